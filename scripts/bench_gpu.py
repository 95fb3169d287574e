"""FE-CLIP speed on one CUDA GPU (bf16), against the ideal from FLOPs; checks of the CUDA paths.

One prepared run for a GPU machine (written for one NVIDIA H200): ViT-L-14-336-quickgelu with random
weights (the timing does not depend on the weights), at FE-CLIP's bf16 precision as in training and
evaluation (products in bf16 under autocast, the residual stream and the head in fp32, the frozen
CLIP's matrices stored in bf16).

Sections (``--only`` picks some; in this order):
  checks    feclip-tiny on CUDA in fp32 (TF32 off) gives the CPU's outputs and training gradients; the
            attention kernels that actually run for ViT-L (profiler), for inference and for a training
            step, without and with ``train.deterministic: true`` (strict deterministic algorithms):
            fused SDPA (flash / memory-efficient / cuDNN) or the math path; ViT-L trained a few steps
            twice from the same start: bit for bit equal with ``train.deterministic``, and how far
            apart without it (the run-to-run spread)
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

FLOP model (GFLOPs per image; F = 381.9 for the ViT-L/14@336 image encoder's forward, 24 blocks of
F/24 each, embedding and head neglected; A = 13.6 % of F for the adapters and fc_patch at 4 taps,
A/4 per tap; taps t_1 < ... < t_N):
  encode_image             F
  FE-CLIP forward          F (t_N + 1) / 24 + A                    (blocks after the last tap never run)
  training step, uncached  F (t_N + 1) / 24 + A  +  F (t_N - t_1) / 24  +  2 A
  training step, cached    F (t_N - t_1) / 24 + A  +  F (t_N - t_1) / 24  +  2 A
The backward pass runs through the frozen blocks after the first tap for their input gradients only
(as many FLOPs as their forward) and through the adapters for input and weight gradients (twice their
forward); the blocks up to the first tap need no backward. spread3 [15, 18, 21, 23]: 433.8 GFLOPs per
image forward, 665.0 per uncached and 410.4 per cached training step. Achieved TFLOP/s = images/s x
GFLOPs per image / 1000; MFU = that / the peak (``--peak-tflops``, 989 for the H200 SXM's dense bf16:
NVIDIA's datasheet gives 1,979 TFLOP/s with 2:4 sparsity; the H200 NVL's dense figure is 835; a large
bf16 matrix product reaches about 790 on the H200 this project is lent).

Usage: ``python scripts/bench_gpu.py [--quick] [--only checks,infer] [--out bench_gpu.json]``. Prints
the versions and the device, one line per figure, and last one JSON object of named figures. Exit
status 1 when a check or a section failed (the other sections still run, their figures are printed),
2 without CUDA. See docs/gpu_bench.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from feclip.data.mvtec import MVTEC_CATEGORIES

SECTIONS = ("checks", "infer", "train", "protocol", "eval", "pipeline")
PEAK_TFLOPS_H200 = 989.0  # H200 SXM, dense bf16 (datasheet: 1,979 with sparsity)
VIT_L_FORWARD_GFLOPS = 381.9
ADAPTER_FRACTION = 0.136  # adapters + fc_patch at 4 taps, relative to the encoder forward
PAPER_TAPS = (15, 18, 21, 23)
FLOP_MODELS = ("ViT-L-14-336", "ViT-L-14-336-quickgelu")  # the backbones the FLOP model describes
MVTEC_TEST_IMAGES = 1725
MVTEC_ANOMALOUS_FRACTION = 1258 / 1725
FUSED_ATTENTION_OPS = (  # prefixes of the aten ops of fused SDPA kernels (CUDA, and flash on the CPU)
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_flash_attention_",
    "aten::_efficient_attention_",
)
MATH_ATTENTION_OPS = ("aten::_scaled_dot_product_attention_math",)


# -- FLOP model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopModel:
    """GFLOPs per image of FE-CLIP's passes (the model of the module docstring)."""

    forward_gflops: float = VIT_L_FORWARD_GFLOPS  # the image encoder's forward, all blocks
    depth: int = 24
    adapter_fraction: float = ADAPTER_FRACTION  # adapters + fc_patch at 4 taps, relative to forward
    taps: tuple[int, ...] = PAPER_TAPS

    @property
    def block(self) -> float:
        return self.forward_gflops / self.depth

    @property
    def adapters(self) -> float:
        return self.adapter_fraction * self.forward_gflops * len(self.taps) / 4

    def encode_image(self) -> float:
        return self.forward_gflops

    def feclip_forward(self) -> float:
        return self.block * (self.taps[-1] + 1) + self.adapters

    def prefix(self) -> float:
        """What the prefix cache computes once per image: the blocks up to the first tap."""
        return self.block * (self.taps[0] + 1)

    def train_step(self, cached: bool) -> float:
        between = self.block * (self.taps[-1] - self.taps[0])  # blocks after the first tap
        forward = between + self.adapters if cached else self.feclip_forward()
        return forward + between + 2 * self.adapters

    def per_image(self) -> dict[str, float]:
        return {
            "encode_image": self.encode_image(),
            "feclip_forward": self.feclip_forward(),
            "train_step_uncached": self.train_step(cached=False),
            "train_step_cached": self.train_step(cached=True),
        }


