"""APRIL-GAN (feclip.methods.aprilgan): pinned to the authors' code, and hand-checkable pieces.

The fixture ``tests/data/peers/aprilgan.pt`` holds what the reference (``ByChelsea/VAND-APRIL-GAN``)
computed on the tiny random CLIP, fixed random images, masks and linear-layer weights
(``scripts/peers/pin_aprilgan.py`` writes it). Measured: image scores within 1.2e-6, maps within 4.3e-6
(values up to 4.0), loss within 9.6e-7 (8.4e-8 relative), gradients of the linear layers within 8.4e-7
(at most 1.3e-6 of each tensor's largest entry): fp32 rounding (docs/peers.md).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, load_script

from feclip.errors import ConfigError
from feclip.losses import dice_loss
from feclip.methods.aprilgan import (
    AprilGan,
    AprilGanConfig,
    align_corners_matrix,
    ensemble_sentences,
    focal_on_probabilities,
)
from feclip.models import load_clip

FIXTURE = REPO / "tests" / "data" / "peers" / "aprilgan.pt"


def _pin_script():
    return load_script("scripts/peers/pin_aprilgan.py")


@pytest.fixture(scope="module")
def pinned():
    """(fixture, pin script module, tiny CLIP rebuilt from the fixture's seed, inputs)."""
    pin = _pin_script()
    fixture = torch.load(FIXTURE, weights_only=True)
    assert fixture["seeds"] == {"clip": pin.CLIP_SEED, "data": pin.DATA_SEED, "fc": pin.FC_SEED}
    clip = load_clip(fixture["model"], seed=fixture["seeds"]["clip"])
    v = clip.visual
    inputs = pin.make_inputs(
        fixture["n_images"], v.image_size[0], v.conv1.out_channels, v.proj.shape[1], len(pin.REF_TAPS)
    )
    return fixture, pin, clip, inputs


def test_fixture_inputs_are_rebuilt_bit_for_bit(pinned):
    """A change in the RNG, open_clip's initialisation or the input recipe fails here, loudly."""
    fixture, pin, clip, inputs = pinned
    sha = fixture["sha256"]
    assert pin.tensor_sha256(clip.state_dict()) == sha["clip"], (
        "the tiny CLIP drawn from the fixture's seed has other weights than when the fixture was "
        "written (torch/open_clip changed its initialisation?): rerun scripts/peers/pin_aprilgan.py"
    )
    assert pin.tensor_sha256({"images": inputs["images"], "masks": inputs["masks"]}) == sha["inputs"]
    assert pin.tensor_sha256(inputs["fc"]) == sha["fc"]
    assert inputs["class_names"] == fixture["class_names"]


def test_matches_reference_outputs_loss_and_gradients(pinned):
    fixture, _, clip, inputs = pinned
    ref = fixture["reference"]
    model = AprilGan(clip)
    model.load_trainable_state_dict(inputs["fc"])
    out = model(inputs["images"], inputs["class_names"])
    total, parts = model.loss(out, inputs["masks"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    total.backward()

    def max_diff(a, b):
        return float((a.detach().double() - b.double()).abs().max())

    assert out.image_scores.shape == (4,) and out.maps.shape == (4, 84, 84)
    assert max_diff(out.image_scores, ref["image_scores"]) < 1e-5
    assert max_diff(out.maps, ref["maps"]) < 2e-5
    assert max_diff(total, ref["loss"]) < 1e-5 * float(ref["loss"])
    assert max_diff(parts["focal"], ref["focal"]) < 1e-5 * float(ref["focal"])
    assert max_diff(parts["dice"], ref["dice"]) < 1e-5 * float(ref["dice"])
    grads = {f"fc.{k}": p.grad for k, p in model.fc.named_parameters()}
    assert set(grads) == set(ref["grads"])
    for k, g in ref["grads"].items():
        assert max_diff(grads[k], g) < 1e-5 * float(g.abs().max()), k
    # the frozen CLIP gets no gradient at all
    assert all(p.grad is None for p in clip.parameters())


def test_upsampling_by_matrices_matches_interpolate(pinned):
    _, _, clip, inputs = pinned
    a = AprilGan(clip)
    a.load_trainable_state_dict(inputs["fc"])
    b = AprilGan(clip, AprilGanConfig(upsample="matmul"))
    b.load_trainable_state_dict(inputs["fc"])
    x = inputs["images"][:2]
    assert torch.allclose(a(x).maps, b(x).maps, atol=1e-5)
    m = torch.randn(3, 2, 5, 7)
    ref = F.interpolate(m, size=(11, 13), mode="bilinear", align_corners=True)
    ours = align_corners_matrix(5, 11) @ m @ align_corners_matrix(7, 13).T
    assert torch.allclose(ours, ref, atol=1e-6)


# -- hand-checkable pieces ------------------------------------------------------------------------


def test_focal_on_a_hand_computed_case():
    # pixel 1: p = (0.2, 0.8), target 1 -> pt = 1e-5 * 0.2 + (1 - 1e-5) * 0.8 + 1e-5 = 0.800004
    # pixel 2: p = (0.6, 0.4), target 0 -> pt = (1 - 1e-5) * 0.6 + 1e-5 * 0.4 + 1e-5 = 0.600008
    probs = torch.tensor([[[[0.2, 0.6]], [[0.8, 0.4]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1.0, 0.0]]])
    expected = (-(0.199996**2) * math.log(0.800004) - 0.399992**2 * math.log(0.600008)) / 2
    assert focal_on_probabilities(probs, target).item() == pytest.approx(expected, rel=1e-6)
    # no smoothing, gamma 0: plain cross-entropy of the true class
    plain = focal_on_probabilities(probs, target, gamma=0.0, smooth=0.0).item()
    assert plain == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, rel=1e-6)


def test_dice_on_a_hand_computed_case_and_the_reference_formula():
    # (2 * 0.8 + 1) / (0.8 + 0.4 + 1 + 1) = 2.6 / 3.2 -> loss 1 - 0.8125
    prob = torch.tensor([[[0.8, 0.4]]])
    target = torch.tensor([[[1.0, 0.0]]])
    assert dice_loss(prob, target, smooth=1.0).item() == pytest.approx(0.1875, rel=1e-6)
    # the reference's BinaryDiceLoss: 1 - sum_b coeff_b / B over images (B > 1), smooth 1
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 6, 6, generator=g)
    t = (torch.rand(3, 6, 6, generator=g) > 0.7).float()
    coeff = (2 * (p * t).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    assert dice_loss(p, t, smooth=1.0).item() == pytest.approx(1 - coeff.sum().item() / 3, abs=1e-7)


def test_loss_sums_focal_and_dice_over_taps_and_ignores_labels(tiny_clip):
    model = AprilGan(tiny_clip(0), AprilGanConfig(taps=(10, 23)))
    probs1 = torch.tensor([[[0.2, 0.6]], [[0.8, 0.4]]])  # (2, 1, 2): one image, 1 x 2 pixels
    probs2 = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    tap_probs = torch.stack([probs1, probs2])[:, None]  # (N=2, B=1, 2, 1, 2)
    out = type("Out", (), {"terms": {"tap_probs": tap_probs}})()
    masks = torch.tensor([[[0.9, 0.2]]])  # binarised at 0.5 -> (1, 0)
    total, parts = model.loss(out, masks, torch.tensor([0.0]))
    target = torch.tensor([[[1.0, 0.0]]])
    focal = sum(focal_on_probabilities(p, target) for p in tap_probs)
    dice = dice_loss(probs1[None, 1], target, 1.0) + dice_loss(probs2[None, 1], target, 1.0)
    assert parts["focal"].item() == pytest.approx(focal.item(), rel=1e-6)
    assert parts["dice"].item() == pytest.approx(dice.item(), rel=1e-6)
    assert total.item() == pytest.approx((focal + dice).item(), rel=1e-6)
    same, _ = model.loss(out, masks, torch.tensor([1.0]))
    assert same.item() == total.item()


def test_dice_of_a_single_image_batch_by_rows_switch(tiny_clip):
    """The reference squeezes a batch of one mask to (S, S) and its dice then runs per mask row."""
    probs = torch.tensor([[[0.2, 0.6], [0.7, 0.9]], [[0.8, 0.4], [0.3, 0.1]]])  # (2, S=2, S=2)
    out = type("Out", (), {"terms": {"tap_probs": probs[None, None]}})()  # (N=1, B=1, 2, 2, 2)
    masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # row 0: 1 - (2 * 0.8 + 1) / (1.2 + 1 + 1) = 0.1875; row 1: 1 - 1 / (0.4 + 1) = 0.285714...
    by_rows = (0.1875 + (1 - 1 / 1.4)) / 2
    # the whole image: 1 - (2 * 0.8 + 1) / (1.6 + 1 + 1)
    whole = 1 - 2.6 / 3.6
    clip = tiny_clip(0)
    _, parts = AprilGan(clip, AprilGanConfig(dice_rows_for_one_image=True)).loss(out, masks)
    assert parts["dice"].item() == pytest.approx(by_rows, rel=1e-6)
    _, parts = AprilGan(clip).loss(out, masks)
    assert parts["dice"].item() == pytest.approx(whole, rel=1e-6)


# -- contract and options -------------------------------------------------------------------------


def test_contract_shapes_ranges_and_trainable_weights(tiny_clip):
    model = AprilGan(tiny_clip(0))
    x = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(3))
    out = model(x)
    assert out.image_scores.shape == (2,) and out.maps.shape == (2, 84, 84)
    assert out.terms["tap_probs"].shape == (4, 2, 2, 84, 84)
    maps = out.maps.detach()
    assert 0 <= float(maps.min()) and float(maps.max()) <= 4  # a sum of 4 probabilities
    assert ((out.image_scores > 0) & (out.image_scores < 1)).all()
    sd = model.trainable_state_dict()
    assert sorted(sd) == sorted(f"fc.{i}.{w}" for i in range(4) for w in ("weight", "bias"))
    assert sd["fc.0.weight"].shape == (32, 32)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(sd)
    model.train()
    assert model.training and not model.clip.training


def test_reference_checkpoint_layout_loads_and_image_score_ignores_the_linear_layers(tiny_clip):
    model = AprilGan(tiny_clip(0))
    x = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(4))
    before = model(x)
    state = {k: torch.randn_like(v) for k, v in model.trainable_state_dict().items()}
    model.load_trainable_state_dict({"trainable_linearlayer": state})  # the reference's .pth layout
    assert torch.equal(model.fc[2].bias, state["fc.2.bias"])
    after = model(x)
    assert torch.equal(before.image_scores, after.image_scores)  # CLIP's zero-shot score
    assert not torch.allclose(before.maps, after.maps)


