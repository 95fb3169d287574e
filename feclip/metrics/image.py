"""Image-level metrics (AUROC, AP, F1-max) and the exact rank statistics every metric here builds on.

All three metrics are functions of two sorted arrays: the scores of the positives and the scores of
the negatives. :func:`_rank_metrics` computes them from integer counts (``searchsorted`` of the
distinct positive scores into the sorted negatives), so they are exact, handle ties the way
scikit-learn does, and need memory proportional to the number of positives only. The pixel-level
metrics (:mod:`feclip.metrics.pixel`) reuse the same core on the pixels of a category.

Undefined cases: when the targets hold a single class (no positive or no negative, or no sample at
all) every metric returns ``nan`` instead of raising; :func:`feclip.metrics.macro_average` then
propagates or skips it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["image_auroc", "image_ap", "f1_max"]

NAN = float("nan")
# Below this many distinct positive scores, rank_counts searches in one thread.
_MIN_PARALLEL_SEARCH = 1 << 17


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of ``x``: torch tensors via ``.detach().cpu().numpy()`` (bfloat16 -> float32)."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def as_scores(x: Any, name: str) -> np.ndarray:
    """Scores as a floating array (float16/32/64 kept; ints and bools promoted) with finite values only."""
    a = to_numpy(x)
    if a.dtype.kind in "biu":
        a = a.astype(np.promote_types(a.dtype, np.float32))
    elif a.dtype.kind != "f":
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def as_targets(x: Any, name: str) -> np.ndarray:
    """Targets binarised with ``> 0`` (any numeric or bool dtype) as a bool array."""
    a = to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric or bool, got dtype {a.dtype}")
    return a > 0


def check_same_shape(targets: np.ndarray, preds: np.ndarray, tname: str, pname: str) -> None:
    if targets.shape != preds.shape:
        raise ValueError(
            f"{tname} and {pname} must have the same shape, got {targets.shape} and {preds.shape}"
        )


def split_sorted(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive scores, negative scores), each sorted ascending; one copy of ``scores`` in total."""
    flat_t = targets.reshape(-1)
    flat_s = scores.reshape(-1)
    pos = flat_s[flat_t]
    neg = flat_s[~flat_t]
    pos.sort()
    neg.sort()
    return pos, neg


@dataclass(frozen=True)
class RankCounts:
    """The integer counts every rank metric is made of (see :func:`_rank_metrics`).

    Attributes:
        n_pos, n_neg: number of positive and of negative scores.
        starts: (U,) index in the sorted positives of the first of each distinct positive score u_j.
        counts: (U,) int64 number of positives scoring u_j.
        lt, le: (U,) int64 number of negatives scoring < u_j and <= u_j.
    """

    n_pos: int
    n_neg: int
    starts: np.ndarray
    counts: np.ndarray
    lt: np.ndarray
    le: np.ndarray


def rank_counts(pos: np.ndarray, neg: np.ndarray, threads: int = 1) -> RankCounts | None:
    """The :class:`RankCounts` of sorted (ascending) positive and negative scores; ``None`` when either
    is empty. One ``searchsorted`` of the distinct positive scores into the negatives per side, split
    over ``threads`` threads when there are many."""
    n_pos, n_neg = len(pos), len(neg)
    if n_pos == 0 or n_neg == 0:
        return None
    if n_pos > 1:
        starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
    else:
        starts = np.zeros(1, dtype=np.intp)
    u = pos[starts]
    counts = np.diff(np.append(starts, n_pos)).astype(np.int64)
    lt = np.empty(len(u), dtype=np.int64)
    le = np.empty(len(u), dtype=np.int64)

    def search(chunk: slice) -> None:
        lt[chunk] = np.searchsorted(neg, u[chunk], side="left")
        le[chunk] = np.searchsorted(neg, u[chunk], side="right")

    if threads > 1 and len(u) >= _MIN_PARALLEL_SEARCH:
        bounds = np.linspace(0, len(u), threads + 1).astype(np.intp)
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(search, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]))
    else:
        search(slice(None))
    return RankCounts(n_pos, n_neg, starts, counts, lt, le)


