"""The CUDA paths, on a real GPU (``-m gpu``; skipped where CUDA is absent, never run in CI).

What the CPU tests emulate is checked here for real, with the tiny random CLIP (seconds):

* one precision policy: under bf16 on CUDA (real autocast), cached and uncached training steps,
  evaluation and ``feclip-predict``, few-shot banks and test tokens give the same numbers;
* the host waits for the device at most once per evaluation batch and never inside a training step,
  as ``torch.cuda.set_sync_debug_mode`` sees it (the CPU count is in ``tests/test_hostsync.py``);
* fp32 on CUDA (TF32 off) equals the CPU within rounding, outputs and gradients;
* ``train.deterministic`` training is bit-for-bit repeatable on CUDA, and evaluation is repeatable;
* ``DataLoader`` workers with pinned memory change no number;
* the metrics' sort of the normal pixels on the GPU (``eval.metrics_device=auto``) changes no number;

and on ViT-L/14@336 (random weights: kernels do not depend on them), through the profile and the
repeated training of ``scripts/bench_gpu_kernels.py`` (the GPU bench reports the same as figures):

* a fused SDPA kernel (flash, memory-efficient or cuDNN), never the math path, runs the attention of a
  bf16 inference forward, a training step and a training step under ``train.deterministic``;
* ``train.deterministic`` training of ViT-L is bit-for-bit repeatable.

``scripts/gpu_session.sh`` runs this file on the lent GPU machine (docs/gpu_bench.md).
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_clip, make_tiny_feclip, randomize_adapters

from feclip.config import EvalConfig, LossConfig, TrainConfig
from feclip.data import AnomalyDataset, list_samples
from feclip.engine import train as train_module
from feclip.engine.cache import PrefixCache
from feclip.engine.evaluate import predict
from feclip.losses import feclip_loss
from feclip.models import FEClip, FEClipConfig, load_clip

sys.path.insert(0, str(REPO / "scripts"))  # the profile and the repeated training of the GPU bench
from bench_gpu_kernels import (  # noqa: E402
    ATTENTION_PATHS,
    attention_ops,
    classify_attention,
    max_rel_diff,
    repeated_training,
    uses_fused_attention,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
VIT_L = "ViT-L-14-336-quickgelu"


def model_on(device: torch.device, precision: str | None = None, **kw) -> FEClip:
    """The tiny FE-CLIP with adapters that matter (random, not the near-identity initialisation)."""
    clip = make_tiny_clip(logit_scale=100.0).to(device)
    return randomize_adapters(make_tiny_feclip(clip, seed=None, precision=precision, **kw), seed=7, scale=0.2)


@contextmanager
def full_fp32():
    """TF32 off for matrix products and convolutions (a CUDA vs CPU comparison in fp32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextmanager
def cuda_syncs():
    """The synchronising CUDA calls that ``set_sync_debug_mode`` reports, as they happen: a list of
    ``file:line`` of the Python code that made each (it grows while the block runs)."""
    seen: list[str] = []
    old = torch.cuda.get_sync_debug_mode()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            seen.append(f"{filename}:{lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(old)


# -- one precision policy ---------------------------------------------------------------------------


def test_the_default_precision_on_cuda_is_bf16_with_an_fp32_head():
    model = model_on(CUDA)
    assert model.precision == "bf16" and model.token_dtype == torch.float32
    x = torch.randn(2, 3, model.image_size, model.image_size, device=CUDA)
    with torch.no_grad():
        out = model(x)
    assert out.tap_cls_logits.dtype == torch.float32 and out.tap_patch_logits.dtype == torch.float32


def test_cached_and_uncached_training_steps_agree_on_cuda(sets):
    model = model_on(CUDA, "bf16")
    ds = AnomalyDataset(list_samples("synthetic", sets["set_a"])[:6], image_size=84)
    cache = PrefixCache(model, ds, CUDA, batch_size=4)
    picked = [4, 1, 5]
    cached = cache.batch(picked)
    images = torch.stack([ds[i]["image"] for i in picked]).to(CUDA)
    labels = torch.tensor([ds[i]["label"] for i in picked], device=CUDA)
    masks = cached["mask"].to(CUDA)
    results = []
    model.train()
    for forward, inputs in ((model.forward_from_prefix, cached["tokens"].to(CUDA)), (model.forward, images)):
        model.zero_grad(set_to_none=True)
        loss, _ = feclip_loss(forward(inputs), masks, labels, LossConfig())
        loss.backward()
        results.append(
            (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        )
    (loss_a, grads_a), (loss_b, grads_b) = results
    # the same kernels on the same tokens: equal up to the non-determinism of atomics in the backward
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=0)
    for k in grads_a:
        scale = grads_a[k].abs().max().clamp(min=1e-12)
        assert ((grads_a[k] - grads_b[k]).abs().max() / scale).item() < 1e-4, k


def test_evaluation_and_predict_give_the_same_numbers_on_cuda(sets):
    from feclip.predict import score_batch

    model = model_on(CUDA, "bf16")
    ds = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)
    preds = predict(model, ds, EvalConfig(batch_size=4, sigma=4.0), CUDA)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(CUDA)
    chunks = [score_batch(model, images[i : i + 4], sigma=4.0) for i in range(0, len(ds), 4)]
    np.testing.assert_allclose(
        preds.scores, torch.cat([c[0] for c in chunks]).double().numpy(), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        np.stack(preds.maps), torch.cat([c[1] for c in chunks]).numpy(), rtol=0, atol=1e-5
    )


def test_a_fewshot_reference_is_at_distance_zero_from_its_bank_on_cuda(sets):
    from feclip.models.fewshot import MemoryBank, fewshot_maps

    model = model_on(CUDA, "bf16")
    refs = [s for s in list_samples("synthetic", sets["set_b"], split="train") if s.category == "cat"][:1]
    bank = MemoryBank.from_samples(model, refs)
    ds = AnomalyDataset(refs, image_size=84)
    with torch.no_grad():
        out = model(ds[0]["image"][None].to(CUDA), return_tokens=True)
    assert fewshot_maps(out.tap_tokens, bank, 84, sigma=0.0).abs().max().item() < 1e-5


def test_fp32_on_cuda_matches_the_cpu():
    """Outputs within 1e-4 (probabilities), gradients within 1e-3 of each gradient's largest value."""
    cpu_model = model_on(torch.device("cpu"), "fp32")
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    size = cpu_model.image_size
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(4, size, size)
    masks[1::2, size // 4 : size // 2, size // 3 : size // 2] = 1.0
    labels = torch.tensor([0, 1, 0, 1])

    def run(model, device):
        model.eval()
        with torch.no_grad():
            out = model(x.to(device))
        outputs = [out.tap_cls_logits.softmax(-1).cpu(), out.tap_patch_logits.softmax(-1).cpu()]
        model.train()
        model.zero_grad(set_to_none=True)
        loss, _ = feclip_loss(model(x.to(device)), masks.to(device), labels.to(device), LossConfig())
        loss.backward()
        return outputs, {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None}

    with full_fp32():
        ref_out, ref_grads = run(cpu_model, torch.device("cpu"))
        out, grads = run(cuda_model, CUDA)
    assert max((a - b).abs().max().item() for a, b in zip(ref_out, out)) < 1e-4
    assert ref_grads.keys() == grads.keys()
    for k in ref_grads:
        scale = ref_grads[k].abs().max().clamp(min=1e-12)
        assert ((ref_grads[k] - grads[k]).abs().max() / scale).item() < 1e-3, k


# -- host synchronisations ------------------------------------------------------------------------


def test_an_evaluation_batch_synchronises_at_most_once(sets):
    ds = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84).preload()
    model = model_on(CUDA, "bf16")
    cfg = EvalConfig(batch_size=4, sigma=4.0)
    predict(model, ds, cfg, CUDA)  # warm-up: kernel selection, the Gaussian kernel's buffers
    torch.cuda.synchronize()
    with cuda_syncs() as syncs:
        predict(model, ds, cfg, CUDA)
    batches = math.ceil(len(ds) / cfg.batch_size)
    assert len(syncs) <= batches, syncs[:5]


@pytest.mark.parametrize("prefix_cache", ["on", "off"])
def test_training_steps_never_wait_for_the_device(sets, tmp_path, monkeypatch, prefix_cache):
    """Between two optimizer steps of an epoch, no synchronisation (CHECK_EVERY large: the loss is read
    at the epoch's end only). The prefix cache's build before the first step and the epoch end's
    checkpoint (each weight copied to the host) may wait; they happen once per epoch, not per step."""
    ds = AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84).preload()  # 18 images
    model = model_on(CUDA, "bf16")
    monkeypatch.setattr(train_module, "CHECK_EVERY", 10_000)
    cfg = TrainConfig(epochs=1, batch_size=2, prefix_cache=prefix_cache, progress=False, resume=False)
    at_step: list[int] = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        at_step.append(len(syncs))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with cuda_syncs() as syncs:
        result = train_module.train(model, ds, cfg, tmp_path, 0, CUDA)
    assert result.steps == 9 and math.isfinite(result.last_loss)
    between = syncs[at_step[0] : at_step[-1]]  # from the first step to the last one
    assert not between, sorted(set(between))


