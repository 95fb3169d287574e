"""The embedded default data: two small MVTec-layout datasets built from scikit-image's bundled photos.

Nothing is downloaded: the sources are the textures and photos that ship inside scikit-image
(``skimage.data``, each loads offline). The two sets use disjoint categories, so the zero-shot protocol
(train on one dataset, test on another) can run end to end::

    set_a: brick (texture, gray), grass (texture, gray), coffee (object photo, RGB)
    set_b: gravel (texture, gray), cat (object photo "chelsea", RGB), rocket (object photo, RGB)

Layout of each set root (``<root>/set_a``, ``<root>/set_b``)::

    <category>/train/good/000.png
    <category>/test/good/000.png
    <category>/test/<defect>/000.png
    <category>/ground_truth/<defect>/000_mask.png       0/255, exactly the modified pixels

Normal images are random crops of the source (flips/rotations for textures, horizontal flips for
objects) with a small brightness/contrast/colour jitter, resized to ``image_size``. Defect kinds:
``blob`` (an irregular dark or bright spot), ``scratch`` (a thin polyline), ``patch`` (a cut-paste of
a rotated, re-lit square from elsewhere in the image) and ``stain`` (a translucent colour blotch).
Anomalous test images are assigned to the kinds in turn.

Everything is deterministic per seed (one RNG stream per image). :func:`make_synthetic` is idempotent:
a set whose marker file records the same parameters is left alone; otherwise it is written to a
temporary folder and renamed into place, so a half-written set never looks complete.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from feclip.errors import ConfigError, DatasetError

__all__ = ["DEFECT_KINDS", "MARKER", "SETS", "make_synthetic"]

#: Set name -> category -> (``skimage.data`` function, "texture" | "object").
SETS: dict[str, dict[str, tuple[str, str]]] = {
    "set_a": {"brick": ("brick", "texture"), "grass": ("grass", "texture"), "coffee": ("coffee", "object")},
    "set_b": {"gravel": ("gravel", "texture"), "cat": ("chelsea", "object"), "rocket": ("rocket", "object")},
}
DEFECT_KINDS: tuple[str, ...] = ("blob", "scratch", "patch", "stain")
MARKER = ".feclip_synthetic.json"
_VERSION = 1


@functools.cache
def _source(name: str) -> np.ndarray:
    """A ``skimage.data`` image as uint8, (H, W) or (H, W, 3)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    img = img.astype(np.uint8)
    img.setflags(write=False)
    return img


# ---------------------------------------------------------------------------------------------------
# Normal images
# ---------------------------------------------------------------------------------------------------


