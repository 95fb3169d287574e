"""The curves behind the metrics: ROC (image or pixel) and PRO vs FPR, made from the same rank counts
and prepared pixels as the numbers, so that a plotted curve is the one the metric integrates.

* :func:`roc_curve`: one vertex pair per distinct positive score (``score >= t`` predicted
  anomalous), ties drawn as diagonal segments, from (0, 0) to (1, 1). Its trapezoidal area is the
  AUROC of :func:`feclip.metrics.image_auroc` / :func:`~feclip.metrics.pixel_auroc` (the
  Mann-Whitney count, ties 1/2), up to float rounding.
* :func:`pro_curve` with ``method="exact"``: the PRO-vs-FPR curve through every distinct score, from
  (0, 0), cut at ``fpr_limit`` with a linearly interpolated last point; its trapezoidal area divided by
  ``fpr_limit`` is :func:`~feclip.metrics.aupro` ``(method="exact")``.
* :func:`pro_curve` with ``method="zsad"``: the points of AnomalyCLIP's 200-threshold grid with
  FPR < ``fpr_limit``, FPR ascending and *not* rescaled; ``aupro(method="zsad")`` is
  ``sklearn.metrics.auc`` of these points after min-max rescaling their FPRs to [0, 1]
  (docs/metrics.md).

Memory: as the metrics (one sorted copy of the scores); the curves hold two points per distinct
anomalous score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from feclip.metrics.aupro import (
    DEFAULT_FPR_LIMIT,
    RegionPixels,
    check_aupro_options,
    region_pixels,
    zsad_points,
)
from feclip.metrics.image import (
    RankCounts,
    as_scores,
    as_targets,
    check_same_shape,
    rank_counts,
    split_sorted,
)

__all__ = ["pro_curve", "pro_curve_from_regions", "roc_curve"]


def _vertices(rc: RankCounts, above: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(negatives, y) at the vertices of a rank curve: (0, 0), then for each distinct positive score
    u_j, highest first, the point just above it (``> u_j``) and the point at it (``>= u_j``), then
    (n_neg, y_total). ``above[k]``: the y of the positives from sorted position ``k`` up (length P + 1,
    ``above[P] = 0``)."""
    n_neg = rc.n_neg
    gt_x = (n_neg - rc.le)[::-1]
    ge_x = (n_neg - rc.lt)[::-1]
    gt_y = above[rc.starts + rc.counts][::-1]
    ge_y = above[rc.starts][::-1]
    u = len(rc.starts)
    x = np.empty(2 * u + 2, dtype=np.float64)
    y = np.empty(2 * u + 2, dtype=np.float64)
    x[0], y[0] = 0.0, 0.0
    x[1:-1:2], x[2:-1:2] = gt_x, ge_x
    y[1:-1:2], y[2:-1:2] = gt_y, ge_y
    x[-1], y[-1] = n_neg, above[0]
    return x, y


def roc_curve(targets: Any, scores: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """ROC curve ``(fpr, tpr)`` of any-shaped targets and scores (flattened: image labels ``(N,)`` or
    masks and maps ``(N, H, W)``), a sample positive when ``score >= t``.

    Vertices: (0, 0); for each distinct positive score u, highest first, (FPR, TPR) of ``score > u``
    then of ``score >= u`` (a tie group of positives and negatives is a diagonal segment); (1, 1).
    Every (FPR, TPR) of a threshold ``score >= t`` lies on the curve. ``None`` when only one class is
    present. Shape: ``(...), (...) -> (P,), (P,)`` with P = 2 * (distinct positive scores) + 2.
    """
    y = as_targets(targets, "targets")
    s = as_scores(scores, "scores")
    check_same_shape(y, s, "targets", "scores")
    rc = rank_counts(*split_sorted(y, s))
    if rc is None:
        return None
    above = np.arange(rc.n_pos, -1, -1, dtype=np.float64)  # positives at sorted position k and up
    fp, tp = _vertices(rc, above)
    return fp / rc.n_neg, tp / rc.n_pos


def pro_curve_from_regions(
    rp: RegionPixels, fpr_limit: float = DEFAULT_FPR_LIMIT, method: str = "exact"
) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`pro_curve` of prepared pixels (:func:`feclip.metrics.aupro.region_pixels`)."""
    limit = check_aupro_options(fpr_limit, method)
    if method == "zsad":
        points = zsad_points(rp)
        if points is None:
            return None
        fpr, pro = points
        keep = fpr < limit
        return fpr[keep][::-1].copy(), pro[keep][::-1].copy()
    n_regions = rp.n_regions
    rc = rank_counts(rp.pos, rp.neg)
    if rc is None or n_regions == 0:
        return None
    weight = 1.0 / rp.region_area[rp.pos_region]  # each anomalous pixel's share of its region
    above = np.zeros(len(rp.pos) + 1, dtype=np.float64)
    above[:-1] = np.cumsum(weight[::-1])[::-1]
    neg, pro = _vertices(rc, above)
    fpr, pro = neg / rc.n_neg, pro / n_regions
    i = int(np.searchsorted(fpr, limit, side="right"))
    if i < len(fpr):  # cut at the limit, interpolating linearly on the segment that crosses it
        f0, f1, p0, p1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        fpr = np.append(fpr[:i], limit)
        pro = np.append(pro[:i], p0 + (p1 - p0) * (limit - f0) / (f1 - f0))
    return fpr, pro


def pro_curve(
    masks: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT, method: str = "exact"
) -> tuple[np.ndarray, np.ndarray] | None:
    """The PRO-vs-FPR curve that :func:`feclip.metrics.aupro` with the same arguments integrates.

    Args:
        masks, maps: ``(N, H, W)`` (or lists of ``(H_i, W_i)`` arrays), as for ``aupro``.
        fpr_limit: the FPR limit, in (0, 1].
        method: ``"exact"``: every vertex of the exact curve (see :func:`roc_curve`, with each anomalous
            pixel weighted by 1 / (its region's area * number of regions)) up to ``fpr_limit``, the
            last point interpolated there; ``aupro = trapezoid(pro, fpr) / fpr_limit``.
            ``"zsad"``: the ``cal_pro_score`` grid points with FPR < ``fpr_limit``, FPR ascending, not
            rescaled (``aupro`` rescales them to [0, 1] before its trapezoid).

    Returns:
        ``(fpr, pro)``, shapes ``(P,), (P,)``; ``None`` without anomalous or normal pixels (and, for
        zsad, for constant maps).
    """
    return pro_curve_from_regions(region_pixels(masks, maps), fpr_limit, method)
