"""AnomalyCLIP (feclip.methods.anomalyclip): pinned to the reference's outputs, and hand-checkable parts.

The fixture tests/data/peers/anomalyclip.{npz,json} holds what the reference implementation
(zqhang/AnomalyCLIP, its own CLIP class on the tiny CLIP's weights) computed; scripts/peers/pin_anomalyclip.py
made it and is the source of the inputs rebuilt here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, load_script

from feclip.errors import ConfigError
from feclip.methods.anomalyclip import (
    AnomalyClip,
    AnomalyClipConfig,
    dice_loss_reference,
    dpam_attention,
    focal_loss_reference,
    scale_block,
)
from feclip.models import load_clip

FIXTURE = REPO / "tests" / "data" / "peers" / "anomalyclip"


def _pin():
    return load_script("scripts/peers/pin_anomalyclip.py")


@pytest.fixture(scope="module")
def pinned():
    meta = json.loads(FIXTURE.with_suffix(".json").read_text())
    arrays = dict(np.load(FIXTURE.with_suffix(".npz")))
    return meta, {k: torch.from_numpy(v) for k, v in arrays.items()}


@pytest.fixture(scope="module")
def pin_setup(pinned):
    """The pinned CLIP and inputs, rebuilt; their checksums must be the fixture's."""
    meta, arrays = pinned
    pin = _pin()
    clip = load_clip(meta["model"], seed=meta["clip_seed"])
    assert pin.weights_checksum(clip) == meta["clip_sha256"], (
        "the tiny CLIP drawn with the fixture's seed has other weights than when the fixture was made "
        "(RNG or open_clip initialisation changed): re-run scripts/peers/pin_anomalyclip.py"
    )
    images, masks, labels = pin.make_inputs(meta["n_images"], clip.visual.image_size[0], meta["input_seed"])
    assert pin.tensor_checksum(images, masks, labels) == meta["inputs_sha256"], "the pinned inputs changed"
    prompts = {k[len("prompt/") :]: v for k, v in arrays.items() if k.startswith("prompt/")}
    return pin, clip, images, masks, labels, prompts


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("tap_set", ["top", "multi"])
def test_matches_reference(pinned, pin_setup, tap_set):
    meta, ref = pinned
    pin, clip, images, masks, labels, prompts = pin_setup
    ours = pin.run_ours(clip, tuple(meta["tap_sets"][tap_set]), prompts, images, masks, labels)
    assert torch.equal(ours["tokens"].cpu(), ref["tokens"].long()), "open_clip's token ids != the reference's"
    diffs = {
        "scores": float((ours["scores"] - ref[f"{tap_set}/scores"]).abs().max()),
        "maps": float((ours["maps"] - ref[f"{tap_set}/maps"]).abs().max()),
        "loss_rel": _rel(ours["loss"], ref[f"{tap_set}/loss"]),
        "parts": float((ours["parts"] - ref[f"{tap_set}/parts"]).abs().max()),
    }
    assert diffs["scores"] < 1e-6 and diffs["maps"] < 2e-5, diffs
    assert diffs["loss_rel"] < 1e-5 and diffs["parts"] < 1e-5, diffs
    for k, g in ours["grads"].items():
        r = ref[f"{tap_set}/grad/{k}"]
        if not r.any():  # a deep token of a layer the 2-layer text tower does not have
            assert not g.any(), k
            continue
        # the deep tokens pass a cast to fp16 (as in the reference): their gradient is rounded to fp16,
        # so fp32 rounding differences upstream can move it by one fp16 step (2^-10 relative)
        tol = 2**-10 if k.startswith("compound") else 1e-5
        assert _rel(g, r) < tol, (k, _rel(g, r))


def test_fixture_is_small_and_records_the_reference():
    assert FIXTURE.with_suffix(".npz").stat().st_size < 300_000
    meta = json.loads(FIXTURE.with_suffix(".json").read_text())
    assert meta["reference"] == "zqhang/AnomalyCLIP" and len(meta["reference_commit"]) == 40