def metrics_from_counts(rc: RankCounts | None) -> tuple[float, float, float]:
    """(AUROC, AP, F1-max) from :func:`rank_counts`; ``nan`` for all three when ``rc`` is ``None``."""
    if rc is None:
        return NAN, NAN, NAN
    n_pos, n_neg, starts, counts, lt, le = rc.n_pos, rc.n_neg, rc.starts, rc.counts, rc.lt, rc.le
    # Integer numerator: <= 2 P N, exact in int64 for any realistic pixel count (P N < 4.6e18).
    numerator = int(np.sum(counts * (lt + le)))
    auroc = numerator / (2 * n_pos * n_neg)
    tp = (n_pos - starts).astype(np.float64)  # positives with score >= u_j
    fp = (n_neg - lt).astype(np.float64)  # negatives with score >= u_j
    ap = float(np.sum(counts * (tp / (tp + fp)))) / n_pos
    f1 = float(np.max(2.0 * tp / (tp + fp + n_pos)))
    return auroc, ap, f1


def _rank_metrics(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AP, F1-max) from the sorted (ascending) positive and negative scores.

    With the distinct positive scores u_j (counts c_j), lt_j = #neg < u_j and le_j = #neg <= u_j:

    - AUROC = sum_j c_j (lt_j + le_j) / (2 P N): the Mann-Whitney statistic, ties counting 1/2, which is
      the area under the ROC curve with ties drawn as diagonal segments (what scikit-learn integrates).
    - AP = sum_j (c_j / P) * precision(u_j), precision(u) = #pos >= u / (#pos >= u + #neg >= u): the
      step sum  sum_k (R_k - R_{k-1}) P_k  over all distinct thresholds (recall moves only at u_j).
    - F1-max = max_j 2 tp_j / (tp_j + fp_j + P): for a fixed tp, F1 falls as fp grows, so the best
      threshold of the precision-recall curve is always one of the u_j.
    """
    return metrics_from_counts(rank_counts(pos, neg))


def _image_rank_metrics(labels: Any, scores: Any) -> tuple[float, float, float]:
    y = as_targets(labels, "labels")
    s = as_scores(scores, "scores")
    check_same_shape(y, s, "labels", "scores")
    if y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D (N,), got shape {y.shape}")
    return _rank_metrics(*split_sorted(y, s))


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of per-image scores; equals ``sklearn.metrics.roc_auc_score``.

    Args:
        labels: (N,) image labels, anomalous where ``> 0`` (bool, int or float).
        scores: (N,) anomaly scores, higher = more anomalous (numpy or torch, float16/32/64).

    Returns:
        AUROC in [0, 1], ties counted 1/2; ``nan`` when ``labels`` hold a single class.
    """
    return _image_rank_metrics(labels, scores)[0]


def image_ap(labels: Any, scores: Any) -> float:
    """Average precision of per-image scores; equals ``sklearn.metrics.average_precision_score``.

    AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds, highest first (no interpolation).

    Args:
        labels: (N,) image labels, anomalous where ``> 0``.
        scores: (N,) anomaly scores.

    Returns:
        AP in [0, 1]; ``nan`` when ``labels`` hold a single class.
    """
    return _image_rank_metrics(labels, scores)[1]


def f1_max(labels: Any, scores: Any) -> float:
    """Best F1 over the thresholds of the precision-recall curve: max 2PR / (P + R).

    Equals ``max(2 * p * r / (p + r))`` over ``sklearn.metrics.precision_recall_curve`` points, the
    non-finite values (P = R = 0) ignored.

    Args:
        labels: (N,) image labels, anomalous where ``> 0``.
        scores: (N,) anomaly scores.

    Returns:
        F1-max in (0, 1]; ``nan`` when ``labels`` hold a single class.
    """
    return _image_rank_metrics(labels, scores)[2]
