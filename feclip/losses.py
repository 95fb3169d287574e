"""The FE-CLIP training loss (paper Eq. 4 and 5), computed from a model output.

``L = w_cls * mean_n BCE(S_n, y) + mean_n [w_focal * Focal(M_n, G) + w_dice * Dice(M_n, G)]``

over the ``N`` taps, where ``S_n`` is tap n's CLS abnormal probability, ``M_n`` its abnormal map and
``G`` the ground-truth mask. Where the map and the mask meet is an option (``mask_target``):
``upsample`` (the map, bilinear, to the input size: the paper's ``Up(.)``), or the mask brought down to
the token grid by ``nearest`` sampling or ``maxpool``. ``mask_loss_input="logit_margin"`` upsamples the
logit margin and applies the sigmoid afterwards (the probability is the sigmoid of the margin, so only
the order of upsampling and squashing changes).

Each term is computed from a logit wherever one exists, so that it stays exact where a probability
would round to 0 or 1: the abnormal probability of the 2-way softmax is ``softmax([l0, l1])[1] =
sigmoid(l1 - l0)``, so the BCE takes the margin ``l1 - l0`` (:func:`cls_bce`, PyTorch's
``binary_cross_entropy_with_logits``), and the focal loss of a logit map (the token grid, or the
upsampled margin) is torchvision's ``sigmoid_focal_loss`` (:func:`focal_loss`). The default map
(``mask_loss_input="probability"`` with ``mask_target="upsample"``) is a bilinear mix of sigmoids, which
is the sigmoid of no logit: its focal loss is computed on the probability, clamped to
``[EPS, 1 - EPS]`` for the logarithms (:func:`focal_loss_from_probability`).

No step of the loss waits on the device: the images the map losses see are chosen by 0/1 weights,
not by boolean indexing, and the upsampling is two matrix products (:func:`bilinear_upsample`), whose
backward pass is deterministic on CUDA, unlike ``F.interpolate``'s (which
``torch.use_deterministic_algorithms`` refuses).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from feclip.config import LossConfig

EPS = 1e-6  # probabilities are clamped to [EPS, 1 - EPS] where the loss takes their logarithm
# the values of the options read here (train.loss.*; feclip.config.RunConfig.validate checks them)
MASK_TARGETS = ("upsample", "nearest", "maxpool")  # mask_target: where the map and the mask meet
MASK_LOSS_ON = ("all", "abnormal")  # mask_loss_on: the images the map losses see
MASK_LOSS_INPUTS = ("probability", "logit_margin")  # mask_loss_input: what is upsampled


@lru_cache(maxsize=32)
def _bilinear_matrix(n_in: int, n_out: int, device: str) -> torch.Tensor:
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for i in range(n_out):  # PyTorch's align_corners=False source coordinate, clamped at 0
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    with torch.inference_mode(False):  # a normal tensor, usable with and without autograd
        return m.to(device=device, dtype=torch.float32)


def bilinear_matrix(n_in: int, n_out: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(n_out, n_in)`` matrix of 1-D bilinear resizing with ``align_corners=False`` (PyTorch's
    rule for an explicit output size), built once per size and device (do not modify it)."""
    return _bilinear_matrix(int(n_in), int(n_out), str(torch.device(device)))