def test_class_names_choose_the_prompts(tiny_clip):
    model = AprilGan(tiny_clip(0))
    x = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(5))
    plain = model(x)
    assert torch.equal(model(x, ["object", "object"]).maps, plain.maps)
    named = model(x, ["bottle", "metal_nut"])
    assert not torch.allclose(named.image_scores, plain.image_scores)
    assert torch.equal(model.text_for(["bottle"], 1)[0], model.encode_text("bottle"))
    off = AprilGan(model.clip, AprilGanConfig(class_names=False))
    off.load_trainable_state_dict(model.trainable_state_dict())
    assert torch.equal(off(x, ["bottle", "metal_nut"]).maps, plain.maps)
    with pytest.raises(ConfigError, match="3 class names"):
        model(x, ["a", "b", "c"])


def test_prompt_ensemble_sentences():
    normal, abnormal = ensemble_sentences("bottle")
    assert (len(normal), len(abnormal)) == (7 * 35, 5 * 35)
    assert normal[0] == "a bad photo of a bottle."
    assert normal[35] == "a bad photo of a flawless bottle."
    assert abnormal[-1] == "this is one bottle with damage in the scene."


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"taps": (5, 24)}, r"\[0, 23\]"),
        ({"taps": (11, 5)}, "strictly increasing"),
        ({"taps": ()}, "at least one"),
        ({"upsample": "nearest"}, "upsample"),
        ({"logit_scale": 0.0}, "logit_scale"),
    ],
)
def test_invalid_config_is_refused(tiny_clip, options, match):
    with pytest.raises(ConfigError, match=match):
        AprilGan(tiny_clip(0), AprilGanConfig(**options))


def test_wrong_image_size_and_precision_are_refused(tiny_clip):
    model = AprilGan(tiny_clip(0))
    with pytest.raises(ConfigError, match="84"):
        model(torch.zeros(1, 3, 56, 56))
    with pytest.raises(ConfigError, match="precision"):
        AprilGan(model.clip, precision="fp64")
