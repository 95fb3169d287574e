"""Models: loading CLIP (:func:`load_clip`) and FE-CLIP itself (:class:`FEClip`, :class:`FEClipConfig`)."""

from feclip.models.checkpoint import load_adapters, save_adapters
from feclip.models.clip import DEFAULT_MODEL, TINY_MODEL, list_models, load_clip
from feclip.models.feclip import FEClip, FEClipConfig, FEClipOutput

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "FEClip",
    "FEClipConfig",
    "FEClipOutput",
    "list_models",
    "load_adapters",
    "load_clip",
    "save_adapters",
]
