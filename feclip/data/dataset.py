"""``AnomalyDataset``: a torch Dataset over a list of :class:`~feclip.data.sample.Sample`.

Each item is a dict::

    image          (3, S, S) float32, RGB, square bicubic resize, CLIP-normalised
    mask           (S, S) float32 in {0, 1}; zeros for normal images and for images without pixel GT;
                   binarised at the original resolution, then resized by ``mask_resize``
    has_mask       bool: the pixel ground truth of this image's category is known (False for image-level
                   datasets such as BrainMRI: pixel metrics must skip them)
    label          int, 0 normal / 1 anomalous
    category       str
    defect         str
    path           str, the image file
    original_size  (2,) int64 tensor, (H0, W0) of the image file
    index          int, position in the dataset

Decoding happens once per image: with ``cache=True`` (default) the resized uint8 image and bool mask
are kept in memory (about 3*S*S + S*S bytes per image, ~0.45 MB at S = 336), so later epochs never wait
on PNG/JPEG decoding. :meth:`AnomalyDataset.preload` fills the cache up front (threads), which also
validates every file before training starts; do it before creating a multi-worker DataLoader so that
forked workers inherit the filled cache (or use ``persistent_workers=True``).

With ``disk_cache=ROOT`` the decoded, resized arrays live on disk instead (:mod:`feclip.data.decoded`):
the first dataset over a list of files decodes them all once, in threads, and writes one entry under
``ROOT``; every later dataset over the same files and options (any process, seed or variant) maps that
entry read-only and never decodes. Items are bit-identical to those decoded in memory. The entry is
opened (or built) by :meth:`AnomalyDataset.preload` or on first access, in whichever process comes
first (a build in ``DataLoader`` workers is done by one of them while the others wait). When ``ROOT``
cannot be written (and holds no entry yet) the dataset logs one warning per process and decodes in
memory as without ``disk_cache``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from feclip.data.decoded import DecodedEntry, open_or_build
from feclip.data.sample import Sample, natural_key
from feclip.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MASK_RESIZE,
    DEFAULT_RESIZE,
    MASK_RESIZE_METHODS,
    RESIZE_MODES,
    load_mask,
    load_rgb,
    resize_mask,
    resize_rgb,
)
from feclip.data.transforms import image_size as read_image_size
from feclip.errors import ConfigError, DatasetError

__all__ = ["AnomalyDataset"]

log = logging.getLogger(__name__)


def _normalize_chw(image: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32 ``(x / 255 - mean) / std``, contiguous.

    The arithmetic of :func:`feclip.data.transforms.normalize` (the same float32 operations in the same
    order, so bit-identical; tested), written straight into a channels-first tensor: about 4x faster per
    item at S = 336, and the batch's ``torch.stack`` becomes a plain copy. ``mean`` and ``std``: (3, 1, 1).
    """
    out = torch.empty((3, *image.shape[:2]), dtype=torch.float32)
    out.copy_(torch.from_numpy(image).permute(2, 0, 1))
    return out.div_(255.0).sub_(mean).div_(std)


@dataclass(frozen=True)
class _Decoded:
    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray | None  # (S, S) bool, None = all zeros
    original_size: tuple[int, int]  # (H0, W0)


