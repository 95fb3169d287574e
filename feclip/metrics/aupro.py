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

Preparing the pixels (:func:`pixel_group`, shared with the pixel AUROC/AP/F1 by
:func:`feclip.metrics.compute_category_metrics`): one pass over the images copies the normal pixels
into one buffer, sorted in place once, and labels each mask within its bounding box; the anomalous
pixels are ordered by one sort of 64-bit keys (score bits, position) instead of a stable argsort.
Pooled rows (:func:`pool_groups`) merge the categories' sorted pixels and renumber their regions
instead of splitting, sorting and labelling everything again. Every array equals what one stable sort
of all the pixels gives, so the values are the same bit for bit.

Undefined cases return ``nan`` (never raise):
    - no anomalous pixel in the category (no region), or no normal pixel (FPR undefined);
    - ``zsad`` only, where the reference loop divides by zero or fails: maps constant (max == min, so
      the threshold step is 0), fewer than 2 thresholds with FPR < ``fpr_limit``, or all kept FPRs
      equal (e.g. a map that separates the classes so well that FPR is 0 at every threshold).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.measure import label as _label_components
from sklearn.metrics import auc as _sk_auc

from feclip.errors import ConfigError
from feclip.metrics.image import RankCounts, rank_counts
from feclip.metrics.pixel import prepare_pixels
from feclip.metrics.sorting import Sort, host_sort

__all__ = ["aupro"]

AUPRO_METHODS = ("exact", "zsad")
# The defaults of the functions here and of eval.aupro.* (feclip.config.AuproConfig reads them here).
DEFAULT_FPR_LIMIT = 0.3  # every paper's
DEFAULT_METHODS = AUPRO_METHODS  # both variants
ZSAD_STEPS = 200
# Largest (thresholds x regions) histogram built at once by the zsad method; more regions are done in blocks.
_MAX_HIST_CELLS = 1 << 22
_NAN = float("nan")
_LOW32 = np.uint64(0xFFFFFFFF)
_HIGH32 = np.uint64(0xFFFFFFFF00000000)
# Below this many values a merge of sorted runs is not split over threads.
_MIN_PARALLEL_MERGE = 1 << 22


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


def _value_keys(values: np.ndarray) -> np.ndarray | None:
    """uint32 keys ordered as the float16/32 ``values`` (-0.0 and 0.0 equal); ``None`` for other dtypes."""
    if values.dtype not in (np.float16, np.float32):
        return None
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))


