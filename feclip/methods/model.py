"""A peer method as the engine sees a model: the one place that knows the peers' differences.

The engine (training loop, evaluation, adapter checkpoints, provenance) was written against
:class:`~feclip.models.FEClip`. :class:`PeerModel` wraps a peer (:mod:`feclip.methods.winclip`,
:mod:`~feclip.methods.aprilgan`, :mod:`~feclip.methods.anomalyclip`) and gives it the same surface:
``precision``, ``token_dtype``, ``image_size``, ``grid``, ``trainable_state_dict()``,
``checkpoint_metadata()`` and ``forward(images, categories=None) -> MethodOutput``; training methods
add ``loss(output, masks, labels)`` and :meth:`PeerModel.param_groups`. :func:`build_model` builds
FE-CLIP or a peer from a run config.

What FE-CLIP alone has (the prefix cache, the fc_patch learning-rate policies, the few-shot banks,
the map kinds and tap choices of ``eval.*``, the outputs store) is refused for a peer by
``RunConfig.validate`` (those options), or simply not used (the store: a peer's outputs are recomputed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import nn

from feclip.errors import ConfigError
from feclip.methods.base import MethodOutput

# method.name -> (module, model class, config attribute of MethodConfig); "feclip" is FE-CLIP itself
PEERS = {
    "winclip": ("feclip.methods.winclip", "WinClip"),
    "aprilgan": ("feclip.methods.aprilgan", "AprilGan"),
    "anomalyclip": ("feclip.methods.anomalyclip", "AnomalyClip"),
}
METHODS = ("feclip", *PEERS)
TRAINING_FREE = ("winclip",)  # nothing to train: evaluated with feclip-eval (or train.epochs=0)


def _peer_class(name: str) -> type[nn.Module]:
    import importlib

    module, cls = PEERS[name]
    return getattr(importlib.import_module(module), cls)


class PeerModel(nn.Module):
    """A peer method over a frozen CLIP, with the surface the engine uses (module docstring).

    ``name``: ``method.name``; ``method``: the peer module (its parameters are under ``method.``, so
    the adapter file holds ``method.<its trainable names>``); ``backbone``: the open_clip model name.
    """

    def __init__(self, name: str, method: nn.Module, backbone: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.method = method
        self.backbone = backbone
        self.precision = method.precision
        self.image_size = int(method.image_size)
        visual = method.clip.visual
        self.grid = tuple(visual.grid_size)
        self.trains = any(p.requires_grad for p in method.parameters())
        self._takes_names = name == "aprilgan" and bool(getattr(method.config, "class_names", False))

    @property
    def config(self):
        """The peer's own config dataclass."""
        return self.method.config

    @property
    def clip(self) -> nn.Module:
        return self.method.clip

    @property
    def token_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def backbone_name(self) -> str | None:
        return self.backbone

    def forward(self, images: torch.Tensor, categories: Sequence[str] | None = None) -> MethodOutput:
        """``(B, 3, S, S)`` -> the peer's :class:`MethodOutput`. ``categories``: each image's category,
        for the methods whose prompts name it (APRIL-GAN with ``class_names``: the dataset's folder name
        verbatim, ``metal_nut``, as its reference's data loaders give it)."""
        if self._takes_names and categories is not None:
            return self.method(images, class_names=list(categories))
        return self.method(images)

    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor):
        """The peer's own training loss: ``(total, parts)``, the parts named as FE-CLIP's (``cls``: the
        image-level term, AnomalyCLIP's ``image``; ``focal``, ``dice``, ``total``; 0 where the method has
        no such term) for the training log."""
        if not hasattr(self.method, "loss"):
            raise ConfigError(f"method={self.name} is training-free: evaluate it with feclip-eval")
        total, parts = self.method.loss(output, masks, labels)
        zero = total.detach().new_zeros(())
        named = {
            "cls": parts.get("cls", parts.get("image", zero)),
            "focal": parts.get("focal", zero),
            "dice": parts.get("dice", zero),
            "total": parts.get("total", total.detach()),
        }
        return total, named

    def param_groups(self, lr: float) -> list[dict]:
        """One Adam group: every trainable parameter of the peer at ``lr``."""
        params = [p for p in self.method.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "name": self.name}]

    def train(self, mode: bool = True) -> PeerModel:
        super().train(mode)
        self.method.train(mode)  # each peer keeps its frozen CLIP in eval mode
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds: the peer's learned tensors, named ``method.<name>``."""
        if not self.trains:
            return {}
        return {f"method.{k}": v for k, v in self.method.trainable_state_dict().items()}

    def checkpoint_metadata(self) -> dict[str, str]:
        """The string metadata of an adapter file (:func:`feclip.models.checkpoint.save_adapters`)."""
        visual = self.clip.visual
        taps = getattr(self.config, "taps", None)
        weights = getattr(self.clip, "feclip_weights", None)  # its WeightsSource, when load_clip built it
        return {
            "format": "feclip-peer-v1",
            "method": self.name,
            "backbone": str(self.backbone),
            "backbone_weights": weights.describe() if weights is not None else "",
            "width": str(visual.conv1.weight.shape[0]),
            "depth": str(len(visual.transformer.resblocks)),
            "taps": json.dumps(list(taps)) if taps is not None else "None",
            "image_size": str(self.image_size),
            "config": json.dumps(asdict(self.config), default=str),
        }


