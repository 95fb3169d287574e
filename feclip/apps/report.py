"""``feclip-report``: summarise a results tree into tables, paired comparisons and plots.

    feclip-report [results_dir] [--out DIR] [--paper FILE | --no-paper] [--study-numbers FILE]
                  [--baseline VALUE] [--metrics main|all|m1,m2] [--skip-nan-categories] [--no-plots]

Prints the Markdown summary, then one ``wrote PATH`` line per file written. What is computed and
written: :mod:`feclip.report` (:func:`~feclip.report.write_report`). This module is the command line
only: the options, which paper and study files they name, what is printed, the exit status.

Exit status: 0 the report was written; 2 any problem with the input or the output (a bad option, a
malformed or missing file, an output folder that cannot be written), printed as one line
``feclip-report: error: ...`` with no traceback (an unforeseen ``OSError`` too); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from feclip.apps.common import OneLineParser, fail, run_app
from feclip.errors import FEClipError
from feclip.report import DEFAULT_PAPER, METRIC_ORDER, ReportError, write_report

__all__ = ["PROG", "build_parser", "main"]

PROG = "feclip-report"


def _parse_metrics(text: str | None) -> list[str] | None:
    """``--metrics``: ``main`` (default), ``all`` or a comma-separated list."""
    if text is None or text == "main":
        return None
    if text == "all":
        return list(METRIC_ORDER)
    return [m.strip() for m in text.split(",") if m.strip()]


def build_parser() -> OneLineParser:
    """The ``feclip-report`` argument parser."""
    parser = OneLineParser(
        prog=PROG,
        description="Summarise a results tree: mean ± std over seeds, paper gaps, paired variant differences, plots.",
    )
    parser.add_argument(
        "results_dir",
        nargs="?",
        default="results",
        help="results tree or one study's folder (default: results)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <results_dir>/report)"
    )
    parser.add_argument(
        "--paper", type=Path, default=None, help=f"paper numbers CSV (default: {DEFAULT_PAPER})"
    )
    parser.add_argument("--no-paper", action="store_true", help="no paper columns")
    parser.add_argument(
        "--study-numbers",
        type=Path,
        default=None,
        metavar="FILE",
        help="also compare with a reproduction study's numbers, matched by the variant's taps=<name>, "
        "train and dataset (e.g. feclip/report/paper/study_numbers.csv; default: off)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="VALUE",
        help="paired differences against one value of the studied axis (spread3 or taps=spread3), within "
        "each value of the other axes such as protocol (default: every pair)",
    )
    parser.add_argument(
        "--metrics", default=None, help="table metrics: main (default), all, or a comma-separated list"
    )
    parser.add_argument(
        "--skip-nan-categories",
        action="store_true",
        help="macro over defined categories only (default: nan propagates)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser


def _resolve_paper(args: argparse.Namespace) -> Path | None:
    """The paper file to use: explicit (must exist), the default (skipped with a note when absent), or none."""
    if args.no_paper:
        return None
    if args.paper is not None:
        if not args.paper.exists():
            raise ReportError(f"--paper: paper numbers file {args.paper} does not exist")
        if not args.paper.is_file():
            raise ReportError(f"--paper: {args.paper} is not a file")
        return args.paper
    if not DEFAULT_PAPER.is_file():
        print(f"{PROG}: note: {DEFAULT_PAPER} not found, no paper columns", file=sys.stderr)
        return None
    return DEFAULT_PAPER


def _resolve_study(args: argparse.Namespace) -> Path | None:
    """The study numbers file to use: none unless asked for (then it must exist and be a file)."""
    path = args.study_numbers
    if path is None:
        return None
    if not path.exists():
        raise ReportError(f"--study-numbers: study numbers file {path} does not exist")
    if not path.is_file():
        raise ReportError(f"--study-numbers: {path} is not a file")
    return path


def _run(args: argparse.Namespace) -> int:
    """Write the report the options ask for, print it and the files written; returns 0.

    An ``OSError`` the report's own checks did not foresee is still one line (its type, the file and the
    reason) and exit status 2; a :class:`~feclip.report.ReportError` is left to :func:`run_app`.
    """
    try:
        markdown, written = write_report(
            args.results_dir,
            args.out,
            paper_path=_resolve_paper(args),
            baseline=args.baseline,
            metrics=_parse_metrics(args.metrics),
            skip_nan=args.skip_nan_categories,
            plots=not args.no_plots,
            study_path=_resolve_study(args),
        )
    except FEClipError:
        raise  # one line from run_app, even for the errors that are OSErrors too
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        return fail(PROG, f"{type(err).__name__}{where}: {err.strerror or err}")
    print(markdown)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``feclip-report``: prints the Markdown summary and the files written; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_app(PROG, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
