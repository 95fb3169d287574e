"""Image and mask loading, square resize and CLIP normalisation.

Conventions (the peers' "squash" preprocessing, spec section 2 / A8):

- images: decoded to RGB uint8 (grayscale, palette, RGBA and 16-bit inputs converted; alpha dropped),
  resized to (S, S) with bicubic interpolation, then ``(x / 255 - mean) / std`` with the OpenAI CLIP
  mean and std;
- masks: decoded to one channel, binarised with ``> threshold`` (default 0: VisA masks are not 0/255),
  resized to (S, S) with nearest-neighbour interpolation.

Every decoding failure (missing, unreadable or truncated file) is raised as
:class:`feclip.errors.DatasetError` naming the path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from feclip.errors import DatasetError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "check_image",
    "image_size",
    "load_mask",
    "load_mask_values",
    "load_rgb",
    "normalize",
    "resize_mask",
    "resize_rgb",
]

#: OpenAI CLIP normalisation constants (RGB).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` (so a truncated file fails here, not later)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
        return img
    except FileNotFoundError:
        raise DatasetError(f"{what} {path} not found") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{what} {path} is not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{what} {path} cannot be decoded (truncated or corrupt file?): {err}") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map a 16/32-bit integer or float single-channel array to uint8."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if 0.0 <= lo and hi <= 1.0:
            return np.round(arr * 255).astype(np.uint8)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.round((arr - lo) * scale).astype(np.uint8)
    hi = int(arr.max()) if arr.size else 0
    if hi <= 255 and int(arr.min()) >= 0:
        return arr.astype(np.uint8)
    return np.clip(np.round(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB.

    Returns:
        uint8 array, shape (H, W, 3).
    """
    img = _open(Path(path), "image")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        gray = _to_uint8(np.asarray(img))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def load_mask_values(path: str | Path) -> np.ndarray:
    """Decode a mask file to its raw gray values, (H, W): uint8 (colour masks converted to luminance,
    1-bit masks as 0/255) or the raw 16/32-bit values."""
    img = _open(Path(path), "mask")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img).copy()
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8).copy()


def load_mask(path: str | Path, threshold: int = 0) -> np.ndarray:
    """Decode a mask file and binarise it: a pixel is anomalous when its gray value is ``> threshold``.

    Returns:
        bool array, shape (H, W).
    """
    return load_mask_values(path) > threshold


def check_image(path: str | Path, decode: bool = False) -> tuple[int, int]:
    """(H, W) of an image file after checking it: its structure (``PIL.Image.verify``), or with
    ``decode=True`` a full decode (slower; also catches truncated JPEG data). Raises DatasetError."""
    if decode:
        img = _open(Path(path), "image")
        return img.size[1], img.size[0]
    size = image_size(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
    except Exception as err:  # verify() raises assorted exception types for corrupt files
        raise DatasetError(f"image {path} is corrupt or truncated: {err}") from None
    return size


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header (no decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except FileNotFoundError:
        raise DatasetError(f"file {path} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"file {path} is not a readable image: {err}") from None
    return height, width


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Square bicubic resize. (H, W, 3) uint8 -> (size, size, 3) uint8."""
    if image.shape[:2] == (size, size):
        return image
    out = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8).copy()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Square nearest-neighbour resize. (H, W) bool -> (size, size) bool."""
    if mask.shape == (size, size):
        return mask
    out = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(out) > 127


def normalize(
    image: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ``(x / 255 - mean) / std`` per channel."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(m).div_(s)
