"""FE-CLIP speed on one CUDA GPU (bf16), against the ideal from FLOPs; which kernels the CUDA paths run.

One prepared run for a GPU machine (written for one NVIDIA H200): ViT-L-14-336-quickgelu with random
weights (the timing does not depend on the weights), at FE-CLIP's bf16 precision as in training and
evaluation (products in bf16 under autocast, the residual stream and the head in fp32, the frozen
CLIP's matrices stored in bf16).

Sections (``--only`` picks some; in this order):
  checks    figures of what tests/test_cuda.py checks pass/fail on a GPU (run it first: gpu_session.sh
            does): the attention kernels that actually run for ViT-L (profiler), for inference and for a
            training step, without and with ``train.deterministic: true`` (strict deterministic
            algorithms): fused SDPA (flash / memory-efficient / cuDNN) or the math path; and ViT-L
            trained a few cached steps twice from the same start without ``train.deterministic``: how far
            apart the weights end (the run-to-run spread)
  infer     images/s at batch 64: the FE-CLIP forward and plain ``encode_image``
  train     images/s of one training step (forward, loss, backward, fused Adam) at batch 16, with and
            without the frozen-prefix cache (taps spread3), and the cached step under
            ``train.deterministic`` (its cost)
  protocol  the 9-epoch protocol on an MVTec-sized set (1,725 random images and blob masks in memory,
            batch 16, prefix cache on): the real :func:`feclip.engine.train.train`, checkpoints included
  eval      the full evaluation of an MVTec-sized set (1,725 images, 15 categories): ``predict`` (model,
            maps, sigma-4 smoothing) and ``metric_rows`` (all metrics, both AUPROs, micro rows), timed apart
  pipeline  the evaluation from PNG files (1024 x 1024, decoded, resized, normalised by DataLoader
            workers) relative to the model alone on pre-loaded tensors, with 0 and 8 workers

The FLOP model, MFU and the summary are in scripts/bench_gpu_figures.py, the attention profile and the
repeated training in scripts/bench_gpu_kernels.py, what scripts/bench.py uses too in scripts/benchlib.py.

Usage: ``python scripts/bench_gpu.py [--quick] [--only checks,infer] [--out bench_gpu.json]``. Prints
the versions and the device, one line per figure, and last one JSON object of named figures. Exit
status 1 when a section failed (the other sections still run, their figures are printed), 2 without
CUDA. See docs/gpu_bench.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling modules below, when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu_end_to_end import measure_eval, measure_pipeline, measure_protocol  # noqa: E402
from bench_gpu_figures import (  # noqa: E402
    FLOP_MODELS,
    PEAK_TFLOPS_H200,
    FlopModel,
    add_flop_figures,
    format_summary,
)
from bench_gpu_kernels import attention_ops, describe_attention, max_rel_diff, repeated_training  # noqa: E402
from benchlib import (  # noqa: E402
    MVTEC_TEST_IMAGES,
    RandomAnomalySet,
    feclip_model,
    seconds_per_call,
    train_step,
    training_batch,
)

from feclip.data.mvtec import MVTEC_CATEGORIES  # noqa: E402

SECTIONS = ("checks", "infer", "train", "protocol", "eval", "pipeline")


# -- arguments -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    infer_batch: int = 64
    train_batch: int = 16
    iters: int = 20
    warmup: int = 5
    n_images: int = MVTEC_TEST_IMAGES  # the protocol's training set and the evaluated set
    categories: int = len(MVTEC_CATEGORIES)
    epochs: int = 9
    pipeline_images: int = 256  # PNG files of the pipeline section
    pipeline_side: int = 1024  # their side (MVTec AD's images are 700 to 1024 pixels a side)
    pipeline_workers: int = 8
    determinism_steps: int = 5  # cached training steps taken twice: the run-to-run spread


QUICK = Sizes(
    infer_batch=16,
    train_batch=16,
    iters=3,
    warmup=1,
    n_images=64,
    categories=3,
    epochs=1,
    pipeline_images=32,
    determinism_steps=2,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_gpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every section")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections of {SECTIONS}, run in that order",
    )
    parser.add_argument("--out", help="also write the JSON figures to this file")
    parser.add_argument("--model", default="ViT-L-14-336-quickgelu", help="open_clip model (random weights)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS_H200, help="dense bf16 peak")
    parser.add_argument("--compile", default="off", help="train.compile for the protocol section")
    parser.add_argument("--device", default="cuda", help="a CUDA device")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.sizes = QUICK if args.quick else Sizes()
    return args


# -- device helpers --------------------------------------------------------------------------------


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- checks: the kernels that run, the run-to-run spread -------------------------------------------


def run_checks(clip, device: torch.device, determinism_steps: int = 5) -> dict:
    """Figures of the CUDA paths (tests/test_cuda.py checks them pass/fail): the attention ops the
    profiler sees for inference, training and deterministic training, and how far two default
    (non-deterministic) runs of ``determinism_steps`` cached steps from one start end apart."""
    model = feclip_model(clip, seed=None)
    figures = {"precision": f"{model.precision} (tokens {model.token_dtype})"}
    for path, names in attention_ops(model, device).items():
        figures[f"attention_ops_{path}"] = names
    figures["attention_design"] = describe_attention(model)
    free = repeated_training(clip, device, determinism_steps, deterministic=False)
    figures["determinism_steps"] = determinism_steps
    figures["nondeterministic_max_rel_diff"] = max_rel_diff(*free)
    return figures


# -- inference and training steps ------------------------------------------------------------------


def measure_infer(clip, device: torch.device, batch: int, iters: int, warmup: int, amp: bool) -> dict:
    """Images/s of the FE-CLIP forward and of plain ``encode_image`` at ``batch``."""
    model = feclip_model(clip, seed=None).eval()  # bf16 on CUDA: the CLIP's matrices now stored in bf16
    size = model.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        feclip_s = seconds_per_call(lambda: model(x), device, iters, warmup)
        with autocast(device, amp):  # open_clip's own forward, at the same precision
            encode_s = seconds_per_call(lambda: clip.encode_image(x), device, iters, warmup)
    return {
        "infer_batch": batch,
        "infer_images_per_s": batch / feclip_s,
        "encode_image_images_per_s": batch / encode_s,
        "forward_overhead": feclip_s / encode_s,
    }


def measure_train(clip, device: torch.device, batch: int, iters: int, warmup: int, amp: bool) -> dict:
    """Images/s of one training step (forward, loss, backward, Adam), from cached prefix tokens (in the
    model's token dtype, as :class:`~feclip.engine.cache.PrefixCache` keeps them) and from the images;
    and the cached step under ``train.deterministic``."""
    from feclip.config import TrainConfig
    from feclip.engine.train import build_optimizer, deterministic_algorithms

    model = feclip_model(clip, seed=None).train()
    optimizer = build_optimizer(model, TrainConfig())
    # prefix: the fp32 residual stream, as the cache stores and serves it
    x, prefix, masks, labels = training_batch(model, batch, device)

    def step(cached: bool) -> None:
        train_step(model, optimizer, prefix if cached else x, masks, labels, cached)

    cached_s = seconds_per_call(lambda: step(True), device, iters, warmup)
    uncached_s = seconds_per_call(lambda: step(False), device, iters, warmup)
    with deterministic_algorithms(True, device):
        deterministic_s = seconds_per_call(lambda: step(True), device, iters, warmup)
    model.eval()
    return {
        "train_batch": batch,
        "train_images_per_s_cached": batch / cached_s,
        "train_images_per_s_uncached": batch / uncached_s,
        "prefix_cache_speedup": uncached_s / cached_s,
        "train_images_per_s_cached_deterministic": batch / deterministic_s,
        "deterministic_cost": deterministic_s / cached_s,
    }


def environment(device: torch.device) -> dict:
    import open_clip

    cuda = device.type == "cuda"
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }


def write_json(path: str, figures: dict) -> None:
    """``figures`` as indented JSON, replacing ``path`` atomically."""
    from feclip.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(figures, indent=2, default=str) + "\n")


def run_sections(args, device: torch.device) -> dict:
    """Every section of ``args.sections`` on ``device``; the figures, flat."""
    from feclip.models import load_clip

    sizes, amp = args.sizes, device.type == "cuda"
    figures = {**environment(device), "model": args.model, "quick": args.quick, "sections": args.sections}
    clip = load_clip(args.model, pretrained=None, device=device)
    dataset = None
    if {"protocol", "eval"} & set(args.sections):
        dataset = RandomAnomalySet(sizes.n_images, clip.visual.image_size[0], sizes.categories)
    steps = {
        "checks": lambda: run_checks(clip, device, sizes.determinism_steps),
        "infer": lambda: measure_infer(clip, device, sizes.infer_batch, sizes.iters, sizes.warmup, amp),
        "train": lambda: measure_train(clip, device, sizes.train_batch, sizes.iters, sizes.warmup, amp),
        "protocol": lambda: measure_protocol(clip, dataset, device, sizes, args.compile),
        "eval": lambda: measure_eval(clip, dataset, device, amp),
        "pipeline": lambda: measure_pipeline(clip, device, sizes),
    }
    for section in dict.fromkeys(args.sections):  # in the order asked for (default: SECTIONS)
        reset_memory(device)
        t0 = time.perf_counter()
        try:
            figures.update(steps[section]())
        except Exception as e:  # noqa: BLE001 - one failing section must not cost the others' figures
            traceback.print_exc()
            figures.setdefault("section_errors", {})[section] = f"{type(e).__name__}: {e}"[:500]
        figures[f"peak_memory_gb_{section}"] = peak_memory_gb(device)
        print(f"[{section}] finished in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.out:  # the figures so far: a run stopped by a time limit keeps its finished sections
            write_json(args.out, {**figures, "partial": True})
    figures = {k: v for k, v in figures.items() if v is not None}
    if args.model in FLOP_MODELS:
        add_flop_figures(figures, FlopModel(), args.peak_tflops)
    return figures


def main(argv=None) -> dict:
    import os

    # before the first cuBLAS call: the deterministic sections need it, and on Hopper it is cuBLAS's
    # default workspace anyway (feclip.engine.train.prepare_deterministic_cuda)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.stderr.write(
            f"bench_gpu.py: error: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}): this benchmark needs a GPU; scripts/bench.py measures the CPU\n"
        )
        raise SystemExit(2)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}",
        flush=True,
    )
    figures = run_sections(args, device)
    print(format_summary(figures))
    line = json.dumps(figures)
    if args.out:
        write_json(args.out, figures)
    print(line)
    return figures


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result.get("section_errors") else 0)
