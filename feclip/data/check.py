"""The ground-truth check behind ``feclip-data check``: counts per category and split, every mask read,
problems sorted into errors, warnings and notes (:class:`CheckReport`, :func:`check_dataset`), and the
report as text (:func:`format_report`).

The test split is held to the rules a run applies to an evaluation target
(:func:`feclip.data.validate.target_problems`), so the check reports as errors exactly what would stop a
run, and more (it decodes every mask).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feclip.data.catalogue import dataset_info
from feclip.data.layout import EmptyDatasetError, Listing
from feclip.data.listing import list_samples, listing_options
from feclip.data.sample import Sample, natural_key
from feclip.data.transforms import check_image, load_mask_values
from feclip.data.validate import jpeg_mask_warnings, target_problems
from feclip.errors import FEClipError

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_THREADS",
    "LARGE_MASK_FRACTION",
    "CheckReport",
    "check_dataset",
    "format_report",
]

#: A mask covering more than this fraction of its image is likely an object mask, not a defect mask.
LARGE_MASK_FRACTION = 0.5
#: Threads reading the files (``feclip-data check --threads``).
DEFAULT_THREADS = 8
#: Errors, warnings and notes listed of each kind (``feclip-data check --limit``).
DEFAULT_LIMIT = 20


@dataclass
class CheckReport:
    """What ``feclip-data check`` found.

    Attributes:
        rows: (category, split, images, normal, anomalous, with_mask) per category and split.
        mask_values: per category, Counter of mask value signatures ("{0,255}", "{0,1}", "37 levels 0..255").
        mask_kinds: per category, Counter of mask kinds: ``binary`` (one non-zero value), ``labels``
            (several non-zero values, all below 128: label ids such as VisA's), ``soft`` (several, up to
            128 or more: JPEG noise, anti-aliased edges).
        errors: problems that change the metrics or stop a run (missing masks, size mismatches,
            unreadable files, masks without images, and every target rule of
            :mod:`feclip.data.validate` on the test split: a category without anomalous images, without
            images at all, mixing masked and unmasked anomalous images, ...).
        warnings: things to look at (empty or very large masks, non-binary masks, missing categories,
            counts that differ from the published ones, ignored folders, a category without normal
            images, JPEG masks read with ``> 0``, a duplicate copy that differs from the one read).
        notes: for information (a split the dataset does not have, counts that match the published
            ones, label-valued masks, which copy of a duplicated dataset is read).
    """

    name: str
    root: Path
    rows: list[tuple[str, str, int, int, int, int]] = field(default_factory=list)
    mask_values: dict[str, Counter] = field(default_factory=dict)
    mask_kinds: dict[str, Counter] = field(default_factory=dict)
    mask_max: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_masks_read: int = 0
    notes: list[str] = field(default_factory=list)


def _value_signature(values: np.ndarray) -> str:
    uniq = np.unique(values)
    if len(uniq) <= 3:
        return "{" + ",".join(str(int(v)) for v in uniq) + "}"
    return f"{len(uniq)} levels {int(uniq[0])}..{int(uniq[-1])}"


def _mask_kind(uniq: np.ndarray) -> str:
    """``binary``, ``labels`` or ``soft`` from a mask's sorted distinct values (see CheckReport)."""
    nonzero = uniq[uniq > 0]
    if len(nonzero) <= 1:
        return "binary"
    return "labels" if int(nonzero[-1]) < 128 else "soft"


