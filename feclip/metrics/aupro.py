"""AUPRO: area under the per-region-overlap (PRO) curve up to an FPR limit, in its two published forms.

Regions are the 8-connected components of each ground-truth mask
(``skimage.measure.label(mask, connectivity=2)``); every region of every image weighs the same.
PRO(t) is the mean over all regions of the fraction of the region's pixels with a score above the
threshold t; FPR(t) is the fraction of all normal pixels (of all images, normal images included)
above t. Normal images therefore only enter through the FPR denominator and numerator.

``method="exact"`` (MVTec AD evaluation script, anomalib ``AUPRO``)
    The PRO-vs-FPR curve through every distinct score (pixels with score >= t are positive),
    starting at (0, 0), linearly interpolated at FPR = ``fpr_limit``, integrated with the trapezoid
    rule and divided by ``fpr_limit``. Computed without materialising the curve: a normal pixel at
    rank r (by score, highest first) owns the FPR interval [r, r + 1] / N_neg, over which PRO rises
    linearly from PRO(> s) to PRO(>= s) across its tie group; summed over the normal pixels above the
    limit this is a weighted Mann-Whitney count done with ``searchsorted`` of the anomalous pixels
    into the sorted normal pixels, plus one partial trapezoid for the tie group that straddles the
    limit.

``method="zsad"`` (AnomalyCLIP / APRIL-GAN ``cal_pro_score``, from cflow-ad)
    Thresholds ``np.arange(lo, hi, (hi - lo) / 200)`` over the category's global min and max (numpy
    decides the count: 200, or 201 when the float32 step rounds down), binary map ``map > th``,
    points with FPR < ``fpr_limit`` (strict) kept, their FPRs min-max rescaled to [0, 1],
    ``sklearn.metrics.auc(fpr_rescaled, pro)``. The same numbers as that loop, computed by bucketing
    every pixel into the threshold grid once (``searchsorted``), a per-region histogram of the
    buckets and a reverse cumulative sum, instead of a loop over thresholds x images x regions.
    The grid is built from scalars of the maps' dtype promoted to at least float32 (AnomalyCLIP's maps
    are float32), so float16 maps give the same value as the same numbers stored in float32.

Undefined cases return ``nan`` (never raise):
    - no anomalous pixel in the category (no region), or no normal pixel (FPR undefined);
    - ``zsad`` only, where the reference loop divides by zero or fails: maps constant (max == min, so
      the threshold step is 0), fewer than 2 thresholds with FPR < ``fpr_limit``, or all kept FPRs
      equal (e.g. a map that separates the classes so well that FPR is 0 at every threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.measure import label as _label_components
from sklearn.metrics import auc as _sk_auc

from feclip.errors import ConfigError
from feclip.metrics.pixel import prepare_pixels

__all__ = ["aupro"]

AUPRO_METHODS = ("exact", "zsad")
ZSAD_STEPS = 200
# Largest (thresholds x regions) histogram built at once by the zsad method; more regions are done in blocks.
_MAX_HIST_CELLS = 1 << 22
_NAN = float("nan")


def check_aupro_options(fpr_limit: Any, method: Any) -> float:
    """Validate ``method`` and ``fpr_limit``; returns the limit as a float. Raises ConfigError."""
    if not isinstance(method, str) or method not in AUPRO_METHODS:
        raise ConfigError(
            f"aupro: method must be one of {', '.join(map(repr, AUPRO_METHODS))}; got {method!r}"
        )
    try:
        limit = float(fpr_limit)
    except (TypeError, ValueError):
        limit = _NAN
    if not 0.0 < limit <= 1.0:
        raise ConfigError(f"aupro: fpr_limit must be a number in (0, 1]; got {fpr_limit!r}")
    return limit


@dataclass(frozen=True)
class RegionPixels:
    """A category's pixels split by ground truth, with the region of every anomalous pixel.

    Attributes:
        pos: (P,) scores of the anomalous pixels, sorted ascending.
        pos_region: (P,) int64 index (0..R-1) of the region of each entry of ``pos``.
        region_area: (R,) int64 pixel count of each region.
        neg: (N_neg,) scores of the normal pixels, sorted ascending.
    """

    pos: np.ndarray
    pos_region: np.ndarray
    region_area: np.ndarray
    neg: np.ndarray

    @property
    def n_regions(self) -> int:
        return len(self.region_area)


def region_pixels(masks: Any, maps: Any) -> RegionPixels:
    """Split ``maps`` (N, H, W) by ``masks`` (N, H, W) and label the regions (8-connectivity).

    A 2-D (H, W) pair is taken as one image. Lists of 2-D arrays of different sizes (each map the size
    of its own mask: original-resolution evaluation pooled over categories) give the same result as
    stacking would if the sizes agreed. Memory: one copy of the maps (their dtype) plus one byte per
    pixel, plus O(P) for the anomalous pixels.
    """
    if isinstance(masks, (list, tuple)) and len({np.shape(m) for m in masks}) > 1:
        if not isinstance(maps, (list, tuple)) or len(maps) != len(masks):
            raise ValueError("masks and maps must be lists of the same length when their sizes differ")
        return merge_regions([region_pixels(m, a) for m, a in zip(masks, maps)])
    m, a = prepare_pixels(masks, maps)
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise ValueError(f"masks and maps must be (N, H, W) or (H, W), got shape {m.shape}")
    neg = a[~m]
    neg.sort()
    pos_parts: list[np.ndarray] = []
    region_parts: list[np.ndarray] = []
    area_parts: list[np.ndarray] = []
    offset = 0
    for i in range(m.shape[0]):
        mi = m[i]
        if not mi.any():
            continue
        lab, n = _label_components(mi, connectivity=2, return_num=True)
        area_parts.append(np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64))
        region_parts.append(lab[mi].astype(np.int64) + (offset - 1))
        pos_parts.append(a[i][mi])
        offset += n
    if pos_parts:
        pos = np.concatenate(pos_parts)
        pos_region = np.concatenate(region_parts)
        order = np.argsort(pos, kind="stable")
        pos, pos_region = pos[order], pos_region[order]
        region_area = np.concatenate(area_parts)
    else:
        pos = np.empty(0, dtype=a.dtype)
        pos_region = np.empty(0, dtype=np.int64)
        region_area = np.empty(0, dtype=np.int64)
    return RegionPixels(pos=pos, pos_region=pos_region, region_area=region_area, neg=neg)


def merge_regions(parts: list[RegionPixels]) -> RegionPixels:
    """The :class:`RegionPixels` of several groups of images together (regions renumbered)."""
    offsets = np.cumsum([0] + [len(p.region_area) for p in parts[:-1]])
    pos = np.concatenate([p.pos for p in parts])
    pos_region = np.concatenate([p.pos_region + off for p, off in zip(parts, offsets)])
    order = np.argsort(pos, kind="stable")
    neg = np.concatenate([p.neg for p in parts])
    neg.sort()
    area = np.concatenate([p.region_area for p in parts])
    return RegionPixels(pos=pos[order], pos_region=pos_region[order], region_area=area, neg=neg)


def aupro_exact(rp: RegionPixels, fpr_limit: float) -> float:
    """Exact AUPRO of prepared pixels (see the module docstring); ``nan`` without regions or negatives."""
    n_neg, n_regions = len(rp.neg), rp.n_regions
    if n_neg == 0 or n_regions == 0:
        return _NAN
    neg, pos = rp.neg, rp.pos
    weight = 1.0 / rp.region_area[rp.pos_region]  # PRO weight of each anomalous pixel, times n_regions
    # The tie group of normal pixels that straddles the limit: it holds the normal pixel of descending
    # rank floor(limit * n_neg). Normal pixels scoring above it lie wholly left of the limit.
    rank = min(int(np.floor(fpr_limit * n_neg)), n_neg - 1)
    v = neg[n_neg - 1 - rank]
    n_le = int(np.searchsorted(neg, v, side="right"))  # normal pixels <= v
    n_lt = int(np.searchsorted(neg, v, side="left"))  # normal pixels < v
    # Whole part: sum over normal pixels u > v of (PRO(> u) + PRO(>= u)) / 2 / n_neg, regrouped per
    # anomalous pixel s: its weight times (#{v < u < s} + #{v < u <= s}).
    above_lt = np.maximum(np.searchsorted(neg, pos, side="left").astype(np.int64) - n_le, 0)
    above_le = np.maximum(np.searchsorted(neg, pos, side="right").astype(np.int64) - n_le, 0)
    area = float(np.dot(weight, (above_lt + above_le).astype(np.float64))) / (2.0 * n_neg)
    # Partial trapezoid over the straddling tie group, from f0 to the limit.
    f0, f1 = (n_neg - n_le) / n_neg, (n_neg - n_lt) / n_neg
    x = min(fpr_limit, f1)
    if x > f0:
        g_gt = float(weight[np.searchsorted(pos, v, side="right") :].sum())  # PRO(> v)
        g_ge = float(weight[np.searchsorted(pos, v, side="left") :].sum())  # PRO(>= v)
        g_x = g_gt + (g_ge - g_gt) * (x - f0) / (f1 - f0)
        area += (x - f0) * (g_gt + g_x) / 2.0
    return area / (n_regions * fpr_limit)


def zsad_thresholds(lo: Any, hi: Any, dtype: Any = np.float32) -> np.ndarray:
    """The ``cal_pro_score`` grid: ``np.arange(lo, hi, (hi - lo) / 200)`` on scalars of ``dtype``.

    ``dtype`` is promoted to at least float32. numpy computes the length in that scalar type, which
    gives 200 or 201 thresholds (201 when the rounded step is slightly short), exactly as the loop.
    """
    t = np.dtype(np.promote_types(dtype, np.float32)).type
    lo, hi = t(lo), t(hi)
    return np.arange(lo, hi, (hi - lo) / ZSAD_STEPS)


def _floor_to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest numbers of ``dtype`` <= ``values``: for x of that dtype, x > v  <=>  x > floor(v)."""
    out = values.astype(dtype)
    over = out > values
    out[over] = np.nextafter(out[over], np.array(-np.inf, dtype=dtype))
    return out


