"""The fast paths of the metrics: per-image splitting and labelling (pixel_group), the stable order of
the anomalous pixels, merged sorted runs, pooled groups (the __micro__ rows) and category_metric_sets,
each against the plain computation it replaces: equal bit for bit, not approximately."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from skimage.measure import label

from feclip.errors import ConfigError
from feclip.metrics import compute_category_metrics
from feclip.metrics.aggregate import category_metric_sets, metric_threads
from feclip.metrics.image import _rank_metrics, rank_counts

aupro_module = importlib.import_module("feclip.metrics.aupro")
image_module = importlib.import_module("feclip.metrics.image")
aggregate_module = importlib.import_module("feclip.metrics.aggregate")

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max")

# ----------------------------------------------------------------------------- slow, obvious references


def ref_region_pixels(masks, maps):
    """Every image labelled whole (no bounding box), the normal pixels sorted with np.sort, the anomalous
    ones ordered by a stable argsort of their scores in image order, regions numbered image by image."""
    pos, region, area, neg = [], [], [], []
    offset = 0
    for m, a in zip(masks, maps):
        m = np.asarray(m) > 0
        a = np.asarray(a)
        neg.append(a[~m])
        lab, n = label(m, connectivity=2, return_num=True)
        for r in range(1, n + 1):
            area.append(int((lab == r).sum()))
        pos.append(a[m])
        region.append(lab[m].astype(np.int64) - 1 + offset)
        offset += n
    pos, region = np.concatenate(pos), np.concatenate(region)
    order = np.argsort(pos, kind="stable")
    return pos[order], region[order], np.array(area, dtype=np.int64), np.sort(np.concatenate(neg))


def assert_same_regions(rp, ref):
    pos, region, area, neg = ref
    assert rp.pos.dtype == pos.dtype and rp.neg.dtype == neg.dtype
    assert np.array_equal(rp.pos, pos) and np.array_equal(np.signbit(rp.pos), np.signbit(pos))
    assert np.array_equal(rp.pos_region, region)
    assert np.array_equal(rp.region_area, area)
    assert np.array_equal(rp.neg, neg)


def assert_same_values(got: dict, expected: dict):
    """Same keys in the same order, and the same floats bit for bit (nan where nan)."""
    assert list(got) == list(expected)
    for k in expected:
        a, b = got[k], expected[k]
        assert (math.isnan(a) and math.isnan(b)) or a == b, (k, a, b)


def images(rng, n, size=12, levels=None, dtype=np.float32, anomalous=0.7, shape=None):
    """Per-image lists: masks (uint8, 1-3 rectangles/specks on ~70 % of the images), maps."""
    h, w = shape or (size, size)
    masks, maps = [], []
    for _ in range(n):
        m = np.zeros((h, w), np.uint8)
        if rng.random() < anomalous:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
                m[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = 1
        a = rng.random((h, w)) + 0.6 * m
        if levels:
            a = np.round(a * levels) / levels
        masks.append(m)
        maps.append(a.astype(dtype))
    return masks, maps


# ----------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("levels", [None, 5])
def test_region_pixels_equal_the_plain_split(dtype, levels):
    rng = np.random.default_rng(1)
    masks, maps = images(rng, 7, size=14, levels=levels, dtype=dtype)
    masks[2][:] = 0  # a normal image
    masks[3][0, 0] = masks[3][-1, -1] = 1  # regions in opposite corners: the bounding box is everything
    masks[4][:] = 0
    masks[4][5:8, 6:9] = 1  # one small region: a small bounding box
    rp = aupro_module.region_pixels(np.stack(masks), np.stack(maps))
    assert_same_regions(rp, ref_region_pixels(masks, maps))


def test_stable_order_breaks_ties_by_position_and_keeps_signed_zeros():
    values = np.array([0.5, -0.0, 0.0, 0.5, -1.0, 0.0, -0.0, 2.0, 0.5], dtype=np.float32)
    order, keys = aupro_module._stable_order(values)
    assert np.array_equal(order, np.argsort(values, kind="stable"))  # -0.0 == 0.0: ties by position
    assert keys is not None and np.all(keys[1:] > keys[:-1])  # unique and sorted
    half = values.astype(np.float16)
    assert np.array_equal(aupro_module._stable_order(half)[0], np.argsort(half, kind="stable"))
    rng = np.random.default_rng(2)
    many = np.round(rng.standard_normal(5000) * 4).astype(np.float32)  # heavy ties
    assert np.array_equal(aupro_module._stable_order(many)[0], np.argsort(many, kind="stable"))
    wide = rng.random(50)  # float64: no keys, the stable argsort itself
    order, keys = aupro_module._stable_order(wide)
    assert keys is None and np.array_equal(order, np.argsort(wide, kind="stable"))


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_merge_sorted_equals_one_sort(monkeypatch, threads):
    monkeypatch.setattr(aupro_module, "_MIN_PARALLEL_MERGE", 0)  # split even tiny inputs
    rng = np.random.default_rng(3)
    runs = [np.sort(rng.random(n).astype(np.float32)) for n in (100, 0, 37, 1, 250)]
    runs.append(np.full(80, runs[0][50]))  # ties across runs, at a likely splitter
    expected = np.sort(np.concatenate(runs))
    assert np.array_equal(aupro_module.merge_sorted(runs, threads), expected)
    same = [np.full(30, 0.25, dtype=np.float32)] * 3  # every splitter equal: one slice gets all
    assert np.array_equal(aupro_module.merge_sorted(same, threads), np.full(90, 0.25, dtype=np.float32))
    assert len(aupro_module.merge_sorted([], threads)) == 0


def test_rank_counts_in_threads_equal_one_thread(monkeypatch):
    rng = np.random.default_rng(4)
    pos = np.sort(np.round(rng.random(3000) * 500) / 500)
    neg = np.sort(np.round(rng.random(9000) * 500) / 500)
    one = rank_counts(pos, neg)
    monkeypatch.setattr(image_module, "_MIN_PARALLEL_SEARCH", 0)
    many = rank_counts(pos, neg, threads=3)
    for field in ("starts", "counts", "lt", "le"):
        assert np.array_equal(getattr(one, field), getattr(many, field)), field
    assert np.array_equal(one.lt, np.searchsorted(neg, pos[one.starts], side="left"))
    assert rank_counts(pos[:0], neg) is None and rank_counts(pos, neg[:0]) is None
    assert all(math.isnan(v) for v in _rank_metrics(pos[:0], neg))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooled_groups_equal_the_split_of_all_images(monkeypatch, dtype, threads):
    """Groups interleaved in the pooled order (as categories are in a dataset), one group without any
    anomalous pixel, ties across groups: the pooled pixels are those of all images split at once."""
    monkeypatch.setattr(aupro_module, "_MIN_PARALLEL_MERGE", 0)  # threads > 1: merges split too
    rng = np.random.default_rng(5)
    masks, maps = images(rng, 12, size=10, levels=6, dtype=dtype)
    members = [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    for i in members[2]:
        masks[i][:] = 0
    parts = [
        aupro_module.pixel_group(
            ((masks[i] > 0, maps[i]) for i in idx), dtype, sum(maps[i].size for i in idx)
        )
        for idx in members
    ]
    assert parts[0].keys is not None if dtype == np.float32 else parts[0].keys is None
    pooled = aupro_module.pool_groups(parts, [np.array(idx) for idx in members], threads=threads)
    assert_same_regions(pooled, ref_region_pixels(masks, maps))


# ----------------------------------------------------------------------------- category_metric_sets


def dataset(rng, n_categories=3, per_category=6, **kw):
    """Images of the categories interleaved (image i in category i % n), as in the benchmark sets."""
    n = n_categories * per_category
    masks, maps = images(rng, n, **kw)
    labels = np.array([int(m.any()) for m in masks])
    scores = np.array([float(a.max()) for a in maps]) + 0.1 * labels
    categories = [f"c{i % n_categories}" for i in range(n)]
    groups = {c: [i for i, x in enumerate(categories) if x == c] for c in dict.fromkeys(categories)}
    return labels, scores, masks, maps, groups


def plain(labels, scores, masks, maps, groups, with_masks, **kw):
    """The loop it replaces: compute_category_metrics on each group's stacked arrays (lists if sizes differ)."""
    out = {}
    for name, idx in groups.items():
        if not with_masks[name]:
            out[name] = compute_category_metrics(labels[idx], scores[idx], **kw)
            continue
        mk, mp = [masks[i] for i in idx], [maps[i] for i in idx]
        if len({m.shape for m in mk}) == 1:
            mk, mp = np.stack(mk), np.stack(mp)
        out[name] = compute_category_metrics(labels[idx], scores[idx], mk, mp, **kw)
    return out


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "dtype,levels", [(np.float32, None), (np.float32, 8), (np.float16, 8), (np.float64, None)]
)
def test_category_metric_sets_equal_the_plain_loop(monkeypatch, threads, dtype, levels):
    rng = np.random.default_rng(6)
    labels, scores, masks, maps, groups = dataset(rng, levels=levels, dtype=dtype)
    for i in groups["c2"]:  # an all-normal category: nan pixel metrics, and only negatives to pool
        masks[i][:] = 0
    groups["__micro__"] = list(range(len(labels)))
    with_masks = dict.fromkeys(groups, True)
    calls = []  # the fast path ran: three groups split, then pooled (not split again)
    for name in ("pixel_group", "pool_groups"):
        fn = getattr(aggregate_module, name)
        monkeypatch.setattr(
            aggregate_module, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    got = category_metric_sets(labels, scores, masks, maps, groups, with_masks, "__micro__", threads=threads)
    assert sorted(calls) == ["pixel_group"] * 3 + ["pool_groups"]
    expected = plain(labels, scores, masks, maps, groups, with_masks)
    assert list(got) == list(groups)
    for name in groups:
        assert_same_values(got[name], expected[name])
    assert all(math.isnan(got["c2"][k]) for k in ("pixel_auroc", "pixel_aupro", "pixel_aupro_zsad"))


def test_category_metric_sets_constant_maps_and_options():
    rng = np.random.default_rng(7)
    labels, scores, masks, maps, groups = dataset(rng, n_categories=2)
    for i in groups["c1"]:
        maps[i] = np.full_like(maps[i], 0.5)  # constant: zsad undefined, exact the diagonal
    groups["__micro__"] = list(range(len(labels)))
    with_masks = dict.fromkeys(groups, True)
    for kw in ({"aupro_methods": ()}, {"aupro_methods": "zsad", "fpr_limit": 0.1}, {"fpr_limit": 1.0}):
        got = category_metric_sets(labels, scores, masks, maps, groups, with_masks, "__micro__", **kw)
        expected = plain(labels, scores, masks, maps, groups, with_masks, **kw)
        for name in groups:
            assert_same_values(got[name], expected[name])
    got = category_metric_sets(labels, scores, masks, maps, groups, with_masks, "__micro__")
    assert math.isnan(got["c1"]["pixel_aupro_zsad"]) and got["c1"]["pixel_aupro"] == pytest.approx(0.15)


def test_pooled_rows_of_different_sizes_leftover_images_and_image_only_groups():
    rng = np.random.default_rng(8)
    masks, maps = images(rng, 4, shape=(9, 11))
    more_masks, more_maps = images(rng, 4, shape=(13, 7))
    masks, maps = masks + more_masks + images(rng, 2, shape=(9, 11))[0], maps + more_maps
    maps = maps + [rng.random((9, 11)).astype(np.float32) for _ in range(2)]
    labels = np.array([int(m.any()) for m in masks])
    scores = rng.random(len(masks))
    # a, b: one size each; images 8, 9 belong to no group but are pooled; b's order is not increasing
    groups = {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7], "__micro__": list(range(10))}
    with_masks = dict.fromkeys(groups, True)
    got = category_metric_sets(labels, scores, masks, maps, groups, with_masks, "__micro__", threads=2)
    expected = plain(labels, scores, masks, maps, groups, with_masks)
    for name in groups:
        assert_same_values(got[name], expected[name])
    shuffled = {"a": [0, 1, 2, 3], "b": [6, 4, 7, 5], "__micro__": list(range(10))}
    got = category_metric_sets(labels, scores, masks, maps, shuffled, with_masks, "__micro__")
    assert_same_values(got["__micro__"], expected["__micro__"])
    # a group without masks: computed image-level only, and the pooled rows too when told so
    image_only = {"a": True, "b": False, "__micro__": False}
    got = category_metric_sets(labels, scores, masks, maps, groups, image_only, "__micro__")
    assert list(got["b"]) == list(got["__micro__"]) == list(METRICS[:3])
    assert_same_values(got["a"], expected["a"])


