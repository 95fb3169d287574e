"""Paired differences: is variant A better than variant B by more than seed noise?

For two variants of a study (same backbone) and each (train_dataset, dataset, metric), the per-seed
difference of their macro values over the seeds both have, its mean and a Student-t confidence interval
(:data:`CONFIDENCE`, n - 1 degrees of freedom); the rows of ``paired.csv`` (:data:`PAIRED_COLUMNS`).

By default every pair of variants is compared. A baseline names one value of the axis a study varies
(``spread3``, ``taps=spread3``): each variant is then compared with the baseline variant that shares its
values of every other axis (``protocol``, ...), so a study swept over both training directions gets
both halves, and ``paired.csv`` gets a column per other axis. An evaluation-only variant (a
training-free method) pairs with a trained one on the datasets both evaluate (:func:`_shared_cells`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from feclip.report.backbones import _grouped
from feclip.report.errors import ReportError
from feclip.report.labels import BARE, variant_axes
from feclip.report.orders import _sort_key
from feclip.report.references import NO_TRAINING, _split_overrides

__all__ = ["CONFIDENCE", "PAIRED_COLUMNS", "paired_ci", "paired_differences"]

CONFIDENCE = 0.95
PAIRED_COLUMNS = [
    "study", "backbone", "train_dataset", "dataset", "metric", "variant_a", "variant_b", "n_shared",
    "seeds", "mean_diff", "ci_low", "ci_high", "distinguishable",
]  # fmt: skip


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


def _axis_values(variants: Sequence[str]) -> dict[str, set[str]]:
    """The values of each axis that varies between ``variants`` (a plain name: :data:`BARE`)."""
    axes = [variant_axes(v) for v in variants]
    keys = {k for a in axes for k in a}
    found = {k: {a.get(k) for a in axes} for k in keys}
    return {k: {v for v in values if v is not None} for k, values in found.items() if len(values) > 1}


def _named(key: str, value: str) -> str:
    """``key=value``, or the value alone for a plain name."""
    return f"{key}={value}" if key != BARE else value


def _parse_baseline(baseline: str) -> tuple[str | None, str]:
    """``taps=spread3`` -> (``taps``, ``spread3``); ``spread3`` -> (``None``, ``spread3``).

    Raises:
        ReportError: the baseline names several values (a whole variant name) or is empty.
    """
    items = [item.strip() for item in _split_overrides(str(baseline)) if item.strip()]
    if len(items) != 1:
        raise ReportError(
            f"baseline {baseline!r} names {len(items)} values; name one value of the studied axis "
            "(e.g. spread3 or taps=spread3): each variant is compared with the one that differs from it "
            "only there"
        )
    key, sep, value = items[0].partition("=")
    return (key.strip().lstrip("+~"), value.strip()) if sep else (None, items[0])


def _resolve_in_study(study: str, varying: dict[str, set[str]], key: str | None, value: str):
    """The (axis, value) the baseline names among a study's varying axes; ``None`` when it has none.

    ``key`` may be the full axis name or its last dotted part(s) (``policy=lr_div_100`` for
    ``train.fc_patch.policy``). Raises ReportError when the baseline fits several axes.
    """
    if key is None:
        found = [k for k, values in varying.items() if value in values]
    else:
        found = [k for k in varying if (k == key or k.endswith("." + key)) and value in varying[k]]
    if len(found) > 1:
        options = ", ".join(_named(k, value) for k in sorted(found))
        raise ReportError(f"baseline {value!r} is ambiguous in study {study}: name one of {options}")
    return (found[0], value) if found else None


def _pairs_against(
    variants: Sequence[str], axis: str, value: str, context: Sequence[str]
) -> list[tuple[str, str, dict[str, str]]]:
    """Each variant against the baseline variant with the same values of the ``context`` axes.

    Returns (a, b, context values) with b the baseline; a variant whose context has no baseline variant
    is left out.
    """
    axes = {v: variant_axes(v) for v in variants}

    def where(v: str) -> tuple:
        return tuple(axes[v].get(k, "") for k in context)

    baselines = {where(v): v for v in variants if axes[v].get(axis) == value}
    return [
        (v, baselines[where(v)], dict(zip(context, where(v))))
        for v in variants
        if where(v) in baselines and v != baselines[where(v)]
    ]


def _context_column(key: str) -> str:
    """The paired.csv column of an other axis: its name (``protocol``), prefixed where it would clash."""
    name = key or "name"
    return f"axis:{name}" if name in PAIRED_COLUMNS else name


def _shared_cells(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The (dataset, metric, seed) cells two variants share, with ``value_a``, ``value_b`` and the pair's
    ``train_dataset``.

    An inner join: the seeds both have; a ``nan`` value stays ``nan`` (and so does the mean). The
    training sets must match, except that an evaluation-only variant (``train_dataset`` ``none``: a
    training-free method such as WinCLIP, a saved checkpoint) pairs with a trained one on the same
    evaluated dataset and seeds; the pair's ``train_dataset`` then reads ``none/mvtec`` (A's, then B's).
    """
    both = a.merge(b, on=["dataset", "metric", "seed"], suffixes=("_a", "_b"))
    train_a, train_b = both["train_dataset_a"], both["train_dataset_b"]
    same = train_a == train_b
    keep = same | (train_a == NO_TRAINING) | (train_b == NO_TRAINING)
    both = both[keep].copy()
    both["train_dataset"] = train_a[keep].where(same[keep], train_a[keep] + "/" + train_b[keep])
    return both