def _zsad_pro_sums(rp: RegionPixels, bucket: np.ndarray, n_thresholds: int) -> np.ndarray:
    """(T,) sum over regions of TP(region, th_k) / area(region), for each threshold k."""
    n_regions, width = rp.n_regions, n_thresholds + 1
    block = max(1, _MAX_HIST_CELLS // width)
    if n_regions <= block:
        groups = [(0, n_regions, rp.pos_region, bucket)]
    else:
        order = np.argsort(rp.pos_region, kind="stable")
        region_sorted, bucket_sorted = rp.pos_region[order], bucket[order]
        bounds = np.searchsorted(region_sorted, np.arange(0, n_regions + block, block))
        groups = [
            (lo, min(lo + block, n_regions), region_sorted[a:b], bucket_sorted[a:b])
            for lo, a, b in zip(range(0, n_regions, block), bounds[:-1], bounds[1:])
        ]
    sums = np.zeros(n_thresholds, dtype=np.float64)
    for lo, hi, region, bkt in groups:
        k = hi - lo
        # hist[j, r]: pixels of region lo + r lying in bucket j (above exactly j thresholds).
        hist = np.bincount(bkt * k + (region - lo), minlength=width * k).reshape(width, k)
        # Pixels of a region above threshold k are those in buckets j > k: reverse cumulative sum.
        tp = np.cumsum(hist[::-1], axis=0)[::-1][1:]
        sums += (tp / rp.region_area[lo:hi]).sum(axis=1)
    return sums


def aupro_zsad(rp: RegionPixels, fpr_limit: float) -> float:
    """AnomalyCLIP-style AUPRO of prepared pixels (see the module docstring); ``nan`` when undefined."""
    n_neg, n_regions = len(rp.neg), rp.n_regions
    if n_neg == 0 or n_regions == 0:
        return _NAN
    lo = min(rp.neg[0], rp.pos[0])
    hi = max(rp.neg[-1], rp.pos[-1])
    if not hi > lo:
        return _NAN
    ths = zsad_thresholds(lo, hi, rp.neg.dtype)
    ths_cmp = _floor_to_dtype(ths, rp.neg.dtype)  # same strict comparisons, in the pixels' own dtype
    fp = n_neg - np.searchsorted(rp.neg, ths_cmp, side="right")
    fpr = fp / n_neg
    # An anomalous pixel is above thresholds 0 .. bucket-1 (the thresholds strictly below its score).
    bucket = np.searchsorted(ths_cmp, rp.pos, side="left").astype(np.int64)
    pro = _zsad_pro_sums(rp, bucket, len(ths)) / n_regions
    keep = fpr < fpr_limit
    if np.count_nonzero(keep) < 2:
        return _NAN
    f = fpr[keep]
    f_min, f_max = f.min(), f.max()
    if f_max == f_min:
        return _NAN
    f = (f - f_min) / (f_max - f_min)
    return float(_sk_auc(f, pro[keep]))


def aupro_from_regions(rp: RegionPixels, fpr_limit: float, method: str) -> float:
    """AUPRO of already prepared pixels; options validated by the caller (:func:`check_aupro_options`)."""
    return aupro_exact(rp, fpr_limit) if method == "exact" else aupro_zsad(rp, fpr_limit)


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, method: str = "exact") -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised to [0, 1].

    Args:
        masks: (N, H, W) ground truth of all test images of one category, anomalous where ``> 0``
            (bool, uint8, float ...); all zeros for normal images. (H, W) is taken as one image.
        maps: (N, H, W) anomaly maps, float16/32/64, numpy or torch; higher = more anomalous.
        fpr_limit: upper end of the FPR range, in (0, 1]; 0.3 in every paper.
        method: ``"exact"`` (MVTec / anomalib: exact integral to the limit, divided by it) or
            ``"zsad"`` (AnomalyCLIP ``cal_pro_score``: 200 linear thresholds, FPR < limit rescaled to
            [0, 1]). See the module docstring and docs/metrics.md.

    Returns:
        AUPRO in [0, 1]; ``nan`` for a category without anomalous pixels or without normal pixels,
        and, for ``zsad``, in the cases where the reference loop would divide by zero.

    Raises:
        ConfigError: ``method`` or ``fpr_limit`` out of range.
        ValueError: shapes differ, or the maps hold NaN or infinite values.
    """
    limit = check_aupro_options(fpr_limit, method)
    return aupro_from_regions(region_pixels(masks, maps), limit, method)
