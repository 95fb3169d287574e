"""The images ``feclip-predict`` reads: finding them, decoding each once, scoring a batch.

:func:`decode` keeps only what is needed from a full-resolution image: the model input ``S x S`` (the
same pixels as evaluation's, so the scores are equal) and a copy at the output size (the longer side
at most ``max_side``); nothing full-size outlives the call, so memory stays bounded for huge inputs.
:func:`score_batch` scores with :func:`feclip.scoring.scores_and_maps`, as evaluation does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feclip.errors import DatasetError

__all__ = ["Decoded", "InputImage", "decode", "find_inputs", "load_batch", "output_size", "score_batch"]


@dataclass(frozen=True)
class InputImage:
    """One file to process: its path and the output name (relative stem, POSIX separators)."""

    path: Path
    name: str


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def find_inputs(
    paths: Sequence[str | Path], exclude: Path | None = None
) -> tuple[list[InputImage], list[str]]:
    """The images named by ``paths`` and the problems found while listing them.

    A file is taken as given (its decoding decides); a folder contributes every visible file below it
    with an image suffix, and each other visible file is a problem ("not an image file"). Files under
    ``exclude`` (the output folder) are skipped. Output names are unique: a clash gets the suffix
    (``a_jpg``), then a counter.
    """
    from feclip.data.layout import IMAGE_EXTENSIONS

    exclude = exclude.resolve() if exclude is not None else None
    found: list[tuple[Path, str]] = []
    problems: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                if _hidden(f, path) or _inside(f, exclude):
                    continue
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    problems.append(f"{f}: not an image file (suffix {f.suffix or 'none'!r})")
                    continue
                found.append((f, f.relative_to(path).with_suffix("").as_posix()))
        elif path.is_file():
            found.append((path, path.stem))
        elif path.exists():
            problems.append(f"{path}: not a regular file or folder")
        else:
            problems.append(f"{path}: no such file or folder")
    return _unique_names(found), problems


def _unique_names(found: list[tuple[Path, str]]) -> list[InputImage]:
    taken: set[str] = set()
    out = []
    for path, name in found:
        candidate = name
        if candidate in taken:
            candidate = f"{name}_{path.suffix.lstrip('.').lower() or 'file'}"
        n = 2
        while candidate in taken:
            candidate, n = f"{name}_{n}", n + 1
        taken.add(candidate)
        out.append(InputImage(path, candidate))
    return out


# modes that load_rgb turns into RGB with PIL's own convert("RGB"); the others (16-bit, float) go
# through load_rgb itself
_PIL_RGB_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


def output_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) of the outputs for an image of (height, width): the same, or scaled so that the longer
    side is ``max_side`` (0 = never scaled)."""
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return height, width
    if height >= width:
        return max_side, max(1, round(width * max_side / height))
    return max(1, round(height * max_side / width)), max_side


@dataclass
class Decoded:
    """One decoded image: the model input ``(S, S, 3)`` uint8, the image at the output size
    ``(h, w, 3)`` uint8 and the original ``(H, W)``."""

    model_input: np.ndarray
    shown: np.ndarray
    size: tuple[int, int]


def decode(path: str | Path, size: int, max_side: int) -> Decoded:
    """Decode an image once and keep only what is needed: the model input, bicubic from the full
    image (the same pixels as ``resize_rgb(load_rgb(path), size)``, so scores equal evaluation's), and
    a copy at the output size (Lanczos, through PIL's ``reduce``). Nothing full-size outlives the call.

    Raises:
        DatasetError: naming the file (as :func:`feclip.data.transforms.load_rgb` words it).
    """
    from PIL import Image

    from feclip.data.transforms import load_rgb

    path = Path(path)
    img = None
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
                img.load()
        except MemoryError:
            raise
        except Exception:
            load_rgb(path)  # raises the DatasetError that names the file and says what is wrong
            raise DatasetError(f"image {path} cannot be decoded") from None
        if img.mode not in _PIL_RGB_MODES:  # 16-bit or float pixels: load_rgb's own scaling
            img.close()
            img = Image.fromarray(load_rgb(path))
        elif img.mode != "RGB":
            try:
                rgb = img.convert("RGB")
            except Exception:
                load_rgb(path)
                raise DatasetError(f"image {path}: cannot convert its {img.mode} pixels to RGB") from None
            img.close()
            img = rgb
        width, height = img.size
        h, w = output_size(height, width, max_side)
        model_input = img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BICUBIC)
        shown = (
            img
            if (h, w) == (height, width)
            else img.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
        )
        return Decoded(
            np.array(model_input, dtype=np.uint8), np.array(shown, dtype=np.uint8), (height, width)
        )
    except MemoryError:
        raise DatasetError(f"image {path} is too large to decode in the memory available") from None
    finally:
        if img is not None:
            img.close()


def load_batch(items: Sequence[InputImage], size: int, max_side: int):
    """Decode a batch: (kept items, decoded images, model inputs (B, 3, S, S) or None, problems)."""
    import torch

    from feclip.data.transforms import normalize

    kept, decoded, problems = [], [], []
    for item in items:
        try:
            image = decode(item.path, size, max_side)
        except DatasetError as err:
            problems.append(str(err))
            continue
        kept.append(item)
        decoded.append(image)
    images = torch.stack([normalize(d.model_input) for d in decoded]) if decoded else None
    return kept, decoded, images, problems


def score_batch(model, images, sigma: float):
    """Image scores ``(B,)`` and maps ``(B, S, S)`` (the evaluation's defaults with ``sigma``, at the
    input size), on the CPU, for CLIP-normalised ``images`` ``(B, 3, S, S)``."""
    import torch

    from feclip.scoring import ScoringConfig, scores_and_maps

    device = next(model.parameters()).device
    with torch.inference_mode():
        scores, maps = scores_and_maps(model, model(images.to(device)), ScoringConfig(sigma=sigma))
    return scores.float().cpu(), maps.float().cpu()
