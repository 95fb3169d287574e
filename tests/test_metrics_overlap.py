"""Metrics started one category at a time (feclip.metrics.aggregate.MetricSets) and the evaluation that
starts each category's metrics while the model predicts the next ones: the same numbers, bit for bit,
as all metrics computed after the predictions; errors of a background category surface at the end."""

import math

import numpy as np
import pytest
import torch
from test_metrics_grouped import assert_same_values, dataset, plain

import feclip.engine.evaluate as evaluate_module
from feclip.config import EvalConfig, PostprocessConfig
from feclip.data import AnomalyDataset, list_samples
from feclip.engine.evaluate import evaluate, metric_rows, predict
from feclip.metrics.aggregate import MetricSets, category_metric_sets
from feclip.results import MICRO


def _arrays(masks, maps, idx):
    return [masks[i] for i in idx], [maps[i] for i in idx]


@pytest.mark.parametrize("threads", [1, 2])
def test_groups_added_one_by_one_in_any_order_equal_category_metric_sets(threads):
    rng = np.random.default_rng(21)
    labels, scores, masks, maps, groups = dataset(rng, n_categories=4, per_category=5, levels=20)
    for i in groups["c3"]:  # an all-normal category
        masks[i][:] = 0
    groups[MICRO] = list(range(len(labels)))
    with_masks = {**dict.fromkeys(groups, True), "c1": False, MICRO: True}
    expected = category_metric_sets(labels, scores, masks, maps, groups, with_masks, MICRO, threads=1)
    names = [n for n in groups if n != MICRO]
    with MetricSets(len(names), keep_pixels=True, threads=threads, background=True) as sets:
        for name in reversed(names):  # the pooled rows do not depend on the order the groups came in
            idx = groups[name]
            arrays = _arrays(masks, maps, idx) if with_masks[name] else (None, None)
            sets.add(name, idx, labels[idx], scores[idx], *arrays)
            assert name in sets
        sets.pool(MICRO, groups[MICRO], labels, scores, masks, maps)
        got = sets.results()
    assert set(got) == set(expected)
    for name in groups:
        assert_same_values(got[name], expected[name])
    assert list(got["c1"]) == ["image_auroc", "image_ap", "image_f1_max"]
    assert math.isnan(got["c3"]["pixel_auroc"])


def test_a_background_groups_error_surfaces_when_the_results_are_asked_for():
    rng = np.random.default_rng(22)
    labels, scores, masks, maps, groups = dataset(rng, n_categories=2)
    bad = groups["c1"][0]
    maps[bad] = maps[bad].copy()
    maps[bad][1, 1] = np.nan
    sets = MetricSets(2, threads=1, background=True)
    with sets:
        for name in ("c0", "c1"):
            idx = groups[name]
            sets.add(name, idx, labels[idx], scores[idx], *_arrays(masks, maps, idx))  # no error yet
        with pytest.raises(ValueError, match="maps contains NaN or infinite values"):
            sets.results()
    with pytest.raises(ValueError, match="added twice"):
        sets.add("c0", groups["c0"], labels[groups["c0"]], scores[groups["c0"]])
    sets.close()  # idempotent


def test_pooling_without_kept_pixels_or_with_repeated_images_splits_them_again():
    rng = np.random.default_rng(23)
    labels, scores, masks, maps, groups = dataset(rng, n_categories=2, per_category=4)
    groups[MICRO] = list(range(len(labels)))
    with_masks = dict.fromkeys(groups, True)
    expected = category_metric_sets(labels, scores, masks, maps, groups, with_masks, MICRO)
    for keep, pooled in ((False, groups[MICRO]), (True, groups[MICRO] + [0])):
        with MetricSets(2, keep_pixels=keep, threads=1) as sets:
            for name in ("c0", "c1"):
                idx = groups[name]
                sets.add(name, idx, labels[idx], scores[idx], *_arrays(masks, maps, idx))
            sets.pool(MICRO, pooled, labels[pooled], scores[pooled], *_arrays(masks, maps, pooled))
            got = sets.results()
        # image 0 twice: split again and counted twice, as the plain loop does
        want = (
            plain(labels, scores, masks, maps, {MICRO: pooled}, {MICRO: True})[MICRO]
            if keep
            else expected[MICRO]
        )
        assert_same_values(got[MICRO], want)
    assert want["pixel_auroc"] != expected[MICRO]["pixel_auroc"]  # the repeated image counts


@pytest.fixture()
def target(sets):
    """Set B of the smoke data (3 categories of 3 normal and 3 anomalous images, in category order)."""
    return AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)


def _values(rows):
    return {(r.category, r.metric): (r.value, r.n_images) for r in rows}


@pytest.mark.parametrize(
    "cfg",
    [
        EvalConfig(batch_size=4),
        EvalConfig(batch_size=5, postprocess=PostprocessConfig(morph_open=1, min_component_px=4)),
        EvalConfig(batch_size=4, resolution="original", micro=True),
    ],
    ids=["input", "postprocess", "original"],
)
def test_evaluation_with_the_metrics_overlapped_gives_the_same_rows(tiny_feclip, target, cfg, monkeypatch):
    model = tiny_feclip()
    started = []  # (category, images predicted when its metrics were started)
    real = evaluate_module.add_group

    def spy(sets, preds, name, idx, with_masks):
        started.append((name, len(preds.maps)))
        return real(sets, preds, name, idx, with_masks)

    monkeypatch.setattr(evaluate_module, "add_group", spy)
    device = torch.device("cpu")
    overlapped = evaluate(model, "d", target, cfg, device, overlap_metrics=True)
    during = list(started)
    started.clear()
    after = evaluate(model, "d", target, cfg, device)  # the default: after
    not_overlapped = list(started)
    assert _values(overlapped) == _values(after)
    preds = predict(model, target, cfg, device)
    assert _values(metric_rows("d", preds, target.category_has_masks, cfg)) == _values(after)
    categories = list(target.category_has_masks)
    assert len(categories) == 3 and MICRO in {r.category for r in after}
    # overlapped: every category started as soon as its last image was there, the first ones before the
    # predictions were done; the pooled rows last
    n = len(target)
    assert [name for name, _ in during] == [*categories, MICRO]
    assert during[0][1] < n and during[1][1] < n and during[-1][1] == n
    # not overlapped: every group after the predictions
    assert [name for name, _ in not_overlapped] == [*categories, MICRO]
    assert all(k == n for _, k in not_overlapped)
