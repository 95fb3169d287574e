"""The FE-CLIP model ``feclip-predict`` runs, rebuilt exactly from an adapter file (or refused).

The adapter file's metadata holds the full :class:`~feclip.models.FEClipConfig` and the backbone the
adapters were trained on (``backbone_weights``): random weights are redrawn with the recorded seed,
loaded weights are checked against the recorded SHA-256; anything else is refused. Without an adapter
file the paper's bare CLIP baseline runs instead: no adapters (lam = 0), the last block's patch tokens
projected with CLIP's own ``visual.proj`` (random weights: seed :data:`BASELINE_SEED`).

Problems are raised as :class:`~feclip.errors.FEClipError` (one line each); notices that do not stop
the rebuild go to ``warn`` (default: :func:`warnings.warn`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path

from feclip.errors import CheckpointMismatchError, FEClipError

BASELINE_SEED = 0  # random weights without an adapter file are drawn with this seed

__all__ = ["BASELINE_SEED", "build_model", "config_from_metadata", "resolve_pretrained"]


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def resolve_pretrained(backbone: str, pretrained: str | None) -> str | None:
    """The weights to load: the given tag/file, ``None`` for 'none'/'random', else the default."""
    from feclip.models import TINY_MODEL

    if pretrained is None:
        return None if backbone == TINY_MODEL else "openai"
    return None if pretrained.lower() in ("none", "random") else pretrained


def config_from_metadata(meta: dict[str, str], path: str | Path, warn: Callable[[str], None] = _warn):
    """Rebuild the :class:`~feclip.models.FEClipConfig` stored in an adapter file's metadata."""
    from feclip.models import FEClipConfig

    if "config" not in meta:
        raise CheckpointMismatchError(
            f"{path}: no model config in the file's metadata (not written by feclip)"
        )
    try:
        values = json.loads(meta["config"])
    except json.JSONDecodeError as err:
        raise CheckpointMismatchError(f"{path}: unreadable model config in the metadata ({err})") from None
    if not isinstance(values, dict):
        raise CheckpointMismatchError(f"{path}: the model config in the metadata is not a JSON object")
    known = {f.name for f in dataclasses.fields(FEClipConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        warn(f"{path}: ignoring unknown config fields {unknown}")
    values = {k: tuple(v) if k == "taps" and isinstance(v, list) else v for k, v in values.items()}
    try:
        cfg = FEClipConfig(**{k: v for k, v in values.items() if k in known})
        cfg.validate()
    except (TypeError, ValueError) as err:  # wrong types or values written into the metadata
        raise CheckpointMismatchError(f"{path}: invalid model config in the metadata ({err})") from None
    return cfg


def _saved_backbone(meta: dict[str, str]) -> str | None:
    name = meta.get("backbone")
    return None if name in (None, "", "None") else name


def _recorded_image_size(meta: dict[str, str], path) -> int | None:
    """The input size the adapters were trained at (None for files that do not record it)."""
    value = meta.get("image_size")
    if value in (None, "", "None"):
        return None
    try:
        return int(value)
    except ValueError:
        raise CheckpointMismatchError(f"{path}: unreadable image_size {value!r} in the metadata") from None


def _load_clip(planned, pretrained: str | None, device: str, image_size: int | None = None):
    """Build the CLIP ``planned`` describes (at ``image_size``, None = the model's own) and check
    that it is what was built."""
    from feclip.models import load_clip

    clip = load_clip(planned.name, pretrained, device=device, seed=planned.seed, image_size=image_size)
    built = getattr(clip, "feclip_weights", None)
    same = built is not None and built.is_random == planned.is_random
    if same and planned.is_random:
        same = built.seed == planned.seed
    elif same:
        same = bool(built.sha256) and built.sha256.startswith(planned.sha256 or "")
    if not same:
        raise CheckpointMismatchError(
            f"the CLIP built is {built.describe() if built else 'unknown'}, not the planned {planned.describe()}"
        )
    return clip


def _checkpoint_metadata(checkpoint: str) -> dict[str, str]:
    from feclip.models.checkpoint import read_metadata

    path = Path(checkpoint)
    if path.is_dir():
        inside = path / "adapters.safetensors"
        hint = f" (did you mean {inside}?)" if inside.is_file() else ""
        raise FEClipError(f"--checkpoint {path} is a folder, not an adapter file{hint}")
    if not path.exists():
        raise FEClipError(f"adapter file not found: {path}")
    if not path.is_file():
        raise FEClipError(f"--checkpoint {path} is not a regular file")
    meta = read_metadata(path)
    method = meta.get("method", "feclip")  # a peer's file (feclip.methods.model.PeerModel) records its method
    if method != "feclip":
        raise FEClipError(
            f"--checkpoint {path} holds {method}'s weights: feclip-predict runs FE-CLIP; evaluate {method} with "
            f"feclip-eval method={method} checkpoint=..."
        )
    return meta


def _checkpoint_weights(
    checkpoint: str, meta: dict[str, str], backbone: str, pretrained: str | None, warn: Callable[[str], None]
):
    """The ``pretrained`` argument that rebuilds the recorded backbone, and the plan aligned with the
    record (:func:`~feclip.models.provenance.align_with_checkpoint`: another model, random vs loaded
    weights, another weights file or an unrecorded random seed are refused)."""
    from feclip.models.provenance import SHA_CHARS, align_with_checkpoint, checkpoint_backbone, plan

    recorded = checkpoint_backbone(meta)
    if pretrained is not None or recorded is None or recorded.name != backbone:
        weights = resolve_pretrained(backbone, pretrained)  # checked against the record below
    elif recorded.is_random:
        weights = None
    elif recorded.source.startswith("file:"):
        sha = f" (sha256 {recorded.sha256[:SHA_CHARS]}...)" if recorded.sha256 else ""
        raise FEClipError(
            f"{checkpoint}: trained with the CLIP weights file {recorded.source[5:]}{sha}; "
            "pass that file as --pretrained FILE"
        )
    else:
        weights = recorded.source
    planned = align_with_checkpoint(plan(backbone, weights, seed=None), meta, checkpoint)
    if planned.is_random and planned.seed is None:
        raise CheckpointMismatchError(
            f"{checkpoint}: trained on {recorded.describe() if recorded else 'a random backbone'}, drawn "
            "without a seed, so the model it was trained with cannot be rebuilt; re-train it with a seed"
        )
    if recorded is None:
        warn(
            f"{checkpoint} does not record the CLIP weights it was trained on "
            f"(written before feclip recorded them); assuming {planned.describe()}"
        )
    return weights, planned


def build_model(
    checkpoint: str | None,
    backbone: str | None,
    pretrained: str | None,
    device: str,
    warn: Callable[[str], None] = _warn,
):
    """The FE-CLIP model to run (eval mode), a one-line description of it, and the
    :class:`~feclip.models.provenance.WeightsSource` of its CLIP.

    With a checkpoint: the config and backbone recorded in the file (``backbone`` and ``pretrained``
    must agree with the record when given); random weights are redrawn with the recorded seed and
    loaded weights must have the recorded SHA-256. Without: the bare CLIP baseline (lam = 0, the last
    block, ``fc_patch`` = ``visual.proj``), random weights drawn with seed :data:`BASELINE_SEED`.
    ``warn`` receives the notices that do not stop the rebuild (one line each).
    """
    from feclip.models import DEFAULT_MODEL, FEClip, FEClipConfig, load_adapters
    from feclip.models.provenance import checkpoint_backbone, plan

    if checkpoint is None:
        backbone = backbone or DEFAULT_MODEL
        weights = resolve_pretrained(backbone, pretrained)
        clip = _load_clip(plan(backbone, weights, seed=BASELINE_SEED), weights, device)
        source = clip.feclip_weights
        depth = len(clip.visual.transformer.resblocks)
        cfg = FEClipConfig(taps=(depth - 1,), lam=0.0, fc_patch_init="clip_proj")
        model = FEClip(clip, cfg)
        what = (
            f"no --checkpoint: bare CLIP zero-shot baseline (backbone {source.describe()}; no adapters, "
            f"patch tokens of block {depth - 1} through CLIP's projection)"
        )
        return model.eval(), what, source
    meta = _checkpoint_metadata(checkpoint)
    saved = _saved_backbone(meta)
    if backbone is not None and saved is not None and backbone != saved:
        raise CheckpointMismatchError(
            f"{checkpoint}: made for backbone {saved}, but --backbone is {backbone}"
        )
    recorded = checkpoint_backbone(meta)
    backbone = backbone or saved or (recorded.name if recorded is not None else None)
    if backbone is None:
        raise FEClipError(f"{checkpoint}: the file does not name its backbone; pass --backbone")
    cfg = config_from_metadata(meta, checkpoint, warn)
    weights, planned = _checkpoint_weights(checkpoint, meta, backbone, pretrained, warn)
    clip = _load_clip(planned, weights, device, _recorded_image_size(meta, checkpoint))
    try:
        model = FEClip(clip, cfg)
    except ValueError as err:  # ConfigError included: e.g. taps beyond this backbone's depth
        raise CheckpointMismatchError(f"{checkpoint}: does not fit backbone {backbone}: {err}") from None
    load_adapters(model, checkpoint)  # refuses another tap set or width, and non-finite weights
    source = clip.feclip_weights
    what = f"FE-CLIP adapters {checkpoint} (backbone {source.describe()}, taps {list(cfg.taps)})"
    return model.eval(), what, source
