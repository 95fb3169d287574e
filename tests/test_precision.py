"""One precision policy for every path that produces a number, checked under CPU bf16 autocast.

The model owns its precision (FEClip.precision): training with and without the prefix cache, few-shot
banks and test tokens, evaluation and feclip-predict all run the same numbers; under bf16 the frozen
CLIP's matrices are stored in bf16 with the numbers of autocast over fp32 weights.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_clip, make_tiny_feclip, randomize_adapters

from feclip.config import EvalConfig, LossConfig
from feclip.data import AnomalyDataset, list_samples
from feclip.engine.cache import PrefixCache
from feclip.errors import ConfigError
from feclip.losses import feclip_loss
from feclip.models import FEClip, FEClipConfig
from feclip.models.feclip import default_precision, precision_for
from feclip.scoring import ScoringConfig, scores_and_maps


def fresh_clip():
    return make_tiny_clip(logit_scale=100.0)


def make(clip, precision, **kw):
    # adapters that matter, so that every path is exercised
    return randomize_adapters(make_tiny_feclip(clip, precision=precision, **kw), seed=7, scale=0.2)


@pytest.fixture()
def images():
    return torch.randn(4, 3, 84, 84, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def data(synthetic_sets):
    return synthetic_sets(n_train_good=2, n_test_good=2, n_test_bad=2, image_size=64)


def test_defaults_follow_the_device_and_train_amp():
    assert default_precision("cpu") == "fp32" and default_precision(torch.device("cuda")) == "bf16"
    assert precision_for("bf16", "cuda:0") == "bf16"
    assert precision_for("bf16", "cpu") == precision_for("none", "cuda") == "fp32"
    assert FEClip(fresh_clip(), FEClipConfig()).precision == "fp32"  # the CLIP is on the CPU


def test_bf16_stores_the_frozen_matrices_with_the_numbers_of_autocast_over_fp32_weights(images):
    """Storing the frozen CLIP in bf16 is a memory and speed choice, never a numerical one."""
    stored = make(fresh_clip(), "bf16")
    cast = make(fresh_clip(), "bf16")
    cast.set_precision("bf16")  # already bf16: nothing changes
    kept = FEClip(fresh_clip(), FEClipConfig(), precision="bf16", store_frozen=False)
    kept.load_state_dict(stored.state_dict())
    v = stored.clip.visual
    blk = v.transformer.resblocks[0]
    assert (
        blk.attn.in_proj_weight.dtype == blk.mlp.c_fc.weight.dtype == v.conv1.weight.dtype == torch.bfloat16
    )
    assert (
        v.positional_embedding.dtype == v.class_embedding.dtype == torch.float32
    )  # added to the fp32 stream
    assert blk.ln_1.weight.dtype == v.ln_post.weight.dtype == v.proj.dtype == torch.float32
    assert stored.text_embeddings.dtype == torch.float32
    assert kept.clip.visual.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float32
    with torch.no_grad():
        a, b = stored(images), kept(images)
    for name in ("tap_cls_logits", "tap_patch_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for x, y in zip(scores_and_maps(stored, a, ScoringConfig()), scores_and_maps(kept, b, ScoringConfig())):
        assert torch.equal(x, y)
    # and the gradients of a training step
    grads = []
    for model in (stored, kept):
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(images)
        (out.tap_maps.mean() + out.tap_scores.mean()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_bf16_runs_the_products_in_bf16_the_residual_stream_and_the_head_in_fp32(images):
    model = make(fresh_clip(), "bf16")
    products = []
    blk = model.clip.visual.transformer.resblocks[20]
    hooks = [
        blk.mlp.c_fc.register_forward_hook(lambda m, i, o: products.append(o.dtype)),
        model.adapters["18"].ffe.linear.register_forward_hook(lambda m, i, o: products.append(o.dtype)),
    ]
    with torch.no_grad():
        tokens = model.prefix(images)
        out = model(images, return_tokens=True)
    for h in hooks:
        h.remove()
    assert set(products) == {torch.bfloat16}  # the matrix products (blocks and adapters)
    assert tokens.dtype == model.token_dtype == torch.float32  # the residual stream between blocks
    assert out.tap_tokens.dtype == torch.float32
    _, anomaly_map = scores_and_maps(model, out, ScoringConfig())
    assert out.tap_cls_logits.dtype == out.tap_patch_logits.dtype == anomaly_map.dtype == torch.float32
    fp32 = make(fresh_clip(), "fp32")
    with torch.no_grad():
        ref = fp32(images)
    assert ref.tap_tokens is None and fp32.token_dtype == torch.float32
    # bf16 moves the probabilities a little, not the ranking's scale
    assert (out.tap_maps - ref.tap_maps).abs().max() < 0.05
    assert not torch.equal(out.tap_maps, ref.tap_maps)


def test_the_model_policy_wins_over_the_callers_autocast(images):
    model = make(fresh_clip(), "fp32")
    with torch.no_grad():
        plain = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = model(images)
    assert torch.equal(plain.tap_patch_logits, under.tap_patch_logits)


def test_fp32_after_bf16_storage_is_refused_and_a_bad_name_too():
    clip = fresh_clip()
    make(clip, "bf16")
    with pytest.raises(ConfigError, match="stored in bf16.*loaded anew"):
        FEClip(clip, FEClipConfig(), precision="fp32")
    with pytest.raises(ConfigError, match=r"precision must be one of \('fp32', 'bf16'\)"):
        FEClip(fresh_clip(), FEClipConfig(), precision="fp16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_and_uncached_training_steps_compute_the_same_numbers(data, precision):
    """The prefix cache stores and serves the fp32 residual stream the prefix computed: the blocks after
    the first tap see the same tokens at the same precision, so the loss and every gradient are equal."""
    model = make(fresh_clip(), precision)
    ds = AnomalyDataset(list_samples("synthetic", data["set_a"])[:6], image_size=84)
    cache = PrefixCache(model, ds, torch.device("cpu"), batch_size=4)
    assert cache.tokens.dtype == model.token_dtype
    picked = [4, 1, 5]
    cached = cache.batch(picked)
    items = [ds[i] for i in picked]
    images = torch.stack([it["image"] for it in items])
    labels = torch.tensor([it["label"] for it in items])
    results = []
    model.train()
    for forward, inputs in ((model.forward_from_prefix, cached["tokens"]), (model.forward, images)):
        model.zero_grad(set_to_none=True)
        loss, _ = feclip_loss(forward(inputs), cached["mask"], labels, LossConfig())
        loss.backward()
        results.append(
            (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        )
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def test_fewshot_banks_are_built_at_the_precision_of_the_test_tokens(data):
    """A reference image among the test images is at distance 0 from the bank: the bank and the test
    tokens come from the same forward, in the same precision (a bank in fp32 against bf16 tokens
    would leave the rounding as a distance)."""
    from feclip.models.fewshot import MemoryBank
    from feclip.scoring import fewshot_maps

    model = make(fresh_clip(), "bf16")
    refs = [s for s in list_samples("synthetic", data["set_b"], split="train") if s.category == "cat"][:1]
    bank = MemoryBank.from_samples(model, refs)
    ds = AnomalyDataset(refs, image_size=84)
    with torch.no_grad():
        out = model(ds[0]["image"][None], return_tokens=True)
    dist = fewshot_maps(out.tap_tokens, bank, 84, sigma=0.0)
    assert dist.abs().max() < 1e-6


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_feclip_predict_and_feclip_eval_give_the_same_numbers(data, precision):
    from feclip.engine.evaluate import predict
    from feclip.predict import score_batch

    model = make(fresh_clip(), precision)
    ds = AnomalyDataset(list_samples("synthetic", data["set_b"]), image_size=84)
    preds = predict(model, ds, EvalConfig(batch_size=4, sigma=4.0), torch.device("cpu"))
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    chunks = [score_batch(model, images[i : i + 4], sigma=4.0) for i in range(0, len(ds), 4)]  # same batches
    assert np.array_equal(preds.scores, torch.cat([c[0] for c in chunks]).double().numpy())
    assert np.array_equal(np.stack(preds.maps), torch.cat([c[1] for c in chunks]).numpy())


def test_a_deep_copy_keeps_the_policy(images):
    model = make(fresh_clip(), "bf16")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(model(images).tap_maps, twin(images).tap_maps)
    assert twin.precision == "bf16"
