"""Side-by-side speed ratios on this machine's CPU (noise cancels in ratios measured in one run).

Sections (``--only`` picks some):
  model    FE-CLIP forward vs plain ``encode_image`` on ViT-L-14-336 with random weights, batch 1,
           interleaved runs; trainable vs frozen parameter counts.
  train    one training step (forward + loss + backward + Adam) with vs without the frozen-prefix cache
           for the tap sets spread3, last4 and stages [5, 11, 17, 23] on ViT-L-14-336 (random weights).
  eval     one synthetic category evaluated end to end (model, maps, all metrics) on ViT-L-14-336.
  metrics  AUPRO (zsad, exact) vs straightforward implementations (scripts/bench_metrics.py).
  host     the host work of one training epoch over 1,725 images at 336: the DataLoader path vs the
           prefix cache's index lookups (no model).
  pipeline eval images/s of the full evaluation (decode 1024x1024 PNGs -> model -> maps -> metrics)
           relative to the model alone on pre-loaded tensors, interleaved, batch 4, with 0 and 2
           DataLoader workers, from the files and from a warm decoded-image cache (disk_cache, built
           beforehand); for ViT-L-14-336 on 8 PNGs (the model bound on a CPU) and feclip-tiny on 32
           (the host bound, as on a GPU); plus the feed alone from the warm cache (no model).
  syncs    host-device synchronisations per training step and per evaluation batch (counted on the
           CPU by feclip.engine.hostsync; feclip-tiny).
  precision the demo (feclip-tiny, synthetic set A, 30 epochs) evaluated on set B in fp32 and in
           emulated bf16 (CPU autocast; FE-CLIP's bf16 policy): image/pixel AUROC and map differences.
  spread   the demo trained again with the same seed and gradient noise at float rounding level (what
           non-deterministic CUDA reductions do), and with other seeds: the ranges of the metrics.

The last line printed is one JSON object of named figures, e.g. ``forward_overhead``.
Usage: ``python scripts/bench.py [--only model,metrics] [--repeats 5] [--model ViT-L-14-336-quickgelu]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Run each function once per round, in turn, so slow drifts hit all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Median of ``values`` and a distribution-free confidence interval for it (order statistics:
    the interval between the k-th smallest and the k-th largest value, k the largest rank whose
    binomial(n, 1/2) tail stays within (1 - confidence) / 2). ``nan`` bounds when n is too small
    (n >= 6 gives a 95 % interval)."""
    from scipy.stats import binom

    xs = sorted(values)
    n = len(xs)
    k = 0  # 1-based rank of the lower bound; 0: no interval at this confidence
    while k + 1 <= n // 2 and binom.cdf(k, n, 0.5) <= (1 - confidence) / 2:
        k += 1
    lo, hi = (xs[k - 1], xs[n - k]) if k else (float("nan"), float("nan"))
    return statistics.median(xs), lo, hi


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and 95 % CI of the per-round ratios ``num / den`` of interleaved timings."""
    return median_ci([a / b for a, b in zip(times[num], times[den])])


def _ci_text(ratio: tuple[float, float, float]) -> str:
    return f"{ratio[0]:.3f} (95% CI {ratio[1]:.3f}-{ratio[2]:.3f})"


def bench_model(model_name: str, repeats: int) -> dict:
    from feclip.models import FEClip, FEClipConfig, load_clip

    torch.manual_seed(0)
    clip = load_clip(model_name, pretrained=None)
    model = FEClip(clip, FEClipConfig()).eval()
    size = model.image_size
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        model(x), clip.encode_image(x)  # warm-up
        times = _interleaved(
            {"feclip": lambda: model(x), "encode_image": lambda: clip.encode_image(x)}, repeats
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = paired_ratio(times, "feclip", "encode_image")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(
        f"[model] {model_name}, batch 1, {repeats} interleaved rounds, median seconds: "
        f"FE-CLIP {med['feclip']:.3f}, encode_image {med['encode_image']:.3f}; "
        f"median paired ratio {_ci_text(ratio)}"
    )
    print(f"[model] parameters: trainable {trainable:,}, frozen {frozen:,}")
    return {
        "forward_overhead": ratio[0],
        "forward_overhead_ci95": [ratio[1], ratio[2]],
        "feclip_forward_seconds": med["feclip"],
        "encode_image_seconds": med["encode_image"],
        "trainable_params": trainable,
        "frozen_params": frozen,
    }


TAP_SETS = {"spread3": (15, 18, 21, 23), "last4": (20, 21, 22, 23), "stages": (5, 11, 17, 23)}


def _train_step_times(clip, taps: tuple[int, ...], repeats: int, batch: int) -> dict[str, float]:
    """Median seconds of one training step from the images and from cached prefix tokens."""
    from feclip.config import LossConfig, TrainConfig
    from feclip.engine.train import build_optimizer
    from feclip.losses import feclip_loss
    from feclip.models import FEClip, FEClipConfig

    model = FEClip(clip, FEClipConfig(taps=taps)).train()
    opt = build_optimizer(model, TrainConfig())
    size = model.image_size
    x = torch.randn(batch, 3, size, size)
    masks = (torch.rand(batch, size, size) > 0.95).float()
    labels = torch.arange(batch) % 2
    with torch.no_grad():
        prefix = model.prefix(x)  # what the cache would hold

    def step(use_cache: bool):
        out = model.forward_from_prefix(prefix) if use_cache else model(x)
        loss, _ = feclip_loss(out, masks, labels, LossConfig())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(True), step(False)  # warm-up
    times = _interleaved({"cached": lambda: step(True), "full": lambda: step(False)}, repeats)
    return {k: statistics.median(v) for k, v in times.items()} | {
        "ratio": paired_ratio(times, "full", "cached")
    }


def bench_train(model_name: str, repeats: int, batch: int) -> dict:
    """Train-step time with and without the prefix cache, interleaved, per tap set."""
    from feclip.models import load_clip

    torch.manual_seed(0)
    clip = load_clip(model_name, pretrained=None)
    figures = {}
    for name, taps in TAP_SETS.items():
        med = _train_step_times(clip, taps, repeats, batch)
        figures[f"prefix_cache_speedup_{name}"] = med["ratio"][0]
        figures[f"prefix_cache_speedup_{name}_ci95"] = list(med["ratio"][1:])
        figures[f"train_step_seconds_{name}"] = med["full"]
        figures[f"train_step_cached_seconds_{name}"] = med["cached"]
        print(
            f"[train] {name} {list(taps)}: batch {batch}, step {med['full']:.2f} s without the cache, "
            f"{med['cached']:.2f} s with it: median paired speed-up {_ci_text(med['ratio'])}"
        )
    return figures


def bench_eval(model_name: str, n_images: int) -> dict:
    """One synthetic category end to end: decoding, model, maps (sigma 4), all metrics."""
    import tempfile

    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset, list_samples, make_synthetic
    from feclip.engine.evaluate import evaluate
    from feclip.models import FEClip, FEClipConfig, load_clip

    torch.manual_seed(0)
    model = FEClip(load_clip(model_name, pretrained=None), FEClipConfig()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        n_bad = n_images // 2
        sets = make_synthetic(tmp, n_train_good=1, n_test_good=n_images - n_bad, n_test_bad=n_bad)
        samples = [s for s in list_samples("synthetic", sets["set_b"]) if s.category == "rocket"]
        ds = AnomalyDataset(samples, image_size=model.image_size)
        t0 = time.perf_counter()
        rows = evaluate(model, "synthetic", ds, EvalConfig(batch_size=8), torch.device("cpu"))
        seconds = time.perf_counter() - t0
    print(
        f"[eval] {len(samples)} images of one synthetic category end to end: {seconds:.1f} s "
        f"({seconds / len(samples):.2f} s per image, {len(rows)} metric rows)"
    )
    return {"eval_category_seconds": seconds, "eval_seconds_per_image": seconds / len(samples)}


def bench_host(n_images: int = 1725, size: int = 336, batch: int = 16) -> dict:
    """Host work of one training epoch over an MVTec-sized set (no model): the DataLoader path (decoded
    images normalised, items collated) vs :meth:`PrefixCache.batch` (index lookups of the cached masks
    and labels). 12 synthetic images, decoded once, stand for the 1,725 (index modulo 12)."""
    import tempfile
    from types import SimpleNamespace

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
    cache = SimpleNamespace(  # PrefixCache's masks and labels at 336; tokens left out (a GPU gathers
        tokens=torch.zeros(n_images, 1, 1),  # them on the device, a CPU copies 38 MB per batch either way)
        masks=torch.zeros(n_images, size, size, dtype=torch.uint8),
        labels=torch.zeros(n_images, dtype=torch.int64),
        device=torch.device("cpu"),
    )
    times = _interleaved(
        {
            "loader": lambda: [b for b in DataLoader(Repeated(), batch_sampler=batches, collate_fn=collate)],
            "cache": lambda: [PrefixCache.batch(cache, b) for b in batches],
        },
        2,
    )
    loader_s, cache_s = min(times["loader"]), min(times["cache"])
    print(
        f"[host] one epoch of {n_images} images at {size}: DataLoader {loader_s:.2f} s, the prefix "
        f"cache's mask and label lookups {cache_s:.2f} s (on a GPU those run on the device)"
    )
    return {"epoch_host_seconds_loader": loader_s, "epoch_host_seconds_cache": cache_s}


def _png_category(root: Path, n: int, size: int) -> list:
    """``n`` MVTec-like PNGs of ``size`` x ``size`` (half anomalous, with masks) of one category, listed
    as a ``folder`` dataset."""
    import numpy as np
    from PIL import Image

    from feclip.data import list_samples

    rng = np.random.default_rng(0)
    for sub in ("good", "bad"):
        (root / "test" / sub).mkdir(parents=True, exist_ok=True)
    (root / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        # smooth texture plus noise: compresses like a photo of a part (a few hundred kB per PNG)
        base = 128 + 60 * np.sin(xx / (17 + i) + yy / 29.0)[..., None] * np.array([1.0, 0.8, 0.6])
        img = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        sub = "bad" if i % 2 else "good"
        Image.fromarray(img).save(root / "test" / sub / f"{i:03d}.png")
        if sub == "bad":
            mask = ((yy - size * 0.4) ** 2 + (xx - size * 0.6) ** 2 < (size * 0.08) ** 2).astype(
                np.uint8
            ) * 255
            Image.fromarray(mask).save(root / "ground_truth" / "bad" / f"{i:03d}_mask.png")
    return list_samples("mvtec", root.parent, categories=[root.name])


def bench_pipeline(
    model_names: list[str], n_images: int, repeats: int, size: int = 1024, batch_size: int = 4
) -> dict:
    """Evaluation images/s of the whole pipeline relative to the model alone, per model and workers.

    Model alone: ``model(images)`` over pre-decoded, pre-collated batches (what a GPU could do if the
    host were free). Pipeline: :func:`feclip.engine.evaluate.evaluate` from the PNG files (a fresh
    dataset every round, so every image is decoded), maps with sigma 4 and every metric. Cached
    pipeline: the same with ``disk_cache`` (a fresh dataset every round over an entry written before the
    timed rounds: what every run after the first one does). Feed: the evaluation ``DataLoader`` alone
    over the warm cache, 0 workers (memory map -> normalise -> collate), to see whether it bounds the
    main process. The ratio of each to the model alone is measured in interleaved rounds (median of the
    paired ratios, 95 % CI)."""
    import tempfile

    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset
    from feclip.data.dataset import collate
    from feclip.engine.evaluate import _loader, evaluate
    from feclip.models import FEClip, FEClipConfig, load_clip

    figures: dict = {}
    device = torch.device("cpu")
    cfg = EvalConfig(batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        all_samples = _png_category(Path(tmp) / "part", n_images, size)
        disk = Path(tmp) / "decoded"  # one entry per model's input size
        for spec in model_names:  # "name" or "name:images"
            name, _, count = spec.partition(":")
            samples = all_samples[: int(count)] if count else all_samples
            n_images = len(samples)
            torch.manual_seed(0)
            model = FEClip(load_clip(name, pretrained=None), FEClipConfig()).eval()
            s = model.image_size
            pre = AnomalyDataset(samples, image_size=s).preload()
            batches = [
                collate([pre[i] for i in range(j, min(j + cfg.batch_size, len(pre)))])["image"]
                for j in range(0, len(pre), cfg.batch_size)
            ]

            def model_alone(batches=batches, model=model):
                with torch.inference_mode():
                    for x in batches:
                        model(x)

            t0 = time.perf_counter()
            AnomalyDataset(samples, image_size=s, disk_cache=disk).preload()  # the first run's build
            build_s = time.perf_counter() - t0

            def feed(files=samples, s=s):
                ds = AnomalyDataset(files, image_size=s, disk_cache=disk)
                for _ in _loader(ds, cfg.batch_size, device, 0, original=False):
                    pass

            fns = {"model": model_alone, "feed_cached": feed}
            for workers in (0, 2):
                fns[f"pipeline_w{workers}"] = lambda w=workers, model=model, s=s, files=samples: evaluate(
                    model, "bench", AnomalyDataset(files, image_size=s), cfg, device, num_workers=w
                )
                fns[f"pipeline_cached_w{workers}"] = lambda w=workers, model=model, s=s, files=samples: (
                    evaluate(
                        model,
                        "bench",
                        AnomalyDataset(files, image_size=s, disk_cache=disk),
                        cfg,
                        device,
                        num_workers=w,
                    )
                )
            for fn in fns.values():
                fn()  # warm-up (and the workers' first start)
            times = _interleaved(fns, repeats)
            short = "vitl" if "ViT" in name else "tiny"
            model_ips = n_images / statistics.median(times["model"])
            figures[f"eval_model_images_per_s_{short}"] = model_ips
            figures[f"decoded_cache_build_seconds_{short}"] = build_s
            feed_ratio = paired_ratio(times, "model", "feed_cached")
            figures[f"eval_feed_images_per_s_{short}_cached_w0"] = n_images / statistics.median(
                times["feed_cached"]
            )
            figures[f"eval_feed_ratio_{short}_cached_w0"] = feed_ratio[0]
            figures[f"eval_feed_ratio_{short}_cached_w0_ci95"] = [feed_ratio[1], feed_ratio[2]]
            print(
                f"[pipeline] {name}: decoded-image cache of {n_images} PNGs written in {build_s:.2f} s; "
                f"the feed alone from it (0 workers, no model) "
                f"{figures[f'eval_feed_images_per_s_{short}_cached_w0']:.1f} images/s: "
                f"{_ci_text(feed_ratio)} x the model alone"
            )
            for workers in (0, 2):
                for cached in ("", "_cached"):
                    key, tag = f"pipeline{cached}_w{workers}", f"{short}{cached}_w{workers}"
                    ratio = paired_ratio(times, "model", key)  # = pipeline images/s / model images/s
                    figures[f"eval_images_per_s_{tag}"] = n_images / statistics.median(times[key])
                    figures[f"eval_pipeline_ratio_{tag}"] = ratio[0]
                    figures[f"eval_pipeline_ratio_{tag}_ci95"] = [ratio[1], ratio[2]]
                    source = "from the warm cache" if cached else "from the PNGs"
                    print(
                        f"[pipeline] {name}, {n_images} PNGs of {size}x{size}, batch {cfg.batch_size}, "
                        f"{workers} workers, {source}: pipeline {figures[f'eval_images_per_s_{tag}']:.2f} "
                        f"images/s, model alone {model_ips:.2f} images/s: ratio {_ci_text(ratio)}"
                    )
    return figures


def bench_syncs() -> dict:
    """Host-device synchronisations per training step (cached and not) and per evaluation batch."""
    import math
    import tempfile

    from feclip.config import EvalConfig, TrainConfig
    from feclip.data import AnomalyDataset, list_samples, make_synthetic
    from feclip.engine import train as train_module
    from feclip.engine.evaluate import predict
    from feclip.engine.hostsync import DEVICE_UNDER_TEST, HostSyncCounter
    from feclip.models import FEClip, FEClipConfig, load_clip

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = make_synthetic(Path(tmp) / "syn", n_train_good=2, n_test_good=8, n_test_bad=8, image_size=64)
        ds = AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84)  # 48 images
        for cache in ("on", "off"):
            torch.manual_seed(0)
            model = FEClip(load_clip("feclip-tiny"), FEClipConfig())
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


def bench_precision(epochs: int = 30) -> dict:
    """The demo trained in fp32, evaluated on set B in fp32 and in emulated bf16 (the same adapters)."""
    import tempfile

    import numpy as np

    from feclip.config import EvalConfig, TrainConfig
    from feclip.data import AnomalyDataset, list_samples, make_synthetic
    from feclip.engine.evaluate import metric_rows, predict
    from feclip.engine.train import train
    from feclip.models import FEClip, FEClipConfig, load_clip

    def tiny(precision):
        return FEClip(load_clip("feclip-tiny", seed=42), FEClipConfig(), precision=precision)

    with tempfile.TemporaryDirectory() as tmp:
        sets = make_synthetic(Path(tmp) / "syn")
        torch.manual_seed(42)  # the demo's seed, before the adapters are drawn
        model = tiny("fp32")
        cfg = TrainConfig(epochs=epochs, lr=2e-3, progress=False, resume=False)
        cfg.fc_patch.policy = "same"
        train(
            model,
            AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84),
            cfg,
            tmp,
            42,
            torch.device("cpu"),
        )
        target = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)
        results = {}
        for precision in ("fp32", "bf16"):
            m = tiny(precision)
            m.load_state_dict(model.state_dict(), strict=False)
            preds = predict(m, target, EvalConfig(), torch.device("cpu"))
            rows = metric_rows("synthetic", preds, target.category_has_masks, EvalConfig())
            macro = {
                k: float(np.mean([r.value for r in rows if r.metric == k and r.category != "__micro__"]))
                for k in ("image_auroc", "pixel_auroc", "pixel_aupro_zsad")
            }
            results[precision] = (preds, macro)
    (p32, m32), (p16, m16) = results["fp32"], results["bf16"]
    map_diff = max(float(np.abs(a - b).max()) for a, b in zip(p32.maps, p16.maps))
    figures = {
        "bf16_image_auroc_points": 100 * (m16["image_auroc"] - m32["image_auroc"]),
        "bf16_pixel_auroc_points": 100 * (m16["pixel_auroc"] - m32["pixel_auroc"]),
        "bf16_pro_zsad_points": 100 * (m16["pixel_aupro_zsad"] - m32["pixel_aupro_zsad"]),
        "bf16_max_map_diff": map_diff,
        "bf16_max_score_diff": float(np.abs(p32.scores - p16.scores).max()),
        "bf16_distinct_scores": int(len(np.unique(p16.scores))),
        "fp32_distinct_scores": int(len(np.unique(p32.scores))),
    }
    print(
        f"[precision] demo ({epochs} epochs, feclip-tiny) on set B, fp32 -> emulated bf16: image AUROC "
        f"{100 * m32['image_auroc']:.2f} -> {100 * m16['image_auroc']:.2f}, pixel AUROC "
        f"{100 * m32['pixel_auroc']:.2f} -> {100 * m16['pixel_auroc']:.2f}, PRO {100 * m32['pixel_aupro_zsad']:.2f} -> "
        f"{100 * m16['pixel_aupro_zsad']:.2f}; max |map diff| {map_diff:.4f}, max |score diff| "
        f"{figures['bf16_max_score_diff']:.4f}; distinct scores {figures['fp32_distinct_scores']} / "
        f"{figures['bf16_distinct_scores']} of {len(p32.scores)}"
    )
    return figures


def _demo_metrics(
    seed: int, epochs: int, sets: dict, grad_noise: float = 0.0, noise_seed: int = 0, precision: str = "fp32"
) -> dict:
    """Train the demo (feclip-tiny, set A) and evaluate set B at ``precision`` (``bf16``: emulated on
    the CPU, as on CUDA): macro metrics in points. With
    ``grad_noise``, every gradient is multiplied by ``1 + grad_noise * N(0, 1)`` per element and step:
    the rounding differences of CUDA's non-deterministic reductions (atomic adds in another order)."""
    import tempfile

    import numpy as np

    from feclip.config import EvalConfig, TrainConfig
    from feclip.data import AnomalyDataset, list_samples
    from feclip.engine.evaluate import metric_rows, predict
    from feclip.engine.train import train
    from feclip.models import FEClip, FEClipConfig, load_clip

    torch.manual_seed(seed)
    model = FEClip(load_clip("feclip-tiny", seed=seed), FEClipConfig(), precision=precision)
    if grad_noise:
        g = torch.Generator().manual_seed(noise_seed)
        for p in list(model.adapters.parameters()) + list(model.fc_patch.parameters()):
            p.register_hook(lambda grad, g=g: grad * (1 + grad_noise * torch.randn(grad.shape, generator=g)))
    cfg = TrainConfig(epochs=epochs, lr=2e-3, progress=False, resume=False)
    cfg.fc_patch.policy = "same"
    with tempfile.TemporaryDirectory() as tmp:
        train(
            model,
            AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84),
            cfg,
            tmp,
            seed,
            torch.device("cpu"),
        )
    target = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)
    rows = metric_rows(
        "synthetic",
        predict(model, target, EvalConfig(), torch.device("cpu")),
        target.category_has_masks,
        EvalConfig(),
    )
    return {
        k: 100 * float(np.mean([r.value for r in rows if r.metric == k and r.category != "__micro__"]))
        for k in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro_zsad")
    }