def tflops(images_per_s: float, gflops_per_image: float) -> float:
    """Achieved TFLOP/s."""
    return images_per_s * gflops_per_image / 1e3


def mfu(images_per_s: float, gflops_per_image: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved / peak, a fraction."""
    return tflops(images_per_s, gflops_per_image) / peak_tflops


def protocol_gflops(flops: FlopModel, n_images: int, epochs: int) -> float:
    """The whole cached protocol: the prefix of every image once, then ``epochs`` cached steps each."""
    return n_images * (flops.prefix() + epochs * flops.train_step(cached=True))


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
    determinism_steps: int = 5  # training steps run twice by the determinism check


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


# -- timing ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Mean wall seconds of ``fn()`` over ``iters`` calls after ``warmup`` calls, the queue drained."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- checks ----------------------------------------------------------------------------------------


@contextmanager
def full_fp32():
    """TF32 off for matmuls and convolutions (CUDA vs CPU comparisons in fp32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _outputs_and_grads(model, x, masks, labels) -> tuple[dict, dict]:
    """Inference outputs (eval mode: the image scores and the unsmoothed maps of feclip.scoring) and the
    training loss's gradients of the trainable weights."""
    from feclip.config import LossConfig
    from feclip.losses import feclip_loss
    from feclip.scoring import ScoringConfig, scores_and_maps

    model.eval()
    with torch.inference_mode():
        image_score, anomaly_map = scores_and_maps(model, model(x), ScoringConfig(sigma=0.0))
    outputs = {"image_score": image_score.cpu(), "anomaly_map": anomaly_map.cpu()}
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = feclip_loss(model(x), masks, labels, LossConfig())
    loss.backward()
    grads = {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return outputs, grads


def check_device_matches_cpu(device: torch.device, atol: float = 1e-4, grad_rtol: float = 1e-3) -> dict:
    """feclip-tiny in fp32 on ``device`` vs the CPU: outputs within ``atol`` (probabilities), gradients
    within ``grad_rtol`` of each gradient's largest magnitude."""
    from feclip.models import FEClip, FEClipConfig, load_clip

    torch.manual_seed(0)
    cpu_model = FEClip(load_clip("feclip-tiny"), FEClipConfig())
    dev_model = copy.deepcopy(cpu_model).to(device)
    size = cpu_model.image_size
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(4, size, size)
    masks[1::2, size // 4 : size // 2, size // 3 : size // 2] = 1.0
    labels = torch.tensor([0, 1, 0, 1])
    with full_fp32():
        ref_out, ref_grads = _outputs_and_grads(cpu_model, x, masks, labels)
        out, grads = _outputs_and_grads(dev_model, x.to(device), masks.to(device), labels.to(device))
    out_diff = max((ref_out[k] - out[k]).abs().max().item() for k in ref_out)
    grad_diff = max(
        ((ref_grads[k] - grads[k]).abs().max() / ref_grads[k].abs().max().clamp(min=1e-12)).item()
        for k in ref_grads
    )
    return {
        "check_device_matches_cpu": bool(
            ref_grads.keys() == grads.keys() and out_diff <= atol and grad_diff <= grad_rtol
        ),
        "check_max_abs_diff_outputs": out_diff,
        "check_max_rel_diff_grads": grad_diff,
    }


def _is_attention(name: str) -> bool:
    low = name.lower()
    return any(k in low for k in ("attention", "sdpa", "fmha", "flash", "multi_head"))


def classify_attention(names) -> dict[str, list[str]]:
    """Split profiler op names into fused SDPA ops, math-path SDPA ops and the rest."""
    fused = sorted(n for n in names if n.startswith(FUSED_ATTENTION_OPS))
    math = sorted(n for n in names if n.startswith(MATH_ATTENTION_OPS))
    other = sorted(n for n in names if n not in fused and n not in math)
    return {"fused": fused, "math": math, "other": other}


def uses_fused_attention(names) -> bool:
    """True when some fused SDPA op ran and no math-path SDPA op did."""
    kinds = classify_attention(names)
    return bool(kinds["fused"]) and not kinds["math"]


def attention_ops(model, device: torch.device, amp: bool, batch: int = 2) -> dict[str, list[str]]:
    """Attention-related op and kernel names the profiler sees in one inference forward, one training
    step, and one training step under ``train.deterministic`` (strict deterministic algorithms)."""
    from torch.profiler import ProfilerActivity, profile

    from feclip.engine.train import deterministic_algorithms

    size = model.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    def train_step():
        model.train()
        out = model(x)
        (out.tap_maps.float().mean() + out.tap_scores.float().mean()).backward()
        model.zero_grad(set_to_none=True)

    found = {}
    for name, fn, det in (
        ("inference", infer, False),
        ("training", train_step, False),
        ("training_deterministic", train_step, True),
    ):
        with warnings.catch_warnings(), deterministic_algorithms(det, device):
            warnings.simplefilter("ignore")
            fn()  # warm-up: kernel selection and autotuning outside the trace
            sync(device)
            with profile(activities=activities) as prof:
                fn()
                sync(device)
        found[name] = sorted({e.key for e in prof.key_averages() if _is_attention(e.key)})
    model.eval()
    return found


def check_determinism(clip, device: torch.device, steps: int, batch: int = 16) -> dict:
    """ViT-L trained ``steps`` cached steps twice from the same start on the same batches: with
    ``train.deterministic`` the weights must be equal bit for bit; without it, how far apart they end
    (the run-to-run spread of a default run, after a few steps), as the largest difference relative to
    each tensor's largest magnitude."""
    from feclip.config import LossConfig, TrainConfig
    from feclip.engine.train import build_optimizer, deterministic_algorithms
    from feclip.losses import feclip_loss
    from feclip.models import FEClip, FEClipConfig

    torch.manual_seed(0)
    model = FEClip(clip, FEClipConfig()).train()
    start = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    size = model.image_size
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        tokens = model.prefix(torch.randn(batch, 3, size, size, device=device, generator=g))
    masks = torch.zeros(batch, size, size, device=device)
    masks[1::2, size // 4 : size // 2, size // 3 : size // 2] = 1.0
    labels = torch.arange(batch, device=device) % 2

    def run(deterministic: bool) -> dict:
        model.load_state_dict(start, strict=False)
        optimizer = build_optimizer(model, TrainConfig())
        with deterministic_algorithms(deterministic, device):
            for _ in range(steps):
                loss, _ = feclip_loss(model.forward_from_prefix(tokens), masks, labels, LossConfig())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}

    def spread(a: dict, b: dict) -> float:
        return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)).item() for k in a)

    det = [run(True), run(True)]
    free = [run(False), run(False)]
    model.load_state_dict(start, strict=False)
    model.eval()
    return {
        "check_deterministic_training": all(torch.equal(det[0][k], det[1][k]) for k in det[0]),
        "determinism_steps": steps,
        "deterministic_max_rel_diff": spread(*det),
        "nondeterministic_max_rel_diff": spread(*free),
    }


def describe_attention(model) -> str:
    """How this open_clip builds its attention, and which SDPA backends PyTorch may pick."""
    import open_clip

    blk = model.clip.visual.transformer.resblocks[0]
    backends = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
    }
    return (
        f"open_clip {open_clip.__version__}: {type(blk).__name__} with {type(blk.attn).__name__} "
        f"(need_weights=False: F.scaled_dot_product_attention inside, or the fused fast path "
        f"_native_multi_head_attention in inference without autocast); FE-CLIP's blocks that carry "
        f"gradients call F.scaled_dot_product_attention directly: {bool(model._plain_blocks)}; "
        f"SDPA backends enabled: {', '.join(k for k, v in backends.items() if v)}"
    )