@dataclass
class _Inspected:
    """What :func:`_inspect` found in one sample's files (the mask fields None without a mask)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    signature: str | None = None
    kind: str | None = None
    max_value: int = 0


def _inspect(sample: Sample, decode: bool) -> _Inspected:
    """Check one sample's files, its mask binarised with the sample's own threshold."""
    out = _Inspected()
    try:
        size = check_image(sample.image_path, decode=decode)
    except FEClipError as err:
        out.errors.append(str(err))
        return out
    if sample.mask_path is None:
        return out
    try:
        values = load_mask_values(sample.mask_path)
    except FEClipError as err:
        out.errors.append(str(err))
        return out
    if values.shape != size:
        out.errors.append(
            f"size mismatch: mask {sample.mask_path} is {values.shape[0]}x{values.shape[1]}, "
            f"image {sample.image_path} is {size[0]}x{size[1]} (HxW)"
        )
    threshold = getattr(sample, "mask_threshold", 0)
    uniq = np.unique(values)
    out.max_value = int(uniq[-1]) if uniq.size else 0
    fraction = float((values > threshold).mean())
    if sample.label == 1 and fraction == 0.0:
        detail = f"no pixel > {threshold}"
        if threshold > 0 and out.max_value > 0:
            detail += (
                f"; its values go up to {out.max_value}, so mask_threshold={threshold} empties it "
                "(masks holding small label values, like VisA's, need the default threshold 0)"
            )
        out.warnings.append(
            f"empty mask ({detail}) for anomalous image {sample.image_path}: {sample.mask_path}"
        )
    if fraction > LARGE_MASK_FRACTION:
        out.warnings.append(
            f"mask covers {fraction:.0%} of the image, likely an object/foreground mask rather than a "
            f"defect mask: {sample.mask_path}"
        )
    out.signature = _value_signature(uniq)
    out.kind = _mask_kind(uniq)
    return out


def _mask_value_remarks(report: CheckReport, thresholds: dict[str, set[int]]) -> None:
    """Per category: a warning for soft masks binarised with > 0, a note for label-valued masks (which a
    higher threshold would empty: no hint to raise it there)."""
    for category, kinds in report.mask_kinds.items():
        signatures = ", ".join(sig for sig, _ in report.mask_values[category].most_common(3))
        used = sorted(thresholds.get(category, {0}))
        shown = "/".join(str(t) for t in used)
        if kinds.get("soft"):
            if used == [0]:
                report.warnings.append(
                    f"{category}: {kinds['soft']} mask(s) are not binary ({signatures}) and are binarised "
                    "with > 0, so every faint pixel (JPEG compression noise, anti-aliased edges) counts as "
                    "anomalous; for JPEG or anti-aliased 0/255 masks use mask_threshold=127"
                )
            else:
                report.notes.append(
                    f"{category}: {kinds['soft']} mask(s) are not binary ({signatures}); binarised with > {shown}"
                )
        if kinds.get("labels"):
            text = (
                f"{category}: {kinds['labels']} mask(s) hold small label values ({signatures}; e.g. VisA's "
                f"class ids), binarised with > {shown}"
            )
            if used != [0] and report.mask_max.get(category, 0) > 0:
                report.warnings.append(
                    text + f": values up to {max(used)} are dropped; such masks need the default threshold 0"
                )
            else:
                report.notes.append(text + ": every labelled pixel is anomalous (as intended)")


def _count_remarks(report: CheckReport, info, categories, options: dict) -> None:
    """Compare the test split's counts with the published ones (:attr:`DatasetInfo.test_counts`)."""
    counts = info.test_counts
    if counts is None:
        if info.categories:
            report.notes.append(f"no published test counts known here for {info.name}; counts not compared")
        return
    if listing_options(options):
        report.notes.append(
            f"test counts not compared with the published ones: the reader options "
            f"{', '.join(sorted(listing_options(options)))} change what is listed"
        )
        return
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for category, split, _n, normal, bad, _masks in report.rows:
        if split == "test":
            found[category][0] += normal
            found[category][1] += bad
    differences: list[str] = []
    single = len(counts.per_category) == 1  # the totals say it all
    for category, (normal, bad) in sorted(found.items(), key=lambda kv: natural_key(kv[0])):
        official = None if single and categories is None else counts.category(category)
        if official is not None and (normal, bad) != official:
            differences.append(
                f"{category}: {normal + bad} test images ({normal} normal + {bad} anomalous), published "
                f"{sum(official)} ({official[0]} + {official[1]})"
            )
    if categories is None:
        normal = sum(v[0] for v in found.values())
        bad = sum(v[1] for v in found.values())
        if (normal, bad) != (counts.normal, counts.anomalous):
            differences.append(
                f"in all: {normal + bad} test images ({normal} normal + {bad} anomalous), published "
                f"{counts.images} ({counts.normal} + {counts.anomalous})"
            )
    if differences:
        report.warnings.append(
            f"test counts differ from the published ones ({counts.source}): {'; '.join(differences)} "
            "(a missing category, a partial download or extraction, or another copy of the dataset?)"
        )
    else:
        scope = "in all" if categories is None else "for the categories checked"
        per_category = "" if counts.per_category else " (totals only)"
        report.notes.append(f"test counts match the published ones {scope}{per_category} ({counts.source})")