# -- hand-checkable parts ---------------------------------------------------------------------------


def test_dpam_attention_is_vv_attention():
    """V-V attention against a slow loop over heads and tokens."""
    torch.manual_seed(0)
    clip = load_clip("feclip-tiny", seed=0)
    blk = clip.visual.transformer.resblocks[7]
    h = torch.randn(2, 5, 32)
    vv, qk = dpam_attention(blk, h)
    a = blk.attn
    heads, d = a.num_heads, 32
    dh = d // heads
    q, k, v = F.linear(h, a.in_proj_weight, a.in_proj_bias).split(d, dim=-1)
    slow_vv, slow_qk = torch.zeros(2, 5, d), torch.zeros(2, 5, d)
    for b in range(2):
        for hd in range(heads):
            cols = slice(hd * dh, (hd + 1) * dh)
            for i in range(5):
                for out, key in ((slow_vv, v), (slow_qk, k)):
                    query = v if out is slow_vv else q
                    w = torch.tensor(
                        [float(query[b, i, cols] @ key[b, j, cols]) / math.sqrt(dh) for j in range(5)]
                    )
                    out[b, i, cols] = w.softmax(0) @ v[b, :, cols]
    slow_vv, slow_qk = a.out_proj(slow_vv), a.out_proj(slow_qk)
    torch.testing.assert_close(vv, slow_vv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(qk, slow_qk, atol=1e-6, rtol=1e-5)
    # the ordinary path is the block's own attention
    torch.testing.assert_close(qk, a(h, h, h, need_weights=False)[0], atol=1e-6, rtol=1e-5)


def test_dpam_path_accumulates_attention_only():
    """Taps after the DPAM start read x_s + sum of V-V attentions (no MLP); the CLS feature comes from
    the unchanged CLIP, so with DPAM off every tap is the plain CLIP's tokens."""
    clip = load_clip("feclip-tiny", seed=1)
    images = torch.randn(1, 3, 84, 84)
    v = clip.visual
    with torch.no_grad():
        patches = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(1, 1, -1), patches], 1) + v.positional_embedding
        x = v.ln_pre(x)
        plain = []
        for blk in v.transformer.resblocks:
            plain.append(x)  # block input
            x = blk(x)
        plain.append(x)
    model = AnomalyClip(clip, AnomalyClipConfig(taps=(3, 22, 23), dpam_layer=3), precision="fp32")
    cls, tokens = model.encode_image(images)
    assert model.dpam_start == 22
    ln, proj = v.ln_post, v.proj
    with torch.no_grad():
        expect_3 = ln(plain[4]) @ proj
        b22, b23 = v.transformer.resblocks[22], v.transformer.resblocks[23]
        vv22 = dpam_attention(b22, b22.ln_1(plain[22]))[0]
        vv23 = dpam_attention(b23, b23.ln_1(plain[23]))[0]  # on the ordinary path's tokens
        expect_22 = ln(plain[22] + vv22) @ proj
        expect_23 = ln(plain[22] + vv22 + vv23) @ proj
    torch.testing.assert_close(tokens[0], expect_3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[1], expect_22, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[2], expect_23, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, plain[24][:, 0] @ proj, atol=1e-5, rtol=1e-5)  # no ln_post
    with_ln = AnomalyClip(clip, AnomalyClipConfig(cls_ln_post=True), precision="fp32").encode_image(images)[0]
    torch.testing.assert_close(with_ln, ln(plain[24][:, 0]) @ proj, atol=1e-5, rtol=1e-5)
    off = AnomalyClip(clip, AnomalyClipConfig(taps=(22,), dpam_layer=1), precision="fp32").encode_image(
        images
    )[1]
    torch.testing.assert_close(off[0], ln(plain[23]) @ proj, atol=1e-5, rtol=1e-5)


