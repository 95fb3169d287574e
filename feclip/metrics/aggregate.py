"""Combining metrics: macro average over categories, micro (pooled) evaluation, a category's standard set.

The paper protocol is macro: compute every metric per category, then take the unweighted mean over
the categories of a dataset (:func:`macro_average`). Pooling all categories first (:func:`micro`) is
only an ablation: it mixes score scales across categories and gives lower numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from feclip.errors import ConfigError
from feclip.metrics.aupro import AUPRO_METHODS, aupro_from_regions, check_aupro_options, region_pixels
from feclip.metrics.image import _image_rank_metrics, _rank_metrics, to_numpy
from feclip.metrics.pixel import pixel_metrics

__all__ = ["macro_average", "micro", "compute_category_metrics", "AUPRO_METRIC_NAMES"]

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
    aupro_methods: str | Iterable[str] = ("exact", "zsad"),
    fpr_limit: float = 0.3,
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
    rp = region_pixels(masks, maps)
    p_auroc, p_ap, p_f1 = _rank_metrics(rp.pos, rp.neg)
    out.update({"pixel_auroc": p_auroc, "pixel_ap": p_ap, "pixel_f1_max": p_f1})
    for method in methods:
        out[AUPRO_METRIC_NAMES[method]] = aupro_from_regions(rp, float(fpr_limit), method)
    return out
