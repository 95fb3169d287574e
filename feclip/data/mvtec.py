"""Readers for the MVTec-AD layout family: ``mvtec``, ``mpdd``, ``dtd_synthetic``, ``btad``, ``synthetic``.

Layout (one folder per category)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png                      normal test images (BTAD: ok/)
    <root>/<category>/test/<defect>/*.png                  anomalous test images (BTAD: ko/)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Masks are paired by name: ``<stem>_mask.<ext>`` first, then ``<stem>.<ext>`` (BTAD and some DTD copies),
any image extension. An anomalous image without a mask is an error naming both paths.
"""

from __future__ import annotations

from pathlib import Path

from feclip.data.samples import (
    MaskFinder,
    Sample,
    image_files_under,
    layout_error,
    list_images,
    reject_options,
    report,
    report_empty_categories,
    select_categories,
    subdirs,
)

__all__ = [
    "list_btad",
    "list_dtd_synthetic",
    "list_mpdd",
    "list_mvtec",
    "list_mvtec_like",
    "list_synthetic",
    "mask_files",
]

SYNTHETIC_MARKER = ".feclip_synthetic.json"


def list_mvtec_like(
    name: str,
    root: Path,
    split: str,
    categories: list[str] | None,
    problems: list[str] | None,
    *,
    good: str = "good",
) -> list[Sample]:
    """List ``<root>/<category>/<split>/<defect>/*`` with masks from ``ground_truth/<defect>``.

    Args:
        name: dataset name, for messages.
        root: the folder holding the category folders.
        split: ``"train"`` or ``"test"``.
        categories: categories to keep, or None for all.
        problems: collect per-image problems instead of raising (see :func:`list_samples`).
        good: the folder name of normal images (``"good"``; BTAD ``"ok"``).
    """
    found = {d.name: d for d in subdirs(root) if (d / "test").is_dir() or (d / "train").is_dir()}
    if not found:
        if (root / "test").is_dir() or (root / "train").is_dir():
            raise layout_error(
                name, root, f"{root} looks like a single category folder; pass its parent folder as the root"
            )
        raise layout_error(name, root, "no category folder with a train/ or test/ sub-folder")
    samples: list[Sample] = []
    finder = MaskFinder(("_mask", ""))
    selected = select_categories(list(found), categories, name, root)
    for category in selected:
        cat_dir = found[category]
        split_dir = cat_dir / split
        if not split_dir.is_dir():
            raise layout_error(name, root, f"category {category!r} has no {split}/ folder ({split_dir})")
        for defect_dir in subdirs(split_dir):
            defect = defect_dir.name
            label = 0 if defect == good else 1
            gt_dir = cat_dir / "ground_truth" / defect
            for image in list_images(defect_dir):
                mask = None
                if label == 1:
                    mask = finder.find(gt_dir, image.stem)
                    if mask is None:
                        report(
                            problems,
                            f"{name}: anomalous image {image} has no mask; expected "
                            f"{gt_dir / (image.stem + '_mask.png')} (or {image.stem}.<ext> in {gt_dir})",
                        )
                samples.append(Sample(image, mask, label, category, defect))
    report_empty_categories(
        name, split, selected, samples, problems, lambda c: f"no image in {found[c] / split}/<defect>/"
    )
    return samples


def list_mvtec(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """MVTec AD (Bergmann et al., CVPR 2019), CC BY-NC-SA 4.0.

    Real counts: 15 categories; train 3,629 images (all good); test 1,725 images = 467 good + 1,258
    anomalous, e.g. bottle 83 (20 good), cable 150 (58), capsule 132 (23), carpet 117 (28), grid 78 (21),
    hazelnut 110 (40), leather 124 (32), metal_nut 115 (22), pill 167 (26), screw 160 (41),
    tile 117 (33), toothbrush 42 (12), transistor 100 (60), wood 79 (19), zipper 151 (32).
    Masks ``<stem>_mask.png`` (0/255); grayscale images in grid, screw and zipper.
    """
    reject_options("mvtec", options)
    return list_mvtec_like("mvtec", root, split, categories, problems)


def list_mpdd(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """MPDD, Metal Parts Defect Detection (Jezek et al., 2021), CC BY-NC-SA 4.0; MVTec layout.

    6 categories: bracket_black, bracket_brown, bracket_white, connector, metal_plate, tubes.
    Counts are not quoted here (not verified); run ``feclip-data check ROOT --dataset mpdd``.
    """
    reject_options("mpdd", options)
    return list_mvtec_like("mpdd", root, split, categories, problems)


def list_dtd_synthetic(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """DTD-Synthetic (Aota et al., WACV 2023); MVTec layout.

    12 texture categories (Blotchy_099, Fibrous_183, Marbled_078, Matted_069, Mesh_114, Perforated_037,
    Stratified_154, Woven_001, Woven_068, Woven_104, Woven_125, Woven_127). Counts are not quoted here
    (not verified); run ``feclip-data check``. Masks ``<stem>_mask.png`` or ``<stem>.png``.
    """
    reject_options("dtd_synthetic", options)
    return list_mvtec_like("dtd_synthetic", root, split, categories, problems)


def list_btad(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """BTAD / BTech (Mishra et al., 2021), CC BY-NC-SA 4.0.

    3 products ``01``, ``02``, ``03``; normal folder ``ok``, anomalous ``ko``; images ``.bmp`` or ``.png``
    depending on the product, masks in ``ground_truth/ko/`` with the same stem (either extension).
    The root may be the folder holding ``BTech_Dataset_transformed/`` (as unzipped) or that folder itself.
    Counts are not quoted here (not verified); run ``feclip-data check``.
    """
    reject_options("btad", options)
    inner = root / "BTech_Dataset_transformed"
    if inner.is_dir() and not any((root / c).is_dir() for c in ("01", "02", "03")):
        root = inner
    return list_mvtec_like("btad", root, split, categories, problems, good="ok")


def list_synthetic(root: Path, split: str, categories, problems, **options) -> list[Sample]:
    """The embedded synthetic sets (:mod:`feclip.data.synthetic`): the MVTec reader on one set root.

    Counts follow the generator's parameters: per category ``n_train_good`` train images and
    ``n_test_good`` + ``n_test_bad`` test images (defaults 10, 12 and 24).
    """
    reject_options("synthetic", options)
    sets = [d.name for d in subdirs(root) if (d / SYNTHETIC_MARKER).is_file()]
    if sets:
        raise layout_error(
            "synthetic",
            root,
            f"{root} holds the synthetic sets {', '.join(sets)}; pass one set root, e.g. {root / sets[0]}",
        )
    return list_mvtec_like("synthetic", root, split, categories, problems)


def mask_files(root: Path, **options) -> list[Path]:
    """Every file under ``<root>/<category>/ground_truth/`` (for the masks-without-images check)."""
    inner = root / "BTech_Dataset_transformed"
    if inner.is_dir():
        root = inner
    return image_files_under(d / "ground_truth" for d in subdirs(root))
