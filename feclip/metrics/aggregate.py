"""Combining metrics: macro average over categories, micro (pooled) evaluation, a category's standard set.

The paper protocol is macro: compute every metric per category, then take the unweighted mean over
the categories of a dataset (:func:`macro_average`). Pooling all categories first (:func:`micro`) is
only an ablation: it mixes score scales across categories and gives lower numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from feclip.errors import ConfigError
from feclip.metrics.aupro import (
    AUPRO_METHODS,
    DEFAULT_FPR_LIMIT,
    DEFAULT_METHODS,
    PixelGroup,
    RegionPixels,
    aupro_from_regions,
    check_aupro_options,
    pixel_group,
    pool_groups,
    region_pixels,
)
from feclip.metrics.image import _image_rank_metrics, metrics_from_counts, rank_counts, to_numpy
from feclip.metrics.pixel import pixel_metrics
from feclip.metrics.sorting import Sort, host_sort

__all__ = [
    "macro_average",
    "micro",
    "compute_category_metrics",
    "category_metric_sets",
    "metric_threads",
    "AUPRO_METRIC_NAMES",
]

#: Result key of each AUPRO method in :func:`compute_category_metrics`.
AUPRO_METRIC_NAMES = {"exact": "pixel_aupro", "zsad": "pixel_aupro_zsad"}


def macro_average(per_category: Mapping[str, float], *, skip_nan: bool = False) -> float:
    """Unweighted mean of one metric over categories (the paper's dataset-level number).

    Args:
        per_category: category name -> metric value.
        skip_nan: ``False`` (default): any ``nan`` category makes the result ``nan``, so an undefined
            category (e.g. no anomalous image) is never hidden. ``True``: average the defined ones.

    Returns:
        The mean; ``nan`` for an empty mapping, or when every value is ``nan`` with ``skip_nan``.
    """
    values = [float(v) for v in per_category.values()]
    if skip_nan:
        values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan")
    return math.fsum(values) / len(values)


def micro(
    metric_fn: Callable[..., float],
    targets: Sequence[Any],
    predictions: Sequence[Any],
    **kwargs: Any,
) -> float:
    """A metric on all categories pooled: ``metric_fn(concat(targets), concat(predictions), **kwargs)``.

    Example: ``micro(pixel_auroc, masks_per_category, maps_per_category)`` or
    ``micro(aupro, masks_list, maps_list, method="zsad")``. The arrays are concatenated along axis 0
    (images), so pixel maps must share (H, W). Memory: one pooled copy of everything.

    Args:
        metric_fn: any metric of this package, targets first.
        targets: per-category labels (N_c,) or masks (N_c, H, W).
        predictions: per-category scores (N_c,) or maps (N_c, H, W), same order.
    """
    if len(targets) != len(predictions):
        raise ValueError(
            f"micro: targets and predictions need one entry per category, got {len(targets)} and {len(predictions)}"
        )
    if len(targets) == 0:
        raise ValueError("micro: no categories given")
    pooled_t = np.concatenate([to_numpy(t) for t in targets], axis=0)
    pooled_p = np.concatenate([to_numpy(p) for p in predictions], axis=0)
    return metric_fn(pooled_t, pooled_p, **kwargs)


def _check_methods(aupro_methods: str | Iterable[str]) -> tuple[str, ...]:
    methods = (aupro_methods,) if isinstance(aupro_methods, str) else tuple(aupro_methods)
    for method in methods:
        if method not in AUPRO_METHODS:
            raise ConfigError(
                f"compute_category_metrics: aupro_methods entries must be in "
                f"{', '.join(map(repr, AUPRO_METHODS))}; got {method!r}"
            )
    return methods


def compute_category_metrics(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    aupro_methods: str | Iterable[str] = DEFAULT_METHODS,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> dict[str, float]:
    """The standard metric set of one category, sharing one split/sort of the pixels between metrics.

    Args:
        labels: (N,) image labels, anomalous where ``> 0``.
        scores: (N,) image anomaly scores.
        masks: (N, H, W) ground-truth masks (zeros for normal images), or ``None`` for image-only
            datasets: then no pixel metric is computed. A list of (H_i, W_i) masks of different sizes
            (with a list of maps of the same sizes) is accepted: pixels pool, regions stay per image.
        maps: (N, H, W) anomaly maps; given exactly when ``masks`` is.
        aupro_methods: which AUPRO variants to add: ``"exact"`` -> ``pixel_aupro``, ``"zsad"`` ->
            ``pixel_aupro_zsad``; ``()`` for none.
        fpr_limit: FPR limit of the AUPRO, in (0, 1].

    Returns:
        ``{"image_auroc", "image_ap", "image_f1_max"}`` and, with masks, ``"pixel_auroc", "pixel_ap",
        "pixel_f1_max"`` plus the requested AUPRO keys; values are floats, ``nan`` where undefined.
    """
    methods = _check_methods(aupro_methods)
    for method in methods:
        check_aupro_options(fpr_limit, method)
    if (masks is None) != (maps is None):
        raise ValueError("compute_category_metrics: give both masks and maps, or neither")
    auroc, ap, f1 = _image_rank_metrics(labels, scores)
    out = {"image_auroc": auroc, "image_ap": ap, "image_f1_max": f1}
    if masks is None:
        return out
    if not methods and not isinstance(masks, (list, tuple)):
        out.update(pixel_metrics(masks, maps))
        return out
    out.update(_pixel_values(region_pixels(masks, maps), methods, float(fpr_limit)))
    return out


def _pixel_values(
    rp: RegionPixels, methods: tuple[str, ...], fpr_limit: float, threads: int = 1
) -> dict[str, float]:
    """The pixel metrics of prepared pixels, the rank counts computed once for all of them."""
    counts = rank_counts(rp.pos, rp.neg, threads)
    p_auroc, p_ap, p_f1 = metrics_from_counts(counts)
    out = {"pixel_auroc": p_auroc, "pixel_ap": p_ap, "pixel_f1_max": p_f1}

    def one(method: str) -> float:
        return aupro_from_regions(rp, fpr_limit, method, counts)

    if threads > 1 and len(methods) > 1:  # the AUPRO methods side by side
        with ThreadPoolExecutor(max_workers=len(methods)) as ex:
            values = list(ex.map(one, methods))
    else:
        values = [one(method) for method in methods]
    out.update({AUPRO_METRIC_NAMES[m]: v for m, v in zip(methods, values)})
    return out


def metric_threads() -> int:
    """Threads :func:`category_metric_sets` uses by default: ``FECLIP_METRIC_THREADS`` when set, else
    the CPUs this process may run on."""
    env = os.environ.get("FECLIP_METRIC_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"FECLIP_METRIC_THREADS must be a whole number; got {env!r}") from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _stacked(arrays: list[Any]) -> Any:
    """What the per-group fallback hands to :func:`compute_category_metrics`: one array, or the list
    itself when the sizes differ."""
    return arrays if len({np.shape(a) for a in arrays}) > 1 else np.stack(arrays)


def _fast_inputs(masks: Sequence[Any], maps: Sequence[Any], images: Iterable[int]) -> Any:
    """The maps' dtype when every image's mask and map are 2-D numpy arrays of one size, the maps all of
    one float dtype and the masks bool or numeric; else ``None`` (the general path takes over)."""
    dtype = None
    for i in images:
        m, a = masks[i], maps[i]
        if not (isinstance(m, np.ndarray) and isinstance(a, np.ndarray)) or a.ndim != 2 or m.shape != a.shape:
            return None
        if m.dtype.kind not in "biuf" or a.dtype not in (np.float16, np.float32, np.float64):
            return None
        if dtype is None:
            dtype = a.dtype
        elif a.dtype != dtype:
            return None
    return dtype


def _as_mask(m: np.ndarray) -> np.ndarray:
    return m if m.dtype == np.bool_ else m > 0


def _check_finite(rp: RegionPixels) -> None:
    """Both parts are sorted: NaN and infinities can only sit at their ends (as :func:`as_scores`)."""
    for part in (rp.pos, rp.neg):
        if len(part) and not (np.isfinite(part[0]) and np.isfinite(part[-1])):
            raise ValueError("maps contains NaN or infinite values")


def category_metric_sets(
    labels: Any,
    scores: Any,
    masks: Sequence[Any] | None,
    maps: Sequence[Any] | None,
    groups: Mapping[str, Sequence[int]],
    with_masks: Mapping[str, bool],
    pooled: str | None = None,
    aupro_methods: str | Iterable[str] = DEFAULT_METHODS,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    threads: int | None = None,
    sort: Sort = host_sort,
) -> dict[str, dict[str, float]]:
    """:func:`compute_category_metrics` of several groups of images at once, the same numbers bit for bit.

    For every ``name, idx`` of ``groups``: ``compute_category_metrics(labels[idx], scores[idx],
    stack(masks[idx]), stack(maps[idx]), aupro_methods, fpr_limit)`` when ``with_masks[name]`` (the lists
    themselves when their sizes differ), else the image metrics only. Faster than that loop:

    - the groups are computed by up to ``threads`` threads (default :func:`metric_threads`), each
      image's pixels split and its regions labelled once, without stacking;
    - the ``pooled`` group (the ``__micro__`` rows: images of all the other groups, and maybe more) is
      not split, sorted and labelled again: its pixels are the other groups' sorted pixels merged
      (:func:`~feclip.metrics.aupro.pool_groups`), plus those of its images in no other group.

    Args:
        labels, scores: (N,) per image.
        masks, maps: N per-image (H, W) arrays, or ``None`` without pixel metrics.
        groups: name -> indices of its images (the ``pooled`` one in the order that defines its pooling).
        with_masks: name -> whether to compute the pixel metrics of that group.
        pooled: the name of the group to pool from the others, or ``None``.
        aupro_methods, fpr_limit: as for :func:`compute_category_metrics`.
        threads: at most this many threads; ``1`` computes everything in this thread.
        sort: how the normal pixels' scores are sorted (:mod:`feclip.metrics.sorting`: numpy, or a
            GPU); the numbers do not depend on it.

    Returns:
        name -> the dict of :func:`compute_category_metrics`, in the order of ``groups``.
    """
    methods = _check_methods(aupro_methods)
    for method in methods:
        check_aupro_options(fpr_limit, method)
    limit = float(fpr_limit)
    threads = metric_threads() if threads is None else max(1, int(threads))
    labels, scores = np.asarray(labels), np.asarray(scores)
    pixel_names = [n for n in groups if with_masks[n]]
    if pixel_names and (masks is None or maps is None):
        raise ValueError("category_metric_sets: pixel metrics need masks and maps")
    dtype = None
    if pixel_names and all(len(groups[n]) for n in pixel_names):
        dtype = _fast_inputs(masks, maps, {i for n in pixel_names for i in groups[n]})
        if dtype is not None and any(
            len({maps[i].shape for i in groups[n]}) > 1 for n in pixel_names if n != pooled
        ):
            dtype = None
    keep_for_pool = (
        dtype is not None
        and pooled is not None
        and with_masks.get(pooled, False)
        and len(set(groups[pooled])) == len(groups[pooled])
    )
    names = [n for n in groups if n != pooled]
    inner_threads = threads if len(names) == 1 else 1  # threads within a group when it is alone

    def group_pixels(idx: Sequence[int]) -> PixelGroup:
        n_pixels = sum(maps[i].size for i in idx)
        g = pixel_group(((_as_mask(masks[i]), maps[i]) for i in idx), dtype, n_pixels, sort)
        _check_finite(g.rp)
        return g

    def one(name: str) -> tuple[dict[str, float], PixelGroup | None]:
        idx = list(groups[name])
        if with_masks[name] and dtype is None:  # the general path
            mk, mp = _stacked([masks[i] for i in idx]), _stacked([maps[i] for i in idx])
            return compute_category_metrics(labels[idx], scores[idx], mk, mp, methods, limit), None
        auroc, ap, f1 = _image_rank_metrics(labels[idx], scores[idx])
        out = {"image_auroc": auroc, "image_ap": ap, "image_f1_max": f1}
        if not with_masks[name]:
            return out, None
        g = group_pixels(idx)
        out.update(_pixel_values(g.rp, methods, limit, inner_threads))
        return out, (g if keep_for_pool else None)

    if threads > 1 and len(names) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(names))) as ex:
            done = dict(zip(names, ex.map(one, names)))
    else:
        done = {n: one(n) for n in names}
    results = {n: done[n][0] for n in names}
    if pooled is not None:
        if keep_for_pool:
            results[pooled] = _pooled(
                pooled, groups, done, labels, scores, group_pixels, methods, limit, threads, sort
            )
        else:
            results[pooled] = one(pooled)[0]
    return {n: results[n] for n in groups}


def _pooled(
    pooled: str,
    groups: Mapping[str, Sequence[int]],
    done: Mapping[str, tuple[dict[str, float], PixelGroup | None]],
    labels: np.ndarray,
    scores: np.ndarray,
    group_pixels: Callable[[Sequence[int]], PixelGroup],
    methods: tuple[str, ...],
    limit: float,
    threads: int,
    sort: Sort,
) -> dict[str, float]:
    """The pooled group's metrics from the other groups' :class:`PixelGroup` (see category_metric_sets):
    those wholly inside it, in its order, are merged; its other images are split here."""
    order = list(groups[pooled])
    place = {i: k for k, i in enumerate(order)}
    covered = np.zeros(len(order), dtype=bool)
    parts, positions = [], []
    for name, (_, g) in done.items():
        if g is None:
            continue
        where = np.array([place.get(i, -1) for i in groups[name]], dtype=np.int64)
        # Only groups wholly inside the pooled one, in its order, and not overlapping an earlier one.
        if len(where) and (where.min() < 0 or np.any(np.diff(where) <= 0) or covered[where].any()):
            continue
        covered[where] = True
        parts.append(g)
        positions.append(where)
    rest = np.flatnonzero(~covered)
    if len(rest):
        parts.append(group_pixels([order[k] for k in rest]))
        positions.append(rest)
    auroc, ap, f1 = _image_rank_metrics(labels[order], scores[order])
    out = {"image_auroc": auroc, "image_ap": ap, "image_f1_max": f1}
    out.update(_pixel_values(pool_groups(parts, positions, threads, sort), methods, limit, threads))
    return out
