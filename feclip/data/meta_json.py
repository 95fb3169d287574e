"""Reader for an AnomalyCLIP / APRIL-GAN ``meta.json`` (any dataset already converted to that convention).

Format::

    <root>/meta.json = {"train": {<cls>: [item, ...]}, "test": {<cls>: [item, ...]}}
    item = {"img_path": <relative to root>, "mask_path": <relative, or "">, "cls_name": str,
            "specie_name": <defect or "">, "anomaly": 0 | 1}

Keys ``Train``/``Test`` (AnomalyCLIP's DAGM script) are accepted. An anomalous item whose
``mask_path`` is empty or a folder has no mask (image-level item, as in AnomalyCLIP's loader); a
``mask_path`` naming a file that does not exist is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from feclip.data.samples import Sample, layout_error, report, select_categories

__all__ = ["list_meta_json"]


def list_meta_json(
    root: Path,
    split: str,
    categories: list[str] | None,
    problems: list[str] | None,
    *,
    meta_file: str = "meta.json",
) -> list[Sample]:
    """List the ``split`` entries of ``<root>/<meta_file>``; counts are whatever the file lists.

    Args:
        meta_file: the json file name, relative to the root.
    """
    path = root / meta_file
    if not path.is_file():
        raise layout_error("meta_json", root, f"{path} not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise layout_error("meta_json", root, f"{path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise layout_error("meta_json", root, f"{path} does not hold a JSON object")
    key = split if split in meta else split.capitalize() if split.capitalize() in meta else None
    if key is None:
        raise layout_error(
            "meta_json", root, f"{path} has no {split!r} key (keys: {', '.join(map(str, meta))})"
        )
    by_class = meta[key]
    if not isinstance(by_class, dict):
        raise layout_error("meta_json", root, f"{path}: {key!r} is not an object of class -> list of items")
    wanted = set(select_categories([str(c) for c in by_class], categories, "meta_json", root))
    samples: list[Sample] = []
    for cls, items in by_class.items():
        if str(cls) not in wanted:
            continue
        if not isinstance(items, list):
            raise layout_error("meta_json", root, f"{path}: {key}/{cls} is not a list of items")
        for n, item in enumerate(items):
            where = f"{path} [{key}][{cls}][{n}]"
            if not isinstance(item, dict) or "img_path" not in item or "anomaly" not in item:
                report(problems, f"meta_json: {where}: item lacks 'img_path' or 'anomaly'")
                continue
            try:
                label = int(item["anomaly"])
            except (TypeError, ValueError):
                label = -1
            if label not in (0, 1):
                report(problems, f"meta_json: {where}: 'anomaly' is {item['anomaly']!r}, not 0 or 1")
                continue
            image = root / str(item["img_path"])
            if not image.is_file():
                report(problems, f"meta_json: {where}: image {image} not found")
                continue
            mask = None
            mask_rel = str(item.get("mask_path") or "")
            if label == 1 and mask_rel:
                candidate = root / mask_rel
                if candidate.is_file():
                    mask = candidate
                elif not candidate.is_dir():
                    report(
                        problems, f"meta_json: {where}: mask {candidate} of anomalous image {image} not found"
                    )
            defect = str(item.get("specie_name") or ("anomaly" if label else "good"))
            samples.append(Sample(image, mask, label, str(item.get("cls_name") or cls), defect))
    return samples