def bench_spread(epochs: int = 30, runs: int = 3, grad_noise: float = 1e-6, precision: str = "bf16") -> dict:
    """How far apart two runs of the same seed end when the reductions are not deterministic (emulated:
    gradient noise at float rounding level), next to how far apart two seeds end; at the CUDA
    precision (bf16, emulated), where a rounding difference can cross a bf16 rounding boundary."""
    import tempfile

    import numpy as np

    from feclip.data import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        sets = make_synthetic(Path(tmp) / "syn")
        base = _demo_metrics(42, epochs, sets, precision=precision)
        noisy = [_demo_metrics(42, epochs, sets, grad_noise, i, precision) for i in range(runs)]
        seeds = [_demo_metrics(43 + i, epochs, sets, precision=precision) for i in range(runs)]
    figures = {}
    for k in base:
        same = [base[k]] + [m[k] for m in noisy]
        other = [base[k]] + [m[k] for m in seeds]
        figures[f"spread_same_seed_{k}_points"] = float(np.ptp(same))
        figures[f"spread_seeds_{k}_points"] = float(np.ptp(other))
        print(
            f"[spread] demo {epochs} epochs ({precision}), {k}: seed 42 {base[k]:.2f}; same seed, gradient noise "
            f"{grad_noise:g} ({runs} runs): range {np.ptp(same):.2f} points "
            f"({', '.join(f'{v:.2f}' for v in same[1:])}); {runs} other seeds: range {np.ptp(other):.2f} "
            f"({', '.join(f'{v:.2f}' for v in other[1:])})"
        )
    return figures


