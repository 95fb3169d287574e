"""Readers for the medical benchmarks: ``brainmri``, ``br35h`` (image level), ``clinicdb``, ``kvasir`` (pixel level).

Image-level layouts (test split only)::

    <root>/yes/*.jpg     tumour (label 1, no mask)
    <root>/no/*.jpg      normal (label 0)

Any other folder (Br35H's unlabeled ``pred/``) is ignored and reported by ``feclip-data check``.
BrainMRI's Kaggle archive holds two copies of the same images, ``brain_tumor_dataset/{yes,no}/`` and
a top-level ``yes/`` + ``no/``: the reader reads ``brain_tumor_dataset/`` (the copy AnomalyCLIP's
``generate_dataset_json/brainmri.py`` reads) and ``feclip-data check`` compares the two.

Pixel-level layouts (test split only, every image abnormal)::

    <root>/images/<stem>.<ext>     (ClinicDB's original release: Original/)
    <root>/masks/<stem>.<ext>      (ClinicDB's original release: Ground Truth/)

Masks are paired by stem, any image extension. Reader option ``mask_threshold`` (an int; default 0,
the reference's ``> 0``) sets the binarisation of every mask: Kvasir-SEG's masks are JPEGs, whose
compression noise ``> 0`` counts as polyp, so 127 is recommended there (the paper protocols set it).
"""

from __future__ import annotations

import filecmp
from pathlib import Path

from feclip.data.samples import (
    MaskFinder,
    Sample,
    child_dir,
    image_files_under,
    layout_error,
    list_images,
    reject_options,
    report,
    select_categories,
    subdirs,
)

__all__ = [
    "br35h_notes",
    "brainmri_notes",
    "clinicdb_mask_files",
    "kvasir_mask_files",
    "list_br35h",
    "list_brainmri",
    "list_clinicdb",
    "list_kvasir",
]

_IMAGE_DIRS = ("images", "Original")
_MASK_DIRS = ("masks", "Ground Truth")


# ---------------------------------------------------------------------------------------------------
# yes/no (image level)
# ---------------------------------------------------------------------------------------------------


#: BrainMRI's sub-folder read in preference to a duplicate top-level yes/ + no/ (AnomalyCLIP reads it).
BRAINMRI_COPY = "brain_tumor_dataset"


def _has_yes_no(folder: Path) -> bool:
    return bool(child_dir(folder, "yes") and child_dir(folder, "no"))


def _yes_no_base(name: str, root: Path) -> Path:
    """The folder holding yes/ and no/: for BrainMRI ``brain_tumor_dataset/`` when it has them; else
    ``root`` if it holds them; else its single sub-folder that does."""
    if name == "brainmri":
        preferred = child_dir(root, BRAINMRI_COPY)
        if preferred is not None and _has_yes_no(preferred):
            return preferred
    if _has_yes_no(root):
        return root
    inner = [d for d in subdirs(root) if _has_yes_no(d)]
    if len(inner) == 1:
        return inner[0]
    if len(inner) > 1:
        raise layout_error(
            name, root, f"several folders hold yes/ and no/: {', '.join(str(d) for d in inner)}"
        )
    raise layout_error(name, root, "no yes/ and no/ folders")


def _list_yes_no(name: str, root: Path, split: str, categories, problems, options) -> list[Sample]:
    reject_options(name, options)
    base = _yes_no_base(name, root)
    select_categories(["brain"], categories, name, root)
    samples = []
    for folder_name, label in (("no", 0), ("yes", 1)):
        folder = child_dir(base, folder_name)
        for image in list_images(folder):
            samples.append(Sample(image, None, label, "brain", "tumor" if label else "good"))
    return samples


def _yes_no_notes(name: str, root: Path) -> list[str | tuple[str, str]]:
    base = _yes_no_base(name, root)
    out: list[str | tuple[str, str]] = []
    duplicate = None
    if name == "brainmri":
        other = root if base != root else child_dir(root, BRAINMRI_COPY)
        if other is not None and other != base and _has_yes_no(other):
            duplicate = other
            out.extend(_compare_copies(name, base, other))
    ignored = [d for d in subdirs(base) if d.name.lower() not in ("yes", "no") and d != duplicate]
    out.extend(f"{name}: ignored unlabeled folder {d}" for d in ignored)
    return out


