"""macro_average, micro and compute_category_metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from feclip.errors import ConfigError
from feclip.metrics import (
    aupro,
    compute_category_metrics,
    f1_max,
    image_ap,
    image_auroc,
    macro_average,
    micro,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)

NAN = float("nan")


def test_macro_average_is_the_unweighted_mean():
    assert macro_average({"bottle": 0.9, "cable": 0.6, "zipper": 0.75}) == pytest.approx(0.75, abs=1e-15)
    assert macro_average({"only": 0.42}) == 0.42


def test_macro_average_nan_handling():
    values = {"a": 0.8, "b": NAN, "c": 0.6}
    assert math.isnan(macro_average(values))  # default: an undefined category is never hidden
    assert macro_average(values, skip_nan=True) == pytest.approx(0.7, abs=1e-15)
    assert math.isnan(macro_average({"a": NAN}, skip_nan=True))
    assert math.isnan(macro_average({}))


def test_micro_pools_then_computes_and_differs_from_macro():
    # Both categories separate perfectly on their own scale (macro AUROC 1), but pooled the positive
    # 0.2 of A falls below the negative 0.5 of B: pairs 0.2>0.0, 0.2<0.5, 0.9>0.0, 0.9>0.5 -> 3/4.
    labels = [np.array([0, 1]), np.array([0, 1])]
    scores = [np.array([0.0, 0.2]), np.array([0.5, 0.9])]
    per_cat = {c: image_auroc(y, s) for c, y, s in zip("AB", labels, scores)}
    assert macro_average(per_cat) == 1.0
    assert micro(image_auroc, labels, scores) == 0.75


def test_micro_pixel_and_aupro_kwargs():
    rng = np.random.default_rng(0)
    masks = [(rng.random((3, 8, 8)) > 0.8).astype(np.uint8) for _ in range(2)]
    maps = [rng.random((3, 8, 8)).astype(np.float32) + m for m in masks]
    pooled_masks, pooled_maps = np.concatenate(masks), np.concatenate(maps)
    assert micro(pixel_auroc, masks, maps) == pixel_auroc(pooled_masks, pooled_maps)
    assert micro(aupro, masks, maps, method="zsad") == aupro(pooled_masks, pooled_maps, method="zsad")
    with pytest.raises(ValueError, match="one entry per category"):
        micro(pixel_auroc, masks, maps[:1])
    with pytest.raises(ValueError, match="no categories"):
        micro(pixel_auroc, [], [])


def _category(rng, n=8, size=16):
    labels = np.arange(n) % 2
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 4, 2)
        masks[i, y : y + 4, x : x + 3] = 1
    maps = (rng.random((n, size, size)) + 0.8 * masks).astype(np.float32)
    scores = labels + rng.random(n)
    return labels, scores, masks, maps


def test_compute_category_metrics_matches_the_individual_functions():
    labels, scores, masks, maps = _category(np.random.default_rng(1))
    out = compute_category_metrics(labels, scores, masks, maps)
    expected = {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        "image_f1_max": f1_max(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_ap": pixel_ap(masks, maps),
        "pixel_f1_max": pixel_f1_max(masks, maps),
        "pixel_aupro": aupro(masks, maps, method="exact"),
        "pixel_aupro_zsad": aupro(masks, maps, method="zsad"),
    }
    assert out == expected
    assert all(isinstance(v, float) for v in out.values())


def test_compute_category_metrics_options():
    labels, scores, masks, maps = _category(np.random.default_rng(2))
    image_only = compute_category_metrics(labels, scores)
    assert set(image_only) == {"image_auroc", "image_ap", "image_f1_max"}
    no_aupro = compute_category_metrics(labels, scores, masks, maps, aupro_methods=())
    assert set(no_aupro) == set(image_only) | {"pixel_auroc", "pixel_ap", "pixel_f1_max"}
    zsad_only = compute_category_metrics(labels, scores, masks, maps, aupro_methods="zsad", fpr_limit=0.2)
    assert "pixel_aupro" not in zsad_only
    assert zsad_only["pixel_aupro_zsad"] == aupro(masks, maps, fpr_limit=0.2, method="zsad")
    with pytest.raises(ConfigError, match="aupro_methods entries must be in 'exact', 'zsad'"):
        compute_category_metrics(labels, scores, masks, maps, aupro_methods=("exact", "mvtec"))
    with pytest.raises(ConfigError, match="fpr_limit"):
        compute_category_metrics(labels, scores, masks, maps, fpr_limit=0)
    with pytest.raises(ValueError, match="both masks and maps"):
        compute_category_metrics(labels, scores, masks, None)


def test_category_without_anomalies_gives_nan_everywhere_without_crashing():
    rng = np.random.default_rng(3)
    n = 5
    out = compute_category_metrics(np.zeros(n), rng.random(n), np.zeros((n, 8, 8)), rng.random((n, 8, 8)))
    assert set(out) == {
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "pixel_aupro",
        "pixel_aupro_zsad",
    }
    assert all(math.isnan(v) for v in out.values())