def _stable_order(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(``argsort(values, kind="stable")``, the sorted uint64 keys ``value key << 32 | index`` or ``None``).

    For float16/32 values (fewer than 2**32) one sort of unique 64-bit keys, about 3x faster than the
    stable argsort, which other dtypes use. The keys let sorted runs be merged later (:func:`pool_groups`).
    """
    vkeys = _value_keys(values) if len(values) < (1 << 32) else None
    if vkeys is None:
        return np.argsort(values, kind="stable"), None
    keys = (vkeys.astype(np.uint64) << np.uint64(32)) | np.arange(len(values), dtype=np.uint64)
    keys.sort()
    return (keys & _LOW32).astype(np.intp), keys


@dataclass(frozen=True)
class PixelGroup:
    """The :class:`RegionPixels` of a group of images plus what pooling groups needs (:func:`pool_groups`).

    Attributes:
        rp: the group's pixels and regions.
        order: (P,) position of each entry of ``rp.pos`` among the group's anomalous pixels in image
            order (row-major within an image).
        keys: (P,) the sorted uint64 keys of :func:`_stable_order`, or ``None``.
        image_pos: (n_images,) int64 anomalous pixels of each image.
        image_regions: (n_images,) int64 regions of each image.
    """

    rp: RegionPixels
    order: np.ndarray
    keys: np.ndarray | None
    image_pos: np.ndarray
    image_regions: np.ndarray


def pixel_group(
    images: Iterable[tuple[np.ndarray, np.ndarray]], dtype: Any, n_pixels: int, sort: Sort = host_sort
) -> PixelGroup:
    """Split images ``(bool mask (H, W), map (H, W) of dtype)`` by ground truth and label the regions.

    One pass over the images: the normal pixels are copied into one buffer of ``n_pixels`` (at least
    the total pixel count) and sorted in place by ``sort`` (:mod:`feclip.metrics.sorting`); the
    anomalous pixels are ordered as a stable sort of their scores in image order would, with the same
    region numbering as :func:`region_pixels`.
    """
    buf = np.empty(n_pixels, dtype=dtype)
    n_neg = 0
    pos_parts: list[np.ndarray] = []
    region_parts: list[np.ndarray] = []
    area_parts: list[np.ndarray] = []
    image_pos: list[int] = []
    image_regions: list[int] = []
    offset = 0
    for m, a in images:
        flat_a = a.reshape(-1)
        if not m.any():
            buf[n_neg : n_neg + flat_a.size] = flat_a
            n_neg += flat_a.size
            image_pos.append(0)
            image_regions.append(0)
            continue
        # Labelled within the mask's bounding box: the same components, numbered in the same raster
        # order, and the same row-major order of the anomalous pixels as in the whole image.
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        m_box = m[box]
        lab, n = _label_components(m_box, connectivity=2, return_num=True)
        lab_in = lab[m_box]
        area_parts.append(np.bincount(lab_in, minlength=n + 1)[1:].astype(np.int64))
        region_parts.append(lab_in.astype(np.int64) + (offset - 1))
        pos_parts.append(a[box][m_box])
        flat_m = m.reshape(-1)
        k = flat_a.size - len(lab_in)
        buf[n_neg : n_neg + k] = flat_a[~flat_m]
        n_neg += k
        image_pos.append(len(lab_in))
        image_regions.append(n)
        offset += n
    neg = sort(buf[:n_neg])
    if pos_parts:
        pos = np.concatenate(pos_parts)
        order, keys = _stable_order(pos)
        rp = RegionPixels(
            pos=pos[order],
            pos_region=np.concatenate(region_parts)[order],
            region_area=np.concatenate(area_parts),
            neg=neg,
        )
    else:
        order, keys = np.empty(0, dtype=np.intp), None
        rp = RegionPixels(
            pos=np.empty(0, dtype=dtype),
            pos_region=np.empty(0, dtype=np.int64),
            region_area=np.empty(0, dtype=np.int64),
            neg=neg,
        )
    return PixelGroup(
        rp=rp,
        order=order,
        keys=keys,
        image_pos=np.array(image_pos, dtype=np.int64),
        image_regions=np.array(image_regions, dtype=np.int64),
    )


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
    return pixel_group(zip(m, a), a.dtype, a.size).rp


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


def merge_sorted(runs: Sequence[np.ndarray], threads: int = 1, sort: Sort = host_sort) -> np.ndarray:
    """The sorted concatenation of sorted 1-D ``runs`` of one dtype.

    A sort of the concatenation: the runs hold values only (floats, or the unique keys of
    :func:`_stable_order`), so equal entries are interchangeable and numpy's default (SIMD quicksort)
    serves: 2.5x faster than the timsort merge of ``kind="stable"`` on float32, 1.6x on uint64 keys
    (numpy 2.4, 28 M values in 8 runs). With ``threads > 1`` the value range is cut at sampled
    splitters into ``threads`` slices, each sorted by its own thread (numpy releases the GIL).
    Another ``sort`` than :func:`~feclip.metrics.sorting.host_sort` (a GPU's; float runs only) sorts
    the whole concatenation instead.
    """
    dtype = runs[0].dtype if len(runs) else np.float64
    runs = [r for r in runs if len(r)]
    if len(runs) <= 1:
        return runs[0].copy() if runs else np.empty(0, dtype=dtype)
    total = sum(len(r) for r in runs)
    if sort is not host_sort:
        return sort(np.concatenate(runs))
    if threads <= 1 or total < _MIN_PARALLEL_MERGE:
        out = np.concatenate(runs)
        out.sort()
        return out
    stride = max(1, total // (256 * threads))
    sample = np.sort(np.concatenate([r[stride // 2 :: stride] for r in runs]))
    splitters = sample[(np.arange(1, threads) * len(sample)) // threads]
    bounds = [np.concatenate(([0], np.searchsorted(r, splitters, side="left"), [len(r)])) for r in runs]
    sizes = np.sum([np.diff(b) for b in bounds], axis=0)
    starts = np.concatenate(([0], np.cumsum(sizes)))
    out = np.empty(total, dtype=runs[0].dtype)

    def merge_slice(s: int) -> None:
        at = int(starts[s])
        for r, b in zip(runs, bounds):
            piece = r[b[s] : b[s + 1]]
            out[at : at + len(piece)] = piece
            at += len(piece)
        out[starts[s] : starts[s + 1]].sort()

    with ThreadPoolExecutor(max_workers=threads) as ex:
        list(ex.map(merge_slice, range(threads)))
    return out


def pool_groups(
    groups: Sequence[PixelGroup], positions: Sequence[np.ndarray], threads: int = 1, sort: Sort = host_sort
) -> RegionPixels:
    """The :class:`RegionPixels` of disjoint groups of images pooled, equal to :func:`region_pixels` of
    all their images in the pooled order, without sorting or labelling anything again.

    ``positions[g]``: the (increasing) places in the pooled order of the images of ``groups[g]``, which
    together are 0 .. n_images - 1. The normal pixels are merged (:func:`merge_sorted`); the anomalous
    ones too, ties ordered by the pooled image order (the keys of :func:`_stable_order` with the pooled
    index in their low half, or one stable argsort when a group has no keys); regions are renumbered in
    the pooled image order. ``sort``: how the normal pixels are merged (:func:`merge_sorted`).
    """
    n_images = sum(len(p) for p in positions)
    image_pos = np.zeros(n_images, dtype=np.int64)
    image_regions = np.zeros(n_images, dtype=np.int64)
    for g, where in zip(groups, positions):
        image_pos[where] = g.image_pos
        image_regions[where] = g.image_regions
    first_pos = np.cumsum(image_pos) - image_pos  # pooled index of each image's first anomalous pixel
    first_region = np.cumsum(image_regions) - image_regions
    n_pos, n_regions = int(image_pos.sum()), int(image_regions.sum())
    dtype = np.result_type(*[g.rp.pos.dtype for g in groups]) if groups else np.float32
    values = np.empty(n_pos, dtype=dtype)  # pooled image order
    regions = np.empty(n_pos, dtype=np.int64)
    area = np.empty(n_regions, dtype=np.int64)
    with_keys = n_pos < (1 << 32) and all(g.keys is not None for g in groups if len(g.rp.pos))

    def place(k: int) -> np.ndarray | None:
        """Write group k's anomalous pixels and regions at their pooled places; its keys, made pooled."""
        g, where = groups[k], positions[k]
        local_first = np.cumsum(g.image_pos) - g.image_pos
        to_pooled = np.repeat(first_pos[where] - local_first, g.image_pos) + np.arange(len(g.rp.pos))
        local_first_region = np.cumsum(g.image_regions) - g.image_regions
        region_to_pooled = np.repeat(first_region[where] - local_first_region, g.image_regions)
        region_to_pooled += np.arange(g.rp.n_regions)
        area[region_to_pooled] = g.rp.region_area
        at = to_pooled[g.order]
        values[at] = g.rp.pos
        regions[at] = region_to_pooled[g.rp.pos_region]
        if not with_keys:
            return None
        # Still sorted: the pooled index grows with the group's own within a group.
        return (g.keys & _HIGH32) | to_pooled.astype(np.uint64)[(g.keys & _LOW32).astype(np.intp)]

    todo = [k for k, g in enumerate(groups) if len(g.rp.pos)]
    if threads > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(todo))) as ex:
            runs = list(ex.map(place, todo))
    else:
        runs = [place(k) for k in todo]
    if with_keys:
        keys = merge_sorted(runs, threads) if runs else np.empty(0, dtype=np.uint64)
        order = (keys & _LOW32).astype(np.intp)
    else:
        order = np.argsort(values, kind="stable")
    neg = merge_sorted([g.rp.neg for g in groups], threads, sort) if groups else np.empty(0, dtype=dtype)
    return RegionPixels(pos=values[order], pos_region=regions[order], region_area=area, neg=neg)


