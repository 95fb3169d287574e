"""Image and mask loading, square resize and CLIP normalisation.

Conventions (the peers' "squash" preprocessing, docs/method.md, A8):

- images: decoded to RGB uint8 (grayscale, palette, RGBA and 16-bit inputs converted; alpha dropped),
  resized to (S, S) with bicubic interpolation, then ``(x / 255 - mean) / std`` with the OpenAI CLIP
  mean and std;
- masks: decoded to one channel, binarised with ``> threshold`` (default 0: VisA masks are not 0/255),
  resized to (S, S) by :func:`resize_mask`: ``bilinear`` (default; the pipeline of AnomalyCLIP, whose
  numbers FE-CLIP compares with: the 0/255 mask resized bilinearly with PIL's antialiasing, then
  ``> 0.5`` of 255) or ``nearest`` (nearest neighbour).

Every decoding failure (missing, unreadable or truncated file) is raised as
:class:`feclip.errors.DatasetError` naming the path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from feclip.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MASK_RESIZE_METHODS",
    "check_image",
    "image_size",
    "load_mask",
    "load_mask_values",
    "load_rgb",
    "normalize",
    "probe_image",
    "resize_mask",
    "resize_rgb",
]

#: OpenAI CLIP normalisation constants (RGB).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _describe_failure(path: Path, what: str, err: BaseException) -> DatasetError:
    """The one-line DatasetError for a file PIL could not read."""
    if isinstance(err, FileNotFoundError):
        return DatasetError(f"{what} {path} not found")
    if isinstance(err, IsADirectoryError) or path.is_dir():
        return DatasetError(f"{what} {path} is a folder, not an image file")
    try:
        empty = path.stat().st_size == 0
    except OSError:
        empty = False
    if empty:
        return DatasetError(f"{what} {path} is an empty file (0 bytes)")
    if isinstance(err, Image.DecompressionBombError):
        return DatasetError(f"{what} {path} is too large to decode safely: {err}")
    if isinstance(err, UnidentifiedImageError):
        return DatasetError(
            f"{what} {path} is not a readable image (not an image file, or a corrupt or truncated one)"
        )
    detail = " ".join(str(err).split()) or type(err).__name__
    return DatasetError(f"{what} {path} cannot be decoded (truncated or corrupt file?): {detail}")


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` (so a truncated file fails here, not later)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
        return img
    # PIL raises assorted types for bad files: OSError, SyntaxError, ValueError, struct.error, ...
    except Exception as err:
        raise _describe_failure(path, what, err) from None


def _convert(img: Image.Image, mode: str, path: Path, what: str) -> Image.Image:
    try:
        return img.convert(mode)
    except Exception as err:  # e.g. a colour space PIL cannot convert
        raise DatasetError(f"{what} {path}: cannot convert its {img.mode} pixels to {mode} ({err})") from None


_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


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
    path = Path(path)
    img = _open(path, "image")
    if img.mode in _WIDE_MODES:
        gray = _to_uint8(np.asarray(img))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = _convert(img, "RGB", path, "image")
    return np.asarray(img, dtype=np.uint8).copy()


def load_mask_values(path: str | Path) -> np.ndarray:
    """Decode a mask file to its raw gray values, (H, W): uint8 (colour masks converted to luminance,
    1-bit masks as 0/255) or the raw 16/32-bit values."""
    path = Path(path)
    img = _open(path, "mask")
    if img.mode in _WIDE_MODES:
        return np.asarray(img).copy()
    if img.mode != "L":
        img = _convert(img, "L", path, "mask")
    return np.asarray(img, dtype=np.uint8).copy()


def load_mask(path: str | Path, threshold: int = 0) -> np.ndarray:
    """Decode a mask file and binarise it: a pixel is anomalous when its gray value is ``> threshold``.

    Returns:
        bool array, shape (H, W).
    """
    return load_mask_values(path) > threshold


def check_image(path: str | Path, decode: bool = False) -> tuple[int, int]:
    """(H, W) of an image file after checking it: :func:`probe_image` and its structure
    (``PIL.Image.verify``: chunk checksums of a PNG), or with
    ``decode=True`` a full decode (slower; also catches truncated JPEG data). Raises DatasetError."""
    if decode:
        img = _open(Path(path), "image")
        return img.size[1], img.size[0]
    size = probe_image(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
    except Exception as err:  # verify() raises assorted exception types for corrupt files
        detail = " ".join(str(err).split()) or type(err).__name__
        raise DatasetError(f"image {path} is corrupt or truncated: {detail}") from None
    return size


def _header(path: Path, what: str) -> tuple[int, int, str | None]:
    """(H, W, format) from an image file's header (no decoding); one-line DatasetError otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                return height, width, img.format
    except Exception as err:
        raise _describe_failure(path, what, err) from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header (no decoding)."""
    height, width, _ = _header(Path(path), "file")
    return height, width


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


def _tail_looks_complete(path: Path, fmt: str | None) -> bool:
    """False when a PNG does not end with its IEND chunk or a JPEG has no end-of-image marker near its
    end: the signs of a cut-off file (a download or copy that stopped)."""
    if fmt not in ("PNG", "JPEG"):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64))
            tail = handle.read()
    except OSError:
        return False
    if fmt == "PNG":
        return tail.endswith(_PNG_END)
    return _JPEG_END in tail


def probe_image(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(H, W) of an image file from its header, after checking that it can be used: it exists, is not
    empty, PIL recognises its format and header, and it is not cut off (a PNG without its final chunk or
    a JPEG without its end marker is fully decoded to decide). No full decode otherwise: fast.

    Raises:
        DatasetError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    height, width, fmt = _header(path, what)
    if not _tail_looks_complete(path, fmt):
        _open(path, what).close()  # raises for a truncated file; some writers omit the end marker
    return height, width


#: How images (and their masks) become ``size x size`` (``data.resize`` in a run config).
RESIZE_MODES: tuple[str, ...] = ("square", "center_crop")
#: The default of ``mode`` here and of ``data.resize`` (:class:`feclip.config.DataConfig` reads it here).
DEFAULT_RESIZE = "square"


def short_side_size(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """(H, W) with the shorter side ``size`` and the longer scaled alike, truncated (torchvision's
    ``Resize(int)`` rule)."""
    h, w = shape
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central ``size x size`` square, offsets rounded as torchvision's ``CenterCrop``.
    Shape: ``(H, W, ...) -> (size, size, ...)``."""
    h, w = array.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return array[top : top + size, left : left + size]


