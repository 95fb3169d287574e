"""Combining metrics: macro average over categories, micro (pooled) evaluation, a category's standard set.

The paper protocol is macro: compute every metric per category, then take the unweighted mean over
the categories of a dataset (:func:`macro_average`). Pooling all categories first (:func:`micro`) is
only an ablation: it mixes score scales across categories and gives lower numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    "MetricSets",
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
    out = _image_values(labels, scores)
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

    :class:`MetricSets` does the same one group at a time (e.g. while a model predicts the next ones).

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
    labels, scores = np.asarray(labels), np.asarray(scores)
    names = [n for n in groups if n != pooled]
    if any(with_masks[n] for n in groups) and (masks is None or maps is None):
        raise ValueError("category_metric_sets: pixel metrics need masks and maps")

    def arrays(name: str, idx: list[int]) -> tuple[list | None, list | None]:
        if not with_masks[name]:
            return None, None
        return [masks[i] for i in idx], [maps[i] for i in idx]

    with MetricSets(len(names), pooled is not None, aupro_methods, fpr_limit, threads, sort) as sets:
        for name in names:
            idx = list(groups[name])
            sets.add(name, idx, labels[idx], scores[idx], *arrays(name, idx))
        if pooled is not None:
            idx = list(groups[pooled])
            sets.pool(pooled, idx, labels[idx], scores[idx], *arrays(pooled, idx))
        results = sets.results()
    return {n: results[n] for n in groups}


class MetricSets:
    """The metric sets of :func:`category_metric_sets`, started one group at a time, the same numbers.

    Each :meth:`add` computes a group (its image metrics and, with masks, its pixel metrics) in this
    thread, or in a background thread when there are several groups and threads, or ``background``
    says so: an evaluation adds each category as soon as its last map is made, so that its metrics
    run while the model works on the next categories. :meth:`pool` then computes the pooled group
    (the ``__micro__`` rows) from the added groups' sorted pixels, and :meth:`results` waits for all.
    Use it as a context manager: leaving it drops what has not started and waits for what has.

    Args:
        n_groups: how many groups will be added (one alone gets every thread for itself).
        keep_pixels: keep each group's split pixels for a later :meth:`pool`.
        aupro_methods, fpr_limit, threads, sort: as for :func:`category_metric_sets`.
        background: compute every added group in a background thread, even with one thread.
    """

    def __init__(
        self,
        n_groups: int,
        keep_pixels: bool = False,
        aupro_methods: str | Iterable[str] = DEFAULT_METHODS,
        fpr_limit: float = DEFAULT_FPR_LIMIT,
        threads: int | None = None,
        sort: Sort = host_sort,
        background: bool = False,
    ) -> None:
        self.methods = _check_methods(aupro_methods)
        for method in self.methods:
            check_aupro_options(fpr_limit, method)
        self.limit = float(fpr_limit)
        self.threads = metric_threads() if threads is None else max(1, int(threads))
        self.keep_pixels, self.sort = keep_pixels, sort
        self.inner_threads = self.threads if n_groups == 1 else 1  # threads within a group when it is alone
        parallel = background or (self.threads > 1 and n_groups > 1)
        workers = min(self.threads, max(n_groups, 1))
        self._executor = ThreadPoolExecutor(max_workers=workers) if parallel else None
        self._done: dict[str, Any] = {}  # name -> (metrics, PixelGroup or None, indices), or its Future

    def __enter__(self) -> MetricSets:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop the groups not started yet and wait for those that are (idempotent)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __contains__(self, name: str) -> bool:
        return name in self._done

    def add(
        self,
        name: str,
        idx: Sequence[int],
        labels: Any,
        scores: Any,
        masks: Sequence[Any] | None = None,
        maps: Sequence[Any] | None = None,
    ) -> None:
        """Compute group ``name``: its images' ids ``idx`` (what :meth:`pool` matches), their (n,)
        ``labels`` and ``scores`` and, for pixel metrics, their (H, W) ``masks`` and ``maps`` (lists in
        the order of ``idx``; ``None``: image metrics only)."""
        if name in self._done:
            raise ValueError(f"MetricSets: group {name!r} added twice")
        args = (list(idx), np.asarray(labels), np.asarray(scores), masks, maps)
        if self._executor is None:
            self._done[name] = self._group(*args, self.inner_threads, self.keep_pixels)
        else:
            self._done[name] = self._executor.submit(self._group, *args, self.inner_threads, self.keep_pixels)

    def pool(
        self,
        name: str,
        idx: Sequence[int],
        labels: Any,
        scores: Any,
        masks: Sequence[Any] | None = None,
        maps: Sequence[Any] | None = None,
    ) -> None:
        """Compute the pooled group ``name`` (arguments as for :meth:`add`, ``idx`` in the order that
        defines the pooling) in this thread, once the added groups are done: the sorted pixels of
        those wholly inside it, in its order and not overlapping, are merged; its other images are
        split here."""
        idx, labels, scores = list(idx), np.asarray(labels), np.asarray(scores)
        for other in list(self._done):
            self._finished(other)  # the added groups first (and their errors)
        dtype = None if masks is None else self._dtype(masks, maps, one_shape=False)
        if dtype is None or not self.keep_pixels or len(set(idx)) != len(idx):
            self._done[name] = self._group(idx, labels, scores, masks, maps, self.threads, False, False)
            return
        place = {i: k for k, i in enumerate(idx)}
        covered = np.zeros(len(idx), dtype=bool)
        parts, positions = [], []
        for _, g, group_idx in self._done.values():
            if g is None or g.rp.neg.dtype != dtype:
                continue
            where = np.array([place.get(i, -1) for i in group_idx], dtype=np.int64)
            if len(where) and (where.min() < 0 or np.any(np.diff(where) <= 0) or covered[where].any()):
                continue
            covered[where] = True
            parts.append(g)
            positions.append(where)
        rest = np.flatnonzero(~covered)
        if len(rest):
            parts.append(self._pixels([masks[k] for k in rest], [maps[k] for k in rest], dtype))
            positions.append(rest)
        out = _image_values(labels, scores)
        rp = pool_groups(parts, positions, self.threads, self.sort)
        out.update(_pixel_values(rp, self.methods, self.limit, self.threads))
        self._done[name] = (out, None, idx)

    def results(self) -> dict[str, dict[str, float]]:
        """name -> the dict of :func:`compute_category_metrics`, in the order the groups came; waits for
        the groups still running and raises the first error of any."""
        return {name: self._finished(name) for name in list(self._done)}

    def _finished(self, name: str) -> dict[str, float]:
        done = self._done[name]
        if isinstance(done, Future):
            done = self._done[name] = done.result()
        return done[0]

    @staticmethod
    def _dtype(masks: Sequence[Any], maps: Sequence[Any], one_shape: bool) -> Any:
        """The maps' dtype when the fast path can take these images (see :func:`_fast_inputs`; with
        ``one_shape``, all of one size too), else ``None``."""
        if not len(maps):
            return None
        dtype = _fast_inputs(masks, maps, range(len(maps)))
        if dtype is not None and one_shape and len({a.shape for a in maps}) > 1:
            return None
        return dtype

    def _pixels(self, masks: Sequence[Any], maps: Sequence[Any], dtype: Any) -> PixelGroup:
        n_pixels = sum(a.size for a in maps)
        g = pixel_group(((_as_mask(m), a) for m, a in zip(masks, maps)), dtype, n_pixels, self.sort)
        _check_finite(g.rp)
        return g

    def _group(
        self,
        idx: list[int],
        labels: np.ndarray,
        scores: np.ndarray,
        masks: Sequence[Any] | None,
        maps: Sequence[Any] | None,
        threads: int,
        keep: bool,
        one_shape: bool = True,
    ) -> tuple[dict[str, float], PixelGroup | None, list[int]]:
        """One group's metrics, its split pixels (when ``keep``) and its images. The fast path splits each
        image once without stacking; images it cannot take go to :func:`compute_category_metrics`."""
        if masks is None:
            return _image_values(labels, scores), None, idx
        dtype = self._dtype(masks, maps, one_shape)
        if dtype is None:  # the general path
            mk, mp = _stacked(list(masks)), _stacked(list(maps))
            return compute_category_metrics(labels, scores, mk, mp, self.methods, self.limit), None, idx
        g = self._pixels(masks, maps, dtype)
        out = _image_values(labels, scores)
        out.update(_pixel_values(g.rp, self.methods, self.limit, threads))
        return out, (g if keep else None), idx


def _image_values(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    auroc, ap, f1 = _image_rank_metrics(labels, scores)
    return {"image_auroc": auroc, "image_ap": ap, "image_f1_max": f1}
