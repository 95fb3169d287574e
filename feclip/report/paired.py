"""Paired differences: is variant A better than variant B by more than seed noise?

For two variants of a study (same backbone) and each (train_dataset, dataset, metric), the per-seed
difference of their macro values over the seeds both have, its mean and a Student-t confidence interval
(:data:`CONFIDENCE`, n - 1 degrees of freedom); the rows of ``paired.csv`` (:data:`PAIRED_COLUMNS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from feclip.report.backbones import _grouped
from feclip.report.orders import _sort_key

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


def _variant_pairs(variants: Sequence[str], baseline: str | None) -> list[tuple[str, str]]:
    """(a, b) pairs, difference a - b: every variant against the baseline, or every pair in order."""
    if baseline is not None and baseline in variants:
        return [(v, baseline) for v in variants if v != baseline]
    return [(a, b) for i, a in enumerate(variants) for b in variants[i + 1 :]]


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
        baseline: compare every variant against this one (in the studies and backbones that have it);
            default every pair.
    """
    rows = []
    cell_keys = ["train_dataset", "dataset", "metric"]
    per_seed = _grouped(per_seed)
    for (study, backbone), sdf in per_seed.groupby(["study", "backbone"], sort=True):
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
                    [
                        study,
                        backbone,
                        train,
                        dataset,
                        metric,
                        a,
                        b,
                        len(diffs),
                        seeds,
                        mean,
                        low,
                        high,
                        verdict,
                    ]
                )
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    if out.empty:
        return out
    return out.sort_values(
        ["study", "backbone", "variant_a", "variant_b", "train_dataset", "dataset", "metric"], key=_sort_key
    )
