"""Results tree -> summary tables, paired seed comparisons and plots (``feclip-report``).

Reads every ``<results_dir>/<study>/<variant>/seed=<seed>/metrics.csv`` (the schema of
:mod:`feclip.results`) and writes, into ``--out`` (default ``<results_dir>/report/``):

- ``summary.csv``: tidy, one row per (study, variant, train_dataset, dataset, averaging, metric) with
  the mean and sample std over seeds, the number of seeds, the paper's number and the gap. All numbers
  in this file and in the tables are in percent (points), as papers print them.
- ``summary.md`` / ``summary.tex``: one table per study (rows variant x dataset, cells
  ``91.2 ± 0.3 (5)``), a micro (pooled) table when ``__micro__`` rows exist, and, in the Markdown, the
  paired differences between variants.
- ``paired.csv``: paired differences between the variants of a study over their shared seeds, with a
  95% Student-t confidence interval.
- ``bars_<metric>.png`` (ours vs the paper, per dataset) and ``study_<study>.png`` (mean ± std per
  variant).

Aggregation. Per seed, the dataset value of a metric is the unweighted mean over its categories
(``__micro__`` excluded), as :func:`feclip.metrics.macro_average`: by default one undefined (``nan``)
category makes the seed's value ``nan``, so a broken category is never hidden
(``skip_nan=True`` / ``--skip-nan-categories`` averages the defined ones). Across seeds ``nan``
propagates as well. The std is the sample std (ddof=1), undefined for a single seed.

This module never imports torch (only numpy, pandas, and lazily scipy and matplotlib), so the report
runs on a laptop without the training stack.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from feclip.errors import FEClipError
from feclip.results import COLUMNS, MICRO, atomic_write_text, find_metrics, read_metrics

__all__ = [
    "ReportError",
    "load_results",
    "macro_per_seed",
    "micro_per_seed",
    "aggregate_seeds",
    "load_paper_numbers",
    "summarize",
    "paired_differences",
    "render_markdown",
    "render_latex",
    "write_report",
    "main",
]

PROG = "feclip-report"
#: The columns that identify one cell of a summary table (plus ``averaging``).
KEYS = ["study", "variant", "train_dataset", "dataset", "metric"]
#: Metrics shown in the tables and study plots by default (the ones the paper reports).
MAIN_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro_zsad")
#: Display order of metrics; unknown metrics follow alphabetically.
METRIC_ORDER = (
    "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
    "pixel_aupro", "pixel_aupro_zsad",
)  # fmt: skip
#: Display order of datasets (the paper's); unknown datasets follow alphabetically.
DATASET_ORDER = (
    "mvtec", "visa", "btad", "mpdd", "dagm", "dtd_synthetic", "brainmri", "br35h", "clinicdb", "kvasir",
    "synthetic",
)  # fmt: skip
#: Paper column -> our metric name. The paper's "PRO" follows AnomalyCLIP's evaluation code
#: (200 linear thresholds, points with FPR < 0.3 kept and rescaled), which is our ``pixel_aupro_zsad``; the
#: exact MVTec-style integral (``pixel_aupro``) is a different number.
PAPER_TO_OURS = {
    "image_auroc": "image_auroc",
    "image_ap": "image_ap",
    "pixel_auroc": "pixel_auroc",
    "pixel_aupro": "pixel_aupro_zsad",
}
PAPER_METHOD = "FE-CLIP"
PAPER_SETTING = "zero_shot"
#: The paper's auxiliary (training) dataset for a target: VisA for MVTec AD, MVTec AD otherwise.
PAPER_AUX_FOR_MVTEC = "visa"
PAPER_AUX_DEFAULT = "mvtec"
#: ``train_dataset`` of an evaluation-only run (no training recorded): compared with the paper too.
NO_TRAINING = "none"
DEFAULT_PAPER = Path(__file__).resolve().parent.parent / "results" / "paper" / "paper_numbers.csv"
FLAG = "†"
FLAG_NOTE = "fewer seeds than the other cells"
CONFIDENCE = 0.95
SUMMARY_COLUMNS = [
    "study", "variant", "train_dataset", "dataset", "averaging", "metric", "mean", "std", "n_seeds",
    "paper", "gap", "flagged",
]  # fmt: skip
PAIRED_COLUMNS = [
    "study", "train_dataset", "dataset", "metric", "variant_a", "variant_b", "n_shared", "seeds",
    "mean_diff", "ci_low", "ci_high", "distinguishable",
]  # fmt: skip


class ReportError(FEClipError, ValueError):
    """A results tree or a paper file the report cannot use; the message names the file."""


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------


def _read_one(path: Path) -> pd.DataFrame:
    """One metrics.csv as a DataFrame; any parse problem becomes a :class:`ReportError` naming the file."""
    try:
        rows = read_metrics(path)
    except (OSError, ValueError, TypeError, KeyError, csv.Error) as err:
        detail = str(err).replace(str(path), "").strip(" :") or type(err).__name__
        raise ReportError(f"malformed metrics file {path}: {detail}") from None
    for i, row in enumerate(rows, start=2):
        if None in row or any(row.get(c) is None for c in COLUMNS):
            raise ReportError(f"malformed metrics file {path}: line {i} does not have {len(COLUMNS)} fields")
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["source"] = str(path)
    return frame


def _check_duplicates(df: pd.DataFrame) -> None:
    """Two files holding the same (study, variant, seed, dataset, category, metric) would count twice."""
    key = ["study", "variant", "seed", "train_dataset", "dataset", "category", "metric"]
    dup = df[df.duplicated(key, keep=False)]
    if dup.empty:
        return
    first = dup.iloc[0]
    files = sorted(set(dup[(dup[key] == first[key]).all(axis=1)]["source"]))
    where = " and ".join(files) if len(files) > 1 else f"{files[0]} (twice)"
    raise ReportError(
        f"duplicate results for study={first['study']} variant={first['variant']} seed={first['seed']} "
        f"dataset={first['dataset']} metric={first['metric']} in {where}; keep one copy per run"
    )


def load_results(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every metrics.csv under ``results_dir`` as one long DataFrame (columns of the schema + ``source``).

    Raises:
        ReportError: no metrics.csv under the folder, a malformed file (the message names it), or the
            same run stored twice.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"results folder {results_dir} does not exist")
    paths = find_metrics(results_dir)
    if not paths:
        raise ReportError(f"no metrics.csv under {results_dir}")
    df = pd.concat([_read_one(p) for p in paths], ignore_index=True)
    if df.empty:
        raise ReportError(f"the metrics.csv files under {results_dir} hold no rows")
    for column in ("study", "variant", "train_dataset", "dataset", "category", "metric"):
        df[column] = df[column].astype(str)
    df["value"] = df["value"].astype(float)
    _check_duplicates(df)
    return df


def load_paper_numbers(
    path: str | os.PathLike, method: str = PAPER_METHOD, setting: str = PAPER_SETTING
) -> pd.DataFrame:
    """The paper's numbers for one method and setting, long format: ``dataset, metric, paper`` (percent).

    Reads ``paper_numbers.csv`` (``#`` lines are comments, ``-`` = not reported) and renames the paper's
    columns to our metric names with :data:`PAPER_TO_OURS`; unreported values are dropped.
    """
    try:
        table = pd.read_csv(path, comment="#", na_values=["-"], skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ReportError(f"cannot read paper numbers {path}: {err}") from None
    needed = {"method", "setting", "dataset", *PAPER_TO_OURS}
    missing = sorted(needed - set(table.columns))
    if missing:
        raise ReportError(f"paper numbers {path}: missing columns {missing}")
    rows = table[(table["method"] == method) & (table["setting"] == setting)]
    long = rows.melt(
        id_vars=["dataset"], value_vars=list(PAPER_TO_OURS), var_name="metric", value_name="paper"
    )
    long["metric"] = long["metric"].map(PAPER_TO_OURS)
    try:
        long["paper"] = long["paper"].astype(float)
    except ValueError as err:
        raise ReportError(f"paper numbers {path}: non-numeric value ({err})") from None
    return long.dropna(subset=["paper"]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------


def _nan_propagating_mean(df: pd.DataFrame, by: list[str], skip_nan: bool = False) -> pd.DataFrame:
    """Group mean of ``value``; a group with any ``nan`` is ``nan`` unless ``skip_nan``."""
    grouped = df.groupby(by, sort=False, dropna=False)["value"]
    out = grouped.mean().to_frame("value")
    if not skip_nan:
        any_nan = df["value"].isna().groupby([df[c] for c in by], sort=False, dropna=False).any()
        out.loc[any_nan[any_nan].index, "value"] = np.nan
    return out.reset_index()


def macro_per_seed(df: pd.DataFrame, skip_nan: bool = False) -> pd.DataFrame:
    """The dataset value of each metric per seed: unweighted mean over categories, ``__micro__`` excluded.

    Returns columns ``KEYS + [seed, value]`` (fractions). With ``skip_nan=False`` one ``nan`` category
    makes the value ``nan`` (as :func:`feclip.metrics.macro_average`).
    """
    categories = df[df["category"] != MICRO]
    return _nan_propagating_mean(categories, KEYS + ["seed"], skip_nan)


def micro_per_seed(df: pd.DataFrame) -> pd.DataFrame:
    """The pooled (``__micro__``) value of each metric per seed; empty when no run wrote micro rows."""
    micro = df[df["category"] == MICRO]
    return micro[KEYS + ["seed", "value"]].reset_index(drop=True)


def aggregate_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and count over seeds per :data:`KEYS` cell (fractions).

    ``nan`` propagates: one undefined seed makes mean and std ``nan``. One seed gives std ``nan``.
    """
    if per_seed.empty:
        return pd.DataFrame(columns=KEYS + ["mean", "std", "n_seeds"])
    grouped = per_seed.groupby(KEYS, sort=False)["value"]
    out = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n_seeds": grouped.size()})
    any_nan = grouped.apply(lambda s: bool(s.isna().any()))
    out.loc[any_nan, ["mean", "std"]] = np.nan
    return out.reset_index()


def paper_train_dataset(dataset: str) -> str:
    """The paper's auxiliary training set for a target dataset."""
    return PAPER_AUX_FOR_MVTEC if dataset == "mvtec" else PAPER_AUX_DEFAULT


def _attach_paper(summary: pd.DataFrame, paper: pd.DataFrame | None) -> pd.DataFrame:
    """Add ``paper`` and ``gap`` (ours - paper, points) to macro rows that follow the paper's protocol.

    A row trained on another auxiliary dataset than the paper's gets no paper number (the comparison
    would mislead); evaluation-only rows (``train_dataset == "none"``) do get one.
    """
    summary = summary.copy()
    summary["paper"] = np.nan
    if paper is not None and not paper.empty:
        lookup = {(d, m): v for d, m, v in paper[["dataset", "metric", "paper"]].itertuples(index=False)}
        protocol = summary["train_dataset"].isin([NO_TRAINING]) | (
            summary["train_dataset"] == summary["dataset"].map(paper_train_dataset)
        )
        eligible = protocol & (summary["averaging"] == "macro")
        summary.loc[eligible, "paper"] = [
            lookup.get((d, m), np.nan)
            for d, m in summary.loc[eligible, ["dataset", "metric"]].itertuples(index=False)
        ]
    summary["gap"] = summary["mean"] - summary["paper"]
    return summary


def _mode_count(counts: pd.Series) -> int:
    """The most common seed count (the larger on a tie)."""
    freq = counts.value_counts()
    return int(max(freq[freq == freq.max()].index))


def _flag_fewer_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """``flagged`` = the cell has fewer seeds than the most common count of its table (study x averaging)."""
    summary = summary.copy()
    typical = summary.groupby(["study", "averaging"])["n_seeds"].transform(_mode_count)
    summary["flagged"] = summary["n_seeds"] < typical
    return summary


def _sort_key(column: pd.Series) -> pd.Series:
    """Sort datasets and metrics in display order, everything else alphabetically."""
    orders = {"dataset": DATASET_ORDER, "metric": METRIC_ORDER, "averaging": ("macro", "micro")}
    if column.name in orders:
        rank = {name: i for i, name in enumerate(orders[column.name])}
        return column.map(lambda v: (rank.get(v, len(rank)), str(v)))
    return column.map(str)


def summarize(df: pd.DataFrame, paper: pd.DataFrame | None = None, skip_nan: bool = False) -> pd.DataFrame:
    """The tidy summary (columns :data:`SUMMARY_COLUMNS`, numbers in percent).

    Args:
        df: rows of :func:`load_results`.
        paper: :func:`load_paper_numbers` output (percent), or ``None``.
        skip_nan: average only the defined categories of a seed.
    """
    parts = []
    for averaging, per_seed in (("macro", macro_per_seed(df, skip_nan)), ("micro", micro_per_seed(df))):
        if not per_seed.empty:
            parts.append(aggregate_seeds(per_seed).assign(averaging=averaging))
    summary = pd.concat(parts, ignore_index=True)
    summary[["mean", "std"]] = summary[["mean", "std"]].astype(float) * 100.0
    summary["n_seeds"] = summary["n_seeds"].astype(int)
    summary = _flag_fewer_seeds(_attach_paper(summary, paper))
    order = ["study", "averaging", "variant", "train_dataset", "dataset", "metric"]
    return summary.sort_values(order, key=_sort_key).reset_index(drop=True)[SUMMARY_COLUMNS]


# ---------------------------------------------------------------------------------------------------
# paired differences
# ---------------------------------------------------------------------------------------------------


def paired_ci(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t confidence interval (n - 1 degrees of freedom).

    Returns ``(mean, low, high)``; ``low`` and ``high`` are ``nan`` with fewer than two differences.
    """
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def _variant_pairs(variants: Sequence[str], baseline: str | None) -> list[tuple[str, str]]:
    """(a, b) pairs, difference a - b: every variant against the baseline, or every pair in order."""
    if baseline is not None and baseline in variants:
        return [(v, baseline) for v in variants if v != baseline]
    return [(a, b) for i, a in enumerate(variants) for b in variants[i + 1 :]]


def paired_differences(
    per_seed: pd.DataFrame, baseline: str | None = None, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """Paired differences between the variants of each study over their shared seeds (points).

    For a pair (a, b) and each (train_dataset, dataset, metric): the per-seed difference of the macro
    values a - b on the seeds both have, its mean, and a Student-t CI. ``distinguishable`` is ``True``
    when the CI excludes 0, ``None`` when the CI is undefined (< 2 shared seeds).

    Args:
        per_seed: :func:`macro_per_seed` output (fractions).
        baseline: compare every variant against this one (in the studies that have it); default every pair.
    """
    rows = []
    cell_keys = ["train_dataset", "dataset", "metric"]
    for study, sdf in per_seed.groupby("study", sort=True):
        by_variant = {v: g[cell_keys + ["seed", "value"]] for v, g in sdf.groupby("variant")}
        for a, b in _variant_pairs(sorted(by_variant), baseline):
            # inner join: the seeds both variants have; a nan value stays nan (and so does the mean)
            both = by_variant[a].merge(by_variant[b], on=cell_keys + ["seed"], suffixes=("_a", "_b"))
            for (train, dataset, metric), cell in both.groupby(cell_keys, sort=False):
                cell = cell.sort_values("seed")
                diffs = (cell["value_a"] - cell["value_b"]).to_numpy() * 100.0
                mean, low, high = paired_ci(diffs, confidence)
                seeds = ";".join(map(str, cell["seed"]))
                verdict = None if math.isnan(low) else bool(low > 0 or high < 0)
                rows.append(
                    [study, train, dataset, metric, a, b, len(diffs), seeds, mean, low, high, verdict]
                )
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    if out.empty:
        return out
    return out.sort_values(
        ["study", "variant_a", "variant_b", "train_dataset", "dataset", "metric"], key=_sort_key
    )


# ---------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------

DASH = "–"


def _num(value: float, digits: int = 1) -> str:
    """A number with fixed decimals; ``nan`` shown as a dash."""
    return DASH if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 1) -> str:
    """A signed number (``+0.4``, ``−0.4`` with a minus sign); ``nan`` shown as a dash."""
    if value is None or math.isnan(value):
        return DASH
    text = f"{value:+.{digits}f}"
    return text.replace("-", "−")


def format_cell(mean: float, std: float, n: int, flagged: bool = False) -> str:
    """``91.2 ± 0.3 (5)``; std ``–`` for one seed, mean ``nan`` when undefined, ``†`` when flagged."""
    mean_text = "nan" if math.isnan(mean) else f"{mean:.1f}"
    return f"{mean_text} ± {_num(std)} ({n})" + (FLAG if flagged else "")


def format_paired(mean: float, low: float, high: float, n: int, distinguishable: bool | None) -> str:
    """``+0.40 [+0.10, +0.70] (5)``; ``[n/a]`` without a CI; wrapped in ``**`` when the CI excludes 0."""
    ci = "[n/a]" if distinguishable is None else f"[{_signed(low, 2)}, {_signed(high, 2)}]"
    text = f"{_signed(mean, 2)} {ci} ({n})"
    return f"**{text}**" if distinguishable else text


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """Unique values in display order (known names first, the rest alphabetically)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), v))


