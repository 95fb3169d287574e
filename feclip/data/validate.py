"""Checks a run makes on its listings before any training: can each target give valid metrics, can
the training set train, can few-shot find its references?

A run lists every dataset first, then calls, before building a model::

    warnings = check_train(train_name, train_samples)            # the auxiliary training set
    for ref, samples in targets:
        warnings += check_target(ref.name, samples)              # every evaluation target
        if k: warnings += check_fewshot(ref.name, pool, categories, k)

Each raises :class:`feclip.errors.DatasetError` with one line naming the dataset, the category and,
where relevant, the file, and otherwise returns warnings (strings) to log. ``feclip-data check`` uses
the same rules (:func:`target_problems`, :func:`file_problems`), so the two never disagree.

Rules for an evaluation target (per category; the metrics return ``nan`` rather than raise, so without
these checks a wrong category would only show as ``nan`` hours later):

- no anomalous image: every metric is undefined (image AUROC needs both classes, pixel metrics need
  anomalous pixels): error;
- no normal image: image-level metrics are undefined; with pixel masks the pixel metrics still are
  (CVC-ClinicDB, Kvasir: all abnormal): warning; without masks nothing is defined: error;
- anomalous images with masks and others without: pixel metrics would be wrong (the unmasked defects
  would count as normal pixels): error, the rule :class:`~feclip.data.dataset.AnomalyDataset` applies;
  a category with no mask at all is image level (BrainMRI, Br35H, a ``folder`` without masks): fine;
- the same image listed twice: error (it would be counted twice);
- JPEG masks binarised with ``> 0`` (mask threshold 0): warning (JPEG compression noise around the
  defect and in the background counts as anomalous; Kvasir-SEG's masks are JPEGs: set the reader
  option ``mask_threshold: 127``); the training set gets the same warning;
- an image or mask whose header cannot be read, an empty or cut-off file, a mask whose size differs from
  its image's: error (headers only, in threads: a few thousand files take about a second).

Why one module of about 400 lines: these rules are the one statement of what a listing must satisfy,
shared by the run and ``feclip-data check`` (:mod:`feclip.data.check`); split up, the per-category
grouping, the file checks and the one-line messages they share would be imported back and forth.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from feclip.data.catalogue import BY_NAME
from feclip.data.sample import Sample, natural_key
from feclip.errors import ConfigError, DatasetError, FEClipError

__all__ = [
    "check_fewshot",
    "check_target",
    "check_train",
    "file_problems",
    "jpeg_mask_warnings",
    "read_sizes",
    "target_problems",
    "train_problems",
]


def _threads() -> int:
    return min(16, 4 * (os.cpu_count() or 1))


def _one_line(errors: list[str], name: str) -> str:
    """The first error, plus how many more there are."""
    first = " ".join(errors[0].split())
    if len(errors) == 1:
        return first
    return (
        f"{first} (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in {name}; "
        "`feclip-data check ROOT --dataset NAME` lists them all)"
    )


def _by_category(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.category].append(s)
    return {c: groups[c] for c in sorted(groups, key=natural_key)}


JPEG_SUFFIXES = (".jpg", ".jpeg")


def jpeg_mask_warnings(name: str, samples: Sequence[Sample]) -> list[str]:
    """A warning when masks stored as JPEG are binarised with ``> 0``: JPEG's lossy compression leaves
    values just above 0 around the defect (and sometimes in the background), which ``> 0`` counts as
    anomalous, so the masks grow."""
    jpeg = [
        s
        for s in samples
        if s.mask_path is not None
        and Path(s.mask_path).suffix.lower() in JPEG_SUFFIXES
        and getattr(s, "mask_threshold", 0) == 0
    ]
    if not jpeg:
        return []
    info = BY_NAME.get(name)
    if info is not None and "mask_threshold" in info.options:
        fix = (
            f"set the reader option mask_threshold (run config: options: {{mask_threshold: 127}} on the "
            f"{name} entry; feclip-data check: --option mask_threshold=127)"
        )
    else:
        fix = "binarise them with AnomalyDataset(mask_threshold=127), or convert them to PNG first"
    return [
        f"{name}: {len(jpeg)} mask{'s are JPEG files' if len(jpeg) > 1 else ' is a JPEG file'} (e.g. "
        f"{jpeg[0].mask_path}) binarised with > 0: JPEG compression noise counts as anomalous and enlarges "
        f"the masks; {fix}"
    ]


def _duplicates(name: str, samples: Sequence[Sample]) -> list[str]:
    counts = Counter(Path(s.image_path) for s in samples)
    return [
        f"{name}: image {path} is listed {n} times; it would be counted {n} times in the metrics"
        for path, n in counts.items()
        if n > 1
    ]


# ----------------------------------------------------------------------------------------------------
# Rules without file access
# ----------------------------------------------------------------------------------------------------


def target_problems(name: str, samples: Sequence[Sample]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of an evaluation target from its listing alone (no file is opened).

    Args:
        name: the dataset name, for the messages (and its registry entry, when it has one).
        samples: the target's listing (any order).
    """
    errors: list[str] = []
    warnings: list[str] = []
    if not samples:
        return [f"{name}: no images to evaluate"], []
    info = BY_NAME.get(name)
    image_level: list[str] = []
    with_masks: list[str] = []
    for category, group in _by_category(samples).items():
        normal = [s for s in group if s.label == 0]
        bad = [s for s in group if s.label == 1]
        other = [s for s in group if s.label not in (0, 1)]
        if other:
            errors.append(
                f"{name}: category {category!r}: image {other[0].image_path} has label {other[0].label!r}, "
                "expected 0 (normal) or 1 (anomalous)"
            )
            continue
        masked = [s for s in bad if s.mask_path is not None]
        unmasked = [s for s in bad if s.mask_path is None]
        if not bad:
            errors.append(
                f"{name}: category {category!r} has no anomalous images ({len(normal)} normal): image AUROC "
                "and every pixel metric are undefined (nan) for it; add anomalous images or leave the "
                "category out (categories=...)"
            )
            continue
        if masked and unmasked:
            errors.append(
                f"{name}: category {category!r} mixes anomalous images with masks ({len(masked)}, e.g. "
                f"{masked[0].image_path}) and without ({len(unmasked)}, e.g. {unmasked[0].image_path}); "
                "pixel metrics would be wrong: give every anomalous image its mask, or none"
            )
            continue
        has_masks = not unmasked
        (with_masks if has_masks else image_level).append(category)
        if not normal:
            if has_masks:
                warnings.append(
                    f"{name}: category {category!r} has no normal images ({len(bad)} anomalous): its "
                    "image-level metrics are undefined (nan); its pixel metrics are computed from the masks"
                )
            else:
                errors.append(
                    f"{name}: category {category!r} has no normal images and no pixel masks ({len(bad)} "
                    "anomalous): image AUROC needs normal images and pixel metrics need masks, so no "
                    "metric is defined for it"
                )
    if image_level and (info is None or info.pixel_masks is not False):
        warnings.append(
            f"{name}: no pixel masks in categor{'y' if len(image_level) == 1 else 'ies'} "
            f"{', '.join(image_level)}: image-level metrics only there (pixel metrics are skipped)"
        )
    if image_level and with_masks:
        warnings.append(
            f"{name}: some categories have pixel masks and others ({', '.join(image_level)}) do not: the "
            "pooled __micro__ row has no pixel metrics"
        )
    warnings.extend(jpeg_mask_warnings(name, samples))
    errors.extend(_duplicates(name, samples))
    return errors, warnings


