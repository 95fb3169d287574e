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

The four datasets are declared at the end of the module (:data:`BRAINMRI`, :data:`BR35H`,
:data:`CLINICDB`, :data:`KVASIR`).
"""

from __future__ import annotations

import filecmp
from pathlib import Path

from feclip.data.layout import Listing, MaskFinder, child_dir, image_files_under, list_images, subdirs
from feclip.data.sample import Sample
from feclip.data.spec import DatasetInfo, OfficialCounts, Source, kaggle_steps

__all__ = [
    "BR35H",
    "BRAINMRI",
    "CLINICDB",
    "KVASIR",
    "br35h_notes",
    "brainmri_notes",
    "images_masks_files",
    "list_br35h",
    "list_brainmri",
    "list_images_masks",
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


def _yes_no_base(job: Listing, copy: str | None) -> Path:
    """The folder holding yes/ and no/: the sub-folder ``copy`` (BrainMRI's ``brain_tumor_dataset/``)
    when given and it has them; else the root if it holds them; else its single sub-folder that does."""
    root = job.root
    if copy is not None:
        preferred = child_dir(root, copy)
        if preferred is not None and _has_yes_no(preferred):
            return preferred
    if _has_yes_no(root):
        return root
    inner = [d for d in subdirs(root) if _has_yes_no(d)]
    if len(inner) == 1:
        return inner[0]
    if len(inner) > 1:
        raise job.layout_error(f"several folders hold yes/ and no/: {', '.join(str(d) for d in inner)}")
    raise job.layout_error("no yes/ and no/ folders")


def _list_yes_no(job: Listing, copy: str | None) -> list[Sample]:
    """``no/`` (label 0) then ``yes/`` (label 1) of the base folder, in the dataset's one category."""
    base = _yes_no_base(job, copy)
    (category,) = job.select(job.info.categories)
    samples = []
    for folder_name, label in (("no", 0), ("yes", 1)):
        folder = child_dir(base, folder_name)
        for image in list_images(folder):
            samples.append(Sample(image, None, label, category, "tumor" if label else "good"))
    return samples


def _yes_no_notes(job: Listing, copy: str | None) -> list[str | tuple[str, str]]:
    """Folders the reader ignores and, with a preferred ``copy``, how the duplicate compares."""
    name, root = job.name, job.root
    base = _yes_no_base(job, copy)
    out: list[str | tuple[str, str]] = []
    duplicate = None
    if copy is not None:
        other = root if base != root else child_dir(root, copy)
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


def list_brainmri(job: Listing) -> list[Sample]:
    """BrainMRI, image level only, one category ``brain``.

    The root may be the folder holding ``brain_tumor_dataset/`` or that folder itself. The Kaggle
    archive also holds a duplicate top-level yes/ + no/: ``brain_tumor_dataset/`` is read (as
    AnomalyCLIP does), the other copy only when it is absent; nothing is counted twice, and
    ``feclip-data check`` compares them.
    """
    return _list_yes_no(job, BRAINMRI_COPY)


def list_br35h(job: Listing) -> list[Sample]:
    """Br35H, image level only, one category ``brain``. The unlabeled ``pred/`` folder is ignored
    (AnomalyCLIP's script would have marked it abnormal)."""
    return _list_yes_no(job, None)


def brainmri_notes(job: Listing, **options) -> list[str | tuple[str, str]]:
    """Which copy the brainmri reader reads, whether the duplicate agrees, and folders it ignores."""
    return _yes_no_notes(job, BRAINMRI_COPY)


def br35h_notes(job: Listing, **options) -> list[str | tuple[str, str]]:
    """Folders the br35h reader ignores (e.g. pred/)."""
    return _yes_no_notes(job, None)


# ---------------------------------------------------------------------------------------------------
# images/ + masks/ (pixel level, all abnormal)
# ---------------------------------------------------------------------------------------------------


def _pair_dirs(root: Path) -> tuple[Path, Path] | None:
    for image_name, mask_name in zip(_IMAGE_DIRS, _MASK_DIRS):
        images, masks = child_dir(root, image_name), child_dir(root, mask_name)
        if images and masks:
            return images, masks
    return None


def _images_masks_base(job: Listing) -> tuple[Path, Path]:
    pair = _pair_dirs(job.root)
    if pair:
        return pair
    inner = [p for p in (_pair_dirs(d) for d in subdirs(job.root)) if p]
    if len(inner) == 1:
        return inner[0]
    raise job.layout_error("no images/ and masks/ folders")


def list_images_masks(job: Listing) -> list[Sample]:
    """CVC-ClinicDB and Kvasir-SEG: every image shows a polyp, one category ``colon``.

    Accepts ``images/`` + ``masks/`` (the polyp bundle) or ``Original/`` + ``Ground Truth/``, directly
    under the root or in its single sub-folder (e.g. ``CVC-ClinicDB/``, ``Kvasir-SEG/``). Kvasir-SEG's
    masks are JPEGs: their background and edges carry compression noise, which the default ``> 0``
    counts as polyp; pass the reader option ``mask_threshold=127`` (the paper protocols do).
    ``feclip-data check`` and the run's checks warn when JPEG masks are read with ``> 0``.
    """
    images_dir, masks_dir = _images_masks_base(job)
    (category,) = job.select(job.info.categories)
    finder = MaskFinder(("", "_mask"))
    samples = []
    for image in list_images(images_dir):
        mask = finder.find(masks_dir, image.stem)
        if mask is None:
            job.report(f"{job.name}: image {image} has no mask; expected {masks_dir / image.name}")
        samples.append(Sample(image, mask, 1, category, "polyp"))
    return samples


def images_masks_files(job: Listing, **options) -> list[Path]:
    """Every file in the masks folder."""
    return image_files_under([_images_masks_base(job)[1]])


# ---------------------------------------------------------------------------------------------------
# The datasets
# ---------------------------------------------------------------------------------------------------

#: Brain MRI Images for Brain Tumor Detection (Kaggle, navoneel): 253 images = 155 tumour (yes) + 98
#: normal (no).
BRAINMRI = DatasetInfo(
    name="brainmri",
    reader=list_brainmri,
    splits=("test",),
    pixel_masks=False,
    categories=("brain",),
    layout="<root>[/brain_tumor_dataset]/{yes,no}/*.jpg (yes = tumour, no = normal; brain_tumor_dataset/ "
    "is read when present)",
    default_dir="brainmri",
    notes=brainmri_notes,
    test_counts=OfficialCounts(98, 155, (("brain", 98, 155),), "the Kaggle dataset page"),
    source=Source(
        title="Brain MRI Images for Brain Tumor Detection (Kaggle, navoneel)",
        homepage="https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection",
        licence="Kaggle dataset terms; verify",
        manual=kaggle_steps("navoneel/brain-mri-images-for-brain-tumor-detection"),
    ),
)

#: Br35H Brain Tumor Detection 2020 (Kaggle, ahmedhamada0): 3,000 images = 1,500 tumour (yes) + 1,500
#: normal (no).
BR35H = DatasetInfo(
    name="br35h",
    reader=list_br35h,
    splits=("test",),
    pixel_masks=False,
    categories=("brain",),
    layout="<root>/{yes,no}/*.jpg (yes = tumour, no = normal; unlabeled folders such as pred/ are ignored)",
    default_dir="br35h",
    notes=br35h_notes,
    test_counts=OfficialCounts(1500, 1500, (("brain", 1500, 1500),), "the Kaggle dataset page"),
    source=Source(
        title="Br35H: Brain Tumor Detection 2020 (Kaggle, ahmedhamada0)",
        homepage="https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection",
        licence="Kaggle dataset terms; verify",
        manual=kaggle_steps("ahmedhamada0/brain-tumor-detection")
        + "\n   The unlabeled pred/ folder is ignored.",
    ),
)

#: CVC-ClinicDB (Bernal et al., 2015): 612 colonoscopy frames (384x288) with masks.
CLINICDB = DatasetInfo(
    name="clinicdb",
    reader=list_images_masks,
    splits=("test",),
    pixel_masks=True,
    categories=("colon",),
    layout="<root>[/CVC-ClinicDB]/{images,masks}/<stem>.<ext> (also Original/ + 'Ground Truth'/); "
    "all abnormal",
    default_dir="clinicdb",
    mask_files=images_masks_files,
    takes_mask_threshold=True,
    test_counts=OfficialCounts(0, 612, (("colon", 0, 612),), "CVC-ClinicDB (Bernal et al., 2015)"),
    source=Source(
        title="CVC-ClinicDB (Bernal et al., 2015)",
        homepage="https://polyp.grand-challenge.org/CVCClinicDB/",
        licence="research use; cite Bernal et al. 2015",
        manual=(
            "No direct archive URL is known here. The polyp bundle linked in the AnomalyCLIP README:\n"
            "1. Download https://figshare.com/articles/figure/Polyp_DataSet_zip/21221579\n"
            "2. Put the CVC-ClinicDB frames in <folder>/images and their masks (same file\n"
            "   stems) in <folder>/masks (the original release's Original/ and\n"
            "   'Ground Truth'/ folders are accepted too)\n"
            "3. feclip-data check <folder> --dataset <name>"
        ),
    ),
)

#: Kvasir-SEG (Jha et al., 2020): 1,000 images with JPEG masks (use ``mask_threshold=127``).
KVASIR = DatasetInfo(
    name="kvasir",
    reader=list_images_masks,
    splits=("test",),
    pixel_masks=True,
    categories=("colon",),
    layout="<root>[/Kvasir-SEG]/{images,masks}/<stem>.jpg; all abnormal",
    default_dir="kvasir",
    mask_files=images_masks_files,
    takes_mask_threshold=True,
    test_counts=OfficialCounts(0, 1000, (("colon", 0, 1000),), "Kvasir-SEG (Jha et al., 2020)"),
    source=Source(
        title="Kvasir-SEG (Jha et al., MMM 2020)",
        homepage="https://datasets.simula.no/kvasir-seg/",
        licence="research and educational use (see the homepage); cite Jha et al. 2020",
        url="https://datasets.simula.no/downloads/kvasir-seg.zip",
        filename="kvasir-seg.zip",
        manual=(
            "1. Download https://datasets.simula.no/downloads/kvasir-seg.zip\n"
            "2. mkdir -p <folder> && unzip kvasir-seg.zip -d <folder>\n"
            "3. feclip-data check <folder> --dataset <name>"
        ),
    ),
)
