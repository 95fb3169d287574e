"""``data.num_workers`` is read: DataLoader processes decode for the prefix cache, uncached epochs and
evaluation; the numbers do not depend on it (nor does the run's identity or folder)."""

import pytest
import torch
from conftest import cache_override, compose_run
from torch.utils.data import DataLoader

from feclip.engine import cache as cache_module
from feclip.engine import evaluate as evaluate_module
from feclip.engine import identity
from feclip.engine import train as train_module
from feclip.engine.run import run
from feclip.results import read_metrics


@pytest.fixture(scope="module")
def data_root(synthetic_sets):
    return synthetic_sets(n_train_good=2, n_test_good=2, n_test_bad=2, image_size=64)["set_a"].parents[1]


def overrides(data_root, results, *extra):
    return [
        "backbone=tiny",
        "protocol=demo",
        f"paths.data_root={data_root}",
        f"paths.results_dir={results}",
        cache_override(),
        "train.epochs=1",
        "train.batch_size=4",
        "train.progress=false",
        "eval.batch_size=4",
        *extra,
    ]


@pytest.mark.parametrize("prefix_cache", ["on", "off"])
def test_workers_decode_for_training_and_evaluation_and_change_no_number(
    data_root, tmp_path, monkeypatch, prefix_cache
):
    seen = []

    class Spy(DataLoader):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("num_workers", 0))
            super().__init__(*args, **kwargs)

    for module in (train_module, cache_module, evaluate_module):
        monkeypatch.setattr(module, "DataLoader", Spy)
    extra = (f"train.prefix_cache={prefix_cache}", "study=feed")
    with_workers = run(compose_run(overrides(data_root, tmp_path / "w2", "data.num_workers=2", *extra)))
    assert seen and set(seen) == {2}  # the cache's build or the epoch, and the evaluation
    seen.clear()
    without = run(compose_run(overrides(data_root, tmp_path / "w0", *extra)))
    assert set(seen) == {0}
    a, b = (
        {(r["category"], r["metric"]): r["value"] for r in read_metrics(d / "metrics.csv")}
        for d in (with_workers, without)
    )
    assert a == b
    # the same folder name and identity: workers change no number
    assert with_workers.relative_to(tmp_path / "w2") == without.relative_to(tmp_path / "w0")
    assert (with_workers / "identity.json").read_text() == (without / "identity.json").read_text()


def test_num_workers_is_left_out_of_the_identity(data_root):
    a = compose_run(overrides(data_root, "r", "data.num_workers=8"))
    b = compose_run(overrides(data_root, "r"))
    assert identity.number_config(a) == identity.number_config(b)
    assert a.variant == b.variant == "default"


def test_the_original_resolution_masks_are_decoded_by_the_workers(data_root):
    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset, list_samples
    from feclip.models import FEClip, FEClipConfig, load_clip

    torch.manual_seed(0)
    model = FEClip(load_clip("feclip-tiny"), FEClipConfig())
    ds = AnomalyDataset(list_samples("synthetic", data_root / "synthetic" / "set_b"), image_size=84)
    cfg = EvalConfig(batch_size=4, resolution="original")
    one = evaluate_module.predict(model, ds, cfg, torch.device("cpu"), num_workers=0)
    two = evaluate_module.predict(model, ds, cfg, torch.device("cpu"), num_workers=2)
    assert all((x == y).all() for x, y in zip(one.masks, two.masks)) and len(one.masks) == len(ds)
    assert all((x == y).all() for x, y in zip(one.maps, two.maps))
    assert one.masks[0].shape == ds.original_mask(0).shape