def _clip_with_text_layers(n_layers: int):
    from open_clip.model import CLIP

    torch.manual_seed(3)
    vision = {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": n_layers}
    return CLIP(32, vision, text, quick_gelu=True).eval()


def test_deep_prompts_replace_tokens_per_layer():
    """Before text layer i (1 <= i <= depth - 1) positions 1..t_n_ctx hold deep token i - 1 (fp16-rounded);
    layer 0 sees the learnable context, later layers what the previous layer made of it."""
    import open_clip

    clip = _clip_with_text_layers(4)
    model = AnomalyClip(
        clip, AnomalyClipConfig(depth=3, dpam_layer=1), open_clip.get_tokenizer("ViT-L-14"), "fp32"
    )
    with torch.no_grad():
        for p in model.compound_prompts_text:
            p.normal_(std=0.3)
    seen = {}
    hooks = [
        blk.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
        for i, blk in enumerate(clip.transformer.resblocks)
    ]
    model.text_features()
    for hk in hooks:
        hk.remove()
    pos = clip.positional_embedding
    torch.testing.assert_close(seen[0][0, 1:13], model.ctx_pos[0, 0] + pos[1:13])
    torch.testing.assert_close(seen[0][1, 1:13], model.ctx_neg[0, 0] + pos[1:13])
    for i in (1, 2):
        deep = model.compound_prompts_text[i - 1].detach()
        for row in range(2):
            assert torch.equal(seen[i][row, 1:5], deep.half().float())
        assert not torch.equal(seen[i][:, 5:], seen[i - 1][:, 5:])  # the rest: the previous layer's output
    assert not torch.equal(seen[3][0, 1:5], model.compound_prompts_text[1].detach().half().float())
    model.config.deep_prompts_fp16 = False
    model.text_features()  # runs without the rounding too


def test_text_features_without_deep_prompts_are_clip_encode_text():
    """depth 1 and the context set to the embedding of "X": the sentences' own CLIP text embeddings."""
    clip = load_clip("feclip-tiny", seed=2)
    model = AnomalyClip(clip, AnomalyClipConfig(depth=1), precision="fp32")
    x_emb = clip.token_embedding.weight[model.tokenized_prompts[0, 1]]
    with torch.no_grad():
        model.ctx_pos.copy_(x_emb.expand_as(model.ctx_pos))
        model.ctx_neg.copy_(x_emb.expand_as(model.ctx_neg))
        expect = F.normalize(clip.encode_text(model.tokenized_prompts), dim=-1)
        torch.testing.assert_close(model.text_features(), expect, atol=1e-6, rtol=1e-5)
    assert model.prompt_sentences() == [
        "X X X X X X X X X X X X object.",
        "X X X X X X X X X X X X damaged object.",
    ]


def test_reference_losses_by_hand():
    probs = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.8]]]])  # (1, 2, 1, 2): normal, abnormal
    target = torch.tensor([[[0.0, 1.0]]])
    s = 1e-5
    pt = torch.tensor([(1 - s) * 0.9 + s * 0.1 + s, (1 - s) * 0.8 + s * 0.2 + s])
    expect = (-((1 - pt) ** 2) * pt.log()).mean()
    torch.testing.assert_close(focal_loss_reference(probs, target), expect)
    dice = 1 - (2 * 0.8 + 1) / (0.1 + 0.8 + 1 + 1)
    torch.testing.assert_close(dice_loss_reference(probs[:, 1], target), torch.tensor(dice))


def test_loss_is_lam_times_map_losses_plus_ce_and_reaches_only_the_prompts():
    clip = load_clip("feclip-tiny", seed=4)
    model = AnomalyClip(clip, AnomalyClipConfig(taps=(11, 23)), precision="fp32")
    images = torch.randn(2, 3, 84, 84)
    masks = torch.zeros(2, 84, 84)
    masks[1, 10:40, 20:50] = 1
    labels = torch.tensor([0, 1])
    out = model(images)
    assert out.image_scores.shape == (2,) and out.maps.shape == (2, 84, 84)
    assert out.terms["tap_probs"].shape == (2, 2, 2, 6, 6)
    torch.testing.assert_close(out.image_scores, out.terms["image_logits"].softmax(-1)[:, 1])
    total, parts = model.loss(out, masks, labels)
    torch.testing.assert_close(total.detach(), 4 * (parts["focal"] + parts["dice"]) + parts["image"])
    torch.testing.assert_close(parts["image"], F.cross_entropy(out.terms["image_logits"], labels).detach())
    total.backward()
    assert model.ctx_pos.grad is not None and model.ctx_neg.grad is not None
    assert all(p.grad is None for p in clip.parameters())
    assert set(model.trainable_state_dict()) == {
        "ctx_pos",
        "ctx_neg",
        *(f"compound_prompts_text.{i}" for i in range(8)),
    }