SECTIONS = ("model", "train", "eval", "metrics", "host", "pipeline", "syncs", "precision", "spread")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections: {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=15,
        help="interleaved rounds for the model and train sections (>= 6 for a 95%% CI of the median)",
    )
    parser.add_argument("--train-batch", type=int, default=2, help="batch size of the train section")
    parser.add_argument("--eval-images", type=int, default=8, help="images of the eval section's category")
    parser.add_argument(
        "--model", default="ViT-L-14-336-quickgelu", help="open_clip model name (random weights)"
    )
    parser.add_argument("--n-maps", type=int, default=200, help="maps for the metrics section")
    parser.add_argument("--size", type=int, default=336, help="map size for the metrics section")
    parser.add_argument("--pipeline-images", type=int, default=32, help="PNGs of the pipeline section")
    parser.add_argument(
        "--pipeline-models",
        default="ViT-L-14-336-quickgelu:8,feclip-tiny",
        help="models of the pipeline section (comma-separated; name:N evaluates the first N PNGs)",
    )
    parser.add_argument(
        "--precision-epochs", type=int, default=30, help="demo epochs of the precision and spread sections"
    )
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    if "model" in sections:
        figures.update(bench_model(args.model, args.repeats))
    if "train" in sections:
        figures.update(bench_train(args.model, args.repeats, args.train_batch))
    if "eval" in sections:
        figures.update(bench_eval(args.model, args.eval_images))
    if "host" in sections:
        figures.update(bench_host())
    if "pipeline" in sections:
        models = [m.strip() for m in args.pipeline_models.split(",") if m.strip()]
        figures.update(bench_pipeline(models, args.pipeline_images, args.repeats))
    if "syncs" in sections:
        figures.update(bench_syncs())
    if "precision" in sections:
        figures.update(bench_precision(args.precision_epochs))
    if "spread" in sections:
        figures.update(bench_spread(args.precision_epochs))
    if "metrics" in sections:
        from bench_metrics import bench_metrics

        figures.update(bench_metrics(n_maps=args.n_maps, size=args.size))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
