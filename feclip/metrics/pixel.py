"""Pixel-level metrics over all pixels of all images of one category: AUROC, AP and F1-max.

Every pixel of every test image counts, normal images contributing all-zero masks (the AnomalyCLIP /
APRIL-GAN protocol). The values equal scikit-learn's ``roc_auc_score`` / ``average_precision_score``
/ ``precision_recall_curve`` on the flattened arrays, ties included, but are computed without
scikit-learn's float64 copies: the maps are split once into the scores of anomalous and of normal
pixels (one copy of the maps in their own dtype, float16 stays float16), both parts are sorted in
place, and the metrics come from integer counts (see :func:`feclip.metrics.image._rank_metrics`).
Peak memory is about the maps once more plus one byte per pixel, plus a few int64 arrays of the
size of the anomalous-pixel count.

A category without any anomalous pixel (or without any normal pixel) gives ``nan``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from feclip.metrics.image import _rank_metrics, as_scores, as_targets, check_same_shape, split_sorted

__all__ = ["pixel_auroc", "pixel_ap", "pixel_f1_max"]


def prepare_pixels(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(bool masks, float maps) as numpy, validated: same shape, finite maps."""
    m = as_targets(masks, "masks")
    a = as_scores(maps, "maps")
    check_same_shape(m, a, "masks", "maps")
    return m, a


def sorted_pixel_scores(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scores of anomalous pixels, scores of normal pixels), each sorted ascending."""
    m, a = prepare_pixels(masks, maps)
    return split_sorted(m, a)


def pixel_metrics(masks: Any, maps: Any) -> dict[str, float]:
    """``{"pixel_auroc", "pixel_ap", "pixel_f1_max"}`` from one split and sort of the pixels."""
    auroc, ap, f1 = _rank_metrics(*sorted_pixel_scores(masks, maps))
    return {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_f1_max": f1}


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel AUROC: ``roc_auc_score(masks.ravel() > 0, maps.ravel())``, exact and memory-frugal.

    Args:
        masks: (N, H, W) ground truth, anomalous where ``> 0`` (bool, uint8, float ...); all zeros for
            normal images. Any shape works as long as it equals ``maps.shape``.
        maps: (N, H, W) anomaly maps, float16/32/64 (numpy or torch), higher = more anomalous.

    Returns:
        AUROC in [0, 1] (ties count 1/2); ``nan`` when the masks hold a single class.
    """
    return pixel_metrics(masks, maps)["pixel_auroc"]


def pixel_ap(masks: Any, maps: Any) -> float:
    """Pixel average precision: ``average_precision_score(masks.ravel() > 0, maps.ravel())``.

    Args:
        masks: (N, H, W) ground truth, anomalous where ``> 0``.
        maps: (N, H, W) anomaly maps.

    Returns:
        AP in [0, 1]; ``nan`` when the masks hold a single class.
    """
    return pixel_metrics(masks, maps)["pixel_ap"]


def pixel_f1_max(masks: Any, maps: Any) -> float:
    """Pixel F1-max: best 2PR / (P + R) over the precision-recall curve of all pixels.

    Args:
        masks: (N, H, W) ground truth, anomalous where ``> 0``.
        maps: (N, H, W) anomaly maps.

    Returns:
        F1-max in (0, 1]; ``nan`` when the masks hold a single class.
    """
    return pixel_metrics(masks, maps)["pixel_f1_max"]
