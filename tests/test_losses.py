"""Losses against hand-computed values, against the previous implementation (written out below as the
slow obvious reference: clamped probabilities, logsigmoid focal, F.interpolate, boolean selection), and
the options of the loss config."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from feclip.config import LossConfig
from feclip.losses import (
    EPS,
    cls_bce,
    dice_loss,
    feclip_loss,
    focal_loss,
    focal_loss_from_probability,
    mask_to_grid,
)

# -- the previous implementation, written out (the reference) --------------------------------------


def old_bce(prob, target):
    """BCE on probabilities clamped to [1e-6, 1 - 1e-6] (the CLS term before it took the logit)."""
    p = prob.double().clamp(EPS, 1 - EPS)
    t = target.double()
    return -(t * p.log() + (1 - t) * (1 - p).log()).mean()


def old_focal_elements(logits, target, gamma, alpha):
    """-(1 - p_t)^gamma log p_t, log p_t by logsigmoid, times a_t."""
    logits, target = logits.double(), target.double()
    log_pt = target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)
    loss = -((1 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * (target * alpha + (1 - target) * (1 - alpha))
    return loss


def old_dice(prob, target, smooth):
    p, g = prob.double().flatten(1), target.double().flatten(1)
    return 1 - (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


def old_feclip_loss(out, masks, labels, cfg):
    """The loss as it was: per tap, the kept images selected by boolean indexing, the map upsampled by
    F.interpolate, the probability map mapped back to a logit through the clamp. In float64."""
    n_taps = out.tap_cls_logits.shape[0]
    cls_margin = out.tap_cls_logits[..., 1] - out.tap_cls_logits[..., 0]
    map_margin = out.tap_patch_logits[..., 1] - out.tap_patch_logits[..., 0]
    size = tuple(masks.shape[-2:])
    if cfg.mask_target == "upsample":
        target = masks.double()
    else:
        target = mask_to_grid(masks, tuple(map_margin.shape[-2:]), cfg.mask_target).double()
    keep = labels > 0 if cfg.mask_loss_on == "abnormal" else torch.ones_like(labels, dtype=torch.bool)
    l_cls = sum(old_bce(torch.sigmoid(cls_margin[n]), labels) for n in range(n_taps)) / n_taps
    l_focal = l_dice = torch.zeros((), dtype=torch.float64)
    for n in range(n_taps):
        logit_map = map_margin[n][keep].double()
        if cfg.mask_target == "upsample":
            up = lambda m: F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # noqa: E731
            if cfg.mask_loss_input == "logit_margin":
                logit_map = up(logit_map)
            else:
                logit_map = torch.logit(up(torch.sigmoid(logit_map)).clamp(EPS, 1 - EPS))
        t = target[keep]
        l_focal = l_focal + old_focal_elements(logit_map, t, cfg.focal_gamma, cfg.focal_alpha).mean() / n_taps
        l_dice = l_dice + old_dice(torch.sigmoid(logit_map), t, cfg.dice_smooth).mean() / n_taps
    total = cfg.w_cls * l_cls + cfg.w_focal * l_focal + cfg.w_dice * l_dice
    return total, {"cls": l_cls, "focal": l_focal, "dice": l_dice, "total": total}


def _fake_output(n_taps=2, b=2, h=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        tap_cls_logits=(torch.randn(n_taps, b, 2, generator=g) * scale).requires_grad_(),
        tap_patch_logits=(torch.randn(n_taps, b, h, h, 2, generator=g) * scale).requires_grad_(),
    )


# -- hand-computed cases ------------------------------------------------------------------------------


def test_cls_bce_by_hand():
    # margins log(0.8/0.2) and log(0.3/0.7): abnormal probabilities 0.8 and 0.3
    logits = torch.tensor([[0.0, math.log(4.0)], [1.0, 1.0 + math.log(0.3 / 0.7)]])
    y = torch.tensor([1, 0])
    assert cls_bce(logits, y).item() == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2, rel=1e-6)
    # only the margin matters: the softmax's abnormal probability is sigmoid(l1 - l0)
    assert cls_bce(logits + 5.0, y).item() == pytest.approx(cls_bce(logits, y).item(), rel=1e-6)


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
    # the probability form of the same map: p = 0.5
    prob = torch.full((1, 1, 2), 0.5)
    assert focal_loss_from_probability(prob, target, gamma=2.0).item() == pytest.approx(
        0.25 * math.log(2), rel=1e-6
    )
    # p = 0.9 on a positive: (0.1)^2 * -log 0.9; on a negative: 0.9^2 * -log 0.1
    prob = torch.full((1, 1, 2), 0.9)
    expected = (0.01 * -math.log(0.9) + 0.81 * -math.log(0.1)) / 2
    assert focal_loss_from_probability(prob, target, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    assert focal_loss(torch.logit(prob), target, gamma=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_focal_loss_is_torchvisions():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(3, 5, 5, generator=g) * 4, (torch.rand(3, 5, 5, generator=g) > 0.7).float()
    for gamma, alpha in [(2.0, None), (2.0, 0.25), (0.0, 0.6), (1.5, None)]:
        ours = focal_loss(logits, target, gamma=gamma, alpha=alpha)
        theirs = sigmoid_focal_loss(logits, target, alpha=-1 if alpha is None else alpha, gamma=gamma)
        assert ours.item() == theirs.mean().item()


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


# -- the same values as the previous implementation where its clamp did not bite ---------------------

OPTIONS = [
    dict(mask_target=t, mask_loss_on=on, mask_loss_input=inp, focal_alpha=alpha)
    for t, on, inp, alpha in itertools.product(
        ("upsample", "nearest", "maxpool"), ("all", "abnormal"), ("probability", "logit_margin"), (None, 0.25)
    )
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_equals_the_previous_formulas_within_float32_rounding(options):
    cfg = LossConfig(w_cls=1.5, w_focal=2.0, w_dice=0.5, **options)
    out = _fake_output(n_taps=3, b=4, h=3, seed=7, scale=2.0)
    masks = torch.zeros(4, 12, 12)
    masks[1, 2:7, 3:9] = 1
    masks[3, 6:, :5] = 1
    labels = torch.tensor([0, 1, 0, 1])
    for logits in (out.tap_cls_logits, out.tap_patch_logits):  # the clamp never bites on these
        p = torch.sigmoid(logits[..., 1] - logits[..., 0])
        assert EPS < p.min().item() and p.max().item() < 1 - EPS
    total, parts = feclip_loss(out, masks, labels, cfg)
    ref_total, ref_parts = old_feclip_loss(out, masks, labels, cfg)
    for k in ("cls", "focal", "dice", "total"):
        assert parts[k].item() == pytest.approx(ref_parts[k].item(), rel=2e-6, abs=1e-7), k
    grads = torch.autograd.grad(total, (out.tap_cls_logits, out.tap_patch_logits))
    ref_grads = torch.autograd.grad(ref_total, (out.tap_cls_logits, out.tap_patch_logits))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-7)


def test_the_logit_form_is_exact_where_the_clamped_probability_saturated():
    # a normal image whose CLS margin is 30: sigmoid(30) rounds to 1 in float32
    logits = torch.tensor([[0.0, 30.0]], requires_grad=True)
    label = torch.tensor([0])
    prob = torch.sigmoid(logits[:, 1] - logits[:, 0])
    assert prob.item() == 1.0
    unclamped = -(1 - prob).log()
    assert math.isinf(unclamped.item())  # the probability form without the clamp
    clamped = old_bce(prob, label)
    assert clamped.item() == pytest.approx(-math.log(EPS), rel=1e-6)  # 13.8: saturated
    (clamped_grad,) = torch.autograd.grad(clamped, logits)
    assert torch.all(clamped_grad == 0)  # ... and no gradient left to correct it
    loss = cls_bce(logits, label)
    assert loss.item() == pytest.approx(30.0, rel=1e-6)  # softplus(30) = 30 + log(1 + e^-30)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0].tolist() == pytest.approx([-1.0, 1.0], rel=1e-6)  # d/dm softplus(m) = sigmoid(m)


@pytest.mark.parametrize("mask_target", ["upsample", "maxpool"])
def test_focal_of_a_logit_map_is_exact_at_any_margin(mask_target):
    """On the logit paths a confidently wrong pixel costs its whole margin (the probability path caps
    it at -log 1e-6 = 13.8); every option stays finite, with finite gradients, at margins of 100."""
    margin = torch.tensor([[[-60.0]]])
    assert focal_loss(margin, torch.ones(1, 1, 1)).item() == pytest.approx(60.0, rel=1e-6)
    assert focal_loss_from_probability(torch.sigmoid(margin), torch.ones(1, 1, 1)).item() == pytest.approx(
        -math.log(EPS), rel=1e-5
    )
    out = _fake_output(seed=11, scale=100.0)
    masks = torch.zeros(2, 6, 6)
    masks[1, :3, :3] = 1
    for loss_input in ("probability", "logit_margin"):
        cfg = LossConfig(mask_target=mask_target, mask_loss_input=loss_input)
        total, parts = feclip_loss(out, masks, torch.tensor([0, 1]), cfg)
        grads = torch.autograd.grad(total, (out.tap_cls_logits, out.tap_patch_logits))
        assert all(math.isfinite(v.item()) for v in parts.values())
        assert all(torch.isfinite(g).all() for g in grads)


# -- the total and the options ------------------------------------------------------------------------


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
    per_tap = [cls_bce(out.tap_cls_logits[n], labels).item() for n in range(2)]
    assert parts["cls"].item() == pytest.approx(sum(per_tap) / 2, rel=1e-6)
    probs = out.tap_cls_logits.softmax(-1)[..., 1].mean(0)
    assert parts["cls"].item() != pytest.approx(old_bce(probs, labels).item(), rel=1e-3)
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
