"""Aggregation: per seed the dataset value of each metric, then mean ± std over seeds, in one summary.

Per seed, the dataset value of a metric is the unweighted mean over its categories (``__micro__``
excluded), as :func:`feclip.metrics.macro_average`: by default one undefined (``nan``) category makes
the seed's value ``nan``, so a broken category is never hidden (``skip_nan=True`` averages the defined
ones). Across seeds ``nan`` propagates as well. The std is the sample std (ddof=1), undefined for a
single seed.

Only rows of the paper's CLIP (:func:`feclip.results.is_paper_backbone`; ``unknown``, the value of
legacy files, is not) whose macro covers exactly the dataset's official categories
(:func:`category_coverage`) are compared with the paper, and the same two rules hold for a reproduction
study's numbers (:mod:`feclip.report.references`). A row is compared with the published number of its
own method (``method``: FE-CLIP or a peer, :func:`feclip.report.load.run_methods`), never another's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from feclip.errors import FEClipError
from feclip.report.backbones import _grouped
from feclip.report.labels import PRO_METRICS, fpr_limit, metric_label, paper_aupro_options
from feclip.report.load import run_methods
from feclip.report.orders import _sort_key
from feclip.report.references import DEFAULT_METHOD, NO_TRAINING, paper_train_dataset, variant_taps
from feclip.results import MICRO, is_paper_backbone

__all__ = [
    "KEYS",
    "SUMMARY_COLUMNS",
    "aggregate_seeds",
    "category_coverage",
    "macro_per_seed",
    "micro_per_seed",
    "official_categories",
    "summarize",
]

#: The columns that identify one cell of a summary table (plus ``averaging``).
KEYS = ["study", "variant", "backbone", "train_dataset", "dataset", "metric"]
#: Why a macro cell with a paper number does not show it (``not_compared``, joined by ``+``).
WHY_BACKBONE = "backbone"  # not the paper's CLIP (random, tiny fallback, another model, unknown)
WHY_INCOMPLETE = "incomplete"  # the macro does not cover the official categories
WHY_PROTOCOL = "protocol"  # trained on another auxiliary dataset than the paper's
WHY_AUPRO = "aupro"  # an AUPRO under other options than the paper's (eval.aupro.* in the variant name)
SUMMARY_COLUMNS = [
    "study", "variant", "method", "backbone", "train_dataset", "dataset", "averaging", "metric", "mean", "std",
    "n_seeds", "categories", "incomplete", "paper", "gap", "not_compared", "study_mean", "study_std",
    "gap_study", "not_compared_study", "flagged", "metric_label",
]  # fmt: skip


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

    Returns columns ``KEYS + [seed, value]`` (fractions; ``backbone`` as :func:`backbone_group`). With
    ``skip_nan=False`` one ``nan`` category makes the value ``nan`` (as
    :func:`feclip.metrics.macro_average`).
    """
    categories = _grouped(df[df["category"] != MICRO])
    return _nan_propagating_mean(categories, KEYS + ["seed"], skip_nan)


def micro_per_seed(df: pd.DataFrame) -> pd.DataFrame:
    """The pooled (``__micro__``) value of each metric per seed; empty when no run wrote micro rows."""
    micro = _grouped(df[df["category"] == MICRO])
    return micro[KEYS + ["seed", "value"]].reset_index(drop=True)


@functools.cache
def official_categories(dataset: str) -> tuple[str, ...] | None:
    """The official category list of a benchmark (:func:`feclip.data.dataset_info`), ``None`` without one.

    Open-ended datasets (``synthetic``, ``folder``, ``meta_json``) and names the registry does not know
    have none. The registry is torch-free (``feclip.data`` loads its torch Dataset lazily).
    """
    from feclip.data import dataset_info

    try:
        categories = dataset_info(dataset).categories
    except FEClipError:
        return None
    return tuple(categories) or None


def _coverage_text(n_official: Sequence[int], n_other: Sequence[int], total: int | None) -> str:
    """``2/15``, ``2-15/15`` (seeds differ), ``15/15 +1 other``; without an official list ``3`` or ``2-3``."""
    low, high = min(n_official), max(n_official)
    text = str(low) if low == high else f"{low}-{high}"
    if total is not None:
        text += f"/{total}"
    if max(n_other) > 0:
        text += f" +{max(n_other)} other"
    return text