class AnomalyDataset(Dataset):
    """Images, masks and labels of a list of samples, resized to the model input size.

    Args:
        samples: from :func:`feclip.data.list_samples` (any order is kept as given).
        image_size: S, the square model input size (``model.image_size``: 336 for ViT-L/14@336).
        mean, std: per-channel normalisation (defaults: OpenAI CLIP).
        cache: keep the decoded, resized uint8 arrays in memory after the first read.
        mask_threshold: a mask pixel is anomalous when its gray value is ``> mask_threshold``; None
            (default) uses each sample's own :attr:`Sample.mask_threshold` (0 unless the reader
            option ``mask_threshold`` set it; e.g. 127 for JPEG masks such as Kvasir-SEG's), an int
            overrides it for every sample.
        mask_resize: how masks are resized to ``image_size`` (:func:`~feclip.data.transforms.resize_mask`):
            ``"bilinear"`` (default: AnomalyCLIP's pipeline, antialiased bilinear then ``> 0.5``) or
            ``"nearest"``. :meth:`original_mask` is never resized.
        resize: ``"square"`` (default) or ``"center_crop"``, for images and masks alike
            (:func:`~feclip.data.transforms.resize_rgb`).
        disk_cache: a folder for the on-disk cache of decoded, resized arrays
            (:mod:`feclip.data.decoded`; runs use ``<paths.cache_dir>/decoded``), or None (default):
            decode in this process, kept in memory as ``cache`` says. With it, ``cache`` is not used
            (the memory map is the cache) unless the folder cannot be written.

    Raises:
        DatasetError: no samples, or a category where some anomalous images have masks and others do not.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        *,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        cache: bool = True,
        mask_threshold: int | None = None,
        mask_resize: str = DEFAULT_MASK_RESIZE,
        resize: str = DEFAULT_RESIZE,
        disk_cache: str | os.PathLike | None = None,
    ) -> None:
        self.samples: list[Sample] = list(samples)
        if not self.samples:
            raise DatasetError("AnomalyDataset: no samples (an empty listing)")
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ConfigError(f"AnomalyDataset: image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"AnomalyDataset: mean and std need 3 values (std > 0), got {mean!r}, {std!r}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self.cache = bool(cache)
        if mask_threshold is not None and (
            isinstance(mask_threshold, bool)
            or not isinstance(mask_threshold, (int, np.integer))
            or not 0 <= mask_threshold <= 254
        ):
            raise ConfigError(
                f"AnomalyDataset: mask_threshold must be None or an int in [0, 254], got {mask_threshold!r}"
            )
        self.mask_threshold = None if mask_threshold is None else int(mask_threshold)
        if mask_resize not in MASK_RESIZE_METHODS:
            raise ConfigError(
                f"AnomalyDataset: mask_resize must be one of {MASK_RESIZE_METHODS}, got {mask_resize!r}"
            )
        self.mask_resize = mask_resize
        if resize not in RESIZE_MODES:
            raise ConfigError(f"AnomalyDataset: resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.disk_cache: Path | None = None if disk_cache is None else Path(disk_cache)
        self._cache: dict[int, _Decoded] = {}
        self._entry: DecodedEntry | None = None  # the opened disk-cache entry
        self._disk_failed = False  # disk_cache could not be written: decode in memory
        self._disk_lock = threading.Lock()
        self.category_has_masks: dict[str, bool] = self._masks_per_category()

    # -- properties ---------------------------------------------------------------------------------

    def _masks_per_category(self) -> dict[str, bool]:
        with_mask: dict[str, Sample] = {}
        without: dict[str, Sample] = {}
        for s in self.samples:
            if s.label == 1:
                (with_mask if s.mask_path is not None else without).setdefault(s.category, s)
        for category in with_mask.keys() & without.keys():
            raise DatasetError(
                f"category {category!r} mixes anomalous images with masks ({with_mask[category].image_path}) "
                f"and without ({without[category].image_path}); pixel metrics would be wrong"
            )
        categories = sorted({s.category for s in self.samples}, key=natural_key)
        return {c: c not in without for c in categories}

    @property
    def has_masks(self) -> bool:
        """True when every category has pixel ground truth (pixel metrics can be computed)."""
        return all(self.category_has_masks.values())

    @property
    def categories(self) -> list[str]:
        """Categories present, in natural sort order."""
        return list(self.category_has_masks)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels."""
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def indices(self, category: str) -> list[int]:
        """Positions of the samples of ``category``."""
        return [i for i, s in enumerate(self.samples) if s.category == category]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        n_bad = int(self.labels.sum())
        return (
            f"AnomalyDataset({len(self)} images, {n_bad} anomalous, {len(self.categories)} categories, "
            f"S={self.image_size}, masks={'yes' if self.has_masks else 'no'} ({self.mask_resize} resize), "
            f"cached={len(self._cache)}"
            + (f", disk cache {self._entry.path}" if self._entry is not None else "")
            + ")"
        )

    def threshold_of(self, sample: Sample) -> int:
        """The binarisation threshold of ``sample``'s mask: the dataset's override, else the sample's."""
        if self.mask_threshold is not None:
            return self.mask_threshold
        return int(getattr(sample, "mask_threshold", 0))

    # -- decoding -----------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # pickled for spawned DataLoader workers: the lock cannot travel, and a memory map would
        # travel as a full copy of its arrays; the worker opens the entry again instead
        state = self.__dict__.copy()
        state["_entry"] = None
        del state["_disk_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._disk_lock = threading.Lock()

    def _disk_entry(self, num_threads: int | None = None) -> DecodedEntry | None:
        """The disk-cache entry, opened or built on first use; None without ``disk_cache`` or when its
        folder cannot be written (one warning). A bad file raises :class:`DatasetError` naming it."""
        if self.disk_cache is None or self._disk_failed:
            return None
        if self._entry is not None:
            return self._entry
        with self._disk_lock:  # preload's or the DataLoader's threads: one opener
            if self._entry is None and not self._disk_failed:
                thresholds = [None if s.mask_path is None else self.threshold_of(s) for s in self.samples]
                try:
                    self._entry = open_or_build(
                        self.disk_cache,
                        self.samples,
                        thresholds,
                        self.image_size,
                        self.resize,
                        self.mask_resize,
                        self._decode_file,
                        num_threads or min(8, os.cpu_count() or 1),
                    )
                except OSError as e:
                    self._disk_failed = True
                    log.warning(
                        "decoded-image cache: cannot use %s (%s); decoding in memory instead "
                        "(set paths.cache_dir to a writable folder, or data.decoded_cache=false)",
                        self.disk_cache,
                        e.strerror or e,
                    )
        return self._entry

    def _decode(self, index: int) -> _Decoded:
        hit = self._cache.get(index)
        if hit is not None:
            return hit
        entry = self._disk_entry()
        if entry is not None:  # copies: writable arrays for torch.from_numpy, nothing tied to the map
            has_mask = self.samples[index].mask_path is not None
            return _Decoded(
                np.array(entry.images[index]),
                np.array(entry.masks[index]) if has_mask else None,
                (int(entry.sizes[index, 0]), int(entry.sizes[index, 1])),
            )
        image, mask, original = self._decode_file(index)
        decoded = _Decoded(image, mask, original)
        if self.cache:
            self._cache[index] = decoded
        return decoded

    def _decode_file(self, index: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        """Decode and resize sample ``index`` from its files: ((S, S, 3) uint8, (S, S) bool or None,
        (H0, W0)). Raises :class:`DatasetError` naming a bad file."""
        sample = self.samples[index]
        rgb = load_rgb(sample.image_path)
        original = (int(rgb.shape[0]), int(rgb.shape[1]))
        mask = None
        if sample.mask_path is not None:
            full = load_mask(sample.mask_path, self.threshold_of(sample))
            if full.shape != original:
                raise DatasetError(
                    f"mask {sample.mask_path} is {full.shape[0]}x{full.shape[1]} (HxW) but its image "
                    f"{sample.image_path} is {original[0]}x{original[1]}"
                )
            mask = resize_mask(full, self.image_size, self.mask_resize, self.resize)
        return resize_rgb(rgb, self.image_size, self.resize), mask, original

    def preload(self, num_threads: int | None = None) -> AnomalyDataset:
        """Decode every image now (in threads), filling the cache; raises the first bad file.

        Without ``cache=True`` this only validates the files. With ``disk_cache`` it opens the entry,
        or builds it (decoding in ``num_threads`` threads). Returns self.
        """
        threads = num_threads or min(8, os.cpu_count() or 1)
        if self._disk_entry(threads) is not None:
            return self
        todo = [i for i in range(len(self)) if i not in self._cache]
        if threads <= 1:
            for i in todo:
                self._decode(i)
            return self
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(self._decode, todo):
                pass
        return self

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        sample = self.samples[index]
        decoded = self._decode(index)
        S = self.image_size
        if decoded.mask is None:
            mask = torch.zeros((S, S), dtype=torch.float32)
        else:
            mask = torch.from_numpy(decoded.mask.astype(np.float32))
        return {
            "image": _normalize_chw(decoded.image, self._mean_t, self._std_t),
            "mask": mask,
            "has_mask": self.category_has_masks[sample.category],
            "label": int(sample.label),
            "category": sample.category,
            "defect": sample.defect,
            "path": str(sample.image_path),
            "original_size": torch.tensor(decoded.original_size, dtype=torch.int64),
            "index": index,
        }

    # -- original resolution ------------------------------------------------------------------------

    def original_image(self, index: int) -> np.ndarray:
        """The image at its original resolution, (H0, W0, 3) uint8 (decoded again, not cached)."""
        return load_rgb(self.samples[index].image_path)

    def original_mask(self, index: int) -> np.ndarray:
        """The binary mask at the image's original resolution, (H0, W0) uint8 in {0, 1}.

        All zeros for a normal image and for an image without pixel ground truth (see ``has_mask``).
        """
        sample = self.samples[index]
        hit = self._cache.get(index)
        entry = self._entry
        if hit is not None:
            size = hit.original_size
        elif entry is not None:
            size = (int(entry.sizes[index, 0]), int(entry.sizes[index, 1]))
        else:
            size = read_image_size(sample.image_path)
        if sample.mask_path is None:
            return np.zeros(size, dtype=np.uint8)
        mask = load_mask(sample.mask_path, self.threshold_of(sample))
        if mask.shape != size:
            raise DatasetError(
                f"mask {sample.mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
                f"{sample.image_path} is {size[0]}x{size[1]}"
            )
        return mask.astype(np.uint8)


def collate(items: list[dict]) -> dict:
    """Stack :class:`AnomalyDataset` items into a batch (the ``collate_fn`` of feclip's loaders).

    Returns ``image`` (B, 3, S, S), ``mask`` (B, S, S), ``label`` (B,), ``index`` (B,) int64 and
    ``original_size``: B tuples (H0, W0), ``category``: B names (when the items have one).
    """
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "original_size": [tuple(it["original_size"].tolist()) for it in items],
    }
    if items and all("category" in it for it in items):  # the peers' prompts may name it
        batch["category"] = [it["category"] for it in items]
    return batch
