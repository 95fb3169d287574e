"""Side-by-side speed ratios on this machine's CPU (noise cancels in ratios measured in one run).

Sections (``--only`` picks some):
  model    FE-CLIP forward vs plain ``encode_image`` on ViT-L-14-336 with random weights, batch 1,
           interleaved runs; trainable vs frozen parameter counts.
  metrics  AUPRO (zsad, exact) vs straightforward implementations (scripts/bench_metrics.py).

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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(
        f"[model] {model_name}, batch 1, {repeats} interleaved rounds, median seconds: "
        f"FE-CLIP {med['feclip']:.3f}, encode_image {med['encode_image']:.3f}"
    )
    print(f"[model] parameters: trainable {trainable:,}, frozen {frozen:,}")
    return {
        "forward_overhead": med["feclip"] / med["encode_image"],
        "feclip_forward_seconds": med["feclip"],
        "encode_image_seconds": med["encode_image"],
        "trainable_params": trainable,
        "frozen_params": frozen,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="model,metrics", help="comma-separated sections: model, metrics")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds for the model section")
    parser.add_argument(
        "--model", default="ViT-L-14-336-quickgelu", help="open_clip model name (random weights)"
    )
    parser.add_argument("--n-maps", type=int, default=200, help="maps for the metrics section")
    parser.add_argument("--size", type=int, default=336, help="map size for the metrics section")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - {"model", "metrics"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from model, metrics")
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    if "model" in sections:
        figures.update(bench_model(args.model, args.repeats))
    if "metrics" in sections:
        from bench_metrics import bench_metrics

        figures.update(bench_metrics(n_maps=args.n_maps, size=args.size))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