def category_coverage(df: pd.DataFrame, skip_nan: bool = False) -> pd.DataFrame:
    """Which categories each macro cell averages, per :data:`KEYS` cell over its seeds.

    Returns ``KEYS + [categories, incomplete]``: ``categories`` is the count of the dataset's official
    categories the runs cover over the official count (``2/15``; a range ``2-15/15`` when the seeds
    differ; ``+k other`` for categories outside the list), or the plain count for datasets without an
    official list. ``incomplete`` is True when a seed's categories are not exactly the official list, or
    when the seeds cover different categories. With ``skip_nan`` only the categories with a value count,
    as only they are averaged.
    """
    rows = _grouped(df[df["category"] != MICRO])
    if rows.empty:
        return pd.DataFrame(columns=KEYS + ["categories", "incomplete"])
    counted = rows["category"].where(rows["value"].notna()) if skip_nan else rows["category"]
    per_seed = counted.groupby([rows[c] for c in KEYS + ["seed"]], sort=False, dropna=False).agg(
        lambda s: frozenset(s.dropna())
    )
    out = []
    for key, sets in per_seed.groupby(level=list(range(len(KEYS))), sort=False):
        dataset = key[KEYS.index("dataset")]
        official = official_categories(dataset)
        sets = list(sets)
        if official is None:
            n_in, n_out, total = [len(s) for s in sets], [0], None
            incomplete = len(set(sets)) > 1
        else:
            reference = frozenset(official)
            n_in = [len(s & reference) for s in sets]
            n_out = [len(s - reference) for s in sets]
            total = len(reference)
            incomplete = any(s != reference for s in sets)
        out.append([*key, _coverage_text(n_in, n_out, total), incomplete])
    return pd.DataFrame(out, columns=KEYS + ["categories", "incomplete"])


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


def _common_reasons(summary: pd.DataFrame) -> dict[str, pd.Series]:
    """Why a row cannot be compared with any reference (paper or study): per reason, the rows it blocks.

    ``backbone``: not the paper's CLIP (:func:`feclip.results.is_paper_backbone`; ``unknown`` is not).
    ``incomplete``: the macro does not cover the dataset's official categories (every seed).
    ``aupro``: an AUPRO computed with other options than the paper's (another FPR limit, normal images
    left out, per-image normalisation: ``eval.aupro.*`` in the variant name).
    """
    return {
        WHY_BACKBONE: ~summary["backbone"].map(is_paper_backbone).astype(bool),
        WHY_INCOMPLETE: summary["incomplete"].astype(bool),
        WHY_AUPRO: summary["metric"].isin(PRO_METRICS)
        & ~summary["variant"].map(paper_aupro_options).astype(bool),
    }


def _compare(
    summary: pd.DataFrame, reported: pd.Series, reasons: dict[str, pd.Series]
) -> tuple[pd.Series, pd.Series]:
    """The reference numbers a summary shows, and why it withholds the others.

    ``reported`` is the reference's number for each row (``nan``: it has none). Only a macro row that no
    reason blocks shows it. Returns the shown numbers (``nan`` elsewhere) and ``not_compared``: for a macro
    row with a reference number that is withheld, the blocking reasons joined by ``+`` (in the order of
    ``reasons``), else empty.
    """
    macro = summary["averaging"] == "macro"
    blocked = pd.concat(reasons, axis=1)
    comparable = macro & ~blocked.any(axis=1)
    shown = reported.where(comparable).astype(float)
    why = pd.Series("", index=summary.index, dtype=object)
    withheld = macro & reported.notna() & ~comparable
    if withheld.any():
        why[withheld] = ["+".join(n for n in reasons if row[n]) for _, row in blocked[withheld].iterrows()]
    return shown, why


def _attach_paper(summary: pd.DataFrame, paper: pd.DataFrame | None) -> pd.DataFrame:
    """Add ``paper``, ``gap`` (ours - paper, points) and ``not_compared`` to the summary.

    A row's paper number is its own method's (``method`` column; ``paper`` from
    :func:`~feclip.report.references.load_published_numbers` has a ``method`` column, one from
    :func:`~feclip.report.references.load_paper_numbers` holds FE-CLIP's numbers only, so a peer's rows get
    none). A macro row gets it only when it is comparable: the paper's backbone
    (:func:`feclip.results.is_paper_backbone`; ``unknown`` is not), a complete macro (the dataset's
    official categories, every seed), and the paper's protocol (the paper's auxiliary training set, or
    evaluation only: ``train_dataset == "none"``). Where the paper has a number but the row is not
    comparable, ``not_compared`` says why (``backbone``, ``incomplete``, ``protocol``, joined by ``+``).
    """
    summary = summary.copy()
    summary["paper"] = np.nan
    summary["not_compared"] = ""
    if paper is not None and not paper.empty and not summary.empty:
        methods = paper["method"] if "method" in paper else pd.Series(DEFAULT_METHOD, index=paper.index)
        lookup = {
            (method, d, m): v
            for method, d, m, v in zip(methods, paper["dataset"], paper["metric"], paper["paper"])
        }
        keys = summary[["method", "dataset", "metric"]].itertuples(index=False)
        reported = pd.Series([lookup.get(tuple(k), np.nan) for k in keys], index=summary.index, dtype=float)
        reasons = _common_reasons(summary)
        reasons[WHY_PROTOCOL] = ~(
            (summary["train_dataset"] == NO_TRAINING)
            | (summary["train_dataset"] == summary["dataset"].map(paper_train_dataset))
        )
        summary["paper"], summary["not_compared"] = _compare(summary, reported, reasons)
    summary["gap"] = summary["mean"] - summary["paper"]
    return summary


