"""Reader for a user's own images: a ``good/`` folder and one folder per defect, masks optional.

Single category (its name is the root folder's name, or ``category=...``)::

    <root>/good/*.png                                normal images
    <root>/<defect>/*.png                            anomalous images, any folder name but the ones below
    <root>/ground_truth/<defect>/<stem>_mask.png     optional masks (or masks/<defect>/<stem>.png)

Several categories: ``<root>/<category>/`` each holding the above.

Masks are all-or-nothing per category: with a ``ground_truth/`` (or ``masks/``) folder every
anomalous image needs its mask (an error otherwise); without one the category is image-level only.
There is a single split, ``test``. Images directly in ``<root>`` are not read (``feclip-data check``
notes them).
"""

from __future__ import annotations

from pathlib import Path

from feclip.data.samples import (
    MaskFinder,
    Sample,
    child_dir,
    image_files_under,
    layout_error,
    list_images,
    report,
    report_empty_categories,
    select_categories,
    subdirs,
)
from feclip.errors import DatasetError

__all__ = ["folder_notes", "list_folder", "mask_files"]

_MASK_DIR_NAMES = ("ground_truth", "masks")


def _categories(root: Path, good_dir: str, category: str | None) -> dict[str, Path]:
    if child_dir(root, good_dir):
        return {category or root.resolve().name: root}
    found = {d.name: d for d in subdirs(root) if child_dir(d, good_dir)}
    if not found:
        raise layout_error("folder", root, f"no {good_dir}/ folder in the root or in any sub-folder of it")
    if category is not None:
        raise layout_error(
            "folder", root, "category= names a single-category root, but this root has several"
        )
    return found


def _mask_root(cat_dir: Path) -> Path | None:
    for name in _MASK_DIR_NAMES:
        found = child_dir(cat_dir, name)
        if found:
            return found
    return None


def list_folder(
    root: Path,
    split: str,
    categories: list[str] | None,
    problems: list[str] | None,
    *,
    good_dir: str = "good",
    category: str | None = None,
) -> list[Sample]:
    """List a user's folder; counts are whatever is on disk.

    Args:
        good_dir: the folder of normal images (``"good"``; e.g. ``"ok"`` or ``"normal"``).
        category: the category name of a single-category root (default: the root folder's name).
    """
    found = _categories(root, good_dir, category)
    samples: list[Sample] = []
    finder = MaskFinder(("_mask", ""))
    selected = select_categories(list(found), categories, "folder", root)
    for name in selected:
        cat_dir = found[name]
        mask_root = _mask_root(cat_dir)
        good = child_dir(cat_dir, good_dir)
        for image in list_images(good):
            samples.append(Sample(image, None, 0, name, "good"))
        for defect_dir in subdirs(cat_dir):
            if defect_dir == good or defect_dir == mask_root or defect_dir.name in _MASK_DIR_NAMES:
                continue
            for image in list_images(defect_dir):
                mask = None
                if mask_root is not None:
                    mask = finder.find(mask_root / defect_dir.name, image.stem)
                    if mask is None:
                        report(
                            problems,
                            f"folder: anomalous image {image} has no mask; expected "
                            f"{mask_root / defect_dir.name / (image.stem + '_mask.png')} (or {image.stem}.<ext>); "
                            f"masks are all-or-nothing: remove {mask_root} for image-level only",
                        )
                samples.append(Sample(image, mask, 1, name, defect_dir.name))
    report_empty_categories(
        "folder", split, selected, samples, problems, lambda c: f"no image in {found[c]}/<{good_dir}|defect>/"
    )
    return samples


def folder_notes(root: Path, *, good_dir: str = "good", category: str | None = None) -> list[str]:
    """Image files the reader does not read: those directly in the root (or in a category folder)."""
    try:
        found = _categories(root, good_dir, category)
    except DatasetError:
        return []
    notes = []
    if root not in found.values():  # several categories: a sub-folder without good_dir/ is not one
        for d in subdirs(root):
            if d.name not in found:
                notes.append(f"folder: ignored {d} (no {good_dir}/ folder inside, so it is not a category)")
    for folder in dict.fromkeys([root, *found.values()]):
        loose = list_images(folder)
        if loose:
            notes.append(
                f"folder: ignored {len(loose)} image file(s) directly in {folder} (e.g. {loose[0].name}); "
                f"images go in {good_dir}/ or a defect folder"
            )
    return notes


def mask_files(root: Path, *, good_dir: str = "good", category: str | None = None) -> list[Path]:
    """Every file under each category's ground_truth/ (or masks/) folder."""
    try:
        found = _categories(root, good_dir, category)
    except DatasetError:
        return []
    return image_files_under(m for m in (_mask_root(d) for d in found.values()) if m is not None)
