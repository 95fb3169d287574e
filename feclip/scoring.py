"""From per-tap logits to the image score and the anomaly map, with every option of the ablations.

* map kind (per tap, per token): ``prob_abnormal`` (softmax probability, the paper),
  ``logit_margin`` (logit_abnormal - logit_normal), ``cos_gap`` (cos_abnormal - cos_normal, the margin
  divided by the logit scale), ``sigmoid_margin`` (sigmoid of the margin, equal to the probability);
* tap aggregation: ``mean`` (Eq. 3), ``max``, or ``weighted`` (normalised weights), over all taps or a
  chosen subset of them (block indices);
* upsampling to the evaluation size (bilinear, ``align_corners=False``), then Gaussian smoothing with
  ``sigma`` (0 = off), equal to ``scipy.ndimage.gaussian_filter(map, sigma)`` per image (mode
  ``reflect``, truncate 4);
* the image score: the CLS path only (FE-CLIP), aggregated over taps the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from feclip.errors import ConfigError

MAP_KINDS = ("prob_abnormal", "logit_margin", "cos_gap", "sigmoid_margin")
TAP_AGGREGATIONS = ("mean", "max", "weighted")


@dataclass
class ScoringConfig:
    """How scores and maps are derived from a model output (evaluation options)."""

    map_kind: str = "prob_abnormal"
    tap_aggregation: str = "mean"
    map_taps: tuple[int, ...] | None = None  # block indices used for the map; None = all taps
    score_taps: tuple[int, ...] | None = None  # block indices used for the image score; None = all taps
    tap_weights: tuple[float, ...] | None = None  # for tap_aggregation="weighted": one weight per model tap
    sigma: float = 4.0  # Gaussian smoothing of the map at the evaluation size; 0 = off

    def validate(self) -> None:
        if self.map_kind not in MAP_KINDS:
            raise ConfigError(f"eval.map_kind must be one of {MAP_KINDS}, got {self.map_kind!r}")
        if self.tap_aggregation not in TAP_AGGREGATIONS:
            raise ConfigError(
                f"eval.tap_aggregation must be one of {TAP_AGGREGATIONS}, got {self.tap_aggregation!r}"
            )
        if self.tap_aggregation == "weighted" and not self.tap_weights:
            raise ConfigError("eval.tap_weights must be given when eval.tap_aggregation='weighted'")
        if self.sigma < 0:
            raise ConfigError(f"eval.sigma must be >= 0, got {self.sigma}")


def map_values(
    patch_logits: torch.Tensor, kind: str, logit_scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Per-tap map values from normal/abnormal logits. Shape: ``(..., 2) -> (...)``."""
    logits = patch_logits.float()
    margin = logits[..., 1] - logits[..., 0]
    if kind in ("prob_abnormal", "sigmoid_margin"):
        return torch.sigmoid(margin)  # == softmax(logits)[..., 1]
    if kind == "logit_margin":
        return margin
    if kind == "cos_gap":
        return margin / logit_scale
    raise ConfigError(f"map kind must be one of {MAP_KINDS}, got {kind!r}")


def select_taps(values: torch.Tensor, taps: Sequence[int], subset: Sequence[int] | None) -> torch.Tensor:
    """Keep the taps (block indices) in ``subset``. Shape: ``(N, ...) -> (len(subset), ...)``."""
    if subset is None:
        return values
    missing = [t for t in subset if t not in taps]
    if missing or not subset:
        raise ConfigError(
            f"tap subset {list(subset)} must be a non-empty subset of the model taps {list(taps)}"
        )
    # positions as Python ints: views stacked, no index tensor copied to the device
    return torch.stack([values[list(taps).index(t)] for t in subset])


