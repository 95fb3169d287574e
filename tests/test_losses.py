"""Losses against hand-computed values and the options of the loss config."""

import math
from types import SimpleNamespace

import pytest
import torch

from feclip.config import LossConfig
from feclip.losses import bce, dice_loss, feclip_loss, focal_loss, mask_to_grid


def test_bce_by_hand():
    p = torch.tensor([0.8, 0.3])
    y = torch.tensor([1, 0])
    assert bce(p, y).item() == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2, rel=1e-6)


def test_focal_by_hand():
    # p = sigmoid(0) = 0.5 on a positive and a negative: (1 - 0.5)^2 * log 2 each
    logits = torch.zeros(1, 1, 2)
    target = torch.tensor([[[1.0, 0.0]]])
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    # gamma 0 is the BCE; alpha weighs positives by alpha and negatives by 1 - alpha
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(math.log(2), rel=1e-6)
    assert focal_loss(logits, target, gamma=0.0, alpha=0.25).item() == pytest.approx(
        0.5 * math.log(2), rel=1e-6
    )


def test_dice_by_hand():
    prob = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # intersection 0.5, sums 1 + 1, smooth 1: 1 - (2*0.5 + 1) / (1 + 1 + 1) = 1/3
    assert dice_loss(prob, target, smooth=1.0).item() == pytest.approx(1 / 3, rel=1e-6)
    # a normal image predicted all zero has dice loss 0 with smooth 1
    assert dice_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).item() == 0.0


def test_mask_to_grid():
    m = torch.zeros(1, 4, 4)
    m[0, 1, 1] = 1
    assert mask_to_grid(m, (2, 2), "maxpool").tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    assert mask_to_grid(m, (2, 2), "nearest").tolist() == [[[0.0, 0.0], [0.0, 0.0]]]


def _fake_output(n_taps=2, b=2, h=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        tap_cls_logits=torch.randn(n_taps, b, 2, generator=g, requires_grad=True),
        tap_patch_logits=torch.randn(n_taps, b, h, h, 2, generator=g, requires_grad=True),
    )


def test_total_is_the_weighted_sum_of_per_tap_means():
    out = _fake_output()
    masks = torch.zeros(2, 6, 6)
    masks[1, :3, :3] = 1
    labels = torch.tensor([0, 1])
    total, parts = feclip_loss(out, masks, labels, LossConfig(w_cls=2.0, w_focal=3.0, w_dice=0.5))
    assert total.item() == pytest.approx(
        2 * parts["cls"].item() + 3 * parts["focal"].item() + 0.5 * parts["dice"].item(), rel=1e-6
    )
    # L_cls is the mean of per-tap BCEs, not the BCE of the mean probability
    probs = out.tap_cls_logits.softmax(-1)[..., 1]
    per_tap = [bce(probs[n], labels).item() for n in range(2)]
    assert parts["cls"].item() == pytest.approx(sum(per_tap) / 2, rel=1e-5)
    total.backward()
    assert out.tap_patch_logits.grad is not None


@pytest.mark.parametrize(
    "change",
    [
        dict(mask_target="nearest"),
        dict(mask_target="maxpool"),
        dict(mask_loss_on="abnormal"),
        dict(mask_loss_input="logit_margin"),
        dict(focal_alpha=0.25),
        dict(dice_smooth=1e-5),
        dict(focal_gamma=0.0),
    ],
)
def test_each_option_changes_the_loss(change):
    out = _fake_output(seed=3)
    masks = torch.zeros(2, 6, 6)
    masks[1, 2:5, 1:4] = 1
    labels = torch.tensor([0, 1])
    base, _ = feclip_loss(out, masks, labels, LossConfig())
    other, _ = feclip_loss(out, masks, labels, LossConfig(**change))
    assert not torch.isclose(base, other)


def test_abnormal_only_ignores_normal_images_in_the_mask_loss():
    out = _fake_output(seed=5)
    masks = torch.zeros(2, 6, 6)
    masks[1, :2, :2] = 1
    cfg = LossConfig(mask_loss_on="abnormal")
    _, parts = feclip_loss(out, masks, torch.tensor([0, 1]), cfg)
    out2 = SimpleNamespace(tap_cls_logits=out.tap_cls_logits, tap_patch_logits=out.tap_patch_logits.clone())
    out2.tap_patch_logits.data[:, 0] = 50.0  # change only the normal image's map
    _, parts2 = feclip_loss(out2, masks, torch.tensor([0, 1]), cfg)
    assert parts["focal"].item() == pytest.approx(parts2["focal"].item())
    assert parts["dice"].item() == pytest.approx(parts2["dice"].item())
