""":func:`list_samples`: list one split of a dataset through its reader, after checking the request.

The dataset name is looked up in the catalogue (:mod:`feclip.data.catalogue`); the split, the root, the
categories and the reader options are checked here, once for every reader, so a reader only reads its
layout (:mod:`feclip.data.layout`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from feclip.data.catalogue import dataset_info
from feclip.data.layout import EmptyDatasetError, Listing
from feclip.data.sample import Sample, sort_samples
from feclip.data.spec import MASK_THRESHOLD
from feclip.errors import ConfigError, DatasetError

__all__ = ["MASK_OPTIONS", "check_reader_options", "list_samples", "listing_options", "parse_mask_threshold"]

#: Reader options that change how masks are binarised, not what is listed. :func:`list_samples` applies
#: them itself (every listed :class:`Sample` carries the value), so readers never see them.
MASK_OPTIONS: tuple[str, ...] = (MASK_THRESHOLD,)


def list_samples(
    name: str,
    root: str | Path,
    split: str = "test",
    categories: str | Iterable[str] | None = None,
    *,
    problems: list[str] | None = None,
    **options,
) -> list[Sample]:
    """List the images of one dataset split, sorted by (category, path).

    Args:
        name: one of :data:`feclip.data.DATASETS`.
        root: the dataset root (e.g. ``$DATA_ROOT/mvtec``); see each reader for the layout.
        split: ``"test"`` (default) or ``"train"`` where the layout has one.
        categories: a category name or names to keep (default: all); an unknown name is an error.
        problems: when given, per-image problems (a missing mask, a missing file) are appended to this
            list instead of raised, and the affected images are still listed (mask_path None); layout
            errors are always raised. :func:`feclip.data.check.check_dataset` uses this.
        **options: reader options, each a string (e.g. ``split_file="2cls_highshot"`` for VisA,
            ``meta_file`` for ``meta_json``, ``good_dir``/``category`` for ``folder``,
            ``protocol="adaclip"`` for DAGM); ``mask_threshold`` (an int in [0, 254], or its digits)
            for ``kvasir``, ``clinicdb``, ``folder`` and ``meta_json`` sets every listed sample's
            :attr:`Sample.mask_threshold`. The other readers take none (:attr:`DatasetInfo.options`).

    Returns:
        list[Sample], never empty.

    Raises:
        ConfigError: unknown dataset name, split or reader option; an option or ``categories`` of the
            wrong type.
        DatasetError: missing root, wrong layout, unknown category, a category without images in the
            split, missing file or mask, no images.
    """
    info = dataset_info(name)
    if split not in info.splits:
        raise ConfigError(f"{name} has no split {split!r}; it has: {', '.join(info.splits)}")
    check_reader_options(name, options, info.options)
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise ConfigError(f"{name}: the dataset root must be a folder path, got {root!r}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{name}: dataset root {root} does not exist; expected layout: {info.layout}")
    if not root.is_dir():
        raise DatasetError(f"{name}: dataset root {root} is not a folder; expected layout: {info.layout}")
    wanted = _as_category_list(categories, name)
    samples = info.reader(Listing(info, root, split, wanted, problems), **listing_options(options))
    if not samples:
        which = f" for categories {wanted}" if wanted else ""
        raise EmptyDatasetError(
            f"{name}: no {split} images found under {root}{which}; expected layout: {info.layout}"
        )
    if MASK_THRESHOLD in options:
        threshold = parse_mask_threshold(options[MASK_THRESHOLD], name)
        samples = [dataclasses.replace(s, mask_threshold=threshold) for s in samples]
    return sort_samples(samples)


def listing_options(options: dict) -> dict:
    """The reader options that change what is listed: ``options`` without :data:`MASK_OPTIONS`
    (those are applied by :func:`list_samples` to every listed sample)."""
    return {k: v for k, v in options.items() if k not in MASK_OPTIONS}


def _as_category_list(categories: str | Iterable[str] | None, name: str = "") -> list[str] | None:
    """``categories`` as a list of names (None for all); a wrong type is a :class:`ConfigError`."""
    if categories is None:
        return None
    if isinstance(categories, str):
        return [categories]
    if isinstance(categories, (bytes, dict)) or not isinstance(categories, Iterable):
        raise ConfigError(
            f"{name}: categories must be a category name or a list of names, got {categories!r} "
            f"({type(categories).__name__})"
        )
    out = []
    for c in categories:
        if isinstance(c, bool) or not isinstance(c, (str, int)):
            raise ConfigError(f"{name}: categories must be names (strings), got {c!r} ({type(c).__name__})")
        out.append(str(c))
    return out or None


def check_reader_options(name: str, options: dict, accepted: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` for an option of reader ``name`` that is not in ``accepted``, or whose
    value is not a non-empty string (options come from YAML, where ``good_dir: 0`` is a number)."""
    unknown = sorted(str(k) for k in options if k not in accepted)
    if unknown:
        takes = f"accepts: {', '.join(accepted)}" if accepted else "accepts no options"
        raise ConfigError(
            f"{name}: unknown reader option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the {name} reader {takes}"
        )
    for key, value in options.items():
        if key in MASK_OPTIONS:
            parse_mask_threshold(value, name)
            continue
        if not isinstance(value, str) or not value.strip():
            quote = (
                f"; in YAML quote it: {key}: '{value}'"
                if isinstance(value, (int, float)) and not isinstance(value, bool)
                else ""
            )
            raise ConfigError(
                f"{name}: reader option {key} must be a non-empty string, got {value!r} "
                f"({type(value).__name__}){quote}"
            )


def parse_mask_threshold(value, name: str = "") -> int:
    """The ``mask_threshold`` option as an int in [0, 254] (an int, or a string of digits from the
    command line); anything else is a :class:`ConfigError`."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or not 0 <= number <= 254:
        raise ConfigError(
            f"{name}: reader option mask_threshold must be an integer in [0, 254] (a mask pixel is "
            f"anomalous when its gray value is > mask_threshold), got {value!r}"
        )
    return number
