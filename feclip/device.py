"""Which torch device a run or a command uses: the one place that reads ``auto``."""

from __future__ import annotations

import torch

from feclip.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str | None, option: str = "device") -> torch.device:
    """``auto`` (or ``None``) -> the first CUDA device when there is one, else the CPU; any other name
    as torch reads it. Asking for CUDA where there is none is a :class:`ConfigError` naming ``option``
    (``device=`` for runs, ``--device`` for ``feclip-predict``)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option} {name!r}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} {name}: no CUDA device is available (use cpu)")
    return device
