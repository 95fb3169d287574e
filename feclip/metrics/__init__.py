"""Evaluation metrics: pure functions over numpy arrays or torch tensors, targets first (as sklearn).

Image level: ``image_auroc(labels, scores)``, ``image_ap``, ``f1_max`` with labels/scores (N,).
Pixel level, over all pixels of all images of one category: ``pixel_auroc(masks, maps)``,
``pixel_ap``, ``pixel_f1_max`` and ``aupro(masks, maps, fpr_limit=0.3, method="exact" | "zsad")``
with masks/maps (N, H, W). Aggregation: ``macro_average`` (the paper protocol), ``micro`` (pooled
ablation) and ``compute_category_metrics`` (the standard named set of one category). Curves, the ones
the metrics integrate: ``roc_curve(targets, scores)`` and ``pro_curve(masks, maps, fpr_limit, method)``.

Undefined values (a single class, a category without anomalous pixels) are ``nan``, never an
exception. Definitions and the differences between published AUPRO numbers: docs/metrics.md.
"""

from feclip.metrics.aggregate import compute_category_metrics, macro_average, micro
from feclip.metrics.aupro import aupro
from feclip.metrics.curves import pro_curve, roc_curve
from feclip.metrics.image import f1_max, image_ap, image_auroc
from feclip.metrics.pixel import pixel_ap, pixel_auroc, pixel_f1_max

__all__ = [
    "image_auroc",
    "image_ap",
    "f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "macro_average",
    "micro",
    "compute_category_metrics",
    "roc_curve",
    "pro_curve",
]
