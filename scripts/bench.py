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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        default="model,train,eval,metrics,host",
        help="comma-separated sections: model, train, eval, metrics, host",
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
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - {"model", "train", "eval", "metrics", "host"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from model, train, eval, metrics, host")
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
    if "metrics" in sections:
        from bench_metrics import bench_metrics

        figures.update(bench_metrics(n_maps=args.n_maps, size=args.size))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
