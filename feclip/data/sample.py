"""The :class:`Sample` record (one listed image) and the natural sort every listing uses.

Every listing is sorted: categories in natural order (``Class2`` before ``Class10``), then image paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sample", "natural_key", "sort_samples"]


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image_path: the image file.
        mask_path: its ground-truth mask (any non-zero pixel is anomalous), or None: a normal image
            (all-zero mask) or an anomalous image of an image-level-only dataset.
        label: 0 normal, 1 anomalous.
        category: the sub-dataset (MVTec "bottle", VisA "pcb1", BrainMRI "brain", ...).
        defect: the defect folder name (``"good"`` for normal images).
        mask_threshold: a mask pixel is anomalous when its gray value is ``> mask_threshold`` (0 by
            default: any non-zero pixel; 127 for JPEG masks such as Kvasir-SEG's). Set by the reader
            option ``mask_threshold`` of the datasets that accept it.
    """

    image_path: Path
    mask_path: Path | None
    label: int
    category: str
    defect: str
    mask_threshold: int = 0

    @property
    def has_pixel_gt(self) -> bool:
        """True when the pixel ground truth is known: a normal image, or an anomalous one with a mask."""
        return self.label == 0 or self.mask_path is not None


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``Class2`` < ``Class10``, ``macaroni1`` < ``macaroni2``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))


def sort_samples(samples: Iterable[Sample]) -> list[Sample]:
    """Sort by (category in natural order, image path)."""
    return sorted(samples, key=lambda s: (natural_key(s.category), str(s.image_path)))