def backbone_geometry(backbone_name: str, image_size: int | None = None) -> tuple[int | None, int | None]:
    """``(depth, grid side)`` of an open_clip vision tower, read from its model config (nothing built);
    ``image_size``: ``backbone.image_size`` (None: the model's own). ``None`` where the config does not say."""
    from feclip.models.clip import _open_clip

    vision = (_open_clip().get_model_config(backbone_name) or {}).get("vision_cfg", {})
    depth, patch = vision.get("layers"), vision.get("patch_size")
    size = image_size or vision.get("image_size")
    grid = size // patch if isinstance(size, int) and isinstance(patch, int) else None
    return (depth if isinstance(depth, int) else None), grid


def check_options_fit(cfg, backbone_name: str) -> None:
    """A peer's options against the backbone (its taps within the depth, WinCLIP's windows within the
    token grid), before anything is built or written; raises :class:`ConfigError` as building would."""
    name = cfg.method.name
    if name not in PEERS:
        return
    depth, grid = backbone_geometry(backbone_name, cfg.backbone.image_size)
    options = getattr(cfg.method, name)
    if name == "winclip":
        if grid is not None:
            options.validate(grid=(grid, grid))
    elif depth is not None:
        options.validate(depth)
        if hasattr(options, "resolved"):  # AnomalyCLIP: its default taps and DPAM layer at this depth
            options.resolved(depth).validate(depth)


def checkpoint_options(cfg, depth: int | None) -> dict:
    """What an adapter file of this run's method records as its ``config`` (the metadata
    :func:`~feclip.models.checkpoint.check_fits` compares): FE-CLIP's ``model.*``, or the peer's
    options as the peer holds them on a ``depth``-block backbone (AnomalyCLIP fills in its default taps
    and DPAM layer: a file records them resolved)."""
    name = cfg.method.name
    if name == "feclip":
        return asdict(cfg.model)
    options = getattr(cfg.method, name)
    if depth is not None and hasattr(options, "resolved"):
        options = options.resolved(depth)
    return asdict(options)


def is_peer(model) -> bool:
    """Whether the engine's ``model`` is a peer method (a :class:`PeerModel`), not FE-CLIP: the one
    test the engine makes where the two differ (optimiser groups, fc_patch, prefix cache, loss)."""
    return isinstance(model, PeerModel)


def build_model(cfg, clip: nn.Module, precision: str, backbone: str | None = None) -> nn.Module:
    """The model a run config asks for: :class:`~feclip.models.FEClip` (``method.name=feclip``) or a
    :class:`PeerModel` over ``clip`` at ``precision`` (``fp32`` | ``bf16``)."""
    name = cfg.method.name
    if name == "feclip":
        from feclip.models import FEClip

        return FEClip(clip, cfg.model, precision=precision)
    if name not in PEERS:
        raise ConfigError(f"method.name must be one of {METHODS}, got {name!r}")
    options = getattr(cfg.method, name)
    method = _peer_class(name)(clip, options, precision=precision)
    return PeerModel(name, method, backbone)
