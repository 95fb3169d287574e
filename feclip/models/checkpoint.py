"""Adapter checkpoints: the trainable weights of an :class:`~feclip.models.FEClip` as safetensors.

The file holds only ``adapters.*`` and ``fc_patch.*`` tensors plus string metadata (backbone name,
width, depth, taps, the full model config as JSON). Loading refuses a file made for another backbone
or tap set with :class:`~feclip.errors.CheckpointMismatchError`. Files are written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from feclip.errors import CheckpointMismatchError, FEClipError


def save_adapters(model, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.trainable_state_dict()`` to ``path`` (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {**model.checkpoint_metadata(), **(metadata or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FEClipError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise FEClipError(f"{path}: not a safetensors adapter file ({type(e).__name__}: {e})") from e
    return tensors, meta


def load_adapters(model, path: str | os.PathLike) -> dict[str, str]:
    """Load an adapter file into ``model``; returns the file's metadata.

    Raises :class:`CheckpointMismatchError` when the file was made for another backbone (name or width)
    or another tap set, naming both sides.
    """
    tensors, meta = read_adapters(path)
    mine = model.checkpoint_metadata()
    checks = [("backbone", "backbone"), ("width", "backbone width"), ("taps", "tap set")]
    for key, what in checks:
        theirs = meta.get(key)
        if theirs is not None and theirs != "None" and mine[key] != "None" and theirs != mine[key]:
            raise CheckpointMismatchError(f"{path}: made for {what} {theirs}, but the model has {mine[key]}")
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        cfg = json.loads(meta.get("config", "{}") or "{}")
        raise CheckpointMismatchError(
            f"{path}: does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatch {bad_shape[:3]}); file config: adapters={cfg.get('adapters')}, taps={cfg.get('taps')}"
        )
    model.load_state_dict(tensors, strict=False)
    return meta