def test_category_metric_sets_errors():
    rng = np.random.default_rng(9)
    labels, scores, masks, maps, groups = dataset(rng, n_categories=2)
    with_masks = dict.fromkeys(groups, True)
    maps[3] = maps[3].copy()
    maps[3][2, 2] = np.nan
    with pytest.raises(ValueError, match="maps contains NaN or infinite values"):
        category_metric_sets(labels, scores, masks, maps, groups, with_masks)
    maps[3][2, 2] = -np.inf
    with pytest.raises(ValueError, match="maps contains NaN or infinite values"):
        category_metric_sets(labels, scores, masks, maps, groups, with_masks, threads=2)
    maps[3][2, 2] = 0.5
    with pytest.raises(ConfigError, match="aupro_methods entries"):
        category_metric_sets(labels, scores, masks, maps, groups, with_masks, aupro_methods=("mvtec",))
    with pytest.raises(ValueError, match="same shape"):  # the general path's own message
        category_metric_sets(labels, scores, masks, [a[:, :-1] for a in maps], groups, with_masks)


def test_metric_threads_reads_the_environment(monkeypatch):
    monkeypatch.setenv("FECLIP_METRIC_THREADS", "3")
    assert metric_threads() == 3
    monkeypatch.setenv("FECLIP_METRIC_THREADS", "0")
    assert metric_threads() == 1
    monkeypatch.setenv("FECLIP_METRIC_THREADS", "many")
    with pytest.raises(ConfigError, match="FECLIP_METRIC_THREADS"):
        metric_threads()
    monkeypatch.delenv("FECLIP_METRIC_THREADS")
    assert metric_threads() >= 1


