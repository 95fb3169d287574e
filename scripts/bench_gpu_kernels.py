"""Which attention kernels run, and how repeatable training is: the ``checks`` section of
``scripts/bench_gpu.py`` reports them as figures, ``tests/test_cuda.py`` checks them pass/fail on a GPU
(a fused SDPA kernel in inference and training; ``train.deterministic`` bit for bit on ViT-L).

* :func:`attention_ops`: the attention op and kernel names the profiler sees in one inference forward,
  one training step and one training step under ``train.deterministic``; :func:`classify_attention`
  splits them into fused SDPA ops, math-path ops and the rest, :func:`uses_fused_attention` says
  whether a fused kernel ran and the math path did not;
* :func:`repeated_training`: a few cached training steps taken again and again from one start on one
  batch, the weights after each repetition; :func:`max_rel_diff` compares two of them.
"""

from __future__ import annotations

import warnings

import torch
from benchlib import feclip_model, sync, train_step, training_batch

FUSED_ATTENTION_OPS = (  # prefixes of the aten ops of fused SDPA kernels (CUDA, and flash on the CPU)
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_flash_attention_",
    "aten::_efficient_attention_",
)
MATH_ATTENTION_OPS = ("aten::_scaled_dot_product_attention_math",)
ATTENTION_PATHS = ("inference", "training", "training_deterministic")


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


def attention_ops(model, device: torch.device, batch: int = 2) -> dict[str, list[str]]:
    """Attention-related op and kernel names the profiler sees in one inference forward, one training
    step, and one training step under ``train.deterministic`` (strict deterministic algorithms), by
    path (:data:`ATTENTION_PATHS`). The model is left in eval mode."""
    from torch.profiler import ProfilerActivity, profile

    from feclip.engine.train import deterministic_algorithms

    size = model.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    def step():
        model.train()
        out = model(x)
        (out.tap_maps.float().mean() + out.tap_scores.float().mean()).backward()
        model.zero_grad(set_to_none=True)

    found = {}
    for path, fn, det in zip(ATTENTION_PATHS, (infer, step, step), (False, False, True)):
        with warnings.catch_warnings(), deterministic_algorithms(det, device):
            warnings.simplefilter("ignore")
            fn()  # warm-up: kernel selection and autotuning outside the trace
            sync(device)
            with profile(activities=activities) as prof:
                fn()
                sync(device)
        found[path] = sorted({e.key for e in prof.key_averages() if _is_attention(e.key)})
    model.eval()
    return found


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


def repeated_training(
    clip, device: torch.device, steps: int, deterministic: bool, repeats: int = 2, batch: int = 16
) -> list[dict[str, torch.Tensor]]:
    """FE-CLIP on ``clip`` (seed 0) trained ``steps`` cached steps (Adam, the paper's settings) on one
    random batch, ``repeats`` times from the same start, under ``train.deterministic`` or not: the
    trainable weights after each repetition (on ``device``). Equal bit for bit when training is
    deterministic; how far apart they are otherwise is the run-to-run spread of a default run."""
    from feclip.config import TrainConfig
    from feclip.engine.train import build_optimizer, deterministic_algorithms

    model = feclip_model(clip).train()
    start = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    _, tokens, masks, labels = training_batch(model, batch, device, seed=1)
    states = []
    for _ in range(repeats):
        model.load_state_dict(start, strict=False)
        optimizer = build_optimizer(model, TrainConfig())
        with deterministic_algorithms(deterministic, device):
            for _ in range(steps):
                train_step(model, optimizer, tokens, masks, labels, cached=True)
        states.append({k: v.detach().clone() for k, v in model.trainable_state_dict().items()})
    model.eval()
    return states


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two weight sets, relative to each tensor's largest magnitude."""
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)).item() for k in a)
