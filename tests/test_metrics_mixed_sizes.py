"""Pixel metrics and AUPRO over images of different sizes (original-resolution evaluation, pooled rows)."""

import numpy as np
import pytest
from skimage.measure import label
from sklearn.metrics import roc_auc_score

from feclip.metrics import compute_category_metrics
from feclip.metrics.aupro import region_pixels


def ref_aupro_exact_mixed(masks, maps, fpr_limit=0.3):
    """Brute force over images of any sizes: a curve point at every distinct score, per-region loops."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = label(m > 0, connectivity=2, return_num=True)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    n_neg = sum(int((m == 0).sum()) for m in masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        pros.append(np.mean([((maps[i] >= t) & r).sum() / r.sum() for i, r in regions]))
        fprs.append(sum(int(((a >= t) & (m == 0)).sum()) for m, a in zip(masks, maps)) / n_neg)
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= fpr_limit
    x = np.append(fprs[inside], fpr_limit)
    y = np.append(pros[inside], np.interp(fpr_limit, fprs, pros))
    return np.trapezoid(y, x) / fpr_limit


def _images(rng, shapes):
    masks, maps = [], []
    for h, w in shapes:
        m = np.zeros((h, w), np.uint8)
        m[h // 4 : h // 2, w // 3 : w // 2] = 1
        masks.append(m)
        maps.append((rng.random((h, w)) + 0.8 * m).astype(np.float32))
    return masks, maps


def test_merged_regions_of_two_groups_are_the_regions_of_all():
    rng = np.random.default_rng(0)
    masks, maps = _images(rng, [(12, 10)] * 4)
    labels, scores = np.array([0, 1, 1, 0]), rng.random(4)
    stacked = compute_category_metrics(labels, scores, np.stack(masks), np.stack(maps))
    a = region_pixels(np.stack(masks[:2]), np.stack(maps[:2]))
    b = region_pixels(np.stack(masks[2:]), np.stack(maps[2:]))
    from feclip.metrics.aupro import merge_regions

    merged, whole = merge_regions([a, b]), region_pixels(np.stack(masks), np.stack(maps))
    for field in ("pos", "region_area", "neg"):
        assert np.array_equal(getattr(merged, field), getattr(whole, field)), field
    assert np.array_equal(np.sort(merged.pos_region), np.sort(whole.pos_region))
    assert stacked["pixel_auroc"] == pytest.approx(
        roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps]))
    )


def test_images_of_different_sizes_pool_their_pixels():
    rng = np.random.default_rng(1)
    masks, maps = _images(rng, [(12, 10), (20, 16), (9, 9)])
    labels, scores = np.array([1, 1, 1]), rng.random(3)
    values = compute_category_metrics(labels, scores, masks, maps, aupro_methods=("exact",))
    flat_m = np.concatenate([m.ravel() for m in masks])
    flat_a = np.concatenate([a.ravel() for a in maps])
    assert values["pixel_auroc"] == pytest.approx(roc_auc_score(flat_m, flat_a))
    assert values["pixel_aupro"] == pytest.approx(ref_aupro_exact_mixed(masks, maps), abs=1e-12)
    # every region is its image's own: as many regions as images, areas as drawn
    rp = region_pixels(masks, maps)
    assert sorted(rp.region_area.tolist()) == sorted(int(m.sum()) for m in masks)


def test_pooled_rows_of_categories_of_different_sizes(tmp_path):
    """Original-resolution evaluation on MVTec: categories differ in size, the __micro__ rows pool them."""
    from feclip.config import EvalConfig
    from feclip.engine.evaluate import Predictions, metric_rows
    from feclip.errors import DatasetError
    from feclip.results import MICRO

    rng = np.random.default_rng(2)
    masks, maps = _images(rng, [(12, 10), (12, 10), (20, 16), (20, 16)])
    masks[0][:] = masks[2][:] = 0  # one normal image per category
    preds = Predictions(
        scores=rng.random(4),
        maps=maps,
        masks=masks,
        labels=np.array([0, 1, 0, 1]),
        categories=["a", "a", "b", "b"],
    )
    rows = metric_rows("d", preds, {"a": True, "b": True}, EvalConfig())
    micro = {r.metric: r.value for r in rows if r.category == MICRO}
    assert micro["pixel_aupro"] == pytest.approx(ref_aupro_exact_mixed(masks, maps), abs=1e-12)
    assert micro["pixel_auroc"] == pytest.approx(
        roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps]))
    )
    preds.categories = ["a", "a", "a", "a"]  # one category of two sizes: refused, naming it
    with pytest.raises(DatasetError, match="category 'a': masks of different sizes"):
        metric_rows("d", preds, {"a": True}, EvalConfig())
