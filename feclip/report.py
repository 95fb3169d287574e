"""Results tree -> summary tables, paired seed comparisons and plots (``feclip-report``).

Reads every ``<results_dir>/<study>/<variant>/seed=<seed>/metrics.csv`` (the schema of
:mod:`feclip.results`, the legacy 12-column one included) and writes, into ``--out`` (default
``<results_dir>/report/``):

- ``summary.csv``: tidy, one row per (study, variant, backbone, train_dataset, dataset, averaging,
  metric) with the mean and sample std over seeds, the number of seeds, the categories the macro covers,
  the paper's number and the gap, and (``--study-numbers``) a reproduction study's number, its std and
  the gap to it. All numbers in this file and in the tables are in percent (points), as papers print
  them.
- ``summary.md`` / ``summary.tex``: one table per study (rows variant x backbone x dataset, cells
  ``91.2 ± 0.3 (5)``, with paper/gap and study/study gap columns where there are such numbers), a micro
  (pooled) table when ``__micro__`` rows exist, and, in the Markdown, the paired differences between
  variants.
- ``paired.csv``: paired differences between the variants of a study (same backbone) over their shared
  seeds, with a 95% Student-t confidence interval.
- ``bars_<metric>.png`` (ours vs the paper, per dataset) and ``study_<study>.png`` (mean ± std per
  variant).

Aggregation. Per seed, the dataset value of a metric is the unweighted mean over its categories
(``__micro__`` excluded), as :func:`feclip.metrics.macro_average`: by default one undefined (``nan``)
category makes the seed's value ``nan``, so a broken category is never hidden
(``skip_nan=True`` / ``--skip-nan-categories`` averages the defined ones). Across seeds ``nan``
propagates as well. The std is the sample std (ddof=1), undefined for a single seed.

Provenance. The ``backbone`` column (the CLIP that ran) is part of every grouping key, so runs of two
backbones never average together; a random init's seed is dropped from it (:func:`backbone_group`), so
the seeds of a random-backbone study still form one row. Only rows of the paper's CLIP
(:func:`feclip.results.is_paper_backbone`; ``unknown``, the value of legacy files, is not) whose macro
covers exactly the dataset's official categories (:func:`category_coverage`) are compared with the
paper, and the same two rules hold for a reproduction study's numbers (:func:`load_study_numbers`),
which a macro row matches by the taps set its variant name names (:func:`variant_taps`), its training
and evaluated dataset and the metric.

This module never imports torch (only numpy, pandas, the torch-free dataset registry of
:mod:`feclip.data`, and lazily scipy and matplotlib), so the report runs on a laptop without the
training stack.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from feclip.errors import FEClipError
from feclip.results import (
    COLUMNS,
    LEGACY_COLUMNS,
    MICRO,
    UNKNOWN,
    find_metrics,
    is_paper_backbone,
    unique_tmp,
)

__all__ = [
    "ReportError",
    "load_results",
    "backbone_group",
    "backbone_label",
    "official_categories",
    "category_coverage",
    "macro_per_seed",
    "micro_per_seed",
    "aggregate_seeds",
    "load_paper_numbers",
    "load_study_numbers",
    "variant_taps",
    "summarize",
    "paired_differences",
    "render_markdown",
    "render_latex",
    "write_report",
    "main",
]

PROG = "feclip-report"
#: The columns that identify one cell of a summary table (plus ``averaging``).
KEYS = ["study", "variant", "backbone", "train_dataset", "dataset", "metric"]
#: Metrics shown in the tables and study plots by default (the ones the paper reports).
MAIN_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro_zsad")
#: Display order of metrics; unknown metrics follow alphabetically.
METRIC_ORDER = (
    "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
    "pixel_aupro", "pixel_aupro_zsad",
)  # fmt: skip
#: Display order of datasets (the paper's); unknown datasets follow alphabetically.
DATASET_ORDER = (
    "mvtec", "visa", "btad", "mpdd", "dagm", "dtd_synthetic", "brainmri", "br35h", "clinicdb", "kvasir",
    "synthetic",
)  # fmt: skip
#: Paper column -> our metric name. The paper's "PRO" follows AnomalyCLIP's evaluation code
#: (200 linear thresholds, points with FPR < 0.3 kept and rescaled), which is our ``pixel_aupro_zsad``; the
#: exact MVTec-style integral (``pixel_aupro``) is a different number.
PAPER_TO_OURS = {
    "image_auroc": "image_auroc",
    "image_ap": "image_ap",
    "pixel_auroc": "pixel_auroc",
    "pixel_aupro": "pixel_aupro_zsad",
}
PAPER_METHOD = "FE-CLIP"
PAPER_SETTING = "zero_shot"
#: The paper's auxiliary (training) dataset for a target: VisA for MVTec AD, MVTec AD otherwise.
PAPER_AUX_FOR_MVTEC = "visa"
PAPER_AUX_DEFAULT = "mvtec"
#: ``train_dataset`` of an evaluation-only run (no training recorded): compared with the paper too.
NO_TRAINING = "none"
DEFAULT_PAPER = Path(__file__).resolve().parent.parent / "results" / "paper" / "paper_numbers.csv"
#: A reproduction study's numbers (``--study-numbers``; the report reads it only when asked).
STUDY_NUMBERS = DEFAULT_PAPER.parent / "study_numbers.csv"
#: Key columns of a study numbers file: the taps set (from the variant name, :func:`variant_taps`), the
#: auxiliary training set (``train_dataset``) and the evaluated dataset.
STUDY_KEY = ("taps", "train", "dataset")
#: ``<metric>_std``: the study's std over its seeds.
STUDY_STD_SUFFIX = "_std"
FLAG = "†"
FLAG_NOTE = "fewer seeds than the other cells"
#: Marks a macro cell whose categories are not the dataset's official list (or differ between seeds).
INCOMPLETE_FLAG = "‡"
CONFIDENCE = 0.95
#: Why a macro cell with a paper number does not show it (``not_compared``, joined by ``+``).
WHY_BACKBONE = "backbone"  # not the paper's CLIP (random, tiny fallback, another model, unknown)
WHY_INCOMPLETE = "incomplete"  # the macro does not cover the official categories
WHY_PROTOCOL = "protocol"  # trained on another auxiliary dataset than the paper's
SUMMARY_COLUMNS = [
    "study", "variant", "backbone", "train_dataset", "dataset", "averaging", "metric", "mean", "std",
    "n_seeds", "categories", "incomplete", "paper", "gap", "not_compared", "study_mean", "study_std",
    "gap_study", "not_compared_study", "flagged",
]  # fmt: skip
PAIRED_COLUMNS = [
    "study", "backbone", "train_dataset", "dataset", "metric", "variant_a", "variant_b", "n_shared",
    "seeds", "mean_diff", "ci_low", "ci_high", "distinguishable",
]  # fmt: skip
#: The text columns of metrics.csv that must not be empty.
_TEXT_FIELDS = ("study", "variant", "train_dataset", "dataset", "category", "metric")
_PROVENANCE_FIELDS = ("backbone", "checkpoint")
#: Float rounding a metric may carry past [0, 1] (an integral of 1.0000000000000002); a percentage
#: written by mistake (85.3) is far outside.
_VALUE_TOLERANCE = 1e-6


class ReportError(FEClipError, ValueError):
    """A results tree, a paper file or an output folder the report cannot use; the message names it."""


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------


def _read_one(path: Path) -> pd.DataFrame:
    """One metrics.csv as a DataFrame (:data:`COLUMNS`, ``unknown`` provenance for legacy files).

    Parses as :func:`feclip.results.read_metrics` does, but checks every line: the field count, a number
    in [0, 1] (or ``nan``) as value, integers as seed and n_images, no empty name. Any problem becomes a
    :class:`ReportError` naming the file, the line and the field.
    """

    def fail(detail: str) -> ReportError:
        return ReportError(f"malformed metrics file {path}: {detail}")

    data: dict[str, list] = {c: [] for c in COLUMNS}
    reader = None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None:
                raise fail("empty file, no header line")
            header = tuple(header)
            if header not in (COLUMNS, LEGACY_COLUMNS):
                raise fail(
                    f"line 1: columns {','.join(header)} are neither the metrics.csv schema "
                    f"{','.join(COLUMNS)} nor its legacy first {len(LEGACY_COLUMNS)} columns"
                )
            legacy = header == LEGACY_COLUMNS
            for fields in reader:
                line = reader.line_num
                if not fields:  # a blank line
                    continue
                if len(fields) != len(header):
                    raise fail(f"line {line} has {len(fields)} fields, expected {len(header)}")
                row = dict(zip(header, fields))
                if legacy:
                    row["backbone"] = row["checkpoint"] = UNKNOWN
                for name in _TEXT_FIELDS + _PROVENANCE_FIELDS:
                    if not row[name].strip():
                        raise fail(f"line {line}: empty {name}")
                for name in ("seed", "n_images"):
                    try:
                        row[name] = int(row[name])
                    except ValueError:
                        raise fail(f"line {line}: {name} {row[name]!r} is not an integer") from None
                try:
                    value = float(row["value"])
                except ValueError:
                    raise fail(f"line {line}: value {row['value']!r} is not a number") from None
                if not (math.isnan(value) or -_VALUE_TOLERANCE <= value <= 1.0 + _VALUE_TOLERANCE):
                    raise fail(
                        f"line {line}: value {row['value']} of {row['metric']} is outside [0, 1] "
                        "(metrics.csv holds fractions)"
                    )
                row["value"] = value
                for name in COLUMNS:
                    data[name].append(row[name])
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    except csv.Error as err:
        raise fail(f"line {reader.line_num if reader else 1}: {err}") from None
    except OSError as err:
        raise ReportError(f"cannot read metrics file {path}: {err.strerror or err}") from None
    frame = pd.DataFrame(data, columns=list(COLUMNS))
    frame["seed"] = frame["seed"].astype("int64")
    frame["n_images"] = frame["n_images"].astype("int64")
    frame["value"] = frame["value"].astype(float)
    frame["source"] = str(path)
    return frame


_RANDOM_INIT = re.compile(r"random\(seed=[^)]*\)")
_HASH = re.compile(r"@sha256=([0-9A-Fa-f]+)")


def backbone_group(backbone: str) -> str:
    """The backbone value runs are grouped by: the provenance string without a random init's seed.

    ``feclip-tiny:random(seed=42)`` -> ``feclip-tiny:random``: a random backbone is initialised from the
    run's seed, so keeping it would make every seed a row of its own. Weight hashes are kept (two
    different weight files never average together).
    """
    return _RANDOM_INIT.sub("random", str(backbone))


def backbone_label(backbone: str, hash_chars: int = 0) -> str:
    """The short form shown in the tables: name and source, the weights' hash cut to ``hash_chars``."""
    if hash_chars <= 0:
        return _HASH.sub("", backbone)
    return _HASH.sub(lambda m: "@" + m.group(1)[:hash_chars], backbone)


