"""The FE-CLIP training loss (paper Eq. 4 and 5), computed from a model output.

``L = w_cls * mean_n BCE(S_n, y) + mean_n [w_focal * Focal(M_n, G) + w_dice * Dice(M_n, G)]``

over the ``N`` taps, where ``S_n`` is tap n's CLS abnormal probability, ``M_n`` its abnormal map and
``G`` the ground-truth mask. Where the map and the mask meet is an option (``mask_target``):
``upsample`` (the map, bilinear, to the input size: the paper's ``Up(.)``), or the mask brought down to
the token grid by ``nearest`` sampling or ``maxpool``. ``mask_loss_input="logit_margin"`` upsamples the
logit margin and applies the sigmoid afterwards (the probability is the sigmoid of the margin, so only
the order of upsampling and squashing changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Binary focal loss from logits, mean over all elements.

    ``FL = -a_t (1 - p_t)^gamma log(p_t)`` with ``p_t = p`` on positives, ``1 - p`` on negatives;
    ``a_t = alpha`` on positives and ``1 - alpha`` on negatives, or 1 when ``alpha`` is None.
    Shape: logits and target ``(B, H, W)`` -> scalar.
    """
    logits, target = logits.float(), target.float()
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    log_pt = target * log_p + (1 - target) * log_not_p
    loss = -((1 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * (target * alpha + (1 - target) * (1 - alpha))
    return loss.mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss per image, then the mean over images.

    ``1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s)``. Shape: prob and target ``(B, H, W)`` -> scalar.
    """
    p, g = prob.float().flatten(1), target.float().flatten(1)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return (1 - dice).mean()


def bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on probabilities (clamped to [1e-6, 1 - 1e-6]). Shape: ``(B,)`` -> scalar."""
    p = prob.float().clamp(EPS, 1 - EPS)
    t = target.float()
    return -(t * p.log() + (1 - t) * (1 - p).log()).mean()


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

    Returns ``(total, {"cls": ..., "focal": ..., "dice": ..., "total": ...})``; the parts are detached
    scalar tensors of this batch alone, unweighted (no device synchronisation until someone reads them).
    """
    n_taps = out.tap_cls_logits.shape[0]
    cls_margin = (out.tap_cls_logits[..., 1] - out.tap_cls_logits[..., 0]).float()  # (N, B)
    map_margin = (out.tap_patch_logits[..., 1] - out.tap_patch_logits[..., 0]).float()  # (N, B, h, w)
    keep = mask_loss_images(labels, cfg)
    size = tuple(masks.shape[-2:])
    if cfg.mask_target == "upsample":
        target = masks.float()
    else:
        target = mask_to_grid(masks, tuple(map_margin.shape[-2:]), cfg.mask_target)

    l_cls = torch.stack([bce(torch.sigmoid(cls_margin[n]), labels) for n in range(n_taps)]).mean()
    l_focal = cls_margin.new_zeros(())
    l_dice = cls_margin.new_zeros(())
    if keep.any():
        for n in range(n_taps):
            logit_map = map_margin[n][keep]  # (b, h, w)
            if cfg.mask_target == "upsample":
                if cfg.mask_loss_input == "logit_margin":
                    logit_map = F.interpolate(
                        logit_map[:, None], size=size, mode="bilinear", align_corners=False
                    )[:, 0]
                else:  # upsample the probability; focal needs logits, so map back exactly
                    prob = F.interpolate(
                        torch.sigmoid(logit_map)[:, None], size=size, mode="bilinear", align_corners=False
                    )[:, 0]
                    logit_map = torch.logit(prob.clamp(EPS, 1 - EPS))
            t = target[keep]
            l_focal = l_focal + focal_loss(logit_map, t, cfg.focal_gamma, cfg.focal_alpha) / n_taps
            l_dice = l_dice + dice_loss(torch.sigmoid(logit_map), t, cfg.dice_smooth) / n_taps
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