def _attach_study(summary: pd.DataFrame, study: pd.DataFrame | None) -> pd.DataFrame:
    """Add ``study_mean``, ``study_std``, ``gap_study`` (ours - study, points) and ``not_compared_study``.

    A row matches a study number by (taps set, train dataset, evaluated dataset, metric); its taps set is
    the ``taps=<name>`` item of its variant name (:func:`variant_taps`), so a variant that names none is
    not matched. A matched row shows the number under the paper's comparability rules less the protocol
    one (the training set is part of the key): macro rows of the paper's backbone with a complete macro.
    Where the study has a number but the row is not comparable, ``not_compared_study`` says why
    (``backbone``, ``incomplete``).
    """
    summary = summary.copy()
    summary["study_mean"] = np.nan
    summary["study_std"] = np.nan
    summary["not_compared_study"] = ""
    if study is not None and not study.empty and not summary.empty:
        columns = ["taps", "train_dataset", "dataset", "metric", "study_mean", "study_std"]
        lookup = {tuple(k): (mean, std) for *k, mean, std in study[columns].itertuples(index=False)}
        taps = summary["variant"].map(variant_taps)
        keys = zip(taps, summary["train_dataset"], summary["dataset"], summary["metric"])
        found = [
            lookup.get(key, (np.nan, np.nan)) if key[0] is not None else (np.nan, np.nan) for key in keys
        ]
        reported = pd.Series([mean for mean, _ in found], index=summary.index, dtype=float)
        std = pd.Series([s for _, s in found], index=summary.index, dtype=float)
        summary["study_mean"], summary["not_compared_study"] = _compare(
            summary, reported, _common_reasons(summary)
        )
        summary["study_std"] = std.where(summary["study_mean"].notna())
    summary["gap_study"] = summary["mean"] - summary["study_mean"]
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


def summarize(
    df: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    skip_nan: bool = False,
    study: pd.DataFrame | None = None,
    methods: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The tidy summary (columns :data:`SUMMARY_COLUMNS`, numbers in percent).

    Args:
        df: rows of :func:`load_results`.
        paper: :func:`load_published_numbers` output (every method's rows: each row is compared with its
            own method's) or :func:`load_paper_numbers` output (FE-CLIP's only), percent; or ``None``.
        skip_nan: average only the defined categories of a seed.
        study: :func:`load_study_numbers` output (percent), or ``None`` (the study columns stay empty).
        methods: the method of each (study, variant), :func:`~feclip.report.load.run_methods` output
            (default: computed from ``df``, which reads each run's config.yaml).
    """
    parts = []
    for averaging, per_seed in (("macro", macro_per_seed(df, skip_nan)), ("micro", micro_per_seed(df))):
        if not per_seed.empty:
            parts.append(aggregate_seeds(per_seed).assign(averaging=averaging))
    if not parts:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    summary = pd.concat(parts, ignore_index=True)
    summary[["mean", "std"]] = summary[["mean", "std"]].astype(float) * 100.0
    summary["n_seeds"] = summary["n_seeds"].astype(int)
    # a micro cell pools the same categories as the macro cell of its run and metric
    summary = summary.merge(category_coverage(df, skip_nan), on=KEYS, how="left")
    summary["categories"] = summary["categories"].fillna("")
    summary["incomplete"] = summary["incomplete"].eq(True)
    methods = run_methods(df) if methods is None else methods
    summary = summary.merge(methods[["study", "variant", "method"]], on=["study", "variant"], how="left")
    summary["method"] = summary["method"].fillna(DEFAULT_METHOD)
    summary = _flag_fewer_seeds(_attach_study(_attach_paper(summary, paper), study))
    # which AUPRO a row holds, with the FPR limit its variant ran with: "PRO (zsad, FPR<0.3)"
    summary["metric_label"] = [
        metric_label(m, [fpr_limit(v)]) for m, v in zip(summary["metric"], summary["variant"])
    ]
    order = ["study", "averaging", "variant", "backbone", "train_dataset", "dataset", "metric"]
    return summary.sort_values(order, key=_sort_key).reset_index(drop=True)[SUMMARY_COLUMNS]