def _normal(src: np.ndarray, kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A jittered random crop of ``src`` resized to (size, size[, 3]), float32 in [0, 255]."""
    h, w = src.shape[:2]
    frac = rng.uniform(0.45, 0.75) if kind == "texture" else rng.uniform(0.8, 1.0)
    side = max(8, int(frac * min(h, w)))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = src[y : y + side, x : x + side]
    if kind == "texture":
        crop = np.rot90(crop, int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = np.asarray(
        Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BICUBIC)
    )
    img = img.astype(np.float32)
    gain = rng.uniform(0.9, 1.1)
    if img.ndim == 3:
        gain = gain * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.9, 1.1) + mean  # contrast
    return np.clip(img * gain + rng.uniform(-12, 12), 0, 255)


# ---------------------------------------------------------------------------------------------------
# Defects: each returns (image, mask) with mask exactly the modified pixels
# ---------------------------------------------------------------------------------------------------


def _blob_shape(rng: np.random.Generator, size: int, r_lo: float, r_hi: float) -> np.ndarray:
    """An irregular star-convex blob, (size, size) bool."""
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, size=2)
    r0 = rng.uniform(r_lo, r_hi) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = (yy - cy) * rng.uniform(0.7, 1.3), xx - cx
    theta, dist = np.arctan2(dy, dx), np.hypot(dy, dx)
    radius = np.ones_like(theta)
    for k in (2, 3, 5):
        radius += rng.uniform(0.0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return dist < r0 * radius


def _channels(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else img.shape[2]


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """Blend ``colour`` into ``img`` inside ``mask`` only."""
    out = img.copy()
    a = alpha[mask] if isinstance(alpha, np.ndarray) else alpha
    if img.ndim == 3 and isinstance(a, np.ndarray):
        a = a[:, None]
    out[mask] = img[mask] * (1 - a) + colour * a
    return out


def _colour(rng: np.random.Generator, img: np.ndarray, bright: bool) -> np.ndarray:
    level = rng.uniform(215, 250) if bright else rng.uniform(10, 45)
    if _channels(img) == 1:
        return np.float32(level)
    return np.clip(level + rng.uniform(-20, 20, size=3), 0, 255).astype(np.float32)


def _blob(img, rng, size):
    mask = _blob_shape(rng, size, 0.05, 0.12)
    colour = _colour(rng, img, bright=img.mean() < 110 or rng.random() < 0.3)
    out = _paint(img, mask, colour, 0.7)
    out[mask] += rng.normal(0, 6, size=out[mask].shape).astype(np.float32)
    return np.clip(out, 0, 255), mask


def _scratch(img, rng, size):
    from scipy import ndimage
    from skimage.draw import line

    mask = np.zeros((size, size), dtype=bool)
    p = rng.uniform(0.15 * size, 0.85 * size, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(3, 7))):
        angle += rng.normal(0, 0.35)
        q = np.clip(
            p + rng.uniform(0.06, 0.14) * size * np.array([np.sin(angle), np.cos(angle)]), 2, size - 3
        )
        rr, cc = line(int(p[0]), int(p[1]), int(q[0]), int(q[1]))
        mask[rr, cc] = True
        p = q
    width = max(1, int(round(size / 128)))
    mask = ndimage.binary_dilation(mask, iterations=width)
    return _paint(img, mask, _colour(rng, img, bright=rng.random() < 0.5), 0.9), mask


def _patch(img, rng, size):
    side = int(rng.uniform(0.12, 0.22) * size)
    ys, xs, yd, xd = (int(v) for v in rng.integers(0, size - side, size=4))
    content = np.rot90(img[ys : ys + side, xs : xs + side], int(rng.integers(1, 4))).copy()
    content = content * rng.uniform(0.55, 0.75) if content.mean() > 100 else content * 0.6 + 90
    if img.ndim == 3:
        content = content[:, :, rng.permutation(3)]  # also swap colours
    out = img.copy()
    out[yd : yd + side, xd : xd + side] = np.clip(content, 0, 255)
    mask = np.zeros((size, size), dtype=bool)
    mask[yd : yd + side, xd : xd + side] = True
    return out, mask


def _stain(img, rng, size):
    from scipy import ndimage

    mask = _blob_shape(rng, size, 0.08, 0.15)
    soft = ndimage.gaussian_filter(mask.astype(np.float32), sigma=max(1.0, size / 64))
    alpha = rng.uniform(0.45, 0.65) * (0.5 + 0.5 * soft)
    if _channels(img) == 1:
        tint = np.float32(rng.uniform(20, 60))
    else:
        tint = np.array(
            [(130, 70, 25), (170, 30, 40), (40, 70, 170), (50, 140, 50)][int(rng.integers(4))], np.float32
        )
    return _paint(img, mask, tint, alpha), mask


_DEFECTS = {"blob": _blob, "scratch": _scratch, "patch": _patch, "stain": _stain}


def _defect(img: np.ndarray, kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    min_area = max(6, int(0.002 * size * size))
    for _ in range(20):
        out, mask = _DEFECTS[kind](img, rng, size)
        if min_area <= mask.sum() <= 0.3 * size * size:
            return out, mask
    return out, mask  # pragma: no cover - 20 rejections are practically impossible


# ---------------------------------------------------------------------------------------------------
# Writing a set
# ---------------------------------------------------------------------------------------------------


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(arr).astype(np.uint8)).save(path, format="PNG", compress_level=1)


def _write_set(out: Path, set_index: int, categories: dict, params: dict) -> int:
    """Generate and write one set under ``out`` (PNG encoding in threads); returns the file count."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures: list[Future] = []
        n_files = _generate_set(
            out, set_index, categories, params, lambda p, a: futures.append(pool.submit(_save, p, a))
        )
        for future in futures:
            future.result()
    return n_files


def _generate_set(out: Path, set_index: int, categories: dict, params: dict, save) -> int:
    size = params["image_size"]
    n_files = 0
    for cat_index, (category, (source, kind)) in enumerate(categories.items()):
        src = _source(source)
        base = out / category

        def rng(part: int, i: int, _c: int = cat_index) -> np.random.Generator:
            return np.random.default_rng([params["seed"], set_index, _c, part, i])

        for i in range(params["n_train_good"]):
            save(base / "train" / "good" / f"{i:03d}.png", _normal(src, kind, rng(0, i), size))
        for i in range(params["n_test_good"]):
            save(base / "test" / "good" / f"{i:03d}.png", _normal(src, kind, rng(1, i), size))
        counters = dict.fromkeys(DEFECT_KINDS, 0)
        for i in range(params["n_test_bad"]):
            defect = DEFECT_KINDS[i % len(DEFECT_KINDS)]
            r = rng(2, i)
            img, mask = _defect(_normal(src, kind, r, size), defect, r, size)
            j = counters[defect]
            counters[defect] += 1
            save(base / "test" / defect / f"{j:03d}.png", img)
            save(base / "ground_truth" / defect / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)
        n_files += params["n_train_good"] + params["n_test_good"] + 2 * params["n_test_bad"]
    return n_files


def _read_marker(set_root: Path) -> dict | None:
    try:
        return json.loads((set_root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _complete(set_root: Path, params: dict) -> bool:
    marker = _read_marker(set_root)
    return marker is not None and marker.get("params") == params


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"make_synthetic: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def make_synthetic(
    root: str | Path,
    seed: int = 0,
    *,
    n_train_good: int = 10,
    n_test_good: int = 12,
    n_test_bad: int = 24,
    image_size: int = 256,
    force: bool = False,
) -> dict[str, Path]:
    """Write (or find) the two synthetic sets under ``root``.

    Args:
        root: the parent folder (e.g. ``$DATA_ROOT/synthetic``); the sets go to ``root/set_a`` and
            ``root/set_b``.
        seed: any int >= 0; the same seed gives byte-identical files.
        n_train_good: normal training images per category.
        n_test_good: normal test images per category.
        n_test_bad: anomalous test images per category (spread over :data:`DEFECT_KINDS` in turn).
        image_size: side of the square images, >= 32.
        force: rewrite even when a complete set with the same parameters exists.

    Returns:
        ``{"set_a": Path, "set_b": Path}``, the set roots (pass one to ``list_samples("synthetic", ...)``).

    Defaults: 3 categories per set, 10 + 12 + 24 = 46 images per category, 256x256; about a second per set.
    """
    params = {
        "version": _VERSION,
        "seed": _check_int("seed", seed, 0),
        "n_train_good": _check_int("n_train_good", n_train_good, 0),
        "n_test_good": _check_int("n_test_good", n_test_good, 1),
        "n_test_bad": _check_int("n_test_bad", n_test_bad, 1),
        "image_size": _check_int("image_size", image_size, 32),
    }
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise ConfigError(f"make_synthetic: root must be a folder path, got {root!r}")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(
            f"synthetic: {root} exists and is not a folder; set paths.data_root / paths.cache_dir to a "
            "writable folder"
        )
    out: dict[str, Path] = {}
    todo: list[tuple[int, str, dict, dict]] = []
    for set_index, (set_name, categories) in enumerate(SETS.items()):
        target = root / set_name
        set_params = dict(params, set=set_name, categories=list(categories))
        out[set_name] = target
        if force or not _complete(target, set_params):
            todo.append((set_index, set_name, categories, set_params))
    if not todo:  # complete already: a read-only copy is fine
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(root, err) from None
    for set_index, set_name, categories, set_params in todo:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{set_name}.tmp-", dir=root))
        except OSError as err:
            raise _unwritable(root, err) from None
        try:
            tmp.chmod(0o777 & ~_umask())
            n_files = _write_set(tmp, set_index, categories, set_params)
            (tmp / MARKER).write_text(json.dumps({"params": set_params, "n_files": n_files}, indent=1))
            _swap_in(tmp, root / set_name, set_params)
        except OSError as err:
            raise _unwritable(root, err) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _unwritable(root: Path, err: OSError) -> DatasetError:
    reason = err.strerror or str(err) or type(err).__name__
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return DatasetError(
        f"synthetic: cannot write the synthetic datasets under {root}: {reason}{where}; set "
        "paths.data_root / paths.cache_dir (or the ROOT of `feclip-data synth`) to a writable folder"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in(tmp: Path, target: Path, params: dict) -> None:
    """Rename ``tmp`` to ``target``, replacing an old or incomplete ``target`` (put back if that fails)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if _complete(target, params):  # another process won the race with the same parameters
            pass
        else:
            if old is not None and not target.exists():
                old.rename(target)  # leave things as they were
                old = None
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
