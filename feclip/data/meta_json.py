"""Reader for an AnomalyCLIP / APRIL-GAN ``meta.json`` (any dataset already converted to that convention).

Format::

    <root>/meta.json = {"train": {<cls>: [item, ...]}, "test": {<cls>: [item, ...]}}
    item = {"img_path": <relative to root>, "mask_path": <relative, or "">, "cls_name": str,
            "specie_name": <defect or "">, "anomaly": 0 | 1}

Keys ``Train``/``Test`` (AnomalyCLIP's DAGM script) are accepted; a file may hold only one of them
(listing the other split raises :class:`~feclip.data.layout.EmptyDatasetError`). An anomalous item
whose ``mask_path`` is empty or a folder has no mask (image-level item, as in AnomalyCLIP's loader); a
``mask_path`` naming a file that does not exist is an error. Every item is type-checked: ``anomaly`` must
be 0 or 1 (``"0"``/``"1"`` and booleans accepted), ``img_path`` a non-empty string, ``mask_path`` a string
or null; a wrong item is an error naming the file, the key path and the item's index.

The split ``reference`` is not in the file: it is the images of ``<root>/reference/<category>/``, normal
images kept for few-shot references (docs/fewshot.md), one folder per category as the items'
``cls_name`` names it; a category without a folder has none. The dataset is declared at the end of the
module (:data:`META_JSON`).
"""

from __future__ import annotations

import json
from pathlib import Path

from feclip.data.layout import EmptyDatasetError, Listing, child_dir, list_images, subdirs
from feclip.data.sample import Sample
from feclip.data.spec import DatasetInfo

__all__ = ["META_JSON", "REFERENCE_DIR", "list_meta_json"]

#: The folder of the few-shot reference images, one sub-folder per category.
REFERENCE_DIR = "reference"


def _label(value) -> int | None:
    """0 or 1 from a JSON value (0, 1, true, false, "0", "1", 0.0, 1.0); None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return None


def list_meta_json(job: Listing, *, meta_file: str = "meta.json") -> list[Sample]:
    """List the ``split`` entries of ``<root>/<meta_file>``; counts are whatever the file lists.

    Args:
        job: the listing request (see :class:`~feclip.data.layout.Listing`).
        meta_file: the json file name, relative to the root.
    """
    root, split = job.root, job.split
    if split == "reference":
        return _list_references(job)
    path = root / meta_file
    if not path.is_file():
        raise job.layout_error(f"{path} not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise job.layout_error(f"{path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise job.layout_error(
            f"{path} holds a JSON {type(meta).__name__}, not an object with 'train'/'test' keys"
        )
    key = split if split in meta else split.capitalize() if split.capitalize() in meta else None
    if key is None:
        raise EmptyDatasetError(
            f"{job.name}: {path} has no {split!r} key (keys: {', '.join(map(str, meta)) or 'none'}): "
            f"no {split} split; expected layout: {job.info.layout}"
        )
    by_class = meta[key]
    if not isinstance(by_class, dict):
        raise job.layout_error(
            f"{path}: {key!r} holds a JSON {type(by_class).__name__}, not an object of class -> list of items"
        )
    selected = job.select([str(c) for c in by_class])
    wanted = set(selected)
    samples: list[Sample] = []
    for cls, items in by_class.items():
        if str(cls) not in wanted:
            continue
        if not isinstance(items, list):
            raise job.layout_error(
                f"{path}: [{key}][{cls}] holds a JSON {type(items).__name__}, not a list of items"
            )
        for n, item in enumerate(items):
            sample = _item(job, path, f"[{key}][{cls}][{n}]", item, str(cls))
            if sample is not None:
                samples.append(sample)
    # the category of an item is its cls_name (the class key when absent): count by the key here
    listed = {str(cls) for cls, items in by_class.items() if isinstance(items, list) and items}
    job.report_empty(
        [c for c in selected if c not in listed], [], lambda c: f"[{key}][{c}] is an empty list in {path}"
    )
    return samples


def _list_references(job: Listing) -> list[Sample]:
    """The images of ``<root>/reference/<category>/`` (normal), for the wanted categories that have one."""
    folder = child_dir(job.root, REFERENCE_DIR)
    if folder is None:
        return []
    loose = list_images(folder)
    if loose:
        raise job.layout_error(
            f"{len(loose)} image file(s) directly in {folder} (e.g. {loose[0].name}); few-shot reference "
            f"images go in {folder}/<category>/"
        )
    by_category = {d.name: d for d in subdirs(folder)}
    wanted = job.categories if job.categories is not None else list(by_category)
    return [
        Sample(image, None, 0, category, REFERENCE_DIR)
        for category in job.select([c for c in wanted if c in by_category])
        for image in list_images(by_category[category])
    ]


def _item(job: Listing, path: Path, index: str, item, cls: str) -> Sample | None:
    """The sample of one item, or None after reporting what is wrong with it."""
    root = job.root
    where = f"{job.name}: {path} {index}"
    if not isinstance(item, dict):
        job.report(f"{where}: the item is a JSON {type(item).__name__}, not an object")
        return None
    missing = [k for k in ("img_path", "anomaly") if k not in item]
    if missing:
        job.report(f"{where}: the item lacks {' and '.join(repr(k) for k in missing)}")
        return None
    label = _label(item["anomaly"])
    if label is None:
        job.report(f"{where}: 'anomaly' is {item['anomaly']!r}, expected 0 or 1")
        return None
    img_rel = item["img_path"]
    if not isinstance(img_rel, str) or not img_rel.strip():
        job.report(f"{where}: 'img_path' is {img_rel!r}, expected a path (a non-empty string)")
        return None
    image = root / img_rel
    if not image.is_file():
        job.report(f"{where}: image {image} not found")
        return None
    mask_rel = item.get("mask_path")
    if mask_rel is not None and not isinstance(mask_rel, str):
        job.report(f"{where}: 'mask_path' is {mask_rel!r}, expected a path (a string) or ''")
        return None
    mask = None
    if label == 1 and mask_rel and mask_rel.strip():
        candidate = root / mask_rel
        if candidate.is_file():
            mask = candidate
        elif not candidate.is_dir():
            job.report(f"{where}: mask {candidate} of anomalous image {image} not found")
    category = item.get("cls_name")
    category = str(category) if isinstance(category, (str, int)) and str(category) else cls
    defect = item.get("specie_name")
    defect = (
        str(defect) if isinstance(defect, (str, int)) and str(defect) else ("anomaly" if label else "good")
    )
    return Sample(image, mask, label, category, defect)


#: Any dataset already converted to the AnomalyCLIP / APRIL-GAN ``meta.json`` convention (the user's own
#: path: no default folder, no download).
META_JSON = DatasetInfo(
    name="meta_json",
    reader=list_meta_json,
    splits=("train", "test", "reference"),
    pixel_masks=None,
    categories=(),
    layout='<root>/meta.json = {"train"|"test": {<cls>: [{"img_path", "mask_path", "cls_name", '
    '"specie_name", "anomaly"}]}} with paths relative to <root>; optional few-shot references in '
    "<root>/reference/<cls_name>/*.png",
    takes_mask_threshold=True,
)