def bilinear_upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(maps[:, None], size, mode="bilinear", align_corners=False)[:, 0]`` as two matrix
    products (equal within float32 rounding; deterministic forward and backward on every device).

    Shape: ``(B, h, w) -> (B, H, W)``.
    """
    rows = bilinear_matrix(maps.shape[-2], size[0], maps.device)  # (H, h)
    cols = bilinear_matrix(maps.shape[-1], size[1], maps.device)  # (W, w)
    return rows @ maps.float() @ cols.T


def _focal_elements(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float | None
) -> torch.Tensor:
    """Per-element focal loss of logits: torchvision's ``sigmoid_focal_loss`` (``alpha=None``: -1, its
    "no weighting")."""
    return sigmoid_focal_loss(
        logits.float(), target.float(), alpha=-1.0 if alpha is None else alpha, gamma=gamma, reduction="none"
    )


def _focal_elements_from_probability(
    prob: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float | None
) -> torch.Tensor:
    """Per-element focal loss of probabilities, clamped to ``[EPS, 1 - EPS]``: the formula of
    ``sigmoid_focal_loss`` with ``p`` given instead of ``sigmoid(logit)``."""
    p, t = prob.float().clamp(EPS, 1 - EPS), target.float()
    ce = -(t * p.log() + (1 - t) * (1 - p).log())
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = LossConfig.focal_gamma,
    alpha: float | None = LossConfig.focal_alpha,
) -> torch.Tensor:
    """Binary focal loss from logits, mean over all elements: torchvision's ``sigmoid_focal_loss``.

    ``FL = -a_t (1 - p_t)^gamma log(p_t)`` with ``p = sigmoid(logit)``, ``p_t = p`` on positives,
    ``1 - p`` on negatives; ``a_t = alpha`` on positives and ``1 - alpha`` on negatives, or 1 when
    ``alpha`` is None. ``log(p_t)`` is computed from the logit (no clamping): finite for any logit.
    Shape: logits and target ``(B, H, W)`` -> scalar.
    """
    return _focal_elements(logits, target, gamma, alpha).mean()


def focal_loss_from_probability(
    prob: torch.Tensor,
    target: torch.Tensor,
    gamma: float = LossConfig.focal_gamma,
    alpha: float | None = LossConfig.focal_alpha,
) -> torch.Tensor:
    """:func:`focal_loss` of a probability map that is the sigmoid of no logit (a bilinearly upsampled
    probability, ``mask_loss_input="probability"``), mean over all elements. ``p`` is clamped to
    ``[1e-6, 1 - 1e-6]`` for the logarithms: an element beyond the clamp contributes at most
    ``-log(1e-6) = 13.8`` and no gradient. Shape: prob and target ``(B, H, W)`` -> scalar.
    """
    return _focal_elements_from_probability(prob, target, gamma, alpha).mean()


def _dice_per_image(prob: torch.Tensor, target: torch.Tensor, smooth: float) -> torch.Tensor:
    p, g = prob.float().flatten(1), target.float().flatten(1)
    return 1 - (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


def dice_loss(
    prob: torch.Tensor, target: torch.Tensor, smooth: float = LossConfig.dice_smooth
) -> torch.Tensor:
    """Soft dice loss per image, then the mean over images.

    ``1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s)``. Shape: prob and target ``(B, H, W)`` -> scalar.
    """
    return _dice_per_image(prob, target, smooth).mean()


def cls_bce(cls_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the CLS abnormal probability ``softmax([l0, l1])[1] = sigmoid(l1 - l0)``
    against the image labels, from the logit margin ``l1 - l0`` (``binary_cross_entropy_with_logits``:
    exact and finite for any margin, no clamping), mean over all elements (for the ``(N, B, 2)`` logits
    of N taps: the mean over taps of each tap's BCE).

    Shape: ``(..., B, 2)`` normal/abnormal logits and ``(B,)`` labels in {0, 1} -> scalar.
    """
    margin = (cls_logits[..., 1] - cls_logits[..., 0]).float()
    return F.binary_cross_entropy_with_logits(margin, labels.float().expand_as(margin))


def mask_to_grid(masks: torch.Tensor, size: tuple[int, int], how: str) -> torch.Tensor:
    """Bring masks ``(B, S, S)`` down to the token grid ``(B, h, w)`` by ``nearest`` or ``maxpool``."""
    m = masks[:, None].float()
    if how == "nearest":
        return F.interpolate(m, size=size, mode="nearest")[:, 0]
    if how == "maxpool":
        return F.adaptive_max_pool2d(m, size)[:, 0]
    raise ValueError(f"mask_target must be 'nearest' or 'maxpool' here, got {how!r}")


def mask_loss_images(labels: torch.Tensor, cfg) -> torch.Tensor:
    """The images of a batch that the map losses (focal, dice) see: all, or only the anomalous ones
    (``cfg.mask_loss_on``). Shape: ``(B,) -> (B,)`` bool."""
    return labels > 0 if cfg.mask_loss_on == "abnormal" else torch.ones_like(labels, dtype=torch.bool)


