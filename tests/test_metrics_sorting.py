"""Where the metrics sort the normal pixels (feclip.metrics.sorting): numpy on the host or torch on the
evaluation's device. The device path runs here on the CPU through torch (the same code as on CUDA,
where tests/test_cuda.py checks it): every metric value equal bit for bit to the host path's."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from test_metrics_grouped import METRICS, assert_same_values, dataset

from feclip.config import EvalConfig
from feclip.engine.evaluate import Predictions, metric_rows
from feclip.errors import ConfigError
from feclip.metrics.aggregate import category_metric_sets
from feclip.metrics.sorting import DeviceSort, host_sort, metrics_sort
from feclip.results import MICRO

sorting_module = importlib.import_module("feclip.metrics.sorting")
evaluate_module = importlib.import_module("feclip.engine.evaluate")
CPU = torch.device("cpu")


class CountingSort(DeviceSort):
    """DeviceSort on the CPU that records the size of every array it is handed."""

    def __init__(self, sizes: list, min_values: int = 0):
        super().__init__(CPU, min_values)
        object.__setattr__(self, "sizes", sizes)

    def __call__(self, values):
        self.sizes.append(values.size)
        return super().__call__(values)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype,levels", [(np.float32, None), (np.float16, 8), (np.float64, 4)])
def test_device_sorted_metric_sets_equal_the_host_ones(threads, dtype, levels):
    rng = np.random.default_rng(20)
    labels, scores, masks, maps, groups = dataset(
        rng, n_categories=3, per_category=7, levels=levels, dtype=dtype
    )
    maps[0][0, 0] = -0.0  # signed zeros and ties: interchangeable in any order
    maps[1][0, :3] = 0.0
    groups[MICRO] = list(range(len(labels)))
    with_masks = dict.fromkeys(groups, True)
    expected = category_metric_sets(labels, scores, masks, maps, groups, with_masks, MICRO, threads=threads)
    sizes: list[int] = []
    got = category_metric_sets(
        labels, scores, masks, maps, groups, with_masks, MICRO, threads=threads, sort=CountingSort(sizes)
    )
    n_neg = [sum(int((masks[i] == 0).sum()) for i in idx) for idx in groups.values()]
    # each category's normal pixels, then the pooled ones (merged by a sort of their concatenation)
    assert sorted(sizes) == sorted(n_neg)
    for name in groups:
        assert_same_values(got[name], expected[name])


def test_device_sort_sorts_in_place_and_leaves_small_arrays_to_numpy(monkeypatch):
    rng = np.random.default_rng(21)
    values = rng.random(1000).astype(np.float32)
    expected = np.sort(values)
    out = DeviceSort(CPU, min_values=10)(values)
    assert out is values and np.array_equal(values, expected)

    def no_torch_sort(*args, **kwargs):
        raise AssertionError("torch.sort called for an array below min_values")

    monkeypatch.setattr(torch, "sort", no_torch_sort)
    small = rng.random(50).astype(np.float16)
    assert np.array_equal(DeviceSort(CPU, min_values=51)(small.copy()), np.sort(small))


def test_device_sort_falls_back_to_numpy_when_the_device_is_full(monkeypatch):
    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(torch, "sort", full)
    values = np.random.default_rng(22).random(300)
    expected = np.sort(values)
    assert np.array_equal(DeviceSort(CPU, min_values=0)(values), expected)


def test_metrics_sort_follows_the_option_and_the_device():
    assert metrics_sort("auto", None) is host_sort
    assert metrics_sort("auto", CPU) is host_sort
    assert metrics_sort("cpu", torch.device("cuda")) is host_sort
    chosen = metrics_sort("auto", torch.device("cuda", 1))
    assert isinstance(chosen, DeviceSort) and chosen.device == torch.device("cuda", 1)
    with pytest.raises(
        ConfigError, match=r"eval\.metrics_device must be one of \('auto', 'cpu'\), got 'gpu'"
    ):
        metrics_sort("gpu", CPU)
    assert EvalConfig().metrics_device == "auto"


def test_metric_rows_sort_on_the_evaluation_device(monkeypatch):
    """metric_rows hands the evaluation's device to the sort choice; the rows are those of the host."""
    rng = np.random.default_rng(23)
    labels, scores, masks, maps, groups = dataset(rng, n_categories=3, per_category=5, size=16)
    preds = Predictions(scores, maps, masks, labels, [f"c{i % 3}" for i in range(len(labels))])
    has_masks = dict.fromkeys(groups, True)
    host_rows = metric_rows("d", preds, has_masks, EvalConfig(metrics_device="cpu"))
    sizes: list[int] = []
    asked = []

    def fake_choice(metrics_device, device):
        asked.append((metrics_device, device))
        return CountingSort(sizes)

    monkeypatch.setattr(evaluate_module, "metrics_sort", fake_choice)
    cuda = torch.device("cuda")
    rows = metric_rows("d", preds, has_masks, EvalConfig(), cuda)
    assert asked == [("auto", cuda)] and len(sizes) == 4  # three categories and the pooled rows
    assert [(r.category, r.metric, r.n_images) for r in rows] == [
        (r.category, r.metric, r.n_images) for r in host_rows
    ]
    for a, b in zip(rows, host_rows):
        assert a.value == b.value or (a.value != a.value and b.value != b.value), (a, b)
    assert {r.metric for r in rows} >= set(METRICS)


def test_the_option_is_validated_and_not_part_of_a_run_identity():
    from feclip.config import RunConfig
    from feclip.engine import identity

    cfg = RunConfig()
    cfg.eval.metrics_device = "gpu"
    with pytest.raises(ConfigError, match=r"eval\.metrics_device must be one of"):
        cfg.validate()
    assert "eval.metrics_device" in identity.NOT_IDENTITY