def resize_rgb(image: np.ndarray, size: int, mode: str = DEFAULT_RESIZE) -> np.ndarray:
    """Bicubic (PIL's, antialiased) resize to ``size x size``. (H, W, 3) uint8 -> (size, size, 3) uint8.

    ``mode``: ``"square"`` resizes both sides to ``size`` (the aspect ratio is not kept: the peers'
    convention, which keeps every border); ``"center_crop"`` resizes the shorter side to ``size`` and
    keeps the central square (the earlier reproduction study's: borders of non-square images are cut).
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    target = (size, size) if mode == "square" else short_side_size(image.shape[:2], size)
    out = image
    if image.shape[:2] != target:
        out = np.asarray(
            Image.fromarray(image).resize(target[::-1], Image.Resampling.BICUBIC), dtype=np.uint8
        )
    return np.ascontiguousarray(center_crop(out, size)) if mode == "center_crop" else out.copy()


#: How :func:`resize_mask` resizes a binary mask (``data.mask_resize`` in a run config).
MASK_RESIZE_METHODS: tuple[str, ...] = ("bilinear", "nearest")
#: The default of ``method`` here and of ``data.mask_resize`` (:class:`feclip.config.DataConfig` reads it).
DEFAULT_MASK_RESIZE = "bilinear"


def resize_mask(
    mask: np.ndarray, size: int, method: str = DEFAULT_MASK_RESIZE, mode: str = DEFAULT_RESIZE
) -> np.ndarray:
    """Resize of a binary mask to ``size x size``. (H, W) bool -> (size, size) bool.

    Args:
        mask: the binarised mask at the image's resolution.
        size: the side of the output.
        mode: as for :func:`resize_rgb` (``"center_crop"``: the shorter side resized to ``size`` with
            ``method``, thresholded, then the central square), so that masks stay aligned with images.
        method: ``"bilinear"``: the mask as a 0/255 8-bit image resized with PIL's bilinear filter
            (which widens its support when shrinking: antialiasing), then a pixel is anomalous when its
            value is ``> 0.5`` of 255, i.e. ``>= 128``. This is AnomalyCLIP's target transform exactly
            (``transforms.Resize((S, S))`` on the PIL ``L`` mask, ``ToTensor``, ``> 0.5``).
            ``"nearest"``: PIL's nearest-neighbour resize (each output pixel copies one input pixel).
            They differ only on defect boundaries (and on structures thinner than the scale factor,
            which bilinear drops and nearest keeps or drops by position).
    """
    if method not in MASK_RESIZE_METHODS:
        raise ConfigError(f"mask resize method must be one of {MASK_RESIZE_METHODS}, got {method!r}")
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    target = (size, size) if mode == "square" else short_side_size(mask.shape, size)
    out = mask
    if mask.shape != target:
        resample = Image.Resampling.BILINEAR if method == "bilinear" else Image.Resampling.NEAREST
        out = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(target[::-1], resample)) > 127
    return np.ascontiguousarray(center_crop(out, size)) if mode == "center_crop" else out


def normalize(
    image: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ``(x / 255 - mean) / std`` per channel."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(m).div_(s)
