"""Reader for VisA (Zou et al., ECCV 2022), listed from the official split file ``split_csv/1cls.csv``.

Layout::

    <root>/split_csv/1cls.csv                    columns: object, split, label, image, mask
    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png   NOT 0/255: binarise with > 0

Paths in the csv are relative to the root; ``label`` is ``normal`` or ``anomaly``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from feclip.data.samples import (
    Sample,
    image_files_under,
    layout_error,
    report,
    report_empty_categories,
    select_categories,
    subdirs,
)

__all__ = ["list_visa", "mask_files"]

_COLUMNS = ("object", "split", "label", "image", "mask")


def list_visa(
    root: Path,
    split: str,
    categories: list[str] | None,
    problems: list[str] | None,
    *,
    split_file: str = "1cls",
) -> list[Sample]:
    """VisA, CC BY 4.0 (per the official amazon-science/spot-diff README).

    Real counts (1cls split): 12 categories, 10,821 images = 9,621 normal + 1,200 anomalous (100 per
    category). Test 2,162 = 962 normal + 1,200 anomalous: candle 200, capsules 160, cashew 150,
    chewinggum 150, fryum 150, macaroni1 200, macaroni2 200, pcb1 200, pcb2 200, pcb3 201, pcb4 201,
    pipe_fryum 150 (each with 100 anomalous). Train 8,659 normal images.

    Args:
        split_file: the csv under ``split_csv/`` without ``.csv`` (``1cls``, ``2cls_highshot``, ...).
    """
    csv_path = root / "split_csv" / f"{split_file}.csv"
    if not csv_path.is_file():
        hint = ""
        if any((d / "test").is_dir() for d in subdirs(root)):
            hint = " (this root has <category>/test/ folders: for a VisA copy converted to MVTec layout use --dataset mvtec)"
        raise layout_error("visa", root, f"split file {csv_path} not found{hint}")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or []) if h is not None]
            missing = [c for c in _COLUMNS if c not in header]
            if missing:
                raise layout_error(
                    "visa",
                    root,
                    f"{csv_path} lacks column(s) {', '.join(missing)}; found {', '.join(header) or 'no header'}",
                )
            rows = [_clean(row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise layout_error("visa", root, f"{csv_path} is not a readable csv file ({err})") from None
    found = sorted({row["object"] for row in rows if row["object"]})
    selected = select_categories(found, categories, "visa", root)
    wanted = set(selected)
    samples: list[Sample] = []
    for line_no, row in enumerate(rows, start=2):
        if row["split"] != split or row["object"] not in wanted:
            continue
        where = f"{csv_path} line {line_no}"
        if row["label"] not in ("normal", "anomaly"):
            report(problems, f"visa: {where}: label {row['label']!r} is neither 'normal' nor 'anomaly'")
            continue
        label = int(row["label"] == "anomaly")
        image = root / row["image"]
        if not row["image"] or not image.is_file():
            report(problems, f"visa: {where}: image {image} not found")
            continue
        mask = None
        if label == 1:
            mask = root / row["mask"] if row["mask"] else None
            if mask is None or not mask.is_file():
                report(
                    problems,
                    f"visa: {where}: anomalous image {image} has no mask"
                    + (f" ({mask} not found)" if mask is not None else " (empty mask column)"),
                )
                mask = None
        samples.append(Sample(image, mask, label, row["object"], "anomaly" if label else "good"))
    report_empty_categories(
        "visa", split, selected, samples, problems, lambda c: f"no row with split {split!r} in {csv_path}"
    )
    return samples


def _clean(row: dict) -> dict[str, str]:
    """A csv row with stripped keys and values; missing cells are empty strings."""
    out = {k.strip(): (v if isinstance(v, str) else "").strip() for k, v in row.items() if k is not None}
    for column in _COLUMNS:
        out.setdefault(column, "")
    return out


def mask_files(root: Path, **options) -> list[Path]:
    """Every file under ``<root>/<category>/Data/Masks/``."""
    return image_files_under(d / "Data" / "Masks" for d in subdirs(root))