def _backbone_labels(backbones: Iterable[str]) -> dict[str, str]:
    """Short labels for the backbones of a report; a hash prefix is kept where two would read the same."""
    backbones = sorted(set(backbones))
    short = {b: backbone_label(b) for b in backbones}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {b: backbone_label(b, 8) if short[b] in clash else short[b] for b in backbones}


def _grouped(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``backbone`` replaced by its grouping value (:func:`backbone_group`)."""
    df = df.copy()
    df["backbone"] = df["backbone"].map(backbone_group) if "backbone" in df else UNKNOWN
    return df


def _check_duplicates(df: pd.DataFrame) -> None:
    """Two files holding the same (study, variant, backbone, seed, dataset, category, metric) would count twice."""
    key = ["study", "variant", "backbone", "seed", "train_dataset", "dataset", "category", "metric"]
    df = _grouped(df)
    dup = df[df.duplicated(key, keep=False)]
    if dup.empty:
        return
    first = dup.iloc[0]
    files = sorted(set(dup[(dup[key] == first[key]).all(axis=1)]["source"]))
    where = " and ".join(files) if len(files) > 1 else f"{files[0]} (twice)"
    raise ReportError(
        f"duplicate results for study={first['study']} variant={first['variant']} seed={first['seed']} "
        f"backbone={first['backbone']} dataset={first['dataset']} category={first['category']} "
        f"metric={first['metric']} in {where}; keep one copy per run"
    )


def load_results(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every metrics.csv under ``results_dir`` as one long DataFrame (columns of the schema + ``source``).

    Legacy 12-column files get ``backbone`` = ``checkpoint`` = ``unknown``.

    Raises:
        ReportError: the folder is missing or a file, no metrics.csv under it, a malformed file (the
            message names it and the line), or the same run stored twice.
    """
    results_dir = Path(results_dir)
    if not results_dir.exists():
        raise ReportError(f"results folder {results_dir} does not exist")
    if not results_dir.is_dir():
        raise ReportError(
            f"results folder {results_dir} is a file, not a folder (pass the folder holding it)"
        )
    try:
        paths = find_metrics(results_dir)
    except OSError as err:
        raise ReportError(f"cannot list results folder {results_dir}: {err.strerror or err}") from None
    if not paths:
        raise ReportError(f"no metrics.csv under {results_dir}")
    df = pd.concat([_read_one(p) for p in paths], ignore_index=True)
    if df.empty:
        raise ReportError(f"the metrics.csv files under {results_dir} hold no rows")
    for column in ("study", "variant", "train_dataset", "dataset", "category", "metric", "backbone"):
        df[column] = df[column].astype(str)
    df["value"] = df["value"].astype(float)
    _check_duplicates(df)
    return df


def _read_reference_table(path: Path, what: str = "paper numbers") -> pd.DataFrame:
    """The rows of a reference numbers CSV as text (``#`` starts a comment; every line as wide as the header).

    ``what`` names the file in errors (``paper numbers``, ``study numbers``). The frame's index is the
    line number of each row in the file, and ``attrs["comments"]`` holds the text of its whole-line
    comments, in order (a file's description of its numbers: source, settings).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ReportError(f"{what} {path}: not UTF-8 text") from None
    except OSError as err:
        raise ReportError(f"cannot read {what} {path}: {err.strerror or err}") from None
    header, rows, lines, comments = None, [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            comments.append(line.lstrip()[1:].strip())
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        try:
            fields = [field.strip() for field in next(csv.reader([line], strict=True))]
        except csv.Error as err:
            raise ReportError(f"cannot read {what} {path}: line {number}: {err}") from None
        if header is None:
            header = fields
            twice = [name for name in dict.fromkeys(fields) if fields.count(name) > 1]
            if twice:
                raise ReportError(
                    f"{what} {path}: line {number}: column {twice[0]!r} appears twice in the header"
                )
        elif len(fields) != len(header):
            raise ReportError(
                f"cannot read {what} {path}: line {number} has {len(fields)} fields, the header {len(header)}"
            )
        else:
            rows.append(fields)
            lines.append(number)
    if header is None:
        raise ReportError(f"{what} {path}: empty file")
    table = pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=object)
    table.attrs["comments"] = comments
    return table


def load_paper_numbers(
    path: str | os.PathLike, method: str = PAPER_METHOD, setting: str = PAPER_SETTING
) -> pd.DataFrame:
    """The paper's numbers for one method and setting, long format: ``dataset, metric, paper`` (percent).

    Reads ``paper_numbers.csv`` (``#`` lines are comments, ``-`` = not reported) and renames the paper's
    columns to our metric names with :data:`PAPER_TO_OURS`; unreported values are dropped.

    Raises:
        ReportError: the file cannot be read or parsed, lacks a column, has no row for ``method`` and
            ``setting``, lists a dataset twice, or holds a value that is not a percentage.
    """
    table = _read_reference_table(Path(path))
    needed = {"method", "setting", "dataset", *PAPER_TO_OURS}
    missing = sorted(needed - set(table.columns))
    if missing:
        raise ReportError(f"paper numbers {path}: missing columns {missing}")
    rows = table[(table["method"] == method) & (table["setting"] == setting)]
    if rows.empty:
        raise ReportError(f"paper numbers {path}: no row with method={method} and setting={setting}")
    twice = rows["dataset"][rows["dataset"].duplicated()]
    if not twice.empty:
        raise ReportError(
            f"paper numbers {path}: dataset {twice.iloc[0]} appears twice for {method} {setting}"
        )
    long = rows.melt(
        id_vars=["dataset"], value_vars=list(PAPER_TO_OURS), var_name="column", value_name="text"
    )
    long["text"] = long["text"].replace({"-": None, "": None})  # "-": not reported
    long["paper"] = pd.to_numeric(long["text"], errors="coerce")
    bad = long[long["text"].notna() & long["paper"].isna()]
    if not bad.empty:
        b = bad.iloc[0]
        raise ReportError(
            f"paper numbers {path}: dataset {b['dataset']}, column {b['column']}: {b['text']!r} is not a number"
        )
    out_of_range = long[(long["paper"] < 0) | (long["paper"] > 100)]
    if not out_of_range.empty:
        b = out_of_range.iloc[0]
        raise ReportError(
            f"paper numbers {path}: dataset {b['dataset']}, column {b['column']}: {b['paper']} is not a "
            "percentage in [0, 100]"
        )
    if long["paper"].notna().any() and (long["paper"].dropna() <= 1.0).all():
        raise ReportError(
            f"paper numbers {path}: every {method} {setting} value is <= 1; the file holds percent, not fractions"
        )
    long["metric"] = long["column"].map(PAPER_TO_OURS)
    return long.dropna(subset=["paper"])[["dataset", "metric", "paper"]].reset_index(drop=True)


def _study_percent(text: str, line: int, column: str, fail) -> float:
    """One entry of a study numbers file: a percentage in [0, 100], ``nan`` when not reported (``-``, empty)."""
    if text in ("", "-"):
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise fail(f"line {line}, column {column}: {text!r} is not a number") from None
    if math.isnan(value):
        raise fail(f"line {line}, column {column}: {text!r} is not a number")
    if not 0.0 <= value <= 100.0:
        kind = "standard deviation" if column.endswith(STUDY_STD_SUFFIX) else "percentage"
        raise fail(f"line {line}, column {column}: {text} is not a {kind} in [0, 100]")
    return value


def load_study_numbers(path: str | os.PathLike) -> pd.DataFrame:
    """A reproduction study's numbers, long format: ``taps, train_dataset, dataset, metric, study_mean,
    study_std`` (percent; ``study_std`` is ``nan`` where the file gives none).

    Reads ``study_numbers.csv``: ``#`` lines are comments (kept in ``attrs["comments"]``, the file's own
    description of its settings; ``attrs["source"]`` is ``path``), the key columns ``taps, train,
    dataset`` (the taps set, the auxiliary training set, the evaluated dataset), one column per metric
    named as ours (``image_auroc``, ...) and optional ``<metric>_std`` columns, the std over the study's
    seeds. ``-`` or an empty field = not reported (dropped).

    Raises:
        ReportError: the file cannot be read or parsed, lacks a key column, has a column that is neither
            one of our metrics nor the std of one, no rows, an empty key, a value that is not a number or
            not in [0, 100], only values <= 1 (fractions), or one (taps, train, dataset) twice; the
            message names the file, and the line and column.
    """
    path = Path(path)

    def fail(detail: str) -> ReportError:
        return ReportError(f"study numbers {path}: {detail}")

    table = _read_reference_table(path, "study numbers")
    missing = [c for c in STUDY_KEY if c not in table.columns]
    if missing:
        raise fail(f"missing columns {missing} (the key is {', '.join(STUDY_KEY)})")
    values = [c for c in table.columns if c not in STUDY_KEY]
    metrics = [c for c in values if not c.endswith(STUDY_STD_SUFFIX)]
    for column in metrics:
        if column not in METRIC_ORDER:
            raise fail(
                f"column {column!r} is not one of our metrics ({', '.join(METRIC_ORDER)}) "
                f"nor a <metric>{STUDY_STD_SUFFIX} column"
            )
    for column in values:
        if column.endswith(STUDY_STD_SUFFIX) and column[: -len(STUDY_STD_SUFFIX)] not in metrics:
            raise fail(
                f"column {column!r} is the std of {column[: -len(STUDY_STD_SUFFIX)]!r}, a column the file lacks"
            )
    if not metrics:
        raise fail(f"no metric column (one or more of {', '.join(METRIC_ORDER)})")
    if table.empty:
        raise fail("no rows below the header")
    rows, seen = [], {}
    for line, fields in table.iterrows():
        for column in STUDY_KEY:
            if not fields[column]:
                raise fail(f"line {line}: empty {column}")
        key = tuple(fields[c] for c in STUDY_KEY)
        if key in seen:
            named = " ".join(f"{c}={v}" for c, v in zip(STUDY_KEY, key))
            raise fail(f"lines {seen[key]} and {line} both give {named}; keep one")
        seen[key] = line
        for metric in metrics:
            mean = _study_percent(fields[metric], line, metric, fail)
            std_column = metric + STUDY_STD_SUFFIX
            std = (
                _study_percent(fields[std_column], line, std_column, fail)
                if std_column in values
                else math.nan
            )
            if math.isnan(mean) and not math.isnan(std):
                raise fail(f"line {line}: {std_column} {fields[std_column]} without a {metric} value")
            if not math.isnan(mean):
                rows.append([*key, metric, mean, std])
    columns = ["taps", "train_dataset", "dataset", "metric", "study_mean", "study_std"]
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        raise fail("no value: every entry is '-' or empty")
    if (frame["study_mean"] <= 1.0).all():
        raise fail("every value is <= 1; the file holds percent, not fractions")
    frame["study_std"] = frame["study_std"].astype(float)
    frame.attrs["source"] = str(path)
    frame.attrs["comments"] = list(table.attrs.get("comments", []))
    return frame


def _split_overrides(variant: str) -> list[str]:
    """The items of a variant name (Hydra's override string), split on the commas outside brackets."""
    items, depth, current = [], 0, []
    for ch in variant:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return items


def variant_taps(variant: str) -> str | None:
    """The taps set a variant name asks for: ``<name>`` of its ``taps=<name>`` item, else ``None``.

    A variant name is Hydra's override string (``protocol=visa_to_mvtec,taps=spread3``; any order, an
    ``eval,`` or ``ckpt=`` part allowed). No ``taps=`` item (``protocol=study3``, ``default``: the taps
    default ran, but the name does not say which) gives ``None``, and so does a ``model.taps=[...]``
    item, which replaces the set's layers (the set's name then no longer says what ran).
    """
    found = None
    for item in _split_overrides(str(variant)):
        item = item.strip().lstrip("+")
        if item.startswith("model.taps"):
            return None
        name, sep, value = item.partition("=")
        if sep and name == "taps" and value:
            found = value
    return found


# ---------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------


def _nan_propagating_mean(df: pd.DataFrame, by: list[str], skip_nan: bool = False) -> pd.DataFrame:
    """Group mean of ``value``; a group with any ``nan`` is ``nan`` unless ``skip_nan``."""
    grouped = df.groupby(by, sort=False, dropna=False)["value"]
    out = grouped.mean().to_frame("value")
    if not skip_nan:
        any_nan = df["value"].isna().groupby([df[c] for c in by], sort=False, dropna=False).any()
        out.loc[any_nan[any_nan].index, "value"] = np.nan
    return out.reset_index()


def macro_per_seed(df: pd.DataFrame, skip_nan: bool = False) -> pd.DataFrame:
    """The dataset value of each metric per seed: unweighted mean over categories, ``__micro__`` excluded.

    Returns columns ``KEYS + [seed, value]`` (fractions; ``backbone`` as :func:`backbone_group`). With
    ``skip_nan=False`` one ``nan`` category makes the value ``nan`` (as
    :func:`feclip.metrics.macro_average`).
    """
    categories = _grouped(df[df["category"] != MICRO])
    return _nan_propagating_mean(categories, KEYS + ["seed"], skip_nan)


def micro_per_seed(df: pd.DataFrame) -> pd.DataFrame:
    """The pooled (``__micro__``) value of each metric per seed; empty when no run wrote micro rows."""
    micro = _grouped(df[df["category"] == MICRO])
    return micro[KEYS + ["seed", "value"]].reset_index(drop=True)


@functools.cache
def official_categories(dataset: str) -> tuple[str, ...] | None:
    """The official category list of a benchmark (:func:`feclip.data.dataset_info`), ``None`` without one.

    Open-ended datasets (``synthetic``, ``folder``, ``meta_json``) and names the registry does not know
    have none. The registry is torch-free (``feclip.data`` loads its torch Dataset lazily).
    """
    from feclip.data import dataset_info

    try:
        categories = dataset_info(dataset).categories
    except FEClipError:
        return None
    return tuple(categories) or None


def _coverage_text(n_official: Sequence[int], n_other: Sequence[int], total: int | None) -> str:
    """``2/15``, ``2-15/15`` (seeds differ), ``15/15 +1 other``; without an official list ``3`` or ``2-3``."""
    low, high = min(n_official), max(n_official)
    text = str(low) if low == high else f"{low}-{high}"
    if total is not None:
        text += f"/{total}"
    if max(n_other) > 0:
        text += f" +{max(n_other)} other"
    return text


def category_coverage(df: pd.DataFrame, skip_nan: bool = False) -> pd.DataFrame:
    """Which categories each macro cell averages, per :data:`KEYS` cell over its seeds.

    Returns ``KEYS + [categories, incomplete]``: ``categories`` is the count of the dataset's official
    categories the runs cover over the official count (``2/15``; a range ``2-15/15`` when the seeds
    differ; ``+k other`` for categories outside the list), or the plain count for datasets without an
    official list. ``incomplete`` is True when a seed's categories are not exactly the official list, or
    when the seeds cover different categories. With ``skip_nan`` only the categories with a value count,
    as only they are averaged.
    """
    rows = _grouped(df[df["category"] != MICRO])
    if rows.empty:
        return pd.DataFrame(columns=KEYS + ["categories", "incomplete"])
    counted = rows["category"].where(rows["value"].notna()) if skip_nan else rows["category"]
    per_seed = counted.groupby([rows[c] for c in KEYS + ["seed"]], sort=False, dropna=False).agg(
        lambda s: frozenset(s.dropna())
    )
    out = []
    for key, sets in per_seed.groupby(level=list(range(len(KEYS))), sort=False):
        dataset = key[KEYS.index("dataset")]
        official = official_categories(dataset)
        sets = list(sets)
        if official is None:
            n_in, n_out, total = [len(s) for s in sets], [0], None
            incomplete = len(set(sets)) > 1
        else:
            reference = frozenset(official)
            n_in = [len(s & reference) for s in sets]
            n_out = [len(s - reference) for s in sets]
            total = len(reference)
            incomplete = any(s != reference for s in sets)
        out.append([*key, _coverage_text(n_in, n_out, total), incomplete])
    return pd.DataFrame(out, columns=KEYS + ["categories", "incomplete"])


def aggregate_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and count over seeds per :data:`KEYS` cell (fractions).

    ``nan`` propagates: one undefined seed makes mean and std ``nan``. One seed gives std ``nan``.
    """
    if per_seed.empty:
        return pd.DataFrame(columns=KEYS + ["mean", "std", "n_seeds"])
    grouped = per_seed.groupby(KEYS, sort=False)["value"]
    out = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n_seeds": grouped.size()})
    any_nan = grouped.apply(lambda s: bool(s.isna().any()))
    out.loc[any_nan, ["mean", "std"]] = np.nan
    return out.reset_index()


def paper_train_dataset(dataset: str) -> str:
    """The paper's auxiliary training set for a target dataset."""
    return PAPER_AUX_FOR_MVTEC if dataset == "mvtec" else PAPER_AUX_DEFAULT


def _common_reasons(summary: pd.DataFrame) -> dict[str, pd.Series]:
    """Why a row cannot be compared with any reference (paper or study): per reason, the rows it blocks.

    ``backbone``: not the paper's CLIP (:func:`feclip.results.is_paper_backbone`; ``unknown`` is not).
    ``incomplete``: the macro does not cover the dataset's official categories (every seed).
    """
    return {
        WHY_BACKBONE: ~summary["backbone"].map(is_paper_backbone).astype(bool),
        WHY_INCOMPLETE: summary["incomplete"].astype(bool),
    }


def _compare(
    summary: pd.DataFrame, reported: pd.Series, reasons: dict[str, pd.Series]
) -> tuple[pd.Series, pd.Series]:
    """The reference numbers a summary shows, and why it withholds the others.

    ``reported`` is the reference's number for each row (``nan``: it has none). Only a macro row that no
    reason blocks shows it. Returns the shown numbers (``nan`` elsewhere) and ``not_compared``: for a macro
    row with a reference number that is withheld, the blocking reasons joined by ``+`` (in the order of
    ``reasons``), else empty.
    """
    macro = summary["averaging"] == "macro"
    blocked = pd.concat(reasons, axis=1)
    comparable = macro & ~blocked.any(axis=1)
    shown = reported.where(comparable).astype(float)
    why = pd.Series("", index=summary.index, dtype=object)
    withheld = macro & reported.notna() & ~comparable
    if withheld.any():
        why[withheld] = ["+".join(n for n in reasons if row[n]) for _, row in blocked[withheld].iterrows()]
    return shown, why


def _attach_paper(summary: pd.DataFrame, paper: pd.DataFrame | None) -> pd.DataFrame:
    """Add ``paper``, ``gap`` (ours - paper, points) and ``not_compared`` to the summary.

    A macro row gets the paper's number only when it is comparable: the paper's backbone
    (:func:`feclip.results.is_paper_backbone`; ``unknown`` is not), a complete macro (the dataset's
    official categories, every seed), and the paper's protocol (the paper's auxiliary training set, or
    evaluation only: ``train_dataset == "none"``). Where the paper has a number but the row is not
    comparable, ``not_compared`` says why (``backbone``, ``incomplete``, ``protocol``, joined by ``+``).
    """
    summary = summary.copy()
    summary["paper"] = np.nan
    summary["not_compared"] = ""
    if paper is not None and not paper.empty and not summary.empty:
        lookup = {(d, m): v for d, m, v in paper[["dataset", "metric", "paper"]].itertuples(index=False)}
        reported = pd.Series(
            [lookup.get((d, m), np.nan) for d, m in summary[["dataset", "metric"]].itertuples(index=False)],
            index=summary.index,
            dtype=float,
        )
        reasons = _common_reasons(summary)
        reasons[WHY_PROTOCOL] = ~(
            (summary["train_dataset"] == NO_TRAINING)
            | (summary["train_dataset"] == summary["dataset"].map(paper_train_dataset))
        )
        summary["paper"], summary["not_compared"] = _compare(summary, reported, reasons)
    summary["gap"] = summary["mean"] - summary["paper"]
    return summary


def _attach_study(summary: pd.DataFrame, study: pd.DataFrame | None) -> pd.DataFrame:
    """Add ``study_mean``, ``study_std``, ``gap_study`` (ours - study, points) and ``not_compared_study``.

    A row matches a study number by (taps set, train dataset, evaluated dataset, metric); its taps set is
    the ``taps=<name>`` item of its variant name (:func:`variant_taps`), so a variant that names none is
    not matched. A matched row shows the number under the paper's comparability rules less the protocol
    one (the training set is part of the key): macro rows of the paper's backbone with a complete macro.
    Where the study has a number but the row is not comparable, ``not_compared_study`` says why
    (``backbone``, ``incomplete``).
    """
    summary = summary.copy()
    summary["study_mean"] = np.nan
    summary["study_std"] = np.nan
    summary["not_compared_study"] = ""
    if study is not None and not study.empty and not summary.empty:
        columns = ["taps", "train_dataset", "dataset", "metric", "study_mean", "study_std"]
        lookup = {tuple(k): (mean, std) for *k, mean, std in study[columns].itertuples(index=False)}
        taps = summary["variant"].map(variant_taps)
        keys = zip(taps, summary["train_dataset"], summary["dataset"], summary["metric"])
        found = [
            lookup.get(key, (np.nan, np.nan)) if key[0] is not None else (np.nan, np.nan) for key in keys
        ]
        reported = pd.Series([mean for mean, _ in found], index=summary.index, dtype=float)
        std = pd.Series([s for _, s in found], index=summary.index, dtype=float)
        summary["study_mean"], summary["not_compared_study"] = _compare(
            summary, reported, _common_reasons(summary)
        )
        summary["study_std"] = std.where(summary["study_mean"].notna())
    summary["gap_study"] = summary["mean"] - summary["study_mean"]
    return summary


def _mode_count(counts: pd.Series) -> int:
    """The most common seed count (the larger on a tie)."""
    freq = counts.value_counts()
    return int(max(freq[freq == freq.max()].index))


def _flag_fewer_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """``flagged`` = the cell has fewer seeds than the most common count of its table (study x averaging)."""
    summary = summary.copy()
    typical = summary.groupby(["study", "averaging"])["n_seeds"].transform(_mode_count)
    summary["flagged"] = summary["n_seeds"] < typical
    return summary


def _sort_key(column: pd.Series) -> pd.Series:
    """Sort datasets and metrics in display order, everything else alphabetically."""
    orders = {"dataset": DATASET_ORDER, "metric": METRIC_ORDER, "averaging": ("macro", "micro")}
    if column.name in orders:
        rank = {name: i for i, name in enumerate(orders[column.name])}
        return column.map(lambda v: (rank.get(v, len(rank)), str(v)))
    return column.map(str)


def summarize(
    df: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    skip_nan: bool = False,
    study: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The tidy summary (columns :data:`SUMMARY_COLUMNS`, numbers in percent).

    Args:
        df: rows of :func:`load_results`.
        paper: :func:`load_paper_numbers` output (percent), or ``None``.
        skip_nan: average only the defined categories of a seed.
        study: :func:`load_study_numbers` output (percent), or ``None`` (the study columns stay empty).
    """
    parts = []
    for averaging, per_seed in (("macro", macro_per_seed(df, skip_nan)), ("micro", micro_per_seed(df))):
        if not per_seed.empty:
            parts.append(aggregate_seeds(per_seed).assign(averaging=averaging))
    if not parts:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    summary = pd.concat(parts, ignore_index=True)
    summary[["mean", "std"]] = summary[["mean", "std"]].astype(float) * 100.0
    summary["n_seeds"] = summary["n_seeds"].astype(int)
    # a micro cell pools the same categories as the macro cell of its run and metric
    summary = summary.merge(category_coverage(df, skip_nan), on=KEYS, how="left")
    summary["categories"] = summary["categories"].fillna("")
    summary["incomplete"] = summary["incomplete"].eq(True)
    summary = _flag_fewer_seeds(_attach_study(_attach_paper(summary, paper), study))
    order = ["study", "averaging", "variant", "backbone", "train_dataset", "dataset", "metric"]
    return summary.sort_values(order, key=_sort_key).reset_index(drop=True)[SUMMARY_COLUMNS]


# ---------------------------------------------------------------------------------------------------
# paired differences
# ---------------------------------------------------------------------------------------------------


def paired_ci(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t confidence interval (n - 1 degrees of freedom).

    Returns ``(mean, low, high)``; ``low`` and ``high`` are ``nan`` with fewer than two differences.
    """
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def _variant_pairs(variants: Sequence[str], baseline: str | None) -> list[tuple[str, str]]:
    """(a, b) pairs, difference a - b: every variant against the baseline, or every pair in order."""
    if baseline is not None and baseline in variants:
        return [(v, baseline) for v in variants if v != baseline]
    return [(a, b) for i, a in enumerate(variants) for b in variants[i + 1 :]]


def paired_differences(
    per_seed: pd.DataFrame, baseline: str | None = None, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """Paired differences between the variants of each study over their shared seeds (points).

    Variants are paired within one backbone only. For a pair (a, b) and each (train_dataset, dataset,
    metric): the per-seed difference of the macro values a - b on the seeds both have, its mean, and a
    Student-t CI. ``distinguishable`` is ``True`` when the CI excludes 0, ``None`` when the CI is
    undefined (< 2 shared seeds).

    Args:
        per_seed: :func:`macro_per_seed` output (fractions).
        baseline: compare every variant against this one (in the studies and backbones that have it);
            default every pair.
    """
    rows = []
    cell_keys = ["train_dataset", "dataset", "metric"]
    per_seed = _grouped(per_seed)
    for (study, backbone), sdf in per_seed.groupby(["study", "backbone"], sort=True):
        by_variant = {v: g[cell_keys + ["seed", "value"]] for v, g in sdf.groupby("variant")}
        for a, b in _variant_pairs(sorted(by_variant), baseline):
            # inner join: the seeds both variants have; a nan value stays nan (and so does the mean)
            both = by_variant[a].merge(by_variant[b], on=cell_keys + ["seed"], suffixes=("_a", "_b"))
            for (train, dataset, metric), cell in both.groupby(cell_keys, sort=False):
                cell = cell.sort_values("seed")
                diffs = (cell["value_a"] - cell["value_b"]).to_numpy() * 100.0
                mean, low, high = paired_ci(diffs, confidence)
                seeds = ";".join(map(str, cell["seed"]))
                verdict = None if math.isnan(low) else bool(low > 0 or high < 0)
                rows.append(
                    [
                        study,
                        backbone,
                        train,
                        dataset,
                        metric,
                        a,
                        b,
                        len(diffs),
                        seeds,
                        mean,
                        low,
                        high,
                        verdict,
                    ]
                )
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    if out.empty:
        return out
    return out.sort_values(
        ["study", "backbone", "variant_a", "variant_b", "train_dataset", "dataset", "metric"], key=_sort_key
    )


# ---------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------

DASH = "–"
#: Label columns of the summary and paired tables (left-aligned; the rest are numbers).
_SUMMARY_LABELS = ["variant", "backbone", "train", "dataset"]
_PAIRED_LABELS = ["A − B", "backbone", "train", "dataset"]
#: The two columns a metric gets in a table when the study's numbers are attached.
STUDY_HEADER = ["study", "study gap"]


def _num(value: float, digits: int = 1) -> str:
    """A number with fixed decimals; ``nan`` shown as a dash."""
    return DASH if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 1) -> str:
    """A signed number (``+0.4``, ``−0.4`` with a minus sign); ``nan`` shown as a dash."""
    if value is None or math.isnan(value):
        return DASH
    text = f"{value:+.{digits}f}"
    return text.replace("-", "−")


def format_cell(mean: float, std: float, n: int, flagged: bool = False, incomplete: bool = False) -> str:
    """``91.2 ± 0.3 (5)``; std ``–`` for one seed, mean ``nan`` when undefined, ``†`` when flagged (fewer
    seeds), ``‡`` when the macro does not cover the dataset's official categories."""
    mean_text = "nan" if math.isnan(mean) else f"{mean:.1f}"
    marks = (FLAG if flagged else "") + (INCOMPLETE_FLAG if incomplete else "")
    return f"{mean_text} ± {_num(std)} ({n})" + marks


def format_paired(mean: float, low: float, high: float, n: int, distinguishable: bool | None) -> str:
    """``+0.40 [+0.10, +0.70] (5)``; ``[n/a]`` without a CI; wrapped in ``**`` when the CI excludes 0."""
    ci = "[n/a]" if distinguishable is None else f"[{_signed(low, 2)}, {_signed(high, 2)}]"
    text = f"{_signed(mean, 2)} {ci} ({n})"
    return f"**{text}**" if distinguishable else text


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """Unique values in display order (known names first, the rest alphabetically)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), v))


def _study_cell(mean: float, std: float) -> str:
    """The study's number: ``90.7 ± 0.3`` with its std, ``95.6`` without, ``–`` when it has none."""
    if mean is None or math.isnan(mean):
        return DASH
    return _num(mean) if std is None or math.isnan(std) else f"{_num(mean)} ± {_num(std)}"


def _summary_table(
    cells: pd.DataFrame, metrics: Sequence[str], labels: dict[str, str]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one study table: rows variant x backbone x dataset, a cell per metric (+ paper,
    gap; + study, study gap; both pairs empty where the row is not compared with that reference)."""
    metrics = [m for m in metrics if m in set(cells["metric"])]

    def shown(value_column: str, why_column: str) -> list[str]:
        if value_column not in cells:
            return []
        return [
            m
            for m in metrics
            if cells.loc[cells["metric"] == m, value_column].notna().any()
            or (cells.loc[cells["metric"] == m, why_column] != "").any()
        ]

    with_paper = shown("paper", "not_compared")
    with_study = shown("study_mean", "not_compared_study")
    header = list(_SUMMARY_LABELS)
    for m in metrics:
        header += [m] + (["paper", "gap"] if m in with_paper else [])
        header += STUDY_HEADER if m in with_study else []
    rows = []
    row_keys = ["variant", "backbone", "train_dataset", "dataset"]
    index = cells.set_index(row_keys + ["metric"])
    for (variant, backbone, train, dataset), _ in cells.groupby(row_keys, sort=False):
        row = [variant, labels.get(backbone, backbone), train, dataset]
        for m in metrics:
            key = (variant, backbone, train, dataset, m)
            cell = index.loc[key] if key in index.index else None
            row.append(
                ""
                if cell is None
                else format_cell(
                    cell["mean"], cell["std"], cell["n_seeds"], cell["flagged"], cell["incomplete"]
                )
            )
            if m in with_paper:
                if cell is None or cell["not_compared"]:
                    row += ["", ""]
                else:
                    row += [_num(cell["paper"]), _signed(cell["gap"])]
            if m in with_study:
                if cell is None or cell["not_compared_study"]:
                    row += ["", ""]
                else:
                    row += [_study_cell(cell["study_mean"], cell["study_std"]), _signed(cell["gap_study"])]
        rows.append(row)
    return header, rows


def _paired_table(
    pairs: pd.DataFrame, metrics: Sequence[str], labels: dict[str, str]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one study's paired table: rows pair x backbone x dataset, a cell per metric."""
    metrics = [m for m in metrics if m in set(pairs["metric"])]
    header = list(_PAIRED_LABELS) + list(metrics)
    rows = []
    row_keys = ["variant_a", "variant_b", "backbone", "train_dataset", "dataset"]
    index = pairs.set_index(row_keys + ["metric"])
    for (a, b, backbone, train, dataset), _ in pairs.groupby(row_keys, sort=False):
        row = [f"{a} − {b}", labels.get(backbone, backbone), train, dataset]
        for m in metrics:
            key = (a, b, backbone, train, dataset, m)
            if key not in index.index:
                row.append("")
                continue
            p = index.loc[key]
            row.append(
                format_paired(p["mean_diff"], p["ci_low"], p["ci_high"], p["n_shared"], p["distinguishable"])
            )
        rows.append(row)
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], n_labels: int = 4) -> str:
    """A GitHub-flavoured Markdown table (the first ``n_labels`` columns left-aligned)."""
    align = ["---" if i < n_labels else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(r) + " |" for r in [list(header), align, *rows]]
    return "\n".join(lines)


def _typical_seeds(cells: pd.DataFrame) -> int:
    return _mode_count(cells["n_seeds"]) if not cells.empty else 0


def _foreign_backbones(cells: pd.DataFrame) -> list[str]:
    """The backbones of ``cells`` that are not the paper's CLIP, sorted."""
    return sorted(b for b in set(cells["backbone"]) if not is_paper_backbone(b))


def _backbone_note(backbones: Sequence[str], labels: dict[str, str]) -> str:
    """The note on rows from a backbone that is not the paper's (random, fallback, other, unknown)."""
    names = ", ".join(labels.get(b, b) for b in backbones)
    text = (
        f"rows from a random/fallback backbone are not compared with the paper: their backbone ({names}) "
        "is not the paper's CLIP, ViT-L/14@336 with OpenAI weights"
    )
    if UNKNOWN in backbones:
        text += (
            f"; {UNKNOWN} = a metrics.csv written before the backbone column, whose CLIP cannot be "
            "told, so it is not comparable either (re-run it to record the backbone)"
        )
    return text + "."


def _table_notes(
    cells: pd.DataFrame, paper_label: str | None, labels: dict[str, str], study_label: str | None = None
) -> list[str]:
    """Footnotes under a summary table: the seed flag, incomplete macros, backbones, the paper and study
    legends."""
    notes = []
    withheld_study = (
        cells.loc[cells["not_compared_study"] != "", "not_compared_study"]
        if "not_compared_study" in cells
        else pd.Series(dtype=object)
    )
    with_study = ("study_mean" in cells and cells["study_mean"].notna().any()) or not withheld_study.empty
    references = "the paper or the study" if with_study else "the paper"
    if cells["flagged"].any():
        notes.append(f"{FLAG} {FLAG_NOTE} (most cells have {_typical_seeds(cells)}).")
    incomplete = cells[cells["incomplete"]]
    if not incomplete.empty:
        covered = ", ".join(
            f"{d} {c}" for d, c in dict.fromkeys(zip(incomplete["dataset"], incomplete["categories"]))
        )
        notes.append(
            f"{INCOMPLETE_FLAG} incomplete macro: the categories averaged are not the dataset's official "
            f"list, or differ between seeds ({covered}); never compared with {references}."
        )
    foreign = _foreign_backbones(cells)
    if foreign:
        notes.append(_backbone_note(foreign, labels))
    withheld = cells.loc[cells["not_compared"] != "", "not_compared"]
    if withheld.str.contains(WHY_PROTOCOL).any():
        notes.append(
            "rows trained on another auxiliary dataset than the paper's (VisA for mvtec, MVTec AD "
            "otherwise) are not compared with the paper."
        )
    if (cells["paper"].notna().any() or not withheld.empty) and paper_label:
        legend = f"paper: {paper_label}; gap = ours − paper, in points"
        notes.append(legend + ("; empty: not compared (see above)." if not withheld.empty else "."))
    if with_study:
        legend = (
            f"study: the numbers of {study_label or 'a reproduction study'}. A row's study number is the "
            "study's mean (± its std over its seeds, where it gives one) for the row's taps set (named by "
            "the taps= item of its variant), training and evaluated dataset; study gap = ours − study, in "
            f"points; {DASH}: the study has no number for the row (or its variant names no taps set)"
        )
        if not withheld_study.empty:
            legend += "; empty: not compared (another backbone or an incomplete macro, as for the paper)"
        notes.append(legend + ".")
    return notes


def _study_label(study: pd.DataFrame | None) -> str | None:
    """How the notes name a study numbers file: its path and its own comment lines (its settings)."""
    if study is None:
        return None
    source = study.attrs.get("source", "the reproduction study's numbers")
    comments = " ".join(c for c in study.attrs.get("comments", []) if c)
    return f'{source}, whose comments read: "{comments.rstrip(".")}"' if comments else source


def _study_metrics(cells: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    """The requested metrics present in a table; the main ones by default (all when none of them is present)."""
    present = _ordered(cells["metric"], METRIC_ORDER)
    if metrics is None:
        main = [m for m in present if m in MAIN_METRICS]
        return main or present
    return [m for m in metrics if m in present]


def render_markdown(
    summary: pd.DataFrame,
    paired: pd.DataFrame | None = None,
    metrics: Sequence[str] | None = None,
    title: str = "FE-CLIP results",
    paper_label: str | None = f"{PAPER_METHOD} {PAPER_SETTING}",
    study_label: str | None = None,
) -> str:
    """The Markdown report: per study a macro table, a micro table when present and the paired table.

    ``study_label`` names the study numbers in the notes (:func:`_study_label`: the file and its
    settings) where the summary carries them.
    """
    labels = _backbone_labels(summary["backbone"])
    out = [
        f"# {title}",
        "",
        "Percent; mean ± sample std over seeds (number of seeds); per seed, macro = unweighted mean over "
        "the dataset's categories.",
    ]
    foreign = _foreign_backbones(summary)
    if foreign:
        note = _backbone_note(foreign, labels)
        out += ["", f"> **Warning: not the paper's CLIP.** {note[0].upper()}{note[1:]}"]
    for study in sorted(summary["study"].unique()):
        out += ["", f"## Study `{study}`"]
        for averaging, label in (("macro", "macro (paper protocol)"), ("micro", "micro (pooled, ablation)")):
            cells = summary[(summary["study"] == study) & (summary["averaging"] == averaging)]
            if cells.empty:
                continue
            header, rows = _summary_table(cells, _study_metrics(cells, metrics), labels)
            out += ["", f"### {label.capitalize()}", "", _markdown_table(header, rows, len(_SUMMARY_LABELS))]
            notes = _table_notes(cells, paper_label, labels, study_label)
            out += [""] + notes if notes else []
        pairs = paired[paired["study"] == study] if paired is not None and not paired.empty else None
        if pairs is not None and not pairs.empty:
            header, rows = _paired_table(pairs, _study_metrics(pairs, metrics), labels)
            out += [
                "",
                "### Paired differences",
                "",
                f"Cells: A − B in points, the mean of the per-seed differences over the seeds both share "
                f"[{CONFIDENCE:.0%} CI, Student t, n−1 dof] (n shared seeds), within one backbone. "
                "**Bold**: the CI excludes 0, the difference is distinguishable from seed noise; n/a: fewer "
                "than 2 shared seeds.",
                "",
                _markdown_table(header, rows, len(_PAIRED_LABELS)),
            ]
    return "\n".join(out) + "\n"


_TEX_REPLACEMENTS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$",
    "‡": r"$^\ddagger$", "–": "--", "−": "$-$",
}  # fmt: skip


def _tex(text: str) -> str:
    """Escape a cell for LaTeX (and typeset ±, †, ‡, dashes and minus signs)."""
    return "".join(_TEX_REPLACEMENTS.get(ch, ch) for ch in str(text))


def _latex_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    caption: str,
    notes: Sequence[str],
    n_labels: int = 4,
) -> str:
    """A booktabs tabular with a comment line naming it and the notes as last rows."""
    spec = "l" * n_labels + "r" * (len(header) - n_labels)
    lines = [
        f"% {caption}",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(map(_tex, header)) + r" \\",
    ]
    lines.append(r"\midrule")
    lines += [" & ".join(map(_tex, row)) + r" \\" for row in rows]
    lines.append(r"\bottomrule")
    lines += [f"\\multicolumn{{{len(header)}}}{{l}}{{\\footnotesize {_tex(n)}}} \\\\" for n in notes]
    lines.append(r"\end{tabular}")
    return "\n".join(lines)


def render_latex(
    summary: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    paper_label: str | None = f"{PAPER_METHOD} {PAPER_SETTING}",
    study_label: str | None = None,
) -> str:
    """The summary tables as LaTeX tabulars (booktabs), one per study and averaging."""
    labels = _backbone_labels(summary["backbone"])
    blocks = [
        "% feclip-report: percent, mean +- sample std over seeds (n seeds). Needs \\usepackage{booktabs}."
    ]
    for study in sorted(summary["study"].unique()):
        for averaging in ("macro", "micro"):
            cells = summary[(summary["study"] == study) & (summary["averaging"] == averaging)]
            if cells.empty:
                continue
            header, rows = _summary_table(cells, _study_metrics(cells, metrics), labels)
            notes = _table_notes(cells, paper_label, labels, study_label)
            blocks.append(
                _latex_table(header, rows, f"study {study}, {averaging}", notes, len(_SUMMARY_LABELS))
            )
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, so no global backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    """Render a figure to PNG in memory."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _safe_name(name: str) -> str:
    """A file-name-safe version of a study or metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def render_paper_bars(summary: pd.DataFrame) -> dict[str, bytes]:
    """``bars_<metric>.png`` per metric with paper numbers: per dataset, the paper's bar and one bar per
    study/variant/backbone (± std). Only rows compared with the paper are drawn."""
    cells = summary[(summary["averaging"] == "macro") & summary["paper"].notna()]
    labels = _backbone_labels(summary["backbone"])
    several_backbones = cells["backbone"].nunique() > 1
    pngs = {}
    for metric in _ordered(cells["metric"], METRIC_ORDER):
        sub = cells[cells["metric"] == metric]
        datasets = _ordered(sub["dataset"], DATASET_ORDER)
        series = sorted(set(zip(sub["study"], sub["variant"], sub["backbone"], sub["train_dataset"])))
        width = 0.8 / (len(series) + 1)
        fig = _new_figure(max(5.0, 1.2 * len(datasets) * (len(series) + 1) ** 0.5 + 2), 4.0)
        ax = fig.add_subplot()
        x = np.arange(len(datasets))
        paper = sub.groupby("dataset")["paper"].first()
        ax.bar(x, [paper.get(d, np.nan) for d in datasets], width, label="paper", color="0.6")
        for i, (study, variant, backbone, train) in enumerate(series, start=1):
            s = sub[
                (sub["study"] == study)
                & (sub["variant"] == variant)
                & (sub["backbone"] == backbone)
                & (sub["train_dataset"] == train)
            ]
            s = s.set_index("dataset").reindex(datasets)
            label = f"{study}/{variant} (train {train})"
            if several_backbones:
                label += f" [{labels.get(backbone, backbone)}]"
            ax.bar(x + i * width, s["mean"], width, yerr=s["std"].fillna(0.0), capsize=3, label=label)
        ax.set_xticks(x + width * len(series) / 2, datasets)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric}: ours (mean ± std over seeds) vs paper")
        _set_ylim(ax, np.r_[sub["mean"].to_numpy(), sub["paper"].to_numpy()])
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        pngs[f"bars_{_safe_name(metric)}.png"] = _png_bytes(fig)
    return pngs


