"""The host's side of training and evaluation, measured on the CPU: the ``host`` and ``syncs`` sections
of ``scripts/bench.py``.

  host     the host work of one training epoch over 1,725 images at 336: the DataLoader path vs the
           prefix cache's index lookups (no model).
  syncs    host-device synchronisations per training step and per evaluation batch (counted on the
           CPU by feclip.engine.hostsync; feclip-tiny).
"""

from __future__ import annotations

from pathlib import Path

import torch
from benchlib import feclip_model, interleaved


def bench_host(n_images: int = 1725, size: int = 336, batch: int = 16) -> dict:
    """Host work of one training epoch over an MVTec-sized set (no model): the DataLoader path (decoded
    images normalised, items collated) vs :meth:`PrefixCache.batch` (index lookups of the cached masks
    and labels). 12 synthetic images, decoded once, stand for the 1,725 (index modulo 12)."""
    import tempfile

    from torch.utils.data import DataLoader, Dataset

    from feclip.data import AnomalyDataset, list_samples, make_synthetic
    from feclip.data.dataset import collate
    from feclip.engine.cache import PrefixCache

    with tempfile.TemporaryDirectory() as tmp:
        sets = make_synthetic(tmp, n_train_good=1, n_test_good=2, n_test_bad=2)
        real = AnomalyDataset(list_samples("synthetic", sets["set_a"])[:12], image_size=size).preload()

    class Repeated(Dataset):
        def __len__(self):
            return n_images

        def __getitem__(self, i):
            return real[i % len(real)] | {"index": i}

    batches = [list(range(i, min(i + batch, n_images))) for i in range(0, n_images, batch)]
    # a PrefixCache's storage without a model: masks and labels at 336; tokens left out (a GPU gathers
    # them on the device, a CPU copies 38 MB per batch either way)
    cache = PrefixCache.__new__(PrefixCache)
    cache.tokens = torch.zeros(n_images, 1, 1)
    cache.masks = torch.zeros(n_images, size, size, dtype=torch.uint8)
    cache.labels = cache.host_labels = torch.zeros(n_images, dtype=torch.int64)
    cache.device = torch.device("cpu")
    times = interleaved(
        {
            "loader": lambda: [b for b in DataLoader(Repeated(), batch_sampler=batches, collate_fn=collate)],
            "cache": lambda: [cache.batch(b) for b in batches],
        },
        2,
    )
    loader_s, cache_s = min(times["loader"]), min(times["cache"])
    print(
        f"[host] one epoch of {n_images} images at {size}: DataLoader {loader_s:.2f} s, the prefix "
        f"cache's mask and label lookups {cache_s:.2f} s (on a GPU those run on the device)"
    )
    return {"epoch_host_seconds_loader": loader_s, "epoch_host_seconds_cache": cache_s}


def bench_syncs() -> dict:
    """Host-device synchronisations per training step (cached and not) and per evaluation batch."""
    import math
    import tempfile

    from feclip.config import EvalConfig, TrainConfig
    from feclip.data import AnomalyDataset, list_samples, make_synthetic
    from feclip.engine import train as train_module
    from feclip.engine.evaluate import predict
    from feclip.engine.hostsync import DEVICE_UNDER_TEST, HostSyncCounter
    from feclip.models import load_clip

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = make_synthetic(Path(tmp) / "syn", n_train_good=2, n_test_good=8, n_test_bad=8, image_size=64)
        ds = AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84)  # 48 images
        for cache in ("on", "off"):
            model = feclip_model(load_clip("feclip-tiny"))
            cfg = TrainConfig(epochs=1, batch_size=4, prefix_cache=cache, progress=False, resume=False)
            counter = HostSyncCounter().on_device(model)
            with counter:
                result = train_module.train(model, ds, cfg, Path(tmp) / cache, 0, DEVICE_UNDER_TEST)
            figures[f"host_syncs_per_train_step_cache_{cache}"] = counter.syncs / result.steps
            print(
                f"[syncs] training, prefix cache {cache}: {counter.syncs} waits in {result.steps} steps "
                f"({dict(counter.counts)}; one read every {train_module.CHECK_EVERY} steps and at the epoch's end)"
            )
        eval_ds = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)
        counter = HostSyncCounter().on_device(model)
        with counter:
            predict(model, eval_ds, EvalConfig(batch_size=8), DEVICE_UNDER_TEST)
        batches = math.ceil(len(eval_ds) / 8)
        figures["host_syncs_per_eval_batch"] = counter.syncs / batches
        print(f"[syncs] evaluation: {counter.syncs} waits in {batches} batches ({dict(counter.counts)})")
    return figures
