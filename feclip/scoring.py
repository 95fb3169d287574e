"""The one home of scoring: the model's raw per-tap outputs -> image scores and anomaly maps.

Every score and map that reaches ``metrics.csv``, ``feclip-predict`` and the few-shot mode is made
here, from what :class:`~feclip.models.FEClip` returns for ``B`` images, ``N`` taps and an ``h x w``
token grid: ``tap_cls_logits`` ``(N, B, 2)``, ``tap_patch_logits`` ``(N, B, h, w, 2)`` (normal,
abnormal) and, for the few-shot part, ``tap_tokens`` ``(N, B, h, w, D)``.

* map kind (per tap, per token): ``prob_abnormal`` (softmax probability, the paper),
  ``logit_margin`` (logit_abnormal - logit_normal), ``cos_gap`` (cos_abnormal - cos_normal, the margin
  divided by the logit scale), ``sigmoid_margin`` (sigmoid of the margin, equal to the probability);
* tap aggregation: ``mean`` (Eq. 3), ``max``, or ``weighted`` (normalised weights), over all taps or a
  chosen subset of them (block indices);
* upsampling to the evaluation size ``H x W`` (bilinear, ``align_corners=False``), then Gaussian
  smoothing with ``sigma`` (0 = off), equal to ``scipy.ndimage.gaussian_filter(map, sigma)`` per image
  (mode ``reflect``, truncate 4);
* the image score: the CLS path only (FE-CLIP), aggregated over taps the same way;
* the few-shot part (paper section 4.6, docs/fewshot.md), with the distances of
  :meth:`feclip.models.fewshot.MemoryBank.distance_maps` ``d_n`` ``(N, B, h, w)``::

      fewshot_map = blur_sigma( mean_n Up_HxW( d_n ) )        (B, H, W)
      final_map   = zero_shot_map + fewshot_map                (B, H, W)
      final_score = zero_shot_score + max_pixels fewshot_map   (B,)

  The few-shot map gets the zero-shot map's ``sigma`` (the blur is linear: the final map is the blur
  of the raw sum), and the score adds the maximum of that smoothed map, the map actually added.

A peer method (:mod:`feclip.methods`) gives its own image scores and a map ``(B, h, w)`` or
``(B, S, S)`` (:class:`~feclip.methods.base.MethodOutput`): only the upsampling and the smoothing above
apply to it (:func:`method_scores_and_maps`); the map kinds, tap choices and the few-shot part are
FE-CLIP's (``RunConfig.validate`` refuses them with another method).

One module, not a package (about 400 lines): the tests replace :func:`upsample` here to watch every
resize that :func:`anomaly_maps` and ``feclip-predict`` make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from feclip.errors import ConfigError

if TYPE_CHECKING:
    from feclip.models.fewshot import MemoryBank

MAP_KINDS = ("prob_abnormal", "logit_margin", "cos_gap", "sigmoid_margin")
TAP_AGGREGATIONS = ("mean", "max", "weighted")
_TAP_LISTS = ("map_taps", "score_taps", "tap_weights")  # lists in the YAML, tuples once validated


@dataclass
class ScoringConfig:
    """How scores and maps are derived from a model output: the home of these options and their
    defaults. :class:`feclip.config.EvalConfig` extends it, so the keys are ``eval.map_kind`` etc.

    The tap lists are ``list`` for Hydra's schema; :meth:`of` gives the validated copy with tuples.
    """

    map_kind: str = "prob_abnormal"
    tap_aggregation: str = "mean"
    map_taps: list[int] | None = None  # block indices used for the map; None = all taps
    score_taps: list[int] | None = None  # block indices used for the image score; None = all taps
    tap_weights: list[float] | None = None  # for tap_aggregation="weighted": one weight per model tap
    sigma: float = 4.0  # Gaussian smoothing of the map at the evaluation size; 0 = off

    @classmethod
    def of(cls, options: ScoringConfig) -> ScoringConfig:
        """A validated copy of the scoring fields of ``options`` (an :class:`feclip.config.EvalConfig`
        or a ScoringConfig): tap lists become tuples, an empty one ``None`` (all taps)."""
        values = {f.name: getattr(options, f.name) for f in fields(cls)}
        for name in _TAP_LISTS:
            values[name] = tuple(values[name]) if values[name] else None
        cfg = cls(**values)
        cfg.validate()
        return cfg

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


# ----------------------------------------------------------------------------------------------------
# Per-tap values
# ----------------------------------------------------------------------------------------------------


def abnormal_probability(logits: torch.Tensor) -> torch.Tensor:
    """The 2-way softmax's abnormal probability, as the sigmoid of the margin (the operation of the
    loss too, so every path gives the same bits). Shape: ``(..., 2) -> (...)``, fp32."""
    logits = logits.float()
    return torch.sigmoid(logits[..., 1] - logits[..., 0])


def map_values(
    patch_logits: torch.Tensor, kind: str, logit_scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Per-tap map values from normal/abnormal logits. Shape: ``(..., 2) -> (...)``."""
    if kind in ("prob_abnormal", "sigmoid_margin"):
        return abnormal_probability(patch_logits)  # == softmax(logits)[..., 1]
    logits = patch_logits.float()
    margin = logits[..., 1] - logits[..., 0]
    if kind == "logit_margin":
        return margin
    if kind == "cos_gap":
        return margin / logit_scale
    raise ConfigError(f"map kind must be one of {MAP_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------
# Taps
# ----------------------------------------------------------------------------------------------------


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
    values: torch.Tensor, how: str = ScoringConfig.tap_aggregation, weights: Sequence[float] | None = None
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


# ----------------------------------------------------------------------------------------------------
# Resizing and smoothing
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Zero-shot scores and maps
# ----------------------------------------------------------------------------------------------------


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


def is_method_output(out) -> bool:
    """Whether ``out`` is a peer method's :class:`~feclip.methods.base.MethodOutput` (not FE-CLIP's)."""
    from feclip.methods.base import MethodOutput

    return isinstance(out, MethodOutput)


def method_scores_and_maps(
    out, cfg: ScoringConfig, size: int | tuple[int, int], rows: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A peer method's image scores ``(B,)`` (its own) and maps ``(B, H, W)``: its map ``(B, h, w)`` or
    ``(B, S, S)`` upsampled to ``size`` and smoothed with ``cfg.sigma``, as FE-CLIP's maps are.
    ``rows``: only these images of the batch."""
    scores, maps = out.image_scores.float(), out.maps.float()
    if rows is not None:
        scores, maps = scores[rows], maps[rows]
    return scores, gaussian_blur(upsample(maps, size), cfg.sigma)


def output_image_scores(model, out, cfg: ScoringConfig) -> torch.Tensor:
    """The image scores ``(B,)`` of one output of ``model`` (FE-CLIP's CLS path, or a peer's own)."""
    if is_method_output(out):
        return out.image_scores.float()
    return image_scores(out.tap_cls_logits, model.config.taps, cfg)


def scores_and_maps(
    model,
    out,
    cfg: ScoringConfig,
    size: int | tuple[int, int] | None = None,
    banks: dict[str, MemoryBank] | None = None,
    categories: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What evaluation, ``feclip-predict`` and the few-shot mode report for one output of ``model``.

    Image scores ``(B,)`` and maps ``(B, H, W)`` at ``size`` (default: the model input size), with
    the model's taps and logit scale. ``banks`` (per category) with the images' ``categories`` add
    the few-shot part (:func:`add_fewshot_by_category`; ``out`` taken with ``return_tokens=True``).
    """
    if is_method_output(out):
        if banks is not None:
            raise ConfigError("the few-shot part (eval.fewshot_k) is FE-CLIP's: method=feclip")
        return method_scores_and_maps(out, cfg, model.image_size if size is None else size)
    scores, maps = score_output(
        out, model.config.taps, cfg, model.image_size if size is None else size, model.logit_scale
    )
    if banks is not None:
        scores, maps = add_fewshot_by_category(out.tap_tokens, categories, banks, scores, maps, cfg.sigma)
    return scores, maps


def maps_at_sizes(model, out, cfg: ScoringConfig, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Each image's map at its own size (original-resolution evaluation): ``sizes[j]`` = ``(H_j, W_j)``.

    Shape: ``out.tap_patch_logits`` ``(N, B, h, w, 2)`` -> ``B`` maps ``(H_j, W_j)``.
    """
    if is_method_output(out):
        return [
            method_scores_and_maps(out, cfg, size, rows=slice(j, j + 1))[1][0] for j, size in enumerate(sizes)
        ]
    taps, scale = model.config.taps, model.logit_scale
    return [
        anomaly_maps(out.tap_patch_logits[:, j : j + 1], taps, cfg, size, scale)[0]
        for j, size in enumerate(sizes)
    ]


# ----------------------------------------------------------------------------------------------------
# The few-shot part (the formula in the module docstring)
# ----------------------------------------------------------------------------------------------------


def fewshot_maps(
    tokens: torch.Tensor, bank: MemoryBank, size: int | tuple[int, int], sigma: float = 0.0
) -> torch.Tensor:
    """The few-shot map: mean over taps of the upsampled distance maps, then Gaussian ``sigma``.

    Shape: tokens ``(N, B, h, w, D)`` -> ``(B, H, W)`` with ``size = H`` or ``(H, W)``.
    """
    dist = bank.distance_maps(tokens)  # (N, B, h, w)
    n, b, h, w = dist.shape
    up = upsample(dist.reshape(n * b, h, w), size)  # (N*B, H, W)
    return gaussian_blur(up.reshape(n, b, *up.shape[-2:]).mean(0), sigma)


def combine(
    zero_shot_scores: torch.Tensor, zero_shot_maps: torch.Tensor, few_maps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final score ``zs_score + max(few_map)`` and map ``zs_map + few_map``.

    Shape: ``(B,), (B, H, W), (B, H, W) -> (B,), (B, H, W)``.
    """
    if zero_shot_maps.shape != few_maps.shape:
        raise ConfigError(
            f"zero-shot maps {tuple(zero_shot_maps.shape)} and few-shot maps {tuple(few_maps.shape)} differ"
        )
    few_maps = few_maps.to(zero_shot_maps.device)
    scores = zero_shot_scores.float() + few_maps.flatten(1).amax(1).to(zero_shot_scores.device)
    return scores, zero_shot_maps.float() + few_maps


def add_fewshot(
    tokens: torch.Tensor, bank: MemoryBank, scores: torch.Tensor, maps: torch.Tensor, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot ``scores (B,)`` and ``maps (B, H, W)`` (smoothed with ``sigma``) plus the few-shot part
    of ``tokens (N, B, h, w, D)`` against one ``bank``. Shape: ``-> (B,), (B, H, W)``."""
    return combine(scores, maps, fewshot_maps(tokens.float(), bank, tuple(maps.shape[-2:]), sigma))


def add_fewshot_by_category(
    tokens: torch.Tensor,
    categories: Sequence[str],
    banks: dict[str, MemoryBank],
    scores: torch.Tensor,
    maps: torch.Tensor,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_fewshot` with each image against its own category's bank (``categories``: ``B``
    names). The images of a category are picked by index, never by a boolean mask: no device
    synchronisation. Shape: ``-> (B,), (B, H, W)``."""
    groups = {c: [j for j, x in enumerate(categories) if x == c] for c in dict.fromkeys(categories)}
    if len(groups) == 1:  # the usual case: a dataset is ordered by category
        (category,) = groups
        return add_fewshot(tokens, banks[category], scores, maps, sigma)
    parts_scores, parts_maps, order = [], [], []
    for category, idx in groups.items():
        at = torch.tensor(idx).to(maps.device, non_blocking=True)
        s, m = add_fewshot(
            tokens.index_select(1, at),
            banks[category],
            scores.index_select(0, at),
            maps.index_select(0, at),
            sigma,
        )
        parts_scores.append(s)
        parts_maps.append(m)
        order += idx
    back = torch.tensor(sorted(range(len(order)), key=order.__getitem__)).to(maps.device, non_blocking=True)
    return torch.cat(parts_scores).index_select(0, back), torch.cat(parts_maps).index_select(0, back)


def fewshot_scores(
    out,
    bank: MemoryBank,
    size: int | tuple[int, int],
    sigma: float = ScoringConfig.sigma,
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-shot scores and maps from one model output, with the paper's zero-shot part (the default
    :class:`ScoringConfig` with ``sigma``).

    ``tokens`` defaults to ``out.tap_tokens`` (``model(images, return_tokens=True)``); a ``plain`` bank
    needs the features of :func:`feclip.models.fewshot.tap_features`. Shape: ``-> (B,), (B, H, W)``.
    """
    if tokens is None:
        if bank.which != "fused":
            raise ConfigError(
                "a 'plain' memory bank needs the tokens of tap_features(model, images, 'plain')"
            )
        tokens = out.tap_tokens
    if tokens is None:
        raise ConfigError("the model output has no tap_tokens: call model(images, return_tokens=True)")
    scores, maps = score_output(out, bank.taps, ScoringConfig(sigma=sigma), size)
    return add_fewshot(tokens, bank, scores, maps, sigma)


__all__ = [
    "MAP_KINDS",
    "TAP_AGGREGATIONS",
    "ScoringConfig",
    "abnormal_probability",
    "add_fewshot",
    "add_fewshot_by_category",
    "aggregate_taps",
    "anomaly_maps",
    "combine",
    "combine_taps",
    "fewshot_maps",
    "fewshot_scores",
    "gaussian_blur",
    "gaussian_kernel1d",
    "image_scores",
    "map_values",
    "maps_at_sizes",
    "score_output",
    "scores_and_maps",
    "select_taps",
    "upsample",
]