def _summary_table(cells: pd.DataFrame, metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one study table: rows variant x dataset, a cell per metric (+ paper, gap)."""
    metrics = [m for m in metrics if m in set(cells["metric"])]
    with_paper = [m for m in metrics if cells.loc[cells["metric"] == m, "paper"].notna().any()]
    header = ["variant", "train", "dataset"]
    for m in metrics:
        header += [m] + (["paper", "gap"] if m in with_paper else [])
    rows = []
    index = cells.set_index(["variant", "train_dataset", "dataset", "metric"])
    for (variant, train, dataset), _ in cells.groupby(["variant", "train_dataset", "dataset"], sort=False):
        row = [variant, train, dataset]
        for m in metrics:
            key = (variant, train, dataset, m)
            cell = index.loc[key] if key in index.index else None
            row.append(
                ""
                if cell is None
                else format_cell(cell["mean"], cell["std"], cell["n_seeds"], cell["flagged"])
            )
            if m in with_paper:
                row += ["", ""] if cell is None else [_num(cell["paper"]), _signed(cell["gap"])]
        rows.append(row)
    return header, rows


def _paired_table(pairs: pd.DataFrame, metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one study's paired table: rows pair x dataset, a cell per metric."""
    metrics = [m for m in metrics if m in set(pairs["metric"])]
    header = ["A − B", "train", "dataset"] + list(metrics)
    rows = []
    index = pairs.set_index(["variant_a", "variant_b", "train_dataset", "dataset", "metric"])
    for (a, b, train, dataset), _ in pairs.groupby(
        ["variant_a", "variant_b", "train_dataset", "dataset"], sort=False
    ):
        row = [f"{a} − {b}", train, dataset]
        for m in metrics:
            key = (a, b, train, dataset, m)
            if key not in index.index:
                row.append("")
                continue
            p = index.loc[key]
            row.append(
                format_paired(p["mean_diff"], p["ci_low"], p["ci_high"], p["n_shared"], p["distinguishable"])
            )
        rows.append(row)
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    align = ["---" if i < 3 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(r) + " |" for r in [list(header), align, *rows]]
    return "\n".join(lines)


def _typical_seeds(cells: pd.DataFrame) -> int:
    return _mode_count(cells["n_seeds"]) if not cells.empty else 0


def _table_notes(cells: pd.DataFrame, paper_label: str | None) -> list[str]:
    """Footnotes under a summary table: the seed flag and the paper/gap legend."""
    notes = []
    if cells["flagged"].any():
        notes.append(f"{FLAG} {FLAG_NOTE} (most cells have {_typical_seeds(cells)}).")
    if cells["paper"].notna().any() and paper_label:
        notes.append(f"paper: {paper_label}; gap = ours − paper, in points.")
    return notes


def _study_metrics(cells: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    """The requested metrics present in a table; the main ones by default (all when none of them is present)."""
    present = _ordered(cells["metric"], METRIC_ORDER)
    if metrics is None:
        main = [m for m in present if m in MAIN_METRICS]
        return main or present
    return [m for m in metrics if m in present]


def render_markdown(
    summary: pd.DataFrame,
    paired: pd.DataFrame | None = None,
    metrics: Sequence[str] | None = None,
    title: str = "FE-CLIP results",
    paper_label: str | None = f"{PAPER_METHOD} {PAPER_SETTING}",
) -> str:
    """The Markdown report: per study a macro table, a micro table when present and the paired table."""
    out = [
        f"# {title}",
        "",
        "Percent; mean ± sample std over seeds (number of seeds); per seed, macro = unweighted mean over "
        "the dataset's categories.",
    ]
    for study in sorted(summary["study"].unique()):
        out += ["", f"## Study `{study}`"]
        for averaging, label in (("macro", "macro (paper protocol)"), ("micro", "micro (pooled, ablation)")):
            cells = summary[(summary["study"] == study) & (summary["averaging"] == averaging)]
            if cells.empty:
                continue
            header, rows = _summary_table(cells, _study_metrics(cells, metrics))
            out += ["", f"### {label.capitalize()}", "", _markdown_table(header, rows)]
            notes = _table_notes(cells, paper_label)
            out += [""] + notes if notes else []
        pairs = paired[paired["study"] == study] if paired is not None and not paired.empty else None
        if pairs is not None and not pairs.empty:
            header, rows = _paired_table(pairs, _study_metrics(pairs, metrics))
            out += [
                "",
                "### Paired differences",
                "",
                f"Cells: A − B in points, the mean of the per-seed differences over the seeds both share "
                f"[{CONFIDENCE:.0%} CI, Student t, n−1 dof] (n shared seeds). **Bold**: the CI excludes 0, "
                "the difference is distinguishable from seed noise; n/a: fewer than 2 shared seeds.",
                "",
                _markdown_table(header, rows),
            ]
    return "\n".join(out) + "\n"


_TEX_REPLACEMENTS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$",
    "–": "--", "−": "$-$",
}  # fmt: skip


def _tex(text: str) -> str:
    """Escape a cell for LaTeX (and typeset ±, †, dashes and minus signs)."""
    return "".join(_TEX_REPLACEMENTS.get(ch, ch) for ch in str(text))


def _latex_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], caption: str, notes: Sequence[str]
) -> str:
    """A booktabs tabular with a comment line naming it and the notes as a last row."""
    spec = "lll" + "r" * (len(header) - 3)
    lines = [
        f"% {caption}",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(map(_tex, header)) + r" \\",
    ]
    lines.append(r"\midrule")
    lines += [" & ".join(map(_tex, row)) + r" \\" for row in rows]
    lines.append(r"\bottomrule")
    lines += [f"\\multicolumn{{{len(header)}}}{{l}}{{\\footnotesize {_tex(n)}}} \\\\" for n in notes]
    lines.append(r"\end{tabular}")
    return "\n".join(lines)


