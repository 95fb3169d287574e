"""What every reader shares: the :class:`Listing` request it receives, and the folder and mask helpers.

A *reader* turns one on-disk dataset layout into a ``list[Sample]``. Readers never decode images; they
check that every listed file exists and that every anomalous image of a pixel-level dataset has its
mask (paired by name, never by sorted order). Problems are raised as
:class:`feclip.errors.DatasetError` naming the path and the expected layout, so a bad dataset fails
when it is listed, not deep inside a training epoch. Nothing is silently skipped.

A reader is ``reader(job: Listing, **options) -> list[Sample]``: the :class:`Listing` carries the
dataset's declaration (name, layout), the root, the split, the wanted categories and the problem list,
and says how to report (:meth:`Listing.report`, :meth:`Listing.layout_error`, ...), so no reader
repeats its own name or layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from feclip.data.sample import Sample, natural_key
from feclip.data.spec import DatasetInfo
from feclip.errors import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "EmptyDatasetError",
    "Listing",
    "MaskFinder",
    "child_dir",
    "image_files_under",
    "is_image_file",
    "list_images",
    "subdirs",
]

#: File suffixes (lower case) treated as images; anything else in an image folder is ignored.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class EmptyDatasetError(DatasetError):
    """The layout is right but the requested split (and categories) holds no image."""


@dataclass(frozen=True)
class Listing:
    """One listing request, as :func:`feclip.data.list_samples` hands it to a reader.

    Attributes:
        info: the dataset's declaration (its name and layout go into every message).
        root: the dataset root (an existing folder).
        split: ``"train"`` or ``"test"`` (one of ``info.splits``).
        categories: the categories to keep, or None for all.
        problems: when a list, per-image problems are appended to it instead of raised (the images are
            still listed); layout errors are always raised.
    """

    info: DatasetInfo
    root: Path
    split: str = "test"
    categories: list[str] | None = None
    problems: list[str] | None = None

    @property
    def name(self) -> str:
        """The dataset name."""
        return self.info.name

    def report(self, message: str) -> None:
        """Raise ``DatasetError(message)``, or append it to :attr:`problems` when that is a list."""
        if self.problems is None:
            raise DatasetError(message)
        self.problems.append(message)

    def layout_error(self, what: str) -> DatasetError:
        """A DatasetError saying what is wrong under the root and quoting the expected layout."""
        return DatasetError(f"{self.name}: {what} (root {self.root}); expected layout: {self.info.layout}")

    def select(self, found: Sequence[str]) -> list[str]:
        """The wanted categories (all of ``found`` when none are named), sorted naturally; a wanted
        category not in ``found`` is a DatasetError listing the available ones."""
        if self.categories is None:
            return sorted(found, key=natural_key)
        missing = [c for c in self.categories if c not in found]
        if missing:
            raise DatasetError(
                f"{self.name}: categor{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} not found "
                f"under {self.root}; available: {', '.join(sorted(found, key=natural_key)) or '(none)'}"
            )
        return sorted(set(self.categories), key=natural_key)

    def report_empty(
        self, selected: Iterable[str], samples: Sequence[Sample], where: Callable[[str], str]
    ) -> None:
        """Report (see :meth:`report`) each selected category without an image in the split;
        ``where(category)`` names the place that was searched (a folder or a file), for the message."""
        present = {s.category for s in samples}
        for category in selected:
            if category not in present:
                self.report(
                    f"{self.name}: category {category!r} has no {self.split} images ({where(category)}); "
                    f"add its images or leave it out with categories=...",
                )


def is_image_file(path: Path) -> bool:
    """A visible file whose suffix is in :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (sub-folders are not entered)."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def subdirs(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


def child_dir(folder: Path, name: str) -> Path | None:
    """The sub-folder of ``folder`` named ``name``, compared case-insensitively (exact match preferred)."""
    exact = folder / name
    if exact.is_dir():
        return exact
    matches = [p for p in subdirs(folder) if p.name.lower() == name.lower()] if folder.is_dir() else []
    return matches[0] if len(matches) == 1 else None


def image_files_under(folders: Iterable[Path]) -> list[Path]:
    """Every image file inside the given folders (recursively), sorted."""
    out: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            out.extend(p for p in folder.rglob("*") if is_image_file(p))
    return sorted(out)


class MaskFinder:
    """Pairs images with masks by name: ``<stem><suffix>.<any image ext>`` in a mask folder.

    One instance per listing; each mask folder is read once, so pairing n images is O(n).
    """

    def __init__(self, suffixes: Sequence[str] = ("_mask", "")) -> None:
        self.suffixes = tuple(suffixes)
        self._index: dict[Path, dict[str, list[Path]]] = {}

    def find(self, folder: Path, stem: str) -> Path | None:
        """The mask of image ``stem`` in ``folder`` (first matching suffix wins), or None."""
        index = self._index.get(folder)
        if index is None:
            index = {}
            if folder.is_dir():
                for path in list_images(folder):
                    index.setdefault(path.stem, []).append(path)
            self._index[folder] = index
        for suffix in self.suffixes:
            candidates = index.get(stem + suffix)
            if candidates:
                return sorted(candidates, key=_ext_rank)[0]
        return None


def _ext_rank(path: Path) -> tuple[int, str]:
    ext = path.suffix.lower()
    return (IMAGE_EXTENSIONS.index(ext) if ext in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS), path.name)