def _compare_copies(name: str, read: Path, other: Path) -> list[str | tuple[str, str]]:
    """A note when the unread copy holds the same files (names and bytes) as the one read, else a
    warning listing the differences."""
    differences: list[str] = []
    n_files = 0
    for folder_name in ("yes", "no"):
        a, b = child_dir(read, folder_name), child_dir(other, folder_name)
        files_a = {p.name: p for p in list_images(a)} if a else {}
        files_b = {p.name: p for p in list_images(b)} if b else {}
        n_files += len(files_a)
        only_a = sorted(files_a.keys() - files_b.keys())
        only_b = sorted(files_b.keys() - files_a.keys())
        changed = sorted(
            n
            for n in files_a.keys() & files_b.keys()
            if not filecmp.cmp(files_a[n], files_b[n], shallow=False)
        )
        for what, names in (
            (f"only in {read / folder_name}", only_a),
            (f"only in {other / folder_name}", only_b),
        ):
            if names:
                differences.append(f"{len(names)} file(s) {what} (e.g. {names[0]})")
        if changed:
            differences.append(
                f"{len(changed)} file(s) of {folder_name}/ differ in content (e.g. {changed[0]})"
            )
    if differences:
        return [
            f"{name}: reading {read}; the other copy {other} is not read and does NOT agree with it: "
            + "; ".join(differences)
        ]
    return [
        (
            "note",
            f"{name}: reading {read} (the copy AnomalyCLIP reads); the duplicate copy {other} is not read "
            f"and agrees with it ({n_files} files, same names and bytes)",
        )
    ]


def list_brainmri(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """Brain MRI Images for Brain Tumor Detection (Kaggle, navoneel); image level only.

    Real counts: 253 images = 155 tumour (yes) + 98 normal (no), one category ``brain``. The root may be
    the folder holding ``brain_tumor_dataset/`` or that folder itself. The Kaggle archive also holds a
    duplicate top-level yes/ + no/: ``brain_tumor_dataset/`` is read (as AnomalyCLIP does), the other
    copy only when it is absent; nothing is counted twice, and ``feclip-data check`` compares them.
    """
    return _list_yes_no("brainmri", root, split, categories, problems, options)


def list_br35h(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """Br35H Brain Tumor Detection 2020 (Kaggle, ahmedhamada0); image level only.

    Real counts: 3,000 images = 1,500 tumour (yes) + 1,500 normal (no), one category ``brain``. The
    unlabeled ``pred/`` folder is ignored (AnomalyCLIP's script would have marked it abnormal).
    """
    return _list_yes_no("br35h", root, split, categories, problems, options)


def brainmri_notes(root: Path, **options) -> list[str | tuple[str, str]]:
    """Which copy the brainmri reader reads, whether the duplicate agrees, and folders it ignores."""
    return _yes_no_notes("brainmri", root)


def br35h_notes(root: Path, **options) -> list[str]:
    """Folders the br35h reader ignores (e.g. pred/)."""
    return _yes_no_notes("br35h", root)


# ---------------------------------------------------------------------------------------------------
# images/ + masks/ (pixel level, all abnormal)
# ---------------------------------------------------------------------------------------------------


def _pair_dirs(root: Path) -> tuple[Path, Path] | None:
    for image_name, mask_name in zip(_IMAGE_DIRS, _MASK_DIRS):
        images, masks = child_dir(root, image_name), child_dir(root, mask_name)
        if images and masks:
            return images, masks
    return None


def _images_masks_base(name: str, root: Path) -> tuple[Path, Path]:
    pair = _pair_dirs(root)
    if pair:
        return pair
    inner = [p for p in (_pair_dirs(d) for d in subdirs(root)) if p]
    if len(inner) == 1:
        return inner[0]
    raise layout_error(name, root, "no images/ and masks/ folders")


def _list_images_masks(name: str, root: Path, split, categories, problems, options) -> list[Sample]:
    reject_options(name, options)
    images_dir, masks_dir = _images_masks_base(name, root)
    select_categories(["colon"], categories, name, root)
    finder = MaskFinder(("", "_mask"))
    samples = []
    for image in list_images(images_dir):
        mask = finder.find(masks_dir, image.stem)
        if mask is None:
            report(problems, f"{name}: image {image} has no mask; expected {masks_dir / image.name}")
        samples.append(Sample(image, mask, 1, "colon", "polyp"))
    return samples


def list_clinicdb(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """CVC-ClinicDB (Bernal et al., 2015), research use; every image shows a polyp.

    Real counts: 612 colonoscopy frames (384x288) with masks, one category ``colon``.
    Accepts ``images/`` + ``masks/`` (the polyp bundle) or ``Original/`` + ``Ground Truth/``, directly
    under the root or in its single sub-folder (e.g. ``CVC-ClinicDB/``).
    """
    return _list_images_masks("clinicdb", root, split, categories, problems, options)


def list_kvasir(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """Kvasir-SEG (Jha et al., 2020), research and education use; every image shows a polyp.

    Real counts: 1,000 images with masks, one category ``colon``. Kvasir-SEG's masks are JPEGs: their
    background and edges carry compression noise, which the default ``> 0`` counts as polyp; pass the
    reader option ``mask_threshold=127`` (the paper protocols do). ``feclip-data check`` and the run's
    checks warn when JPEG masks are read with ``> 0``.
    """
    return _list_images_masks("kvasir", root, split, categories, problems, options)


def clinicdb_mask_files(root: Path, **options) -> list[Path]:
    """Every file in the masks folder."""
    return image_files_under([_images_masks_base("clinicdb", root)[1]])


def kvasir_mask_files(root: Path, **options) -> list[Path]:
    """Every file in the masks folder."""
    return image_files_under([_images_masks_base("kvasir", root)[1]])