def render_latex(
    summary: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    paper_label: str | None = f"{PAPER_METHOD} {PAPER_SETTING}",
) -> str:
    """The summary tables as LaTeX tabulars (booktabs), one per study and averaging."""
    blocks = [
        "% feclip-report: percent, mean +- sample std over seeds (n seeds). Needs \\usepackage{booktabs}."
    ]
    for study in sorted(summary["study"].unique()):
        for averaging in ("macro", "micro"):
            cells = summary[(summary["study"] == study) & (summary["averaging"] == averaging)]
            if cells.empty:
                continue
            header, rows = _summary_table(cells, _study_metrics(cells, metrics))
            blocks.append(
                _latex_table(header, rows, f"study {study}, {averaging}", _table_notes(cells, paper_label))
            )
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, so no global backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path) -> Path:
    """Render to PNG in memory, then write atomically (temporary name + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def _safe_name(name: str) -> str:
    """A file-name-safe version of a study or metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_paper_bars(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One PNG per metric with paper numbers: per dataset, bars of each study/variant (± std) and the paper."""
    cells = summary[(summary["averaging"] == "macro") & summary["paper"].notna()]
    written = []
    for metric in _ordered(cells["metric"], METRIC_ORDER):
        sub = cells[cells["metric"] == metric]
        datasets = _ordered(sub["dataset"], DATASET_ORDER)
        series = sorted(set(zip(sub["study"], sub["variant"], sub["train_dataset"])))
        width = 0.8 / (len(series) + 1)
        fig = _new_figure(max(5.0, 1.2 * len(datasets) * (len(series) + 1) ** 0.5 + 2), 4.0)
        ax = fig.add_subplot()
        x = np.arange(len(datasets))
        paper = sub.groupby("dataset")["paper"].first()
        ax.bar(x, [paper.get(d, np.nan) for d in datasets], width, label="paper", color="0.6")
        for i, (study, variant, train) in enumerate(series, start=1):
            s = sub[(sub["study"] == study) & (sub["variant"] == variant) & (sub["train_dataset"] == train)]
            s = s.set_index("dataset").reindex(datasets)
            label = f"{study}/{variant} (train {train})"
            ax.bar(x + i * width, s["mean"], width, yerr=s["std"].fillna(0.0), capsize=3, label=label)
        ax.set_xticks(x + width * len(series) / 2, datasets)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric}: ours (mean ± std over seeds) vs paper")
        _set_ylim(ax, np.r_[sub["mean"].to_numpy(), sub["paper"].to_numpy()])
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        written.append(_save_png(fig, out_dir / f"bars_{_safe_name(metric)}.png"))
    return written


def _set_ylim(ax, values: np.ndarray) -> None:
    """Zoom the y axis on the data (bars from 0 would hide the differences that matter)."""
    finite = values[np.isfinite(values)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        pad = max(1.0, 0.15 * (high - low))
        ax.set_ylim(max(0.0, low - 3 * pad), min(100.0, high + pad) if high <= 100 else high + pad)


def plot_studies(summary: pd.DataFrame, out_dir: Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """One PNG per study: a panel per (train, dataset), x = variants, mean ± std per metric."""
    written = []
    macro = summary[summary["averaging"] == "macro"]
    for study in sorted(macro["study"].unique()):
        cells = macro[macro["study"] == study]
        shown = _study_metrics(cells, metrics)
        cells = cells[cells["metric"].isin(shown)]
        panels = list(dict.fromkeys(zip(cells["train_dataset"], cells["dataset"])))
        ncols = min(len(panels), 3)
        nrows = math.ceil(len(panels) / ncols)
        most = cells.groupby(["train_dataset", "dataset"])["variant"].nunique().max()
        fig = _new_figure(max(4.5, 0.6 * most + 2) * ncols, 3.8 * nrows)
        fig.set_layout_engine("constrained")
        offsets = np.linspace(-0.2, 0.2, len(shown)) if len(shown) > 1 else [0.0]
        for k, (train, dataset) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            panel = cells[(cells["train_dataset"] == train) & (cells["dataset"] == dataset)]
            variants = sorted(panel["variant"].unique())
            x = np.arange(len(variants))
            for metric, dx in zip(shown, offsets):
                s = panel[panel["metric"] == metric].set_index("variant").reindex(variants)
                ax.errorbar(x + dx, s["mean"], yerr=s["std"].fillna(0.0), fmt="o", capsize=3, label=metric)
            tilt = len(variants) > 3
            ax.set_xticks(x, variants, rotation=45 if tilt else 0, ha="right" if tilt else "center")
            ax.set_xlim(-0.5, len(variants) - 0.5)
            ax.set_title(f"{dataset} (train {train})")
            ax.set_ylabel("%")
            ax.grid(axis="y", alpha=0.3)
            if k == 0:
                ax.legend(fontsize="small")
        fig.suptitle(f"study {study}: mean ± std over seeds")
        written.append(_save_png(fig, out_dir / f"study_{_safe_name(study)}.png"))
    return written


# ---------------------------------------------------------------------------------------------------
# the whole report
# ---------------------------------------------------------------------------------------------------


def _csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n", na_rep="nan")


def write_report(
    results_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    paper_path: str | os.PathLike | None = DEFAULT_PAPER,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    skip_nan: bool = False,
    plots: bool = True,
) -> tuple[str, list[Path]]:
    """Build every output of the report; returns the Markdown summary and the paths written.

    Args:
        results_dir: the results tree (or one study's folder of it).
        out_dir: where to write; default ``<results_dir>/report``.
        paper_path: the paper's ``paper_numbers.csv``, or ``None`` for no comparison.
        baseline: compare every variant of a study against this one (default: every pair).
        metrics: metrics of the tables and study plots (default :data:`MAIN_METRICS`); the CSVs hold all.
        skip_nan: average only the defined categories of a seed.
        plots: write the PNGs.
    """
    df = load_results(results_dir)
    if baseline is not None and baseline not in set(df["variant"]):
        variants = ", ".join(sorted(df["variant"].unique()))
        raise ReportError(f"--baseline {baseline!r} is not a variant in {results_dir} (variants: {variants})")
    paper = load_paper_numbers(paper_path) if paper_path is not None else None
    out_dir = Path(out_dir) if out_dir is not None else Path(results_dir) / "report"
    summary = summarize(df, paper, skip_nan)
    paired = paired_differences(macro_per_seed(df, skip_nan), baseline)
    markdown = render_markdown(summary, paired, metrics)
    written = [
        atomic_write_text(out_dir / "summary.csv", _csv_text(summary)),
        atomic_write_text(out_dir / "paired.csv", _csv_text(paired.reindex(columns=PAIRED_COLUMNS))),
        atomic_write_text(out_dir / "summary.md", markdown),
        atomic_write_text(out_dir / "summary.tex", render_latex(summary, metrics)),
    ]
    if plots:
        written += plot_paper_bars(summary, out_dir) + plot_studies(summary, out_dir, metrics)
    return markdown, written


def _parse_metrics(text: str | None) -> list[str] | None:
    """``--metrics``: ``main`` (default), ``all`` or a comma-separated list."""
    if text is None or text == "main":
        return None
    if text == "all":
        return list(METRIC_ORDER)
    return [m.strip() for m in text.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``feclip-report`` argument parser."""
    parser = argparse.ArgumentParser(
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
        "--baseline", default=None, help="paired differences against this variant only (default: every pair)"
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
        if not args.paper.is_file():
            raise ReportError(f"paper numbers file {args.paper} does not exist")
        return args.paper
    if not DEFAULT_PAPER.is_file():
        print(f"{PROG}: note: {DEFAULT_PAPER} not found, no paper columns", file=sys.stderr)
        return None
    return DEFAULT_PAPER


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``feclip-report``: prints the Markdown summary and the files written; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        markdown, written = write_report(
            args.results_dir,
            args.out,
            paper_path=_resolve_paper(args),
            baseline=args.baseline,
            metrics=_parse_metrics(args.metrics),
            skip_nan=args.skip_nan_categories,
            plots=not args.no_plots,
        )
    except FEClipError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(markdown)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