def aupro_exact(rp: RegionPixels, fpr_limit: float, counts: RankCounts | None = None) -> float:
    """Exact AUPRO of prepared pixels (see the module docstring); ``nan`` without regions or negatives.

    ``counts``: ``rank_counts(rp.pos, rp.neg)`` when the caller has them (the pixel AUROC/AP/F1 use
    the same), else computed here.
    """
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
    # #{u < s} and #{u <= s} are the rank counts of s's score: computed once per distinct score.
    rc = counts if counts is not None else rank_counts(pos, neg)
    above = np.maximum(rc.lt - n_le, 0) + np.maximum(rc.le - n_le, 0)
    area = float(np.dot(weight, np.repeat(above.astype(np.float64), rc.counts))) / (2.0 * n_neg)
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


def zsad_points(rp: RegionPixels) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) at every threshold of the ``cal_pro_score`` grid (:func:`zsad_thresholds`, ascending,
    so FPR descending), a pixel anomalous when ``map > th``; ``None`` without regions, without normal
    pixels or for constant maps. Shape: ``(T,), (T,)`` with T = 200 or 201."""
    n_neg, n_regions = len(rp.neg), rp.n_regions
    if n_neg == 0 or n_regions == 0:
        return None
    lo = min(rp.neg[0], rp.pos[0])
    hi = max(rp.neg[-1], rp.pos[-1])
    if not hi > lo:
        return None
    ths = zsad_thresholds(lo, hi, rp.neg.dtype)
    ths_cmp = _floor_to_dtype(ths, rp.neg.dtype)  # same strict comparisons, in the pixels' own dtype
    fp = n_neg - np.searchsorted(rp.neg, ths_cmp, side="right")
    fpr = fp / n_neg
    # An anomalous pixel is above thresholds 0 .. bucket-1 (the thresholds strictly below its score).
    bucket = np.searchsorted(ths_cmp, rp.pos, side="left").astype(np.int64)
    pro = _zsad_pro_sums(rp, bucket, len(ths)) / n_regions
    return fpr, pro


def aupro_zsad(rp: RegionPixels, fpr_limit: float) -> float:
    """AnomalyCLIP-style AUPRO of prepared pixels (see the module docstring); ``nan`` when undefined."""
    points = zsad_points(rp)
    if points is None:
        return _NAN
    fpr, pro = points
    keep = fpr < fpr_limit
    if np.count_nonzero(keep) < 2:
        return _NAN
    f = fpr[keep]
    f_min, f_max = f.min(), f.max()
    if f_max == f_min:
        return _NAN
    f = (f - f_min) / (f_max - f_min)
    return float(_sk_auc(f, pro[keep]))


def aupro_from_regions(
    rp: RegionPixels, fpr_limit: float, method: str, counts: RankCounts | None = None
) -> float:
    """AUPRO of already prepared pixels; options validated by the caller (:func:`check_aupro_options`).
    ``counts``: the rank counts of ``rp`` if already computed (used by ``exact``)."""
    return aupro_exact(rp, fpr_limit, counts) if method == "exact" else aupro_zsad(rp, fpr_limit)


def aupro(masks: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT, method: str = "exact") -> float:
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