def _set_ylim(ax, values: np.ndarray) -> None:
    """Zoom the y axis on the data (bars from 0 would hide the differences that matter)."""
    finite = values[np.isfinite(values)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        pad = max(1.0, 0.15 * (high - low))
        ax.set_ylim(max(0.0, low - 3 * pad), min(100.0, high + pad) if high <= 100 else high + pad)


def render_studies(summary: pd.DataFrame, metrics: Sequence[str] | None = None) -> dict[str, bytes]:
    """``study_<study>.png`` per study: a panel per (train, dataset), x = variants (with the backbone when
    the study has several), mean ± std per metric."""
    pngs = {}
    macro = summary[summary["averaging"] == "macro"]
    labels = _backbone_labels(summary["backbone"])
    for study in sorted(macro["study"].unique()):
        cells = macro[macro["study"] == study]
        shown = _study_metrics(cells, metrics)
        cells = cells[cells["metric"].isin(shown)].copy()
        if cells["backbone"].nunique() > 1:
            cells["series"] = cells["variant"] + " [" + cells["backbone"].map(labels) + "]"
        else:
            cells["series"] = cells["variant"]
        panels = list(dict.fromkeys(zip(cells["train_dataset"], cells["dataset"])))
        ncols = min(len(panels), 3)
        nrows = math.ceil(len(panels) / ncols)
        most = cells.groupby(["train_dataset", "dataset"])["series"].nunique().max()
        fig = _new_figure(max(4.5, 0.6 * most + 2) * ncols, 3.8 * nrows)
        fig.set_layout_engine("constrained")
        offsets = np.linspace(-0.2, 0.2, len(shown)) if len(shown) > 1 else [0.0]
        for k, (train, dataset) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            panel = cells[(cells["train_dataset"] == train) & (cells["dataset"] == dataset)]
            series = sorted(panel["series"].unique())
            x = np.arange(len(series))
            for metric, dx in zip(shown, offsets):
                s = panel[panel["metric"] == metric].set_index("series").reindex(series)
                ax.errorbar(x + dx, s["mean"], yerr=s["std"].fillna(0.0), fmt="o", capsize=3, label=metric)
            tilt = len(series) > 3 or any(len(s) > 20 for s in series)
            ax.set_xticks(x, series, rotation=45 if tilt else 0, ha="right" if tilt else "center")
            ax.set_xlim(-0.5, len(series) - 0.5)
            ax.set_title(f"{dataset} (train {train})")
            ax.set_ylabel("%")
            ax.grid(axis="y", alpha=0.3)
            if k == 0:
                ax.legend(fontsize="small")
        fig.suptitle(f"study {study}: mean ± std over seeds")
        pngs[f"study_{_safe_name(study)}.png"] = _png_bytes(fig)
    return pngs


def plot_paper_bars(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write :func:`render_paper_bars` into ``out_dir`` (atomically); returns the paths."""
    return _write_files(Path(out_dir), render_paper_bars(summary))


def plot_studies(summary: pd.DataFrame, out_dir: Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """Write :func:`render_studies` into ``out_dir`` (atomically); returns the paths."""
    return _write_files(Path(out_dir), render_studies(summary, metrics))


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------


def _why(err: OSError) -> str:
    return err.strerror or str(err)


def _check_out_dir(out_dir: Path) -> None:
    """Fail early (before any work) on an output folder that is a file or cannot be written."""
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ReportError(f"output folder {out_dir}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ReportError(
                    f"output folder {out_dir}: {parent} is not writable (choose another with --out)"
                )
            return


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a new file and push it to the disk (it is renamed over the old one only afterwards)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_files(out_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Write every file of ``files`` into ``out_dir`` all or nothing, as far as a file system allows.

    Every file is first written in full under a temporary name; only when all are written are they
    renamed over the old ones. A failure while writing (read-only folder, full disk) removes the
    temporary files and leaves the folder as it was; a rename, which replaces a file in one step, leaves
    each file either old or new, never half-written.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ReportError(f"output folder {out_dir} is a file, not a folder") from None
    except OSError as err:
        raise ReportError(f"cannot create output folder {out_dir}: {_why(err)}") from None
    targets = [out_dir / name for name in files]
    for target in targets:
        if target.is_dir():
            raise ReportError(f"cannot write {target}: it is a folder")
    staged: list[tuple[Path, Path]] = []
    try:
        for target, data in zip(targets, files.values()):
            tmp = unique_tmp(target)
            staged.append((tmp, target))
            _write_bytes(tmp, data)
    except OSError as err:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise ReportError(
            f"cannot write {staged[-1][1]}: {_why(err)}; the files already in {out_dir} were left as they were"
        ) from None
    for i, (tmp, target) in enumerate(staged):
        try:
            os.replace(tmp, target)
        except OSError as err:
            for rest, _ in staged[i:]:
                rest.unlink(missing_ok=True)
            raise ReportError(f"cannot replace {target}: {_why(err)}") from None
    return targets


def _csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n", na_rep="nan")


def write_report(
    results_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    paper_path: str | os.PathLike | None = DEFAULT_PAPER,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    skip_nan: bool = False,
    plots: bool = True,
    study_path: str | os.PathLike | None = None,
) -> tuple[str, list[Path]]:
    """Build every output of the report; returns the Markdown summary and the paths written.

    Everything is computed in memory first and then written through :func:`_write_files`: a failure
    (bad input, a plot, a read-only folder) leaves a previous report in ``out_dir`` untouched.

    Args:
        results_dir: the results tree (or one study's folder of it).
        out_dir: where to write; default ``<results_dir>/report``.
        paper_path: the paper's ``paper_numbers.csv``, or ``None`` for no comparison.
        baseline: compare every variant of a study against this one (default: every pair).
        metrics: metrics of the tables and study plots (default :data:`MAIN_METRICS`); the CSVs hold all.
        skip_nan: average only the defined categories of a seed.
        plots: write the PNGs.
        study_path: a reproduction study's ``study_numbers.csv`` (:func:`load_study_numbers`), or ``None``
            (default) for no study columns.

    Raises:
        ReportError: any input or output problem; the message names the file or option.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(results_dir) / "report"
    df = load_results(results_dir)
    if baseline is not None and baseline not in set(df["variant"]):
        variants = ", ".join(sorted(df["variant"].unique()))
        raise ReportError(f"--baseline {baseline!r} is not a variant in {results_dir} (variants: {variants})")
    if metrics is not None:
        present = set(df["metric"])
        unknown = [m for m in metrics if m not in present and m not in METRIC_ORDER]
        if unknown or not metrics:
            raise ReportError(
                f"--metrics: {', '.join(unknown) or 'none given'} not in {results_dir} "
                f"(metrics: {', '.join(_ordered(present, METRIC_ORDER))})"
            )
    paper = load_paper_numbers(paper_path) if paper_path is not None else None
    study = load_study_numbers(study_path) if study_path is not None else None
    _check_out_dir(out_dir)
    summary = summarize(df, paper, skip_nan, study)
    paired = paired_differences(macro_per_seed(df, skip_nan), baseline)
    label = _study_label(study)
    markdown = render_markdown(summary, paired, metrics, study_label=label)
    files = {
        "summary.csv": _csv_text(summary).encode(),
        "paired.csv": _csv_text(paired.reindex(columns=PAIRED_COLUMNS)).encode(),
        "summary.md": markdown.encode(),
        "summary.tex": render_latex(summary, metrics, study_label=label).encode(),
    }
    if plots:
        files.update(render_paper_bars(summary))
        files.update(render_studies(summary, metrics))
    return markdown, _write_files(out_dir, files)


def _parse_metrics(text: str | None) -> list[str] | None:
    """``--metrics``: ``main`` (default), ``all`` or a comma-separated list."""
    if text is None or text == "main":
        return None
    if text == "all":
        return list(METRIC_ORDER)
    return [m.strip() for m in text.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``feclip-report`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Summarise a results tree: mean ± std over seeds, paper gaps, paired variant differences, plots.",
    )
    parser.add_argument(
        "results_dir",
        nargs="?",
        default="results",
        help="results tree or one study's folder (default: results)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <results_dir>/report)"
    )
    parser.add_argument(
        "--paper", type=Path, default=None, help=f"paper numbers CSV (default: {DEFAULT_PAPER})"
    )
    parser.add_argument("--no-paper", action="store_true", help="no paper columns")
    parser.add_argument(
        "--study-numbers",
        type=Path,
        default=None,
        metavar="FILE",
        help="also compare with a reproduction study's numbers, matched by the variant's taps=<name>, "
        "train and dataset (e.g. results/paper/study_numbers.csv; default: off)",
    )
    parser.add_argument(
        "--baseline", default=None, help="paired differences against this variant only (default: every pair)"
    )
    parser.add_argument(
        "--metrics", default=None, help="table metrics: main (default), all, or a comma-separated list"
    )
    parser.add_argument(
        "--skip-nan-categories",
        action="store_true",
        help="macro over defined categories only (default: nan propagates)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser


def _resolve_paper(args: argparse.Namespace) -> Path | None:
    """The paper file to use: explicit (must exist), the default (skipped with a note when absent), or none."""
    if args.no_paper:
        return None
    if args.paper is not None:
        if not args.paper.exists():
            raise ReportError(f"--paper: paper numbers file {args.paper} does not exist")
        if not args.paper.is_file():
            raise ReportError(f"--paper: {args.paper} is not a file")
        return args.paper
    if not DEFAULT_PAPER.is_file():
        print(f"{PROG}: note: {DEFAULT_PAPER} not found, no paper columns", file=sys.stderr)
        return None
    return DEFAULT_PAPER


def _resolve_study(args: argparse.Namespace) -> Path | None:
    """The study numbers file to use: none unless asked for (then it must exist and be a file)."""
    path = args.study_numbers
    if path is None:
        return None
    if not path.exists():
        raise ReportError(f"--study-numbers: study numbers file {path} does not exist")
    if not path.is_file():
        raise ReportError(f"--study-numbers: {path} is not a file")
    return path


def _fail(message: str) -> int:
    """Print ``feclip-report: error: ...`` on one line (newlines folded) and return exit status 2."""
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``feclip-report``: prints the Markdown summary and the files written; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        markdown, written = write_report(
            args.results_dir,
            args.out,
            paper_path=_resolve_paper(args),
            baseline=args.baseline,
            metrics=_parse_metrics(args.metrics),
            skip_nan=args.skip_nan_categories,
            plots=not args.no_plots,
            study_path=_resolve_study(args),
        )
    except FEClipError as err:
        return _fail(str(err))
    except OSError as err:  # anything the checks above did not foresee: still one line, no traceback
        where = f" {err.filename}" if err.filename else ""
        return _fail(f"{type(err).__name__}{where}: {_why(err)}")
    print(markdown)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