# ----------------------------------------------------------------------------- metric_rows


def test_metric_rows_equal_the_per_category_loop(monkeypatch):
    """The rows of feclip.engine.evaluate.metric_rows: per category and __micro__, every value the one
    compute_category_metrics gives on the stacked arrays, whatever the number of threads."""
    from feclip.config import EvalConfig
    from feclip.engine.evaluate import Predictions, metric_rows
    from feclip.results import MICRO

    rng = np.random.default_rng(10)
    labels, scores, masks, maps, groups = dataset(rng, n_categories=4, per_category=5, size=16, levels=50)
    preds = Predictions(scores, maps, masks, labels, [f"c{i % 4}" for i in range(len(labels))])
    has_masks = {c: True for c in groups}
    all_groups = {**groups, MICRO: list(range(len(labels)))}
    expected = plain(labels, scores, masks, maps, all_groups, dict.fromkeys(all_groups, True))
    for threads in ("1", "3"):
        monkeypatch.setenv("FECLIP_METRIC_THREADS", threads)
        rows = metric_rows("d", preds, has_masks, EvalConfig())
        got: dict[str, dict[str, float]] = {}
        for r in rows:
            got.setdefault(r.category, {})[r.metric] = r.value
            assert r.n_images == len(all_groups[r.category])
        assert list(got) == [*groups, MICRO]
        for name, values in expected.items():
            assert_same_values(got[name], values)
    # a category without masks: no pixel rows for it, nor pooled ones
    rows = metric_rows("d", preds, {**has_masks, "c3": False}, EvalConfig())
    assert {r.metric for r in rows if r.category in ("c3", MICRO)} == set(METRICS[:3])
