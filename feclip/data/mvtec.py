"""The MVTec-AD layout family: ``mvtec``, ``btad``, ``mpdd``, ``dtd_synthetic`` and ``synthetic``.

Layout (one folder per category)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png                      normal test images (BTAD: ok/)
    <root>/<category>/test/<defect>/*.png                  anomalous test images (BTAD: ko/)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Masks are paired by name: ``<stem>_mask.<ext>`` first, then ``<stem>.<ext>`` (BTAD and some DTD copies),
any image extension. An anomalous image without a mask is an error naming both paths.

The five datasets are declared at the end of the module (:data:`MVTEC`, :data:`BTAD`, :data:`MPDD`,
:data:`DTD_SYNTHETIC`, :data:`SYNTHETIC`): categories, published counts, download source and licence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from feclip.data.layout import Listing, MaskFinder, image_files_under, list_images, subdirs
from feclip.data.sample import Sample
from feclip.data.spec import ANOMALIB_DOWNLOAD_INFO, DatasetInfo, OfficialCounts, Source
from feclip.data.synthetic import MARKER as SYNTHETIC_MARKER

__all__ = [
    "BTAD",
    "DTD_SYNTHETIC",
    "MPDD",
    "MVTEC",
    "MVTEC_CATEGORIES",
    "SYNTHETIC",
    "list_btad",
    "list_mvtec",
    "list_mvtec_like",
    "list_synthetic",
    "mask_files",
]


def list_mvtec_like(job: Listing, good: str = "good") -> list[Sample]:
    """List ``<root>/<category>/<split>/<defect>/*`` with masks from ``ground_truth/<defect>``.

    Args:
        job: the listing request (see :class:`~feclip.data.layout.Listing`).
        good: the folder name of normal images (``"good"``; BTAD ``"ok"``).
    """
    root, split = job.root, job.split
    found = {d.name: d for d in subdirs(root) if (d / "test").is_dir() or (d / "train").is_dir()}
    if not found:
        if (root / "test").is_dir() or (root / "train").is_dir():
            raise job.layout_error(
                f"{root} looks like a single category folder; pass its parent folder as the root"
            )
        raise job.layout_error("no category folder with a train/ or test/ sub-folder")
    samples: list[Sample] = []
    finder = MaskFinder(("_mask", ""))
    selected = job.select(list(found))
    for category in selected:
        cat_dir = found[category]
        split_dir = cat_dir / split
        if not split_dir.is_dir():
            raise job.layout_error(f"category {category!r} has no {split}/ folder ({split_dir})")
        for defect_dir in subdirs(split_dir):
            defect = defect_dir.name
            label = 0 if defect == good else 1
            gt_dir = cat_dir / "ground_truth" / defect
            for image in list_images(defect_dir):
                mask = None
                if label == 1:
                    mask = finder.find(gt_dir, image.stem)
                    if mask is None:
                        job.report(
                            f"{job.name}: anomalous image {image} has no mask; expected "
                            f"{gt_dir / (image.stem + '_mask.png')} (or {image.stem}.<ext> in {gt_dir})",
                        )
                samples.append(Sample(image, mask, label, category, defect))
    job.report_empty(selected, samples, lambda c: f"no image in {found[c] / split}/<defect>/")
    return samples


def list_mvtec(job: Listing) -> list[Sample]:
    """The MVTec layout as released (MVTec AD, MPDD, DTD-Synthetic): normal images in ``good/``."""
    return list_mvtec_like(job)


def list_btad(job: Listing) -> list[Sample]:
    """BTAD: normal folder ``ok``, anomalous ``ko``; images ``.bmp`` or ``.png`` depending on the product,
    masks in ``ground_truth/ko/`` with the same stem (either extension). The root may be the folder
    holding ``BTech_Dataset_transformed/`` (as unzipped) or that folder itself."""
    inner = job.root / "BTech_Dataset_transformed"
    if inner.is_dir() and not any((job.root / c).is_dir() for c in BTAD.categories):
        job = dataclasses.replace(job, root=inner)
    return list_mvtec_like(job, good="ok")


def list_synthetic(job: Listing) -> list[Sample]:
    """One embedded synthetic set (:mod:`feclip.data.synthetic`): the MVTec reader on one set root.

    Counts follow the generator's parameters: per category ``n_train_good`` train images and
    ``n_test_good`` + ``n_test_bad`` test images (defaults 10, 12 and 24).
    """
    sets = [d.name for d in subdirs(job.root) if (d / SYNTHETIC_MARKER).is_file()]
    if sets:
        raise job.layout_error(
            f"{job.root} holds the synthetic sets {', '.join(sets)}; pass one set root, "
            f"e.g. {job.root / sets[0]}"
        )
    return list_mvtec_like(job)


def mask_files(job: Listing, **options) -> list[Path]:
    """Every file under ``<root>/<category>/ground_truth/`` (for the masks-without-images check)."""
    root = job.root
    inner = root / "BTech_Dataset_transformed"
    if inner.is_dir():
        root = inner
    return image_files_under(d / "ground_truth" for d in subdirs(root))


# ----------------------------------------------------------------------------------------------------
# The datasets
# ----------------------------------------------------------------------------------------------------

MVTEC_LAYOUT = (
    "<root>/<category>/{train/good, test/good, test/<defect>}/*.png and "
    "<root>/<category>/ground_truth/<defect>/<stem>_mask.png"
)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

#: MVTec AD (Bergmann et al., CVPR 2019). Train 3,629 images (all good); test 1,725 = 467 good + 1,258
#: anomalous (the dataset paper's table). Masks ``<stem>_mask.png`` (0/255); grayscale images in grid,
#: screw and zipper.
MVTEC = DatasetInfo(
    name="mvtec",
    reader=list_mvtec,
    splits=("train", "test"),
    pixel_masks=True,
    categories=MVTEC_CATEGORIES,
    layout=MVTEC_LAYOUT,
    default_dir="mvtec",
    mask_files=mask_files,
    test_counts=OfficialCounts(
        467,
        1258,
        (
            ("bottle", 20, 63),
            ("cable", 58, 92),
            ("capsule", 23, 109),
            ("carpet", 28, 89),
            ("grid", 21, 57),
            ("hazelnut", 40, 70),
            ("leather", 32, 92),
            ("metal_nut", 22, 93),
            ("pill", 26, 141),
            ("screw", 41, 119),
            ("tile", 33, 84),
            ("toothbrush", 12, 30),
            ("transistor", 60, 40),
            ("wood", 19, 60),
            ("zipper", 32, 119),
        ),
        "MVTec AD paper (Bergmann et al., CVPR 2019)",
    ),
    source=Source(
        title="MVTec AD (Bergmann et al., CVPR 2019)",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        licence="CC BY-NC-SA 4.0",
        # anomalib's current mirror; its earlier share (.../shares/38536/...) answers HTTP 404
        # (anomalib issues #3121, #3441). Same archive, same sha256.
        url="https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
        "420938113-1629960298/mvtec_anomaly_detection.tar.xz",
        filename="mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        checksum_source=ANOMALIB_DOWNLOAD_INFO + "mvtecad.py",
        manual=(
            "The archive URL above is the mirror anomalib uses now (its earlier mydrive link answers\n"
            "HTTP 404); if this one stops answering too:\n"
            "1. Fill in the form at https://www.mvtec.com/company/research/datasets/mvtec-ad/downloads\n"
            "2. Download mvtec_anomaly_detection.tar.xz (about 4.9 GB)\n"
            "3. mkdir -p <folder> && tar -xf mvtec_anomaly_detection.tar.xz -C <folder>\n"
            "4. feclip-data check <folder> --dataset <name>"
        ),
    ),
)

#: BTAD / BTech (Mishra et al., 2021): 3 products ``01``, ``02``, ``03``.
BTAD = DatasetInfo(
    name="btad",
    reader=list_btad,
    splits=("train", "test"),
    pixel_masks=True,
    categories=("01", "02", "03"),
    layout="<root>[/BTech_Dataset_transformed]/<01|02|03>/{train/ok, test/ok, test/ko}/*.{bmp,png} and "
    "<root>/<category>/ground_truth/ko/<stem>.{bmp,png}",
    default_dir="btad",
    mask_files=mask_files,
    test_counts=OfficialCounts(
        451,
        290,
        source="third-party tables only (not from the dataset's authors); per product not quoted",
    ),
    source=Source(
        title="BTAD / BTech (Mishra et al., 2021)",
        homepage="http://avires.dimi.uniud.it/papers/btad/",
        licence="CC BY-NC-SA 4.0 (per anomalib's btech.py; verify)",
        url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
        filename="btad.zip",
        sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        checksum_source=ANOMALIB_DOWNLOAD_INFO + "btech.py",
        manual=(
            "1. Download https://avires.dimi.uniud.it/papers/btad/btad.zip\n"
            "2. mkdir -p <folder> && unzip btad.zip -d <folder>\n"
            "3. feclip-data check <folder> --dataset <name>"
        ),
    ),
)

#: MPDD, Metal Parts Defect Detection (Jezek et al., 2021); the MVTec layout.
MPDD = DatasetInfo(
    name="mpdd",
    reader=list_mvtec,
    splits=("train", "test"),
    pixel_masks=True,
    categories=("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"),
    layout=MVTEC_LAYOUT,
    default_dir="mpdd",
    mask_files=mask_files,
    test_counts=OfficialCounts(
        176,
        282,
        source="third-party tables only (not from the dataset's authors); per category not quoted",
    ),
    source=Source(
        title="MPDD, Metal Parts Defect Detection (Jezek et al., 2021)",
        homepage="https://github.com/stepanje/MPDD",
        licence="CC BY-NC-SA 4.0 (per anomalib's mpdd.py; verify)",
        manual=(
            "No direct archive URL is known here (the files are on a university SharePoint).\n"
            "1. Open https://github.com/stepanje/MPDD and follow its download link\n"
            "2. Unpack so that <folder>/<category>/{train,test,ground_truth} exist\n"
            "   (categories bracket_black, bracket_brown, bracket_white, connector, metal_plate, tubes)\n"
            "3. feclip-data check <folder> --dataset <name>"
        ),
    ),
)

#: DTD-Synthetic (Aota et al., WACV 2023); the MVTec layout, masks ``<stem>_mask.png`` or ``<stem>.png``.
#: Counts are not known here (not verified): run ``feclip-data check``.
DTD_SYNTHETIC = DatasetInfo(
    name="dtd_synthetic",
    reader=list_mvtec,
    splits=("train", "test"),
    pixel_masks=True,
    categories=(
        "Blotchy_099",
        "Fibrous_183",
        "Marbled_078",
        "Matted_069",
        "Mesh_114",
        "Perforated_037",
        "Stratified_154",
        "Woven_001",
        "Woven_068",
        "Woven_104",
        "Woven_125",
        "Woven_127",
    ),  # fmt: skip
    layout=MVTEC_LAYOUT,
    default_dir="dtd_synthetic",
    mask_files=mask_files,
    source=Source(
        title="DTD-Synthetic (Aota et al., WACV 2023), derived from DTD (Cimpoi et al., CVPR 2014)",
        homepage="https://drive.google.com/drive/folders/10OyPzvI3H6llCZBxKxFlKWt1Pw1tkMK1",
        licence="derived from DTD, research use; verify",
        manual=(
            "Google Drive folder (linked in the AnomalyCLIP README):\n"
            "1. Open https://drive.google.com/drive/folders/10OyPzvI3H6llCZBxKxFlKWt1Pw1tkMK1 and download it\n"
            "2. Unpack so that <folder>/<category>/{train,test,ground_truth} exist\n"
            "   (12 categories: Blotchy_099, Fibrous_183, ..., Woven_127)\n"
            "3. feclip-data check <folder> --dataset <name>"
        ),
    ),
)

#: The embedded synthetic sets: ``$DATA_ROOT/synthetic`` holds two set roots, ``set_a`` and ``set_b``;
#: the reader takes one set root.
SYNTHETIC = DatasetInfo(
    name="synthetic",
    reader=list_synthetic,
    splits=("train", "test"),
    pixel_masks=True,
    categories=(),
    layout="a set root written by feclip-data synth (e.g. <DATA_ROOT>/synthetic/set_a), MVTec layout: "
    + MVTEC_LAYOUT,
    default_dir="synthetic",
    mask_files=mask_files,
    source=Source(
        title="feclip's embedded synthetic sets (scikit-image's bundled photos)",
        homepage="feclip.data.synthetic",
        licence="the scikit-image data licences (public domain / CC0 / CC BY; see skimage.data)",
        manual="Nothing to download: feclip-data synth <folder>",
    ),
)
