"""Writing a report: every output built in memory first, then written into the folder all or nothing.

:func:`write_report` is what ``feclip-report`` does: read, summarise, render, plot, write. Its files
go through :func:`_write_files`, a transaction over several files: each is staged in full under a
unique temporary name (:func:`feclip.fileio.unique_tmp`) and pushed to the disk, and only when every
one is staged are they renamed over the old ones. One file alone would be
:func:`feclip.fileio.atomic_write`; a report must not become half old and half new, so a failure while
staging (bad input, a read-only folder, a full disk) leaves a previous report untouched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from feclip.fileio import unique_tmp
from feclip.report.aggregate import macro_per_seed, summarize
from feclip.report.errors import ReportError
from feclip.report.load import load_results
from feclip.report.orders import METRIC_ORDER, _ordered
from feclip.report.paired import paired_differences
from feclip.report.plots import render_paper_bars, render_studies
from feclip.report.references import DEFAULT_PAPER, load_published_numbers, load_study_numbers
from feclip.report.render import _study_label, render_latex, render_markdown

__all__ = ["plot_paper_bars", "plot_studies", "write_report"]


def _why(err: OSError) -> str:
    """The reason an ``OSError`` gives (its ``strerror``), for a one-line message."""
    return err.strerror or str(err)


def _check_out_dir(out_dir: Path) -> None:
    """Fail early (before any work) on an output folder that is a file or cannot be written."""
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ReportError(f"output folder {out_dir}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ReportError(
                    f"output folder {out_dir}: {parent} is not writable (choose another with --out)"
                )
            return


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a new file and push it to the disk (it is renamed over the old one only afterwards)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_files(out_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Write every file of ``files`` into ``out_dir`` all or nothing, as far as a file system allows.

    Every file is first written in full under a temporary name; only when all are written are they
    renamed over the old ones. A failure while writing (read-only folder, full disk) removes the
    temporary files and leaves the folder as it was; a rename, which replaces a file in one step, leaves
    each file either old or new, never half-written.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ReportError(f"output folder {out_dir} is a file, not a folder") from None
    except OSError as err:
        raise ReportError(f"cannot create output folder {out_dir}: {_why(err)}") from None
    targets = [out_dir / name for name in files]
    for target in targets:
        if target.is_dir():
            raise ReportError(f"cannot write {target}: it is a folder")
    staged: list[tuple[Path, Path]] = []
    try:
        for target, data in zip(targets, files.values()):
            tmp = unique_tmp(target)
            staged.append((tmp, target))
            _write_bytes(tmp, data)
    except OSError as err:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise ReportError(
            f"cannot write {staged[-1][1]}: {_why(err)}; the files already in {out_dir} were left as they were"
        ) from None
    for i, (tmp, target) in enumerate(staged):
        try:
            os.replace(tmp, target)
        except OSError as err:
            for rest, _ in staged[i:]:
                rest.unlink(missing_ok=True)
            raise ReportError(f"cannot replace {target}: {_why(err)}") from None
    return targets


def _csv_text(frame: pd.DataFrame) -> str:
    """``frame`` as CSV text: no index, ``\\n`` line ends, ``nan`` for a missing value."""
    return frame.to_csv(index=False, lineterminator="\n", na_rep="nan")


def write_report(
    results_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    paper_path: str | os.PathLike | None = DEFAULT_PAPER,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    skip_nan: bool = False,
    plots: bool = True,
    study_path: str | os.PathLike | None = None,
) -> tuple[str, list[Path]]:
    """Build every output of the report; returns the Markdown summary and the paths written.

    Everything is computed in memory first and then written through :func:`_write_files`: a failure
    (bad input, a plot, a read-only folder) leaves a previous report in ``out_dir`` untouched.

    Args:
        results_dir: the results tree (or one study's folder of it).
        out_dir: where to write; default ``<results_dir>/report``.
        paper_path: the paper's ``paper_numbers.csv``, or ``None`` for no comparison. Every method's
            rows are read (:func:`~feclip.report.references.load_published_numbers`): each run is
            compared with its own method's (FE-CLIP or a peer, from its config.yaml or variant name).
        baseline: one value of a study's axis (``spread3``, ``taps=spread3``): every variant against the
            one with this value and the same other axes, within each value of those (default: every
            pair); see :func:`paired_differences`.
        metrics: metrics of the tables and study plots (default :data:`MAIN_METRICS`); the CSVs hold all.
        skip_nan: average only the defined categories of a seed.
        plots: write the PNGs.
        study_path: a reproduction study's ``study_numbers.csv`` (:func:`load_study_numbers`), or ``None``
            (default) for no study columns.

    Raises:
        ReportError: any input or output problem; the message names the file or option.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(results_dir) / "report"
    df = load_results(results_dir)
    if metrics is not None:
        present = set(df["metric"])
        unknown = [m for m in metrics if m not in present and m not in METRIC_ORDER]
        if unknown or not metrics:
            raise ReportError(
                f"--metrics: {', '.join(unknown) or 'none given'} not in {results_dir} "
                f"(metrics: {', '.join(_ordered(present, METRIC_ORDER))})"
            )
    # every method's published numbers: a run of a peer is compared with that peer's row
    paper = load_published_numbers(paper_path) if paper_path is not None else None
    study = load_study_numbers(study_path) if study_path is not None else None
    _check_out_dir(out_dir)
    summary = summarize(df, paper, skip_nan, study)
    try:
        paired = paired_differences(macro_per_seed(df, skip_nan), baseline)
    except ReportError as err:  # the baseline: named as the option that set it
        raise ReportError(f"--{err}") from None
    label = _study_label(study)
    markdown = render_markdown(summary, paired, metrics, study_label=label, published=paper)
    files = {
        "summary.csv": _csv_text(summary).encode(),
        "paired.csv": _csv_text(paired).encode(),
        "summary.md": markdown.encode(),
        "summary.tex": render_latex(summary, metrics, study_label=label, published=paper).encode(),
    }
    if plots:
        files.update(render_paper_bars(summary))
        files.update(render_studies(summary, metrics))
    return markdown, _write_files(out_dir, files)


def plot_paper_bars(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write :func:`render_paper_bars` into ``out_dir`` (atomically); returns the paths."""
    return _write_files(Path(out_dir), render_paper_bars(summary))


def plot_studies(summary: pd.DataFrame, out_dir: Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """Write :func:`render_studies` into ``out_dir`` (atomically); returns the paths."""
    return _write_files(Path(out_dir), render_studies(summary, metrics))
