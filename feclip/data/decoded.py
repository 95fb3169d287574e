"""An on-disk cache of decoded, resized images and masks, shared by every process and run.

Decoding a 1024x1024 PNG and resizing it costs tens of milliseconds per core; a study evaluates the
same target sets hundreds of times (seeds x variants). The first :class:`~feclip.data.AnomalyDataset`
with ``disk_cache=ROOT`` over a list of samples decodes every file once (in threads) and writes one
*entry*; every later dataset over the same files and options, in any process, memory-maps it and
never decodes.

An entry is the folder ``ROOT/<key>/`` (``ROOT`` is ``<paths.cache_dir>/decoded`` in runs)::

    images.npy  (N, S, S, 3) uint8   the RGB images after ``resize_rgb`` (S = image_size)
    masks.npy   (N, S, S)    bool    the binarised masks after ``resize_mask``; all False for a
                                      sample without a mask file
    sizes.npy   (N, 2)       int64   (H0, W0), each image file's original size
    meta.json                         the format, key, N, S, options, feclip version, first/last files

The *key* (:func:`entry_key`, SHA-256) covers, for every sample in order: the absolute image path,
its size in bytes and ``mtime_ns``; the mask path (or none), its size and ``mtime_ns``; the mask
threshold actually used; plus S, the ``resize`` mode, the ``mask_resize`` method and
:data:`FORMAT_VERSION`. Rewriting a file or changing an option gives another key, so a stale entry
is never read (it stays on disk until removed: ``rm -rf <paths.cache_dir>/decoded``). Labels,
categories and the normalisation are not in the key: they are applied after the cache.

Writes are atomic: an entry is built in a temporary sibling folder ``ROOT/.tmp-<key>-<pid>-<rand>``
and renamed into place; if another process finished first, the later one discards its copy. A lock
file ``ROOT/.lock-<key>`` (``flock``, where available) makes concurrent builders wait for the first
instead of decoding the same files again; correctness never depends on it. An interrupted build
leaves only a temporary folder, which is never read and is removed by a later build once it is older
than a day. An entry that does not match its ``meta.json`` (a missing or truncated file, wrong
shapes) is moved aside with a warning and rebuilt, never used. Reading is ``np.load(mmap_mode="r")``:
forked ``DataLoader`` workers share the mapping and the page cache.

Disk use: ``3*S*S + S*S`` bytes per image (0.45 MB at S = 336: about 0.8 GB for MVTec AD's test set).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feclip.data.sample import Sample
from feclip.errors import DatasetError
from feclip.fileio import TMP_PREFIX, TRASH_PREFIX, clean_stale, fsync_file, key_lock

__all__ = ["FORMAT_VERSION", "DecodedEntry", "entry_key", "open_entry", "open_or_build"]

log = logging.getLogger(__name__)

#: Bumped whenever the arrays an entry holds would differ for the same files and options.
FORMAT_VERSION = 1
IMAGES, MASKS, SIZES, META = "images.npy", "masks.npy", "sizes.npy", "meta.json"

#: ``decode(i) -> (image (S, S, 3) uint8, mask (S, S) bool or None, (H0, W0))`` for sample ``i``.
DecodeFn = Callable[[int], "tuple[np.ndarray, np.ndarray | None, tuple[int, int]]"]


class CorruptEntryError(Exception):
    """An entry folder exists but does not match its ``meta.json`` (or has no readable one)."""


@dataclass(frozen=True)
class DecodedEntry:
    """One opened entry: read-only memory maps of its arrays.

    Attributes:
        path: the entry folder ``ROOT/<key>``.
        images: (N, S, S, 3) uint8.
        masks: (N, S, S) bool.
        sizes: (N, 2) int64, (H0, W0).
    """

    path: Path
    images: np.ndarray
    masks: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _stat(path: str | os.PathLike | None, what: str) -> list:
    """``[absolute path, size, mtime_ns]`` of a file (three Nones for no file)."""
    if path is None:
        return [None, None, None]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"{what} {path} not found") from None
    except OSError as e:
        raise DatasetError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def entry_key(
    samples: Sequence[Sample],
    thresholds: Sequence[int | None],
    image_size: int,
    resize: str,
    mask_resize: str,
) -> str:
    """SHA-256 (hex) of everything the arrays of ``samples`` depend on (the module docstring lists it).

    ``thresholds[i]``: the mask threshold used for sample ``i`` (None when it has no mask).

    Raises:
        DatasetError: a listed file is missing or cannot be read (naming it).
    """
    h = hashlib.sha256()
    head = {"format": FORMAT_VERSION, "S": int(image_size), "resize": resize, "mask_resize": mask_resize}
    h.update(json.dumps(head, sort_keys=True).encode())
    for sample, threshold in zip(samples, thresholds, strict=True):
        row = [*_stat(sample.image_path, "image"), *_stat(sample.mask_path, "mask"), threshold]
        h.update(b"\n" + json.dumps(row).encode())
    return h.hexdigest()


def _expected_shapes(n: int, size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {
        IMAGES: ((n, size, size, 3), np.dtype(np.uint8)),
        MASKS: ((n, size, size), np.dtype(np.bool_)),
        SIZES: ((n, 2), np.dtype(np.int64)),
    }


def open_entry(path: Path, key: str, n: int, size: int) -> DecodedEntry:
    """Memory-map the entry at ``path``, checking it against its ``meta.json`` and the expected
    ``key``, ``n`` images and side ``size``.

    Raises:
        FileNotFoundError: no entry folder at ``path``.
        CorruptEntryError: the folder exists but something is missing, unreadable or mis-shaped.
    """
    if not path.is_dir():
        raise FileNotFoundError(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CorruptEntryError(f"{path / META} is missing or unreadable ({e})") from None
    want = {"format": FORMAT_VERSION, "key": key, "n": n, "image_size": size}
    got = {k: meta.get(k) for k in want} if isinstance(meta, dict) else {}
    if got != want:
        raise CorruptEntryError(f"{path / META} says {got}, expected {want}")
    arrays = {}
    for name, (shape, dtype) in _expected_shapes(n, size).items():
        try:
            arr = np.load(path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:  # missing, truncated (mmap longer than the file), bad header
            raise CorruptEntryError(f"{path / name} is missing or unreadable ({e})") from None
        if arr.shape != shape or arr.dtype != dtype:
            raise CorruptEntryError(f"{path / name} is {arr.dtype}{arr.shape}, expected {dtype}{shape}")
        arrays[name] = arr
    return DecodedEntry(path, arrays[IMAGES], arrays[MASKS], arrays[SIZES])


def _build(root: Path, key: str, n: int, size: int, decode: DecodeFn, num_threads: int, meta: dict) -> Path:
    """Decode every sample into a temporary folder and rename it to ``root/key`` (returned). When
    another process renamed its entry there first, this copy is discarded; the temporary folder is
    removed in every case, a failed decode included."""
    tmp = root / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shapes = _expected_shapes(n, size)
        images = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8, shape=shapes[IMAGES][0])
        masks = np.lib.format.open_memmap(tmp / MASKS, mode="w+", dtype=np.bool_, shape=shapes[MASKS][0])
        sizes = np.zeros(shapes[SIZES][0], dtype=np.int64)

        def one(i: int, images=images, masks=masks) -> None:
            image, mask, original = decode(i)
            images[i] = image
            if mask is not None:
                masks[i] = mask  # else: the zeros open_memmap starts with
            sizes[i] = original

        if num_threads <= 1:
            for i in range(n):
                one(i)
        else:
            pool = ThreadPoolExecutor(max_workers=num_threads)
            try:
                for _ in pool.map(one, range(n)):  # the first bad file raises here, naming itself
                    pass
            finally:  # on an error, the files not started yet are not decoded in vain
                pool.shutdown(wait=True, cancel_futures=True)
        images.flush()
        masks.flush()
        del one, images, masks  # unmapped before the rename
        np.save(tmp / SIZES, sizes)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        for name in (IMAGES, MASKS, SIZES, META):
            fsync_file(tmp / name)
        try:
            os.rename(tmp, root / key)
        except OSError:
            if not (root / key).is_dir():  # not "someone else finished first": a real failure
                raise
            log.debug("decoded cache: %s was written by another process first", root / key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root / key


def open_or_build(
    root: str | os.PathLike,
    samples: Sequence[Sample],
    thresholds: Sequence[int | None],
    image_size: int,
    resize: str,
    mask_resize: str,
    decode: DecodeFn,
    num_threads: int = 1,
) -> DecodedEntry:
    """The entry of ``samples`` under ``root``: opened when it exists and is valid, else built (with
    ``decode`` over ``num_threads`` threads) and opened. A corrupt entry is set aside and rebuilt,
    with a warning.

    Raises:
        OSError: ``root`` (or the entry) cannot be written; the caller decides how to degrade.
        whatever ``decode`` raises for a bad file (:class:`~feclip.errors.DatasetError`, naming it);
            nothing is left in ``root`` then but the lock file.
    """
    from feclip import __version__

    root = Path(root)
    n, size = len(samples), int(image_size)
    key = entry_key(samples, thresholds, size, resize, mask_resize)
    path = root / key
    try:  # the common case, lock-free (and possible in a read-only shared cache)
        return open_entry(path, key, n, size)
    except FileNotFoundError:
        pass
    except CorruptEntryError as e:
        log.warning("decoded-image cache: %s; rebuilding it", e)
    root.mkdir(parents=True, exist_ok=True)
    with key_lock(root, key, "decoded-image cache"):
        try:  # another process may have built (or repaired) it while we waited
            return open_entry(path, key, n, size)
        except FileNotFoundError:
            pass
        except CorruptEntryError:
            trash = root / f"{TRASH_PREFIX}{key[:16]}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(path, trash)
            except FileNotFoundError:  # someone else set it aside
                pass
            shutil.rmtree(trash, ignore_errors=True)
        clean_stale(root)
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "n": n,
            "image_size": size,
            "resize": resize,
            "mask_resize": mask_resize,
            "mask_thresholds": sorted({t for t in thresholds if t is not None}),
            "first_image": os.path.abspath(samples[0].image_path),
            "last_image": os.path.abspath(samples[-1].image_path),
            "covers": "every sample's image and mask path, size and mtime_ns, mask threshold; S, resize, "
            "mask_resize, format",
            "feclip_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        t0 = time.perf_counter()
        _build(root, key, n, size, decode, num_threads, meta)
        log.info(
            "decoded-image cache: wrote %d images at %d px to %s in %.1f s",
            n,
            size,
            path,
            time.perf_counter() - t0,
        )
        return open_entry(path, key, n, size)