def aggregate_taps(
    values: torch.Tensor, how: str = "mean", weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Combine per-tap values. Shape: ``(N, ...) -> (...)``."""
    if how == "mean":
        return values.mean(0)
    if how == "max":
        return values.amax(0)
    if how == "weighted":
        if weights is None or len(weights) != values.shape[0]:
            raise ConfigError(
                f"tap weights must have one value per selected tap ({values.shape[0]}), got {weights}"
            )
        total = float(sum(weights))  # Python floats: no weight tensor copied to the device
        return sum(float(w) / total * values[i] for i, w in enumerate(weights))
    raise ConfigError(f"tap aggregation must be one of {TAP_AGGREGATIONS}, got {how!r}")


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``). Shape: ``(B, h, w) -> (B, H, W)``."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """The normalised 1-D Gaussian of scipy.ndimage (radius ``int(truncate * sigma + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@lru_cache(maxsize=16)
def _device_kernel(sigma: float, truncate: float, device: str) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable with and without autograd
        return gaussian_kernel1d(sigma, truncate).to(device=device, dtype=torch.float32)


@lru_cache(maxsize=64)
def _device_reflect_index(n: int, pad: int, device: str) -> torch.Tensor:
    with torch.inference_mode(False):
        return _reflect_index(n, pad, device)


def _reflect_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of scipy's ``reflect`` (half-sample symmetric) padding: d c b a | a b c d | d c b a."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Per-image Gaussian smoothing; ``sigma = 0`` returns the input. Shape: ``(B, H, W) -> (B, H, W)``."""
    if sigma == 0:
        return maps
    device = str(maps.device)  # the kernel and the padding indices: built once per size and device
    k = _device_kernel(float(sigma), float(truncate), device)
    r = (k.numel() - 1) // 2
    x = maps.float()
    b, h, w = x.shape
    x = x[:, _device_reflect_index(h, r, device)][
        :, :, _device_reflect_index(w, r, device)
    ]  # (B, H+2r, W+2r)
    x = F.conv2d(x[:, None], k.view(1, 1, -1, 1))  # along H
    x = F.conv2d(x, k.view(1, 1, 1, -1))  # along W
    return x[:, 0]


def combine_taps(
    values: torch.Tensor, taps: Sequence[int], subset: Sequence[int] | None, cfg: ScoringConfig
) -> torch.Tensor:
    """Select the ``subset`` of taps and aggregate them as ``cfg`` says. Shape: ``(N, ...) -> (...)``.

    ``cfg.tap_weights`` (one per model tap) are selected along with the taps.
    """
    weights = cfg.tap_weights
    if weights is not None:
        if len(weights) != len(taps):
            raise ConfigError(
                f"eval.tap_weights needs one weight per model tap {list(taps)}, got {list(weights)}"
            )
        weights = select_taps(torch.as_tensor(weights, dtype=torch.float32), taps, subset).tolist()
    return aggregate_taps(select_taps(values, taps, subset), cfg.tap_aggregation, weights)


def image_scores(cls_logits: torch.Tensor, taps: Sequence[int], cfg: ScoringConfig) -> torch.Tensor:
    """CLS-path image scores. Shape: ``(N, B, 2) -> (B,)``."""
    return combine_taps(map_values(cls_logits, "prob_abnormal"), taps, cfg.score_taps, cfg)


def anomaly_maps(
    patch_logits: torch.Tensor,
    taps: Sequence[int],
    cfg: ScoringConfig,
    size: int | tuple[int, int],
    logit_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Anomaly maps at the evaluation size. Shape: ``(N, B, h, w, 2) -> (B, H, W)``."""
    values = combine_taps(map_values(patch_logits, cfg.map_kind, logit_scale), taps, cfg.map_taps, cfg)
    return gaussian_blur(upsample(values, size), cfg.sigma)


def score_output(
    out,
    taps: Sequence[int],
    cfg: ScoringConfig,
    size: int | tuple[int, int],
    logit_scale: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores ``(B,)`` and maps ``(B, H, W)`` from an :class:`~feclip.models.FEClipOutput`."""
    return (
        image_scores(out.tap_cls_logits, taps, cfg),
        anomaly_maps(out.tap_patch_logits, taps, cfg, size, logit_scale),
    )


__all__ = [
    "MAP_KINDS",
    "TAP_AGGREGATIONS",
    "ScoringConfig",
    "aggregate_taps",
    "combine_taps",
    "anomaly_maps",
    "gaussian_blur",
    "gaussian_kernel1d",
    "image_scores",
    "map_values",
    "score_output",
    "select_taps",
    "upsample",
]
