"""Reader for a user's own images: a ``good/`` folder and one folder per defect, masks optional.

Single category (its name is the root folder's name, or ``category=...``)::

    <root>/good/*.png                                normal images
    <root>/<defect>/*.png                            anomalous images, any folder name but the ones below
    <root>/ground_truth/<defect>/<stem>_mask.png     optional masks (or masks/<defect>/<stem>.png)

Several categories: ``<root>/<category>/`` each holding the above.

Masks are all-or-nothing per category: with a ``ground_truth/`` (or ``masks/``) folder every
anomalous image needs its mask (an error otherwise); without one the category is image-level only.
The split ``test`` is every image but those of a ``reference/`` folder beside ``good/``
(``<root>/reference/*.png``, or ``<root>/<category>/reference/*.png``): normal images kept for
few-shot references only (docs/fewshot.md), listed as the split ``reference`` (a category without one
has none; no split ``train``). Images directly in ``<root>`` are not read (``feclip-data check`` notes
them). The dataset is declared at the end of the module (:data:`FOLDER`).
"""

from __future__ import annotations

from pathlib import Path

from feclip.data.layout import Listing, MaskFinder, child_dir, image_files_under, list_images, subdirs
from feclip.data.sample import Sample
from feclip.data.spec import DatasetInfo
from feclip.errors import DatasetError

__all__ = ["FOLDER", "folder_notes", "list_folder", "mask_files"]

_MASK_DIR_NAMES = ("ground_truth", "masks")
#: The folder of a category's few-shot reference images (normal; never part of the test split).
REFERENCE_DIR = "reference"

#: Default of the reader option ``good_dir``: the folder of normal images.
GOOD_DIR = "good"


def _categories(job: Listing, good_dir: str, category: str | None) -> dict[str, Path]:
    """The category folders by name: the root itself when it holds ``good_dir/``, else its sub-folders
    that do."""
    root = job.root
    if child_dir(root, good_dir):
        return {category or root.resolve().name: root}
    found = {d.name: d for d in subdirs(root) if child_dir(d, good_dir)}
    if not found:
        raise job.layout_error(f"no {good_dir}/ folder in the root or in any sub-folder of it")
    if category is not None:
        raise job.layout_error("category= names a single-category root, but this root has several")
    return found


def _mask_root(cat_dir: Path) -> Path | None:
    for name in _MASK_DIR_NAMES:
        found = child_dir(cat_dir, name)
        if found:
            return found
    return None


def list_folder(job: Listing, *, good_dir: str = GOOD_DIR, category: str | None = None) -> list[Sample]:
    """List a user's folder; counts are whatever is on disk.

    Args:
        job: the listing request (see :class:`~feclip.data.layout.Listing`).
        good_dir: the folder of normal images (``"good"``; e.g. ``"ok"`` or ``"normal"``).
        category: the category name of a single-category root (default: the root folder's name).
    """
    found = _categories(job, good_dir, category)
    samples: list[Sample] = []
    finder = MaskFinder(("_mask", ""))
    selected = job.select(list(found))
    if job.split == "reference":  # a category without a reference/ folder simply has none
        for name in selected:
            ref_dir = child_dir(found[name], REFERENCE_DIR)
            images = list_images(ref_dir) if ref_dir is not None else []
            samples += [Sample(image, None, 0, name, REFERENCE_DIR) for image in images]
        return samples
    for name in selected:
        cat_dir = found[name]
        mask_root = _mask_root(cat_dir)
        good = child_dir(cat_dir, good_dir)
        for image in list_images(good):
            samples.append(Sample(image, None, 0, name, "good"))
        for defect_dir in subdirs(cat_dir):
            if defect_dir == good or defect_dir == mask_root or defect_dir.name in _MASK_DIR_NAMES:
                continue
            if defect_dir.name.lower() == REFERENCE_DIR:  # few-shot references, not a defect type
                continue
            for image in list_images(defect_dir):
                mask = None
                if mask_root is not None:
                    mask = finder.find(mask_root / defect_dir.name, image.stem)
                    if mask is None:
                        job.report(
                            f"{job.name}: anomalous image {image} has no mask; expected "
                            f"{mask_root / defect_dir.name / (image.stem + '_mask.png')} (or {image.stem}.<ext>); "
                            f"masks are all-or-nothing: remove {mask_root} for image-level only",
                        )
                samples.append(Sample(image, mask, 1, name, defect_dir.name))
    job.report_empty(selected, samples, lambda c: f"no image in {found[c]}/<{good_dir}|defect>/")
    return samples


def folder_notes(job: Listing, *, good_dir: str = GOOD_DIR, category: str | None = None) -> list[str]:
    """Image files the reader does not read: those directly in the root (or in a category folder)."""
    root = job.root
    try:
        found = _categories(job, good_dir, category)
    except DatasetError:
        return []
    notes = []
    if root not in found.values():  # several categories: a sub-folder without good_dir/ is not one
        for d in subdirs(root):
            if d.name not in found:
                where = (
                    f"; references go in {root}/<category>/{REFERENCE_DIR}/"
                    if d.name.lower() == REFERENCE_DIR
                    else ""
                )
                notes.append(
                    f"{job.name}: ignored {d} (no {good_dir}/ folder inside, so it is not a category{where})"
                )
    for folder in dict.fromkeys([root, *found.values()]):
        loose = list_images(folder)
        if loose:
            notes.append(
                f"{job.name}: ignored {len(loose)} image file(s) directly in {folder} "
                f"(e.g. {loose[0].name}); "
                f"images go in {good_dir}/ or a defect folder"
            )
    return notes


def mask_files(job: Listing, *, good_dir: str = GOOD_DIR, category: str | None = None) -> list[Path]:
    """Every file under each category's ground_truth/ (or masks/) folder."""
    try:
        found = _categories(job, good_dir, category)
    except DatasetError:
        return []
    return image_files_under(m for m in (_mask_root(d) for d in found.values()) if m is not None)


#: A user's own folder of images (no default folder, no download).
FOLDER = DatasetInfo(
    name="folder",
    reader=list_folder,
    splits=("test", "reference"),
    pixel_masks=None,
    categories=(),
    layout="<root>/good/*.png and <root>/<defect>/*.png, optional masks in "
    "<root>/{ground_truth,masks}/<defect>/<stem>[_mask].png, optional few-shot references in "
    "<root>/reference/*.png; or <root>/<category>/ holding that",
    mask_files=mask_files,
    notes=folder_notes,
    takes_mask_threshold=True,
)
