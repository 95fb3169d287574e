"""Reader for DAGM 2007 (the Kaggle "DAGM 2007 competition dataset" copy).

Layout::

    <root>/Class<N>/Train/*.PNG                       N = 1..10 (a doubled Class<N>/Class<N>/ is accepted)
    <root>/Class<N>/Train/Label/<stem>_label.PNG      mask of each defective image
    <root>/Class<N>/Train/Label/Labels.txt            optional: rows "id  flag(0/1)  image  0  mask"
    <root>/Class<N>/Test/...                          the same

An image is anomalous when its ``Label/<stem>_label.*`` exists. When ``Labels.txt`` is present its
flags are cross-checked: a row flagged 1 without a mask file, or a mask for an image flagged 0, is an
error. Folders like ``Class1_def`` (the original release's defect-only copies) are not read.

Two test protocols (reader option ``protocol``):

- ``anomalyclip`` (default): ``test`` is ``Class<N>/Test/`` and ``train`` is ``Class<N>/Train/``, as
  AnomalyCLIP's ``generate_dataset_json/DAGM.py`` lists them (its DAGM numbers, which FE-CLIP compares
  with, are on ``Test/``).
- ``adaclip``: the test set AdaCLIP's ``data_preprocess/dagm-pre.py`` builds. Per class and per folder
  (``Train/``, ``Test/``): every defective image goes to ``test``, with as many normal images of the
  same folder; the remaining normal images form ``train``. AdaCLIP takes the first normal images in
  ``os.listdir`` order (arbitrary); this reader takes them in file-name order, so the counts match
  AdaCLIP's and the normal images chosen are the same only where ``os.listdir`` happened to be sorted.

The dataset is declared at the end of the module (:data:`DAGM`).
"""

from __future__ import annotations

import re
from pathlib import Path

from feclip.data.layout import Listing, MaskFinder, image_files_under, list_images, subdirs
from feclip.data.sample import Sample
from feclip.data.spec import DatasetInfo, Source, kaggle_steps
from feclip.errors import ConfigError

__all__ = ["DAGM", "PROTOCOLS", "list_dagm", "mask_files"]

_CLASS = re.compile(r"^Class\d+$")

#: Values of the reader option ``protocol``; the first is the default.
PROTOCOLS: tuple[str, ...] = ("anomalyclip", "adaclip")


def _class_dirs(root: Path) -> dict[str, Path]:
    out = {}
    for d in subdirs(root):
        if not _CLASS.match(d.name):
            continue
        nested = d / d.name
        if not (d / "Train").is_dir() and not (d / "Test").is_dir() and nested.is_dir():
            d = nested
        out[d.name] = d
    return out


def _labels_txt(path: Path) -> dict[str, int] | None:
    """Flags by image name from ``Labels.txt``; None when absent or not in the expected row format."""
    if not path.is_file():
        return None
    flags: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 1 and parts[0].isdigit():  # the header line
            continue
        if len(parts) < 3 or parts[1] not in ("0", "1"):
            return None
        flags[parts[2]] = int(parts[1])
    return flags or None


