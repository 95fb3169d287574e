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
  precision_wide the same trained demo in fp32 and emulated bf16 on larger sets B (3 categories of 120
           normal + 240 anomalous images), one per seed (--precision-wide-seeds): the image AUROC
           difference per seed, its mean and 95 % t-interval, the flipped normal-anomalous pairs and the
           resolution (points per flipped pair).
  spread   the demo trained again with the same seed and gradient noise at float rounding level (what
           non-deterministic CUDA reductions do), and with other seeds: the ranges of the metrics.
  overlap  an evaluation (690 maps of 336^2, 15 categories, all metrics) with each category's metrics
           started while the model predicts the next ones vs all metrics after the predictions, on an
           emulated GPU (feclip-tiny at 336 plus --overlap-device-ms of sleep per batch: the host free
           as while a GPU computes); the model alone too, for the pipeline ratios (bench_overlap.py).
  reuse    train once, evaluate many (scripts/bench_reuse.py): an eval-only sweep of the demo (8 values
           of eval.sigma) with the adapter and outputs stores vs without, interleaved; and rescoring
           stored outputs into every metric per image vs one ViT-L-14-336 forward.

The last line printed is one JSON object of named figures, e.g. ``forward_overhead``. Helpers shared
with scripts/bench_gpu.py (timing, the training step, the PNG category) are in scripts/benchlib.py;
the metrics section is scripts/bench_metrics.py, host and syncs scripts/bench_host.py, precision,
precision_wide and spread scripts/bench_demo.py.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, bench_demo, bench_metrics: siblings

from benchlib import (  # noqa: E402
    ci_text,
    feclip_model,
    interleaved,
    paired_ratio,
    png_category,
    train_step,
    training_batch,
)


def bench_model(model_name: str, repeats: int) -> dict:
    from feclip.models import load_clip

    clip = load_clip(model_name, pretrained=None)
    model = feclip_model(clip).eval()
    size = model.image_size
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        model(x), clip.encode_image(x)  # warm-up
        times = interleaved(
            {"feclip": lambda: model(x), "encode_image": lambda: clip.encode_image(x)}, repeats
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = paired_ratio(times, "feclip", "encode_image")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(
        f"[model] {model_name}, batch 1, {repeats} interleaved rounds, median seconds: "
        f"FE-CLIP {med['feclip']:.3f}, encode_image {med['encode_image']:.3f}; "
        f"median paired ratio {ci_text(ratio)}"
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
    from feclip.config import TrainConfig
    from feclip.engine.train import build_optimizer

    model = feclip_model(clip, taps=taps).train()
    opt = build_optimizer(model, TrainConfig())
    x, prefix, masks, labels = training_batch(model, batch, torch.device("cpu"))  # prefix: the cache's

    def step(use_cache: bool):
        train_step(model, opt, prefix if use_cache else x, masks, labels, cached=use_cache)

    step(True), step(False)  # warm-up
    times = interleaved({"cached": lambda: step(True), "full": lambda: step(False)}, repeats)
    return {k: statistics.median(v) for k, v in times.items()} | {
        "ratio": paired_ratio(times, "full", "cached")
    }


def bench_train(model_name: str, repeats: int, batch: int) -> dict:
    """Train-step time with and without the prefix cache, interleaved, per tap set."""
    from feclip.models import load_clip

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
            f"{med['cached']:.2f} s with it: median paired speed-up {ci_text(med['ratio'])}"
        )
    return figures


def bench_eval(model_name: str, n_images: int) -> dict:
    """One synthetic category end to end: decoding, model, maps (sigma 4), all metrics."""
    import tempfile

    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset, list_samples, make_synthetic
    from feclip.engine.evaluate import evaluate
    from feclip.models import load_clip

    model = feclip_model(load_clip(model_name, pretrained=None)).eval()
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
    from feclip.models import load_clip

    figures: dict = {}
    device = torch.device("cpu")
    cfg = EvalConfig(batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        all_samples = png_category(Path(tmp) / "part", n_images, size)
        disk = Path(tmp) / "decoded"  # one entry per model's input size
        for spec in model_names:  # "name" or "name:images"
            name, _, count = spec.partition(":")
            samples = all_samples[: int(count)] if count else all_samples
            n_images = len(samples)
            model = feclip_model(load_clip(name, pretrained=None)).eval()
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
            times = interleaved(fns, repeats)
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
                f"{ci_text(feed_ratio)} x the model alone"
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
                        f"images/s, model alone {model_ips:.2f} images/s: ratio {ci_text(ratio)}"
                    )
    return figures


SECTIONS = (
    "model",
    "train",
    "eval",
    "metrics",
    "host",
    "pipeline",
    "syncs",
    "precision",
    "precision_wide",
    "spread",
    "reuse",
    "overlap",
)


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
    parser.add_argument(
        "--overlap-repeats", type=int, default=7, help="interleaved rounds of the overlap section"
    )
    parser.add_argument(
        "--overlap-device-ms",
        type=float,
        default=60.0,
        help="emulated device time per batch of 32 in the overlap section (60: ViT-L-14-336 on an H200)",
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
        "--precision-epochs",
        type=int,
        default=30,
        help="demo epochs of the precision, precision_wide and spread sections",
    )
    parser.add_argument(
        "--precision-wide-seeds",
        type=int,
        default=5,
        help="sets B of the precision_wide section (make_synthetic seeds 0 .. N-1)",
    )
    parser.add_argument(
        "--sweep-rounds", type=int, default=6, help="interleaved sweep pairs of the reuse section (>= 6)"
    )
    parser.add_argument(
        "--sweep-epochs", type=int, default=None, help="train.epochs of the reuse section's demo (30)"
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
        from bench_host import bench_host

        figures.update(bench_host())
    if "pipeline" in sections:
        models = [m.strip() for m in args.pipeline_models.split(",") if m.strip()]
        figures.update(bench_pipeline(models, args.pipeline_images, args.repeats))
    if "syncs" in sections:
        from bench_host import bench_syncs

        figures.update(bench_syncs())
    if "precision" in sections:
        from bench_demo import bench_precision

        figures.update(bench_precision(args.precision_epochs))
    if "precision_wide" in sections:
        from bench_demo import bench_precision_wide

        figures.update(
            bench_precision_wide(args.precision_epochs, seeds=tuple(range(args.precision_wide_seeds)))
        )
    if "spread" in sections:
        from bench_demo import bench_spread

        figures.update(bench_spread(args.precision_epochs))
    if "reuse" in sections:
        from bench_reuse import bench_reuse

        figures.update(
            bench_reuse(args.repeats, args.sweep_rounds, epochs=args.sweep_epochs, model_name=args.model)
        )
    if "overlap" in sections:
        from bench_overlap import bench_overlap

        figures.update(bench_overlap(repeats=args.overlap_repeats, device_ms=args.overlap_device_ms))
    if "metrics" in sections:
        from bench_metrics import bench_metrics

        figures.update(bench_metrics(n_maps=args.n_maps, size=args.size))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