def run_checks(clip, device: torch.device, amp: bool, determinism_steps: int = 5) -> dict:
    from feclip.models import FEClip, FEClipConfig

    figures = check_device_matches_cpu(device)
    model = FEClip(clip, FEClipConfig())
    figures["precision"] = f"{model.precision} (tokens {model.token_dtype})"
    ops = attention_ops(model, device, amp)
    figures["attention_design"] = describe_attention(model)
    for path, names in ops.items():
        figures[f"attention_ops_{path}"] = names
    figures["check_sdpa_fused"] = all(uses_fused_attention(names) for names in ops.values())
    figures.update(check_determinism(clip, device, determinism_steps))
    return figures


# -- inference and training steps ------------------------------------------------------------------


def measure_infer(clip, device: torch.device, batch: int, iters: int, warmup: int, amp: bool) -> dict:
    """Images/s of the FE-CLIP forward and of plain ``encode_image`` at ``batch``."""
    from feclip.models import FEClip, FEClipConfig

    model = FEClip(clip, FEClipConfig()).eval()  # bf16 on CUDA: the CLIP's matrices now stored in bf16
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
    from feclip.config import LossConfig, TrainConfig
    from feclip.engine.train import build_optimizer, deterministic_algorithms
    from feclip.losses import feclip_loss
    from feclip.models import FEClip, FEClipConfig

    model = FEClip(clip, FEClipConfig()).train()
    optimizer = build_optimizer(model, TrainConfig())
    size = model.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    masks = torch.zeros(batch, size, size, device=device)
    masks[1::2, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    labels = torch.arange(batch, device=device) % 2
    with torch.no_grad():
        prefix = model.prefix(x)  # the fp32 residual stream, as the cache stores and serves it

    def step(cached: bool) -> None:
        out = model.forward_from_prefix(prefix) if cached else model(x)
        loss, _ = feclip_loss(out, masks, labels, LossConfig(), n_kept=batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

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


# -- an MVTec-sized data set in memory -------------------------------------------------------------


def blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One to three random ellipses. Shape: ``(size, size)`` uint8 in {0, 1}."""
    yy, xx = np.ogrid[:size, :size]
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(max(2, size / 50), max(3, size / 6), 2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask.astype(np.uint8)


class RandomAnomalySet(torch.utils.data.Dataset):
    """``n`` random images held in memory with blob masks on the anomalous ones, in ``n_categories``
    categories, each with both normal and anomalous images (MVTec AD's test split: 1,725 images, 73 %
    anomalous, 15 categories).

    Items carry the keys of :class:`~feclip.data.AnomalyDataset` that training and evaluation read:
    ``image`` (3, S, S) float32, ``mask`` (S, S) float32, ``label``, ``index``, ``original_size`` (2,);
    ``samples[i].category`` and ``category_has_masks`` serve :mod:`feclip.engine.evaluate`.
    Memory: ``n * 3 * S * S * 4`` bytes for the images (2.3 GB for 1,725 at 336).
    """

    def __init__(self, n: int, size: int, n_categories: int, seed: int = 0):
        names = list(MVTEC_CATEGORIES[:n_categories])
        names += [f"category_{i}" for i in range(len(names), n_categories)]
        self.images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
        self.masks = torch.zeros(n, size, size, dtype=torch.uint8)
        self.labels = [0] * n
        self.samples = [SimpleNamespace(category=names[i % len(names)]) for i in range(n)]
        self.category_has_masks = dict.fromkeys(names, True)
        rng = np.random.default_rng(seed)
        for c in range(len(names)):
            members = list(range(c, n, len(names)))
            k = min(max(round(len(members) * MVTEC_ANOMALOUS_FRACTION), 1), len(members) - 1)
            for i in rng.permutation(members)[:k].tolist():
                self.labels[i] = 1
                self.masks[i] = torch.from_numpy(blob_mask(rng, size))
        self.size = torch.tensor([size, size])

    @property
    def categories(self) -> list[str]:
        return list(self.category_has_masks)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "mask": self.masks[index].float(),
            "label": self.labels[index],
            "index": index,
            "original_size": self.size,
        }


# -- protocol and evaluation -----------------------------------------------------------------------


def measure_protocol(clip, dataset, device: torch.device, sizes: Sizes, compile_mode: str = "off") -> dict:
    """Wall time of :func:`feclip.engine.train.train` over ``dataset`` (prefix cache on, the paper's
    other defaults: Adam 5e-4, fc_patch at lr/100, not deterministic), checkpoints written to a temp dir."""
    from feclip.config import TrainConfig
    from feclip.engine.train import train
    from feclip.models import FEClip, FEClipConfig

    torch.manual_seed(0)
    model = FEClip(clip, FEClipConfig())
    cfg = TrainConfig(
        epochs=sizes.epochs,
        batch_size=sizes.train_batch,
        prefix_cache="on",
        progress=False,
        resume=False,
        compile=compile_mode,
    )
    speeds = []
    with tempfile.TemporaryDirectory() as run_dir, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        sync(device)
        t0 = time.perf_counter()
        result = train(
            model, dataset, cfg, run_dir, 42, device, on_epoch=lambda e, v: speeds.append(v["images_per_s"])
        )
        sync(device)
        seconds = time.perf_counter() - t0
    figures = {
        "protocol_images": len(dataset),
        "protocol_epochs": sizes.epochs,
        "protocol_seconds": seconds,
        "protocol_images_per_s": len(dataset) * sizes.epochs / seconds,
        "protocol_epoch_images_per_s": speeds,
        # setup and the prefix cache's build (at the model's precision, as the steps): outside the epochs' clocks
        "protocol_outside_epochs_seconds": seconds - sum(len(dataset) / v for v in speeds),
        "protocol_last_loss": result.last_loss,
        "protocol_warnings": sorted({str(w.message)[:160] for w in caught}),
    }
    if sizes.epochs == 9 and len(dataset) == MVTEC_TEST_IMAGES:
        figures["protocol_9ep_seconds"] = seconds
    return figures


def measure_pipeline(clip, device: torch.device, sizes: Sizes) -> dict:
    """Evaluation images/s from PNG files (decode, resize, normalise in ``DataLoader`` workers; model;
    maps; metrics) relative to the model alone on pre-loaded, pre-collated tensors; then the same from
    a warm decoded-image cache (``AnomalyDataset(disk_cache=)``, written before the timed runs)."""
    import os
    from pathlib import Path

    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import _png_category

    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset
    from feclip.data.dataset import collate
    from feclip.engine.evaluate import evaluate
    from feclip.models import FEClip, FEClipConfig

    torch.manual_seed(0)
    model = FEClip(clip, FEClipConfig()).eval()
    cfg = EvalConfig()  # batch 32, sigma 4, every metric
    n = sizes.pipeline_images
    workers = min(sizes.pipeline_workers, os.cpu_count() or 1)
    figures = {"pipeline_images": n, "pipeline_side": sizes.pipeline_side, "pipeline_workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        samples = _png_category(Path(tmp) / "part", n, sizes.pipeline_side)
        figures["pipeline_png_writing_seconds"] = time.perf_counter() - t0
        pre = AnomalyDataset(samples, image_size=model.image_size).preload(num_threads=workers)
        batches = [
            collate([pre[i] for i in range(j, min(j + cfg.batch_size, n))])["image"].to(device)
            for j in range(0, n, cfg.batch_size)
        ]

        def model_alone():
            with torch.inference_mode():
                for x in batches:
                    model(x)
            sync(device)

        model_alone()  # warm-up
        t0 = time.perf_counter()
        model_alone()
        model_s = time.perf_counter() - t0
        figures["pipeline_model_images_per_s"] = n / model_s
        for w in (0, workers):
            t0 = time.perf_counter()
            evaluate(
                model,
                "bench",
                AnomalyDataset(samples, image_size=model.image_size),
                cfg,
                device,
                num_workers=w,
            )
            sync(device)
            seconds = time.perf_counter() - t0
            figures[f"eval_images_per_s_w{w}"] = n / seconds
            figures[f"eval_pipeline_ratio_w{w}"] = model_s / seconds
        # the same from a warm decoded-image cache (what every run after a dataset's first one reads)
        disk = Path(tmp) / "decoded"
        t0 = time.perf_counter()
        AnomalyDataset(samples, image_size=model.image_size, disk_cache=disk).preload(num_threads=workers)
        figures["pipeline_cache_build_seconds"] = time.perf_counter() - t0
        for w in (0, workers):
            t0 = time.perf_counter()
            evaluate(
                model,
                "bench",
                AnomalyDataset(samples, image_size=model.image_size, disk_cache=disk),
                cfg,
                device,
                num_workers=w,
            )
            sync(device)
            seconds = time.perf_counter() - t0
            figures[f"eval_images_per_s_cached_w{w}"] = n / seconds
            figures[f"eval_pipeline_ratio_cached_w{w}"] = model_s / seconds
    return figures


def measure_eval(clip, dataset, device: torch.device, amp: bool) -> dict:
    """Seconds of ``predict`` (model and maps) and ``metric_rows`` (all metrics) over ``dataset``."""
    from feclip.config import EvalConfig
    from feclip.engine.evaluate import metric_rows, predict
    from feclip.models import FEClip, FEClipConfig

    torch.manual_seed(0)
    model = FEClip(clip, FEClipConfig()).eval()
    cfg = EvalConfig()  # the paper preset: sigma 4, both AUPROs, micro rows, batch 32
    sync(device)
    t0 = time.perf_counter()
    preds = predict(model, dataset, cfg, device)  # at the model's precision (bf16 on CUDA)
    sync(device)
    t1 = time.perf_counter()
    rows = metric_rows("random", preds, dataset.category_has_masks, cfg)
    t2 = time.perf_counter()
    figures = {
        "eval_images": len(dataset),
        "eval_categories": len(dataset.category_has_masks),
        "eval_seconds": t2 - t0,
        "eval_predict_seconds": t1 - t0,
        "eval_metrics_seconds": t2 - t1,
        "eval_metric_rows": len(rows),
    }
    if len(dataset) == MVTEC_TEST_IMAGES and len(dataset.category_has_masks) == len(MVTEC_CATEGORIES):
        figures["eval_mvtec_seconds"] = t2 - t0
    return figures


# -- figures and report ----------------------------------------------------------------------------


def add_flop_figures(figures: dict, flops: FlopModel, peak_tflops: float) -> None:
    """Achieved TFLOP/s and MFU for every speed figure present, and the protocol's ideal time."""
    per_image = flops.per_image()
    rates = {
        "infer": ("infer_images_per_s", per_image["feclip_forward"]),
        "encode_image": ("encode_image_images_per_s", per_image["encode_image"]),
        "train_cached": ("train_images_per_s_cached", per_image["train_step_cached"]),
        "train_uncached": ("train_images_per_s_uncached", per_image["train_step_uncached"]),
    }
    for name, (key, gflops) in rates.items():
        if key in figures:
            figures[f"tflops_{name}"] = tflops(figures[key], gflops)
            figures[f"mfu_{name}"] = mfu(figures[key], gflops, peak_tflops)
    if "protocol_seconds" in figures:
        total = protocol_gflops(flops, figures["protocol_images"], figures["protocol_epochs"])
        figures["protocol_ideal_seconds"] = total / (peak_tflops * 1e3)
        figures["mfu_protocol"] = figures["protocol_ideal_seconds"] / figures["protocol_seconds"]
    if "eval_predict_seconds" in figures:
        ideal = figures["eval_images"] * per_image["feclip_forward"] / (peak_tflops * 1e3)
        figures["mfu_eval_predict"] = ideal / figures["eval_predict_seconds"]
    figures["gflops_per_image"] = per_image
    figures["peak_tflops"] = peak_tflops


def _mfu(figures: dict, key: str) -> str:
    if f"mfu_{key}" not in figures:  # a backbone the FLOP model does not describe
        return ""
    return f" ({figures['tflops_' + key]:.0f} TFLOP/s, {100 * figures['mfu_' + key]:.1f} % MFU)"


def format_summary(figures: dict) -> str:
    """The human summary: one line per figure present (sections that did not run are left out)."""
    f = figures
    lines = [
        f"[env] {f.get('device_name')}; torch {f.get('torch')}, CUDA {f.get('cuda')}, cuDNN {f.get('cudnn')}, "
        f"open_clip {f.get('open_clip')}; {f.get('model')}{' (quick sizes)' if f.get('quick') else ''}"
    ]
    if "check_device_matches_cpu" in f:
        ok = "ok" if f["check_device_matches_cpu"] else "FAILED"
        lines.append(
            f"[checks] feclip-tiny fp32 vs CPU: {ok} (outputs max |diff| "
            f"{f['check_max_abs_diff_outputs']:.1e}, gradients max rel. diff {f['check_max_rel_diff_grads']:.1e})"
        )
    if "check_sdpa_fused" in f:
        lines.append(f"[checks] fused attention: {'ok' if f['check_sdpa_fused'] else 'FAILED'}")
        lines.append(f"[checks] {f['attention_design']}")
        for path in ("inference", "training", "training_deterministic"):
            kinds = classify_attention(f.get(f"attention_ops_{path}", []))
            lines.append(f"[checks] {path}: fused {kinds['fused'] or 'none'}; math {kinds['math'] or 'none'}")
    if "check_deterministic_training" in f:
        ok = "ok" if f["check_deterministic_training"] else "FAILED"
        lines.append(
            f"[checks] train.deterministic, {f['determinism_steps']} steps twice: {ok} (max rel. diff "
            f"{f['deterministic_max_rel_diff']:.1e}); without it: {f['nondeterministic_max_rel_diff']:.1e}"
        )
    if "infer_images_per_s" in f:
        lines.append(
            f"[infer] batch {f['infer_batch']}: FE-CLIP {f['infer_images_per_s']:.1f} images/s"
            + _mfu(f, "infer")
            + f", encode_image {f['encode_image_images_per_s']:.1f} images/s"
            + _mfu(f, "encode_image")
            + f"; overhead x{f['forward_overhead']:.3f}"
        )
    if "train_images_per_s_cached" in f:
        lines.append(
            f"[train] batch {f['train_batch']}: cached {f['train_images_per_s_cached']:.1f} images/s"
            + _mfu(f, "train_cached")
            + f", uncached {f['train_images_per_s_uncached']:.1f} images/s"
            + _mfu(f, "train_uncached")
            + f"; prefix cache x{f['prefix_cache_speedup']:.2f}"
            + (
                f"; deterministic {f['train_images_per_s_cached_deterministic']:.1f} images/s "
                f"(x{f['deterministic_cost']:.2f} time)"
                if "deterministic_cost" in f
                else ""
            )
        )
    if "protocol_seconds" in f:
        ideal = (
            f"; ideal at peak {f['protocol_ideal_seconds']:.1f} s, {100 * f['mfu_protocol']:.1f} % MFU"
            if "mfu_protocol" in f
            else ""
        )
        lines.append(
            f"[protocol] {f['protocol_epochs']} epochs x {f['protocol_images']} images: "
            f"{f['protocol_seconds']:.1f} s ({f['protocol_images_per_s']:.1f} images/s{ideal}; "
            f"{f['protocol_outside_epochs_seconds']:.1f} s outside the epochs)"
        )
        for w in f["protocol_warnings"]:
            lines.append(f"[protocol] warning: {w}")
    if "eval_seconds" in f:
        predict_mfu = f", {100 * f['mfu_eval_predict']:.1f} % MFU" if "mfu_eval_predict" in f else ""
        lines.append(
            f"[eval] {f['eval_images']} images, {f['eval_categories']} categories: {f['eval_seconds']:.1f} s "
            f"(predict {f['eval_predict_seconds']:.1f} s{predict_mfu}; "
            f"metrics {f['eval_metrics_seconds']:.1f} s, {f['eval_metric_rows']} rows)"
        )
    if "pipeline_model_images_per_s" in f:
        w = f["pipeline_workers"]
        lines.append(
            f"[pipeline] {f['pipeline_images']} PNGs of {f['pipeline_side']}^2: model alone "
            f"{f['pipeline_model_images_per_s']:.1f} images/s; evaluation from the files "
            f"{f['eval_images_per_s_w0']:.1f} images/s with 0 workers (ratio {f['eval_pipeline_ratio_w0']:.3f}), "
            f"{f[f'eval_images_per_s_w{w}']:.1f} with {w} (ratio {f[f'eval_pipeline_ratio_w{w}']:.3f})"
        )
    if "eval_images_per_s_cached_w0" in f:
        w = f["pipeline_workers"]
        lines.append(
            f"[pipeline] from the warm decoded-image cache (written in "
            f"{f['pipeline_cache_build_seconds']:.1f} s): {f['eval_images_per_s_cached_w0']:.1f} images/s "
            f"with 0 workers (ratio {f['eval_pipeline_ratio_cached_w0']:.3f}), "
            f"{f[f'eval_images_per_s_cached_w{w}']:.1f} with {w} "
            f"(ratio {f[f'eval_pipeline_ratio_cached_w{w}']:.3f})"
        )
    for key in sorted(k for k in f if k.startswith("peak_memory_gb_")):
        lines.append(f"[memory] {key.removeprefix('peak_memory_gb_')}: {f[key]:.1f} GB peak")
    for section, error in f.get("section_errors", {}).items():
        lines.append(f"SECTION {section} FAILED: {error}")
    if f.get("failed_checks"):
        lines.append(f"FAILED CHECKS: {', '.join(f['failed_checks'])}")
    return "\n".join(lines)


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
        "checks": lambda: run_checks(clip, device, amp, sizes.determinism_steps),
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
    figures["failed_checks"] = [
        k
        for k in ("check_device_matches_cpu", "check_sdpa_fused", "check_deterministic_training")
        if figures.get(k) is False
    ]
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
    sys.exit(1 if result["failed_checks"] or result.get("section_errors") else 0)