def paired_differences(
    per_seed: pd.DataFrame, baseline: str | None = None, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """Paired differences between the variants of each study over their shared seeds (points).

    Variants are paired within one backbone only. For a pair (a, b) and each (train_dataset, dataset,
    metric): the per-seed difference of the macro values a - b on the seeds both have, its mean, and a
    Student-t CI. ``distinguishable`` is ``True`` when the CI excludes 0, ``None`` when the CI is
    undefined (< 2 shared seeds).

    Args:
        per_seed: :func:`macro_per_seed` output (fractions).
        baseline: one value of the axis a study varies, ``spread3`` or ``taps=spread3`` (a plain variant
            name works too). Every variant is compared with the variant that has this value and the same
            values of the study's other axes (``protocol``, ...): the comparison is made within each value
            of the other axes, and the result gets a column per other axis. A study (or backbone) without
            the value falls back to every pair. Default: every pair of variants.

    Raises:
        ReportError: the baseline names several values, fits two axes of one study (ambiguous), or no
            study has it (unknown); the message lists the values it could name.
    """
    rows = []
    cell_keys = ["train_dataset", "dataset", "metric"]
    per_seed = _grouped(per_seed)
    parsed = _parse_baseline(baseline) if baseline is not None else None
    matched, valid = False, set()
    contexts: list[str] = []
    for (study, backbone), sdf in per_seed.groupby(["study", "backbone"], sort=True):
        by_variant = {v: g[cell_keys + ["seed", "value"]] for v, g in sdf.groupby("variant")}
        variants = sorted(by_variant)
        pairs = [(a, b, {}) for i, a in enumerate(variants) for b in variants[i + 1 :]]
        if parsed is not None:
            varying = _axis_values(variants)
            valid.update(_named(k, v) for k, values in varying.items() for v in values)
            found = _resolve_in_study(study, varying, *parsed)
            if found is not None:
                matched = True
                axis, value = found
                context = sorted(k for k in varying if k != axis)
                contexts += [k for k in context if k not in contexts]
                pairs = _pairs_against(variants, axis, value, context)
        for a, b, where in pairs:
            both = _shared_cells(by_variant[a], by_variant[b])
            for (train, dataset, metric), cell in both.groupby(cell_keys, sort=False):
                cell = cell.sort_values("seed")
                diffs = (cell["value_a"] - cell["value_b"]).to_numpy() * 100.0
                mean, low, high = paired_ci(diffs, confidence)
                seeds = ";".join(map(str, cell["seed"]))
                verdict = None if math.isnan(low) else bool(low > 0 or high < 0)
                row = dict(zip(PAIRED_COLUMNS, [study, backbone, train, dataset, metric, a, b, len(diffs)]))
                row.update(seeds=seeds, mean_diff=mean, ci_low=low, ci_high=high, distinguishable=verdict)
                row.update({_context_column(k): v for k, v in where.items()})
                rows.append(row)
    if parsed is not None and not matched:
        listed = ", ".join(sorted(valid)) or "none: no study varies an axis"
        raise ReportError(f"baseline {baseline!r} is not a value of any study's axes (valid: {listed})")
    extra = [_context_column(k) for k in sorted(contexts, key=lambda k: (k != BARE, k))]
    columns = PAIRED_COLUMNS[:2] + extra + PAIRED_COLUMNS[2:]
    out = pd.DataFrame(rows, columns=columns)
    if out.empty:
        return out
    out[extra] = out[extra].fillna("")
    order = ["study", "backbone", *extra, "variant_a", "variant_b", "train_dataset", "dataset", "metric"]
    return out.sort_values(order, key=_sort_key).reset_index(drop=True)
