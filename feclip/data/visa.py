"""Reader for VisA (Zou et al., ECCV 2022), listed from the official split file ``split_csv/1cls.csv``.

Layout::

    <root>/split_csv/1cls.csv                    columns: object, split, label, image, mask
    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png   NOT 0/255: binarise with > 0

Paths in the csv are relative to the root; ``label`` is ``normal`` or ``anomaly``. The dataset is
declared at the end of the module (:data:`VISA`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from feclip.data.layout import Listing, image_files_under, subdirs
from feclip.data.sample import Sample
from feclip.data.spec import ANOMALIB_DOWNLOAD_INFO, DatasetInfo, OfficialCounts, Source

__all__ = ["VISA", "VISA_CATEGORIES", "list_visa", "mask_files"]

_COLUMNS = ("object", "split", "label", "image", "mask")


def list_visa(job: Listing, *, split_file: str = "1cls") -> list[Sample]:
    """List the rows of one split of ``<root>/split_csv/<split_file>.csv``.

    Real counts (1cls split): 10,821 images = 9,621 normal + 1,200 anomalous (100 per category); train
    8,659 normal images; the published test counts are those of :data:`VISA`.

    Args:
        job: the listing request (see :class:`~feclip.data.layout.Listing`).
        split_file: the csv under ``split_csv/`` without ``.csv`` (``1cls``, ``2cls_highshot``, ...).
    """
    root, split = job.root, job.split
    csv_path = root / "split_csv" / f"{split_file}.csv"
    if not csv_path.is_file():
        hint = ""
        if any((d / "test").is_dir() for d in subdirs(root)):
            hint = " (this root has <category>/test/ folders: for a VisA copy converted to MVTec layout use --dataset mvtec)"
        raise job.layout_error(f"split file {csv_path} not found{hint}")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or []) if h is not None]
            missing = [c for c in _COLUMNS if c not in header]
            if missing:
                raise job.layout_error(
                    f"{csv_path} lacks column(s) {', '.join(missing)}; "
                    f"found {', '.join(header) or 'no header'}",
                )
            rows = [_clean(row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise job.layout_error(f"{csv_path} is not a readable csv file ({err})") from None
    found = sorted({row["object"] for row in rows if row["object"]})
    selected = job.select(found)
    wanted = set(selected)
    samples: list[Sample] = []
    for line_no, row in enumerate(rows, start=2):
        if row["split"] != split or row["object"] not in wanted:
            continue
        where = f"{csv_path} line {line_no}"
        if row["label"] not in ("normal", "anomaly"):
            job.report(f"{job.name}: {where}: label {row['label']!r} is neither 'normal' nor 'anomaly'")
            continue
        label = int(row["label"] == "anomaly")
        image = root / row["image"]
        if not row["image"] or not image.is_file():
            job.report(f"{job.name}: {where}: image {image} not found")
            continue
        mask = None
        if label == 1:
            mask = root / row["mask"] if row["mask"] else None
            if mask is None or not mask.is_file():
                job.report(
                    f"{job.name}: {where}: anomalous image {image} has no mask"
                    + (f" ({mask} not found)" if mask is not None else " (empty mask column)"),
                )
                mask = None
        samples.append(Sample(image, mask, label, row["object"], "anomaly" if label else "good"))
    job.report_empty(selected, samples, lambda c: f"no row with split {split!r} in {csv_path}")
    return samples


def _clean(row: dict) -> dict[str, str]:
    """A csv row with stripped keys and values; missing cells are empty strings."""
    out = {k.strip(): (v if isinstance(v, str) else "").strip() for k, v in row.items() if k is not None}
    for column in _COLUMNS:
        out.setdefault(column, "")
    return out


def mask_files(job: Listing, **options) -> list[Path]:
    """Every file under ``<root>/<category>/Data/Masks/``."""
    return image_files_under(d / "Data" / "Masks" for d in subdirs(job.root))


# ----------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
    "pcb4", "pipe_fryum",
)  # fmt: skip

#: VisA, Visual Anomaly (Zou et al., ECCV 2022). Published test counts: the official split_csv/1cls.csv
#: (100 anomalous images per category), 2,162 = 962 + 1,200.
VISA = DatasetInfo(
    name="visa",
    reader=list_visa,
    splits=("train", "test"),
    pixel_masks=True,
    categories=VISA_CATEGORIES,
    layout="<root>/split_csv/1cls.csv (columns object,split,label,image,mask) and "
    "<root>/<category>/Data/{Images/{Normal,Anomaly}/*.JPG, Masks/Anomaly/*.png}",
    default_dir="visa",
    mask_files=mask_files,
    test_counts=OfficialCounts(
        962,
        1200,
        (
            ("candle", 100, 100),
            ("capsules", 60, 100),
            ("cashew", 50, 100),
            ("chewinggum", 50, 100),
            ("fryum", 50, 100),
            ("macaroni1", 100, 100),
            ("macaroni2", 100, 100),
            ("pcb1", 100, 100),
            ("pcb2", 100, 100),
            ("pcb3", 101, 100),
            ("pcb4", 101, 100),
            ("pipe_fryum", 50, 100),
        ),
        "the official split_csv/1cls.csv (amazon-science/spot-diff)",
    ),
    source=Source(
        title="VisA, Visual Anomaly (Zou et al., ECCV 2022)",
        homepage="https://github.com/amazon-science/spot-diff",
        licence="CC BY 4.0 (official README; anomalib's docstring says CC BY-NC-SA 4.0)",
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        filename="VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        checksum_source=ANOMALIB_DOWNLOAD_INFO + "visa.py",
        manual=(
            "1. Download https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar\n"
            "2. mkdir -p <folder> && tar -xf VisA_20220922.tar -C <folder>\n"
            "3. feclip-data check <folder> --dataset <name>"
        ),
    ),
)
