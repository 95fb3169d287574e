"""``feclip-data``: write the synthetic sets, check a dataset's ground truth, download a benchmark.

Usage::

    feclip-data synth ROOT [--seed 0] [--n-train-good 10] [--n-test-good 12] [--n-test-bad 24] [--image-size 256]
    feclip-data check ROOT --dataset NAME [--categories a,b] [--decode] [--option key=value]
    feclip-data download NAME --root DATA_ROOT [--dir FOLDER] [--remove-archive]
    feclip-data info [NAME]

Exit status: 0 success; 1 ``check`` found errors, or a download failed; 2 a usage error (unknown
dataset, missing root, wrong layout), printed as one line ``feclip-data: error: ...``; 130 interrupted.
The work is done by library functions: :func:`feclip.data.check.check_dataset`,
:func:`feclip.data.synthetic.make_synthetic`, :func:`feclip.data.download.fetch`; the defaults shown
above are theirs.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

from feclip.apps.common import OneLineParser, one_line, run_app
from feclip.data.catalogue import DATASETS, DEFAULT_DIRS, dataset_info
from feclip.data.check import DEFAULT_LIMIT, DEFAULT_THREADS, check_dataset, format_report
from feclip.data.download import SOURCES, DownloadError, DownloadProgress, describe, fetch, source_table
from feclip.data.listing import list_samples
from feclip.data.sample import natural_key
from feclip.data.synthetic import make_synthetic
from feclip.errors import ConfigError, FEClipError

__all__ = ["PROG", "build_parser", "main"]

PROG = "feclip-data"

#: make_synthetic's parameters: the defaults of ``feclip-data synth``.
_SYNTH = inspect.signature(make_synthetic).parameters


class _CommandParser(OneLineParser):
    """The parser of one sub-command: a usage mistake reads ``feclip-data: error: ...`` like the app's
    own (argparse would start it with ``feclip-data check``), then points at the sub-command's help."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {one_line(message)} (see {self.prog} --help)\n")


def _key_value(text: str) -> tuple[str, str]:
    """``key=value`` of ``--option`` as a pair."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"takes key=value, got {text!r}")
    return key, value


def _cmd_synth(args) -> int:
    sets = make_synthetic(
        args.root,
        seed=args.seed,
        n_train_good=args.n_train_good,
        n_test_good=args.n_test_good,
        n_test_bad=args.n_test_bad,
        image_size=args.image_size,
        force=args.force,
    )
    for set_name, path in sets.items():
        test = list_samples("synthetic", path, "test")
        cats = sorted({s.category for s in test}, key=natural_key)
        bad = sum(s.label for s in test)
        print(f"{set_name}: {path}  ({', '.join(cats)}; test {len(test)} images, {bad} anomalous)")
    return 0


def _cmd_check(args) -> int:
    categories = [c for c in args.categories.split(",") if c] if args.categories else None
    report = check_dataset(
        args.dataset, args.root, categories, decode=args.decode, threads=args.threads, **dict(args.options)
    )
    print(format_report(report, args.limit))
    return 1 if report.errors else 0


def _cmd_download(args) -> int:
    info = dataset_info(args.name)
    if args.name == "synthetic":
        target = Path(args.root).expanduser() / (args.dir or DEFAULT_DIRS["synthetic"])
        sets = make_synthetic(target)
        print(f"synthetic: nothing to download; generated {', '.join(str(p) for p in sets.values())}")
        return 0
    if args.name not in SOURCES:
        raise ConfigError(f"{args.name} is your own data: there is nothing to download")
    source = SOURCES[args.name]
    if source.url is None:
        print(f"{args.name} cannot be downloaded automatically (no public archive). Do this instead:\n")
        print(describe(args.name))
        return 0
    target = fetch(
        source,
        args.root,
        folder=args.dir,
        keep_archive=not args.remove_archive,
        progress=DownloadProgress(args.name),
    )
    try:
        samples = list_samples(args.name, target, "test")
        print(f"{args.name}: ready at {target} ({len(samples)} test images)")
    except FEClipError as err:
        print(f"{args.name}: extracted to {target}, but listing it failed: {err}")
        print(f"expected layout: {info.layout}")
        return 1
    print(f"check it with: {PROG} check {target} --dataset {args.name}")
    return 0


def _cmd_info(args) -> int:
    if args.name is None:
        print(source_table())
    elif args.name in SOURCES:
        print(describe(args.name))
    else:
        print(f"{args.name}: your own data; expected layout: {dataset_info(args.name).layout}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``feclip-data`` parser with its four sub-commands."""
    parser = OneLineParser(
        prog=PROG, description="Datasets for feclip: synthetic data, ground-truth checks, downloads."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    p = sub.add_parser("synth", help="write the two embedded synthetic MVTec-layout sets under ROOT")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--seed", type=int, default=_SYNTH["seed"].default)
    p.add_argument("--n-train-good", type=int, default=_SYNTH["n_train_good"].default)
    p.add_argument("--n-test-good", type=int, default=_SYNTH["n_test_good"].default)
    p.add_argument("--n-test-bad", type=int, default=_SYNTH["n_test_bad"].default)
    p.add_argument("--image-size", type=int, default=_SYNTH["image_size"].default)
    p.add_argument("--force", action="store_true", help="rewrite even if complete")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("check", help="count images per category and split, and sanity-check the masks")
    p.add_argument("root", metavar="ROOT", help="the dataset root, e.g. $DATA_ROOT/mvtec")
    p.add_argument("--dataset", required=True, choices=DATASETS, metavar="NAME", help=", ".join(DATASETS))
    p.add_argument("--categories", default=None, help="comma-separated subset")
    p.add_argument("--decode", action="store_true", help="fully decode every image (slower)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help="list at most this many errors/warnings each"
    )
    p.add_argument(
        "--option",
        dest="options",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="reader option",
    )
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("download", help="download and extract a benchmark (or print the manual steps)")
    p.add_argument("name", metavar="NAME", choices=DATASETS, help=", ".join(DATASETS))
    p.add_argument("--root", required=True, help="DATA_ROOT: the dataset goes to ROOT/<default folder>")
    p.add_argument(
        "--dir",
        default=None,
        metavar="FOLDER",
        help="the folder under ROOT to put it in (default: the dataset's default folder, e.g. mvtec); "
        "a run finds it with the dataset's `dir: FOLDER`",
    )
    p.add_argument("--remove-archive", action="store_true", help="delete the archive after extraction")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("info", help="the dataset source table: folders, licences, download")
    p.add_argument("name", nargs="?", choices=DATASETS, metavar="NAME")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``feclip-data``; returns the exit status (a failed download is 1)."""
    args = build_parser().parse_args(argv)
    return run_app(PROG, lambda: args.func(args), failures={DownloadError: 1})


if __name__ == "__main__":
    sys.exit(main())