def test_map_is_the_sum_over_taps_of_upsampled_probabilities():
    clip = load_clip("feclip-tiny", seed=5)
    model = AnomalyClip(clip, AnomalyClipConfig(taps=(5, 23)), precision="fp32")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 84, 84))
        p = out.terms["tap_probs"]  # (N, B, 2, h, w)
        up = F.interpolate(p.flatten(0, 1), size=(84, 84), mode="bilinear")  # (N*B, 2, S, S)
        expect = ((up[:, 1] + 1 - up[:, 0]) / 2).sum(0, keepdim=True)
    torch.testing.assert_close(out.maps, expect, atol=1e-5, rtol=1e-5)


def test_other_input_size_resizes_positions_bilinearly():
    clip = load_clip("feclip-tiny", seed=6)
    model = AnomalyClip(clip, precision="fp32")
    out = model(torch.randn(1, 3, 112, 112))
    assert out.maps.shape == (1, 112, 112) and out.terms["tap_probs"].shape[-2:] == (8, 8)
    with pytest.raises(ConfigError):
        model(torch.randn(1, 3, 90, 90))


def test_depth_scaling_and_validation():
    assert scale_block(24, 24) == 23 and scale_block(6, 12) == 2 and scale_block(6, 24) == 5
    ref = AnomalyClipConfig().resolved(24)
    assert ref.taps == (23,) and ref.dpam_layer == 20
    base = AnomalyClipConfig().resolved(12)
    assert base.taps == (11,) and base.dpam_layer == 11  # V-V attention in blocks 3..12 (1-based)
    for bad in ({"taps": (5, 3)}, {"taps": (24,)}, {"dpam_layer": 26}, {"n_ctx": 0}, {"temperature": 0.0}):
        with pytest.raises(ConfigError):
            AnomalyClipConfig(**bad).validate(24)


def test_loads_the_reference_checkpoint_layout():
    clip = load_clip("feclip-tiny", seed=7)
    model = AnomalyClip(clip, precision="fp32")
    state = {k: torch.randn_like(v) for k, v in model.trainable_state_dict().items()}
    state["compound_prompt_projections.0.weight"] = torch.zeros(896, 32)  # unused by the reference
    state["token_prefix_pos"] = torch.zeros(1, 1, 1, 32)
    model.load_trainable_state_dict(state)
    assert torch.equal(model.ctx_neg, state["ctx_neg"])
    with pytest.raises(ConfigError):
        model.load_trainable_state_dict({"ctx_pos": state["ctx_pos"]})


def test_bf16_policy_stays_close_to_fp32_and_trains():
    clip = load_clip("feclip-tiny", seed=8)
    fp32 = AnomalyClip(clip, precision="fp32")
    bf16 = AnomalyClip(clip, precision="bf16")
    bf16.load_trainable_state_dict(fp32.trainable_state_dict())
    images = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        a, b = fp32(images), bf16(images)
    assert b.maps.dtype == torch.float32 and b.image_scores.dtype == torch.float32
    assert float((a.image_scores - b.image_scores).abs().max()) < 0.02
    assert float((a.maps - b.maps).abs().max()) < 0.05
    total, _ = bf16.loss(bf16(images), torch.zeros(2, 84, 84), torch.tensor([0, 1]))
    total.backward()
    assert torch.isfinite(bf16.ctx_pos.grad).all()
    with pytest.raises(ConfigError):
        AnomalyClip(clip, precision="fp16")