# -- determinism and workers ---------------------------------------------------------------------


def test_deterministic_training_is_bit_for_bit_repeatable_on_cuda(sets, tmp_path):
    ds = AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84).preload()
    states = []
    for i in range(2):
        model = model_on(CUDA, "bf16")
        cfg = TrainConfig(epochs=2, batch_size=4, progress=False, resume=False, deterministic=True)
        train_module.train(model, ds, cfg, tmp_path / f"run{i}", 0, CUDA)
        states.append({k: v.detach().cpu() for k, v in model.trainable_state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_evaluation_is_repeatable_and_workers_change_nothing_on_cuda(sets):
    ds = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)
    model = model_on(CUDA, "bf16")
    cfg = EvalConfig(batch_size=4, sigma=4.0)
    a = predict(model, ds, cfg, CUDA)
    b = predict(model, ds, cfg, CUDA, num_workers=2)
    assert np.array_equal(a.scores, b.scores)
    assert all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps))
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_metrics_sorted_on_the_gpu_equal_the_host_ones(dtype):
    """eval.metrics_device=auto on CUDA: the normal pixels sorted by torch on the GPU; every metric value
    of the categories and of the pooled rows equal bit for bit to numpy's sort (2 M pixels a category)."""
    from test_metrics_grouped import assert_same_values, dataset

    from feclip.metrics.aggregate import category_metric_sets
    from feclip.metrics.sorting import DeviceSort, metrics_sort

    rng = np.random.default_rng(30)
    labels, scores, masks, maps, groups = dataset(rng, n_categories=3, per_category=32, size=256, dtype=dtype)
    groups["__micro__"] = list(range(len(labels)))
    with_masks = dict.fromkeys(groups, True)
    expected = category_metric_sets(labels, scores, masks, maps, groups, with_masks, "__micro__")
    chosen = metrics_sort("auto", CUDA)
    assert isinstance(chosen, DeviceSort) and chosen.min_values < 2_000_000
    got = category_metric_sets(labels, scores, masks, maps, groups, with_masks, "__micro__", sort=chosen)
    for name in groups:
        assert_same_values(got[name], expected[name])


