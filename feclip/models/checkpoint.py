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
from feclip.fileio import atomic_write


def save_adapters(model, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.trainable_state_dict()`` to ``path`` (temporary name, then rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {**model.checkpoint_metadata(), **(metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of an adapter file, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FEClipError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise FEClipError(f"{path}: not a safetensors adapter file ({type(e).__name__}: {e})") from e


def check_fits(
    meta: dict[str, str], model_config: dict, path: str | os.PathLike, prefix: str = "model"
) -> None:
    """Refuse, before any model is built, an adapter file trained with another model configuration.

    ``model_config`` is the run's :class:`~feclip.models.FEClipConfig` as a plain dict (or a peer's
    options, ``prefix`` = ``method.<name>``: how the message names the fields); every field the file
    records must have the same value (lists and tuples compare alike).

    Raises:
        CheckpointMismatchError: naming the fields that differ, both values.
    """
    try:
        saved = json.loads(meta.get("config", "") or "{}")
    except json.JSONDecodeError:
        raise CheckpointMismatchError(f"{path}: unreadable model config in the file's metadata") from None
    if not isinstance(saved, dict):
        raise CheckpointMismatchError(f"{path}: the model config in the file's metadata is not an object")
    plain = json.loads(json.dumps(model_config, default=str))
    diffs = [
        f"{prefix}.{k}={saved[k]!r} (this run: {plain[k]!r})"
        for k in sorted(saved)
        if k in plain and saved[k] != plain[k]
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"{path}: trained with {', '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}; "
            "evaluate it with the model options it was trained with"
        )


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
    checks = [
        ("backbone", "backbone"),
        ("width", "backbone width"),
        ("taps", "tap set"),
        ("image_size", "input size"),
    ]
    for key, what in checks:
        theirs = meta.get(key)
        if theirs not in (None, "", "None") and mine[key] != "None" and theirs != mine[key]:
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
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FEClipError(
            f"{path}: holds non-finite (NaN or inf) weights in {', '.join(bad[:3])}; it cannot be evaluated "
            "(was the training diverging when it was saved?)"
        )
    model.load_state_dict(tensors, strict=False)
    return meta