def check_dataset(
    name: str,
    root: str | Path,
    categories: Sequence[str] | None = None,
    *,
    decode: bool = False,
    threads: int = DEFAULT_THREADS,
    **options,
) -> CheckReport:
    """The ground-truth sanity check behind ``feclip-data check``; see :class:`CheckReport`.

    The test split is held to the rules a run applies to an evaluation target
    (:func:`feclip.data.validate.target_problems`), so ``check`` reports as errors exactly what would
    stop a run, and more (it decodes every mask).

    Args:
        name: one of :data:`feclip.data.DATASETS`.
        root: the dataset root.
        categories: the categories to check (default: all, and then the official list is compared).
        decode: fully decode every image too (slower; catches truncated JPEG data).
        threads: threads reading the files.
        **options: reader options (see :func:`feclip.data.list_samples`).

    Raises:
        DatasetError, ConfigError: an unknown name, a missing root or a wrong layout.
    """
    info = dataset_info(name)
    root = Path(root).expanduser()
    report = CheckReport(name, root)
    listed: list[tuple[str, Sample]] = []
    for split in info.splits:
        problems: list[str] = []
        try:
            samples = list_samples(name, root, split, categories, problems=problems, **options)
        except EmptyDatasetError as err:
            detail = " ".join(str(err).split())
            if split == "test":
                report.warnings.append(
                    f"the test split has no images, so this dataset cannot be an evaluation target ({detail})"
                )
            elif split != "reference":  # few-shot reference/ images are optional: no note
                report.notes.append(f"no {split} split ({detail})")
            continue
        report.errors.extend(problems)
        listed.extend((split, s) for s in samples)
        if split == "test":
            errors, warnings = target_problems(name, samples)
            report.errors.extend(errors)
            report.warnings.extend(warnings)
        else:
            report.warnings.extend(jpeg_mask_warnings(f"{name} ({split} split)", samples))
    if not listed:
        raise EmptyDatasetError(f"{name}: no images at all under {root}; expected layout: {info.layout}")

    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for split, s in listed:
        row = counts[(s.category, split)]
        row[0] += 1
        row[1 if s.label == 0 else 2] += 1
        row[3] += s.mask_path is not None
    order = {split: i for i, split in enumerate(info.splits)}
    for (category, split), (n, normal, bad, masks) in sorted(
        counts.items(), key=lambda kv: (natural_key(kv[0][0]), order[kv[0][1]])
    ):
        report.rows.append((category, split, n, normal, bad, masks))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda item: _inspect(item[1], decode), listed))
    thresholds: dict[str, set[int]] = defaultdict(set)
    for (_, s), found in zip(listed, results):
        report.errors.extend(found.errors)
        report.warnings.extend(found.warnings)
        if found.signature is not None:
            report.n_masks_read += 1
            report.mask_values.setdefault(s.category, Counter())[found.signature] += 1
            report.mask_kinds.setdefault(s.category, Counter())[found.kind] += 1
            report.mask_max[s.category] = max(report.mask_max.get(s.category, 0), found.max_value)
            thresholds[s.category].add(getattr(s, "mask_threshold", 0))

    found = {s.category for _, s in listed}
    if categories is None:
        if info.categories:
            missing = [c for c in info.categories if c not in found]
            extra = sorted(found - set(info.categories), key=natural_key)
            if missing:
                report.warnings.append(f"official categories missing: {', '.join(missing)}")
            if extra:
                report.warnings.append(f"categories not in the official list: {', '.join(extra)}")
        if info.mask_files is not None:
            used = {s.mask_path.resolve() for _, s in listed if s.mask_path is not None}
            for path in info.mask_files(Listing(info, root), **listing_options(options)):
                if path.resolve() not in used:
                    report.errors.append(f"mask without image: {path}")
    _count_remarks(report, info, categories, options)
    if info.notes is not None:
        for item in info.notes(Listing(info, root), **listing_options(options)):
            if isinstance(item, tuple):  # (level, text)
                (report.notes if item[0] == "note" else report.warnings).append(item[1])
            else:
                report.warnings.append(item)
    _mask_value_remarks(report, thresholds)
    return report


def format_report(report: CheckReport, limit: int = DEFAULT_LIMIT) -> str:
    """The report as text: the count table with totals per split, the mask values per category, then
    notes, warnings and errors (at most ``limit`` lines each), and ``OK: no errors`` or ``FAILED: n
    error(s)`` last."""
    info = dataset_info(report.name)
    lines = [f"{report.name} at {report.root}  (pixel ground truth: {_yes_no(info.pixel_masks)})"]
    width = max([len("category")] + [len(r[0]) for r in report.rows])
    lines.append(f"{'category':<{width}}  split  images  normal  anomalous  masks")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for category, split, n, normal, bad, masks in report.rows:
        lines.append(f"{category:<{width}}  {split:<5}  {n:>6}  {normal:>6}  {bad:>9}  {masks:>5}")
        for i, v in enumerate((n, normal, bad, masks)):
            totals[split][i] += v
    for split, (n, normal, bad, masks) in totals.items():
        lines.append(f"{'TOTAL':<{width}}  {split:<5}  {n:>6}  {normal:>6}  {bad:>9}  {masks:>5}")
    n_categories = len({r[0] for r in report.rows})
    lines.append(f"{n_categories} categories; {report.n_masks_read} masks read")
    for category, signatures in report.mask_values.items():
        values = ", ".join(f"{sig} x{n}" for sig, n in signatures.most_common())
        lines.append(f"  mask values {category}: {values}")
    for title, items in (("notes", report.notes), ("warnings", report.warnings), ("errors", report.errors)):
        if not items:
            continue
        lines.append(f"{title} ({len(items)}):")
        lines += [f"  - {line}" for line in items[:limit]]
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more (--limit)")
    lines.append("OK: no errors" if not report.errors else f"FAILED: {len(report.errors)} error(s)")
    return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "no (image level only)", None: "depends on the files"}[value]