def feclip_loss(
    out,
    masks: torch.Tensor,
    labels: torch.Tensor,
    cfg,
    shares: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
    n_kept: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts for one batch.

    Args:
        out: a :class:`~feclip.models.FEClipOutput` (uses ``tap_cls_logits`` (N, B, 2) and
            ``tap_patch_logits`` (N, B, h, w, 2)).
        masks: ``(B, S, S)`` in {0, 1}, zeros for normal images.
        labels: ``(B,)`` in {0, 1}.
        cfg: a :class:`feclip.config.LossConfig`.
        shares: when this batch is one rank's part of a larger batch, its fraction ``(of the images,
            of the images the map losses see)``: the returned total weighs the BCE term by the first and
            the focal and dice terms by the second, so that the parts' totals sum to the loss of the
            whole batch (:func:`feclip.engine.distributed.loss_shares`). ``None``: the batch is whole.
        n_kept: how many images the map losses see (``mask_loss_images(labels, cfg).sum()``), when the
            caller knows it on the host (the training loop reads it from the host's labels). With
            ``mask_loss_on=abnormal`` and ``n_kept=None`` it is read from ``labels``: one device
            synchronisation. With 0, the map losses are 0 and reach no parameter (as a batch without
            anomalous image always did: Adam then skips fc_patch).

    The map losses over the kept images are weighted sums with 0/1 weights (no boolean indexing, no
    device synchronisation): focal is the mean over the kept images' pixels, dice the mean over the kept
    images, as with the selected images alone (within float32 rounding).

    Returns ``(total, {"cls": ..., "focal": ..., "dice": ..., "total": ...})``; the parts are detached
    scalar tensors of this batch alone, unweighted (no device synchronisation until someone reads them).
    """
    n_taps = out.tap_cls_logits.shape[0]
    map_margin = (out.tap_patch_logits[..., 1] - out.tap_patch_logits[..., 0]).float()  # (N, B, h, w)
    size = tuple(masks.shape[-2:])
    if cfg.mask_target == "upsample":
        target = masks.float()
    else:
        target = mask_to_grid(masks, tuple(map_margin.shape[-2:]), cfg.mask_target)
    every_image = cfg.mask_loss_on != "abnormal"
    if n_kept is None:
        n_kept = labels.numel() if every_image else int(mask_loss_images(labels, cfg).sum())

    l_cls = cls_bce(out.tap_cls_logits, labels)  # over (N, B): the mean of the per-tap BCEs
    l_focal = map_margin.new_zeros(())
    l_dice = map_margin.new_zeros(())
    if n_kept > 0:
        # (B,) 0/1 weights of the images the map losses see; all of them: plain means
        weight = None if every_image else mask_loss_images(labels, cfg).float()
        for n in range(n_taps):
            logit_map = map_margin[n]  # (B, h, w)
            if cfg.mask_target == "upsample" and cfg.mask_loss_input != "logit_margin":
                # the upsampled probability is the sigmoid of no logit: the probability form
                prob = bilinear_upsample(torch.sigmoid(logit_map), size)
                focal = _focal_elements_from_probability(prob, target, cfg.focal_gamma, cfg.focal_alpha)
            else:  # a logit map: on the token grid, or the upsampled margin
                if cfg.mask_target == "upsample":
                    logit_map = bilinear_upsample(logit_map, size)
                prob = torch.sigmoid(logit_map)
                focal = _focal_elements(logit_map, target, cfg.focal_gamma, cfg.focal_alpha)  # (B, H, W)
            dice = _dice_per_image(prob, target, cfg.dice_smooth)  # (B,)
            if weight is None:
                focal, dice = focal.mean(), dice.mean()
            else:  # means over the kept images: sums weighted by 0/1, over their count
                focal = (focal.flatten(1).sum(1) * weight).sum() / (n_kept * focal[0].numel())
                dice = (dice * weight).sum() / n_kept
            l_focal = l_focal + focal / n_taps
            l_dice = l_dice + dice / n_taps
    plain = cfg.w_cls * l_cls + cfg.w_focal * l_focal + cfg.w_dice * l_dice
    if shares is None:
        total = plain
    else:
        image_share, mask_share = shares
        total = cfg.w_cls * l_cls * image_share + (cfg.w_focal * l_focal + cfg.w_dice * l_dice) * mask_share
    parts = {
        "cls": l_cls.detach(),
        "focal": l_focal.detach(),
        "dice": l_dice.detach(),
        "total": plain.detach(),
    }
    return total, parts