def list_dagm(job: Listing, *, protocol: str = PROTOCOLS[0]) -> list[Sample]:
    """List one split of the 10 texture classes ``Class1`` .. ``Class10``.

    Defective images are a minority (roughly one in eight). Exact counts are not quoted here (not
    verified); run ``feclip-data check``.

    Args:
        job: the listing request (see :class:`~feclip.data.layout.Listing`).
        protocol: ``"anomalyclip"`` (default: ``Test/`` is the test split) or ``"adaclip"`` (every
            defective image of ``Train/`` and ``Test/`` plus as many normal images; see the module
            docstring).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"dagm: reader option protocol must be one of {', '.join(PROTOCOLS)} "
            f"(anomalyclip: Test/ as AnomalyCLIP; adaclip: AdaCLIP's dagm-pre.py test set), got {protocol!r}"
        )
    root, split = job.root, job.split
    found = _class_dirs(root)
    if not found:
        hint = ""
        inner = [d for d in subdirs(root) if _class_dirs(d)]
        if len(inner) == 1:
            hint = f"; the Class folders are in {inner[0]}: pass that as the root"
        raise job.layout_error(f"no Class<N> folder{hint}")
    folders = ("Train", "Test") if protocol == "adaclip" else ("Train" if split == "train" else "Test",)
    samples: list[Sample] = []
    finder = MaskFinder(("_label",))
    selected = job.select(list(found))
    for category in selected:
        for folder_name in folders:
            split_dir = found[category] / folder_name
            if not split_dir.is_dir():
                raise job.layout_error(f"{category} has no {folder_name}/ folder ({split_dir})")
            listed = _list_folder(job, split_dir, category, finder)
            if protocol == "adaclip":
                listed = _adaclip_split(listed, split)
            samples.extend(listed)
    where = "/".join(folders)
    job.report_empty(selected, samples, lambda c: f"no image in {found[c] / where}")
    return samples


def _list_folder(job: Listing, split_dir: Path, category: str, finder: MaskFinder) -> list[Sample]:
    """Every image of one ``Class<N>/{Train,Test}/`` folder, labelled by its mask (and Labels.txt)."""
    label_dir = split_dir / "Label"
    flags = _labels_txt(label_dir / "Labels.txt")
    samples = []
    for image in list_images(split_dir):
        mask = finder.find(label_dir, image.stem)
        label = int(mask is not None)
        flag = flags.get(image.name) if flags else None
        if flag == 1 and mask is None:
            job.report(
                f"{job.name}: {image} is flagged defective in {label_dir / 'Labels.txt'} but its mask "
                f"{label_dir / (image.stem + '_label.PNG')} is missing",
            )
            label = 1
        elif flag == 0 and mask is not None:
            job.report(
                f"{job.name}: {image} is flagged normal in {label_dir / 'Labels.txt'} but has a mask {mask}",
            )
        samples.append(Sample(image, mask, label, category, "defect" if label else "good"))
    return samples


def _adaclip_split(samples: list[Sample], split: str) -> list[Sample]:
    """AdaCLIP's split of one folder's images: ``test`` = every defective image plus as many normal
    images (the first by file name), ``train`` = the other normal images."""
    defective = [s for s in samples if s.label == 1]
    normal = sorted((s for s in samples if s.label == 0), key=lambda s: s.image_path.name)
    if split == "test":
        return defective + normal[: len(defective)]
    return normal[len(defective) :]


def mask_files(job: Listing, **options) -> list[Path]:
    """Every ``*_label.*`` file under ``Class<N>/{Train,Test}/Label/``."""
    folders = [d / split / "Label" for d in _class_dirs(job.root).values() for split in ("Train", "Test")]
    return [p for p in image_files_under(folders) if p.stem.endswith("_label")]


#: DAGM 2007 (Wieler & Hahn), the Kaggle copy of the competition dataset.
DAGM = DatasetInfo(
    name="dagm",
    reader=list_dagm,
    splits=("train", "test"),
    pixel_masks=True,
    categories=tuple(f"Class{i}" for i in range(1, 11)),
    layout="<root>/Class<N>/{Train,Test}/*.PNG with masks "
    "<root>/Class<N>/{Train,Test}/Label/<stem>_label.PNG",
    default_dir="dagm",
    mask_files=mask_files,
    source=Source(
        title="DAGM 2007 competition dataset (Wieler & Hahn)",
        homepage="https://www.kaggle.com/datasets/mhskjelvareid/dagm-2007-competition-dataset-optical-inspection",
        licence="competition terms, non-commercial research use; verify",
        manual=kaggle_steps("mhskjelvareid/dagm-2007-competition-dataset-optical-inspection")
        + "\n   If the Class folders end up one level deeper, pass that folder as the root.",
    ),
)