# -- ViT-L: fused attention, deterministic training ----------------------------------------------------


@pytest.fixture(scope="module")
def vit_l():
    """ViT-L/14@336 with random weights on CUDA (the kernels and their determinism do not depend on the
    weights). FE-CLIP stores its frozen matrices in bf16 on CUDA: the tests below share that."""
    return load_clip(VIT_L, pretrained=None, device=CUDA)


def test_vit_l_attention_runs_a_fused_sdpa_kernel_in_inference_and_training(vit_l):
    """The profiler sees a fused SDPA op (flash, memory-efficient or cuDNN) and no math-path op in a bf16
    inference forward, a training step, and a training step under ``train.deterministic``."""
    model = FEClip(vit_l, FEClipConfig())  # bf16 on CUDA: the precision of training and evaluation
    assert model.precision == "bf16"
    ops = attention_ops(model, CUDA)
    assert tuple(ops) == ATTENTION_PATHS
    for path, names in ops.items():
        kinds = classify_attention(names)
        assert uses_fused_attention(names), f"{path}: fused {kinds['fused']}, math {kinds['math']}"


def test_vit_l_deterministic_training_is_bit_for_bit_repeatable(vit_l):
    """ViT-L trained 3 cached steps (bf16, Adam) twice from the same start on the same batch under
    ``train.deterministic``: the same weights bit for bit."""
    a, b = repeated_training(vit_l, CUDA, steps=3, deterministic=True, batch=8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"max rel. diff {max_rel_diff(a, b):.1e}"