def train_problems(name: str, samples: Sequence[Sample]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the auxiliary training set from its listing alone.

    The training loss (:func:`feclip.losses.feclip_loss`) is a BCE on the image label plus focal and
    dice losses against each image's mask, zeros for a normal image. So it needs anomalous images, each
    with its mask: an anomalous image without one would teach that its defect is normal.
    """
    if not samples:
        return [f"{name}: the training set has no images"], []
    errors: list[str] = []
    warnings: list[str] = []
    bad = [s for s in samples if s.label == 1]
    normal = [s for s in samples if s.label == 0]
    other = [s for s in samples if s.label not in (0, 1)]
    if other:
        errors.append(
            f"{name}: training image {other[0].image_path} has label {other[0].label!r}, expected 0 or 1"
        )
    if not bad:
        errors.append(
            f"{name}: the training set has no anomalous images ({len(normal)} normal): the training loss "
            "needs anomalous images with pixel masks (the paper trains on the test split of MVTec AD or "
            "VisA: split=test)"
        )
    unmasked = [s for s in bad if s.mask_path is None]
    if unmasked:
        categories = sorted({s.category for s in unmasked}, key=natural_key)
        errors.append(
            f"{name}: {len(unmasked)} of {len(bad)} anomalous training images have no pixel mask (e.g. "
            f"{unmasked[0].image_path}, categor{'y' if len(categories) == 1 else 'ies'} "
            f"{', '.join(categories[:5])}{', ...' if len(categories) > 5 else ''}); the segmentation loss "
            "would treat their defects as normal pixels: train on a dataset with masks"
        )
    if bad and not normal:
        warnings.append(
            f"{name}: the training set has no normal images ({len(bad)} anomalous): the image-level loss "
            "only ever sees the anomalous class"
        )
    warnings.extend(jpeg_mask_warnings(name, samples))
    errors.extend(_duplicates(name, samples))
    return errors, warnings


# ----------------------------------------------------------------------------------------------------
# Headers
# ----------------------------------------------------------------------------------------------------


def read_sizes(
    paths: Iterable[tuple[str | Path, str]], threads: int | None = None
) -> dict[Path, tuple[int, int] | str]:
    """Per file: ``(H, W)`` from its header, or the one-line error message when it cannot be used.

    Args:
        paths: ``(path, what)`` pairs, ``what`` being ``"image"`` or ``"mask"`` (for the messages); a path
            given twice is read once.
        threads: worker threads (default: 4 per core, at most 16).
    """
    from feclip.data.transforms import probe_image

    todo = {Path(p): what for p, what in paths}

    def probe(item: tuple[Path, str]) -> tuple[int, int] | str:
        try:
            return probe_image(*item)
        except FEClipError as err:
            return " ".join(str(err).split())

    workers = max(1, threads or _threads())
    if workers == 1 or len(todo) < 64:
        return {p: probe((p, w)) for p, w in todo.items()}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(todo, pool.map(probe, todo.items())))


def file_problems(
    name: str, samples: Sequence[Sample], *, threads: int | None = None, one_size_per_category: bool = False
) -> list[str]:
    """Errors found in the files' headers: unreadable, empty or cut-off images and masks, masks whose size
    differs from their image's, and, with ``one_size_per_category``, a category with pixel masks whose
    images are not all of one size (original-resolution evaluation stacks each category's maps)."""
    pairs: list[tuple[Path, str]] = []
    for s in samples:
        pairs.append((Path(s.image_path), "image"))
        if s.mask_path is not None:
            pairs.append((Path(s.mask_path), "mask"))
    sizes = read_sizes(pairs, threads)
    errors: list[str] = []
    reported: set[Path] = set()
    per_category: dict[str, dict[tuple[int, int], Path]] = defaultdict(dict)
    for s in samples:
        image_size = sizes[Path(s.image_path)]
        mask_size = sizes[Path(s.mask_path)] if s.mask_path is not None else None
        files = [(Path(s.image_path), image_size)]
        if s.mask_path is not None:
            files.append((Path(s.mask_path), mask_size))
        for path, size in files:
            if isinstance(size, str) and path not in reported:
                reported.add(path)
                errors.append(f"{name}: category {s.category!r}: {size}")
        if isinstance(image_size, tuple):
            per_category[s.category].setdefault(image_size, Path(s.image_path))
            if isinstance(mask_size, tuple) and mask_size != image_size:
                errors.append(
                    f"{name}: category {s.category!r}: mask {s.mask_path} is {mask_size[0]}x{mask_size[1]} "
                    f"(HxW) but its image {s.image_path} is {image_size[0]}x{image_size[1]}"
                )
    if one_size_per_category:
        masked = {s.category for s in samples if s.label == 1 and s.mask_path is not None}
        for category, found in per_category.items():
            if category in masked and len(found) > 1:
                (a, pa), (b, pb) = list(found.items())[:2]
                errors.append(
                    f"{name}: category {category!r} holds images of {len(found)} sizes (e.g. {pa} is "
                    f"{a[0]}x{a[1]}, {pb} is {b[0]}x{b[1]}): evaluation at the original resolution needs "
                    "one size per category (use eval.resolution=input)"
                )
    return errors


# ----------------------------------------------------------------------------------------------------
# What a run calls
# ----------------------------------------------------------------------------------------------------


def check_target(
    name: str,
    samples: list[Sample],
    *,
    decode_headers: bool = True,
    one_size_per_category: bool = False,
) -> list[str]:
    """Check an evaluation target before any training; see the module docstring for the rules.

    Args:
        name: the dataset name (used in the messages).
        samples: its listing, from :func:`feclip.data.list_samples`.
        decode_headers: also read every image's and mask's header (sizes; unreadable, empty, cut-off
            files). Fast: no pixel is decoded.
        one_size_per_category: also require one image size per category with masks (set it for
            ``eval.resolution=original``).

    Returns:
        warnings, one line each (e.g. a category without normal images: its image metrics will be nan).

    Raises:
        DatasetError: one line naming the dataset, the category and the file, when the target cannot give
            valid metrics.
    """
    errors, warnings = target_problems(name, samples)
    if not errors and decode_headers:
        errors = file_problems(name, samples, one_size_per_category=one_size_per_category)
    if errors:
        raise DatasetError(_one_line(errors, name))
    return warnings


def check_train(name: str, samples: list[Sample], *, decode_headers: bool = True) -> list[str]:
    """Check the auxiliary training set before training: it needs anomalous images, each with its pixel
    mask (see :func:`train_problems`), and readable files whose masks match their images' sizes.

    Returns:
        warnings (e.g. no normal images).

    Raises:
        DatasetError: one line naming the dataset and, where relevant, the category and the file.
    """
    errors, warnings = train_problems(name, samples)
    if not errors and decode_headers:
        errors = file_problems(name, samples)
    if errors:
        raise DatasetError(_one_line(errors, name))
    return warnings


def check_fewshot(
    name: str, train_samples: Sequence[Sample] | None, categories: Iterable[str], k: int
) -> list[str]:
    """Check that every target category has at least ``k`` normal training images to draw few-shot
    references from (the rule of :func:`feclip.models.fewshot.pick_reference_samples`). No file access.

    Args:
        name: the dataset name.
        train_samples: its ``train`` split listing (the reference pool); None or empty when it has none.
        categories: the target's categories.
        k: references per category.

    Returns:
        warnings: a category with exactly ``k`` normal images (every seed draws the same references).

    Raises:
        ConfigError: ``k`` is not a positive int.
        DatasetError: one line naming the categories with fewer than ``k`` normal training images.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"few-shot k (eval.fewshot_k) must be a positive int, got {k!r}")
    categories = list(dict.fromkeys(categories))
    normal = Counter(s.category for s in train_samples or () if s.label == 0)
    short = [c for c in categories if normal[c] < k]
    if short:
        listed = ", ".join(f"{c} ({normal[c]})" for c in short[:8]) + (", ..." if len(short) > 8 else "")
        if not train_samples:
            why = "its train split is empty or absent"
        else:
            why = f"too few in categor{'y' if len(short) == 1 else 'ies'} {listed}"
        raise DatasetError(
            f"{name}: few-shot k={k} needs {k} normal training image{'s' if k > 1 else ''} per category; "
            f"{why}: lower eval.fewshot_k or add normal images to the train split"
        )
    return [
        f"{name}: category {c!r} has exactly k={k} normal training images: every seed uses the same "
        "few-shot references"
        for c in categories
        if normal[c] == k
    ]
