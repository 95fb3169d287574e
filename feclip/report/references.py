"""The reference numbers a report compares with: the paper's table and a reproduction study's table.

``paper_numbers.csv`` holds the published numbers per method, setting and dataset: FE-CLIP's and its
peers' (WinCLIP, APRIL-GAN, AnomalyCLIP) as the FE-CLIP paper's Tables 1-2 print them.
:func:`load_paper_numbers` reads one method's rows; :func:`load_published_numbers` every method a run can
be (:data:`PAPER_METHODS`: ``method.name`` -> the file's method name), so that a run of a peer is compared
with that peer's row, never with FE-CLIP's. A run's method comes from its ``config.yaml``
(:func:`feclip.report.load.run_methods`), else from the ``method=<name>`` item of its variant name
(:func:`variant_method`). ``study_numbers.csv`` (:func:`load_study_numbers`) a reproduction study's, keyed by the taps
set, the auxiliary training set and the evaluated dataset. A results row finds its study number through
the taps set its variant name names (:func:`variant_taps`). Both files hold percent; ``#`` starts a
comment, ``-`` means not reported. Any problem is a :class:`~feclip.report.errors.ReportError` naming
the file, and the line and column.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pandas as pd

from feclip.report.errors import ReportError
from feclip.report.orders import METRIC_ORDER

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_PAPER",
    "NO_TRAINING",
    "PAPER_METHOD",
    "PAPER_METHODS",
    "PAPER_SETTING",
    "PAPER_SOURCE",
    "PAPER_TO_OURS",
    "STUDY_NUMBERS",
    "load_paper_numbers",
    "load_published_numbers",
    "load_study_numbers",
    "method_name",
    "paper_train_dataset",
    "is_packaged",
    "published_source",
    "variant_method",
    "variant_taps",
]

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
#: ``method.name`` of a run (conf/method, :data:`feclip.methods.model.METHODS`) -> its rows'
#: ``method`` in paper_numbers.csv. A run is compared with its own method's published numbers only.
PAPER_METHODS = {
    "feclip": PAPER_METHOD,
    "winclip": "WinCLIP",
    "aprilgan": "APRIL-GAN",
    "anomalyclip": "AnomalyCLIP",
}
#: The method of a run that records none (a config.yaml written before the ``method`` group, no
#: ``method=`` item in its variant name): FE-CLIP, the only method then.
DEFAULT_METHOD = "feclip"
#: Where the packaged file's rows come from, per its comment lines: every method's zero-shot row as
#: the FE-CLIP paper's Tables 1-2 print it (for the peers, not their own papers; docs/peers.md).
PAPER_SOURCE = "the FE-CLIP paper's Tables 1-2"
#: The paper's auxiliary (training) dataset for a target: VisA for MVTec AD, MVTec AD otherwise.
PAPER_AUX_FOR_MVTEC = "visa"
PAPER_AUX_DEFAULT = "mvtec"
#: ``train_dataset`` of an evaluation-only run (no training recorded): compared with the paper too.
NO_TRAINING = "none"
#: The packaged copy of the paper's table (``feclip/report/paper/``, shipped in the wheel).
DEFAULT_PAPER = Path(__file__).resolve().parent / "paper" / "paper_numbers.csv"
#: A reproduction study's numbers (``--study-numbers``; the report reads it only when asked).
STUDY_NUMBERS = DEFAULT_PAPER.parent / "study_numbers.csv"
#: Key columns of a study numbers file: the taps set (from the variant name, :func:`variant_taps`), the
#: auxiliary training set (``train_dataset``) and the evaluated dataset.
STUDY_KEY = ("taps", "train", "dataset")
#: ``<metric>_std``: the study's std over its seeds.
STUDY_STD_SUFFIX = "_std"


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


def _check_columns(table: pd.DataFrame, path) -> None:
    """A paper numbers file must have the key columns and the four compared ones."""
    needed = {"method", "setting", "dataset", *PAPER_TO_OURS}
    missing = sorted(needed - set(table.columns))
    if missing:
        raise ReportError(f"paper numbers {path}: missing columns {missing}")


def _require_rows(table: pd.DataFrame, path, method: str, setting: str) -> None:
    """The file must hold at least one row of ``method`` for ``setting``."""
    if not ((table["method"] == method) & (table["setting"] == setting)).any():
        raise ReportError(f"paper numbers {path}: no row with method={method} and setting={setting}")


def _method_rows(table: pd.DataFrame, path, method: str, setting: str) -> pd.DataFrame:
    """One method's rows of a paper numbers table, long: ``dataset, metric, paper`` (percent).

    Unreported values (``-``, empty) are dropped. Raises ReportError on a dataset listed twice, a value
    that is not a number or not in [0, 100], or only values <= 1 (fractions); an empty frame when the
    method has no row for ``setting``.
    """
    rows = table[(table["method"] == method) & (table["setting"] == setting)]
    if rows.empty:
        return pd.DataFrame(columns=["dataset", "metric", "paper"])
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
            f"paper numbers {path}: {method}, dataset {b['dataset']}, column {b['column']}: {b['text']!r} "
            "is not a number"
        )
    out_of_range = long[(long["paper"] < 0) | (long["paper"] > 100)]
    if not out_of_range.empty:
        b = out_of_range.iloc[0]
        raise ReportError(
            f"paper numbers {path}: {method}, dataset {b['dataset']}, column {b['column']}: {b['paper']} is "
            "not a percentage in [0, 100]"
        )
    if long["paper"].notna().any() and (long["paper"].dropna() <= 1.0).all():
        raise ReportError(
            f"paper numbers {path}: every {method} {setting} value is <= 1; the file holds percent, not fractions"
        )
    long["metric"] = long["column"].map(PAPER_TO_OURS)
    return long.dropna(subset=["paper"])[["dataset", "metric", "paper"]].reset_index(drop=True)


def load_paper_numbers(
    path: str | os.PathLike, method: str = PAPER_METHOD, setting: str = PAPER_SETTING
) -> pd.DataFrame:
    """One method's published numbers for one setting, long format: ``dataset, metric, paper`` (percent).

    Reads ``paper_numbers.csv`` (``#`` lines are comments, ``-`` = not reported) and renames the paper's
    columns to our metric names with :data:`PAPER_TO_OURS`; unreported values are dropped. ``method`` is
    the file's name of the method (``FE-CLIP``, ``APRIL-GAN``). A summary given this frame compares
    FE-CLIP's runs only; :func:`load_published_numbers` gives every method its own row.

    Raises:
        ReportError: the file cannot be read or parsed, lacks a column, has no row for ``method`` and
            ``setting``, lists a dataset twice, or holds a value that is not a percentage.
    """
    table = _read_reference_table(Path(path))
    _check_columns(table, path)
    _require_rows(table, path, method, setting)
    return _method_rows(table, path, method, setting)


def load_published_numbers(path: str | os.PathLike, setting: str = PAPER_SETTING) -> pd.DataFrame:
    """Every known method's published numbers for one setting, long: ``method, paper_method, dataset,
    metric, paper`` (percent).

    ``method`` is the run's ``method.name`` (:data:`PAPER_METHODS`: ``aprilgan``), ``paper_method`` the
    file's name for it (``APRIL-GAN``). FE-CLIP's rows are required; a peer without rows in the file is
    simply absent (its runs get no paper number), and rows of methods no run can be (``CLIP``) are
    ignored. ``attrs["source"]`` is the file and ``attrs["comments"]`` its comment lines, where the
    packaged file says where its numbers come from (:func:`published_source`).

    Raises:
        ReportError: as :func:`load_paper_numbers`, for any known method's rows.
    """
    path = Path(path)
    table = _read_reference_table(path)
    _check_columns(table, path)
    _require_rows(table, path, PAPER_METHOD, setting)
    parts = []
    for ours, theirs in PAPER_METHODS.items():
        rows = _method_rows(table, path, theirs, setting)
        if not rows.empty:
            parts.append(rows.assign(method=ours, paper_method=theirs))
    frame = pd.concat(parts, ignore_index=True)[["method", "paper_method", "dataset", "metric", "paper"]]
    frame.attrs["source"] = str(path)
    frame.attrs["comments"] = list(table.attrs.get("comments", []))
    return frame


def published_source(published: pd.DataFrame | None) -> str | None:
    """How the report names the source of the published numbers it shows.

    The packaged ``paper_numbers.csv``: :data:`PAPER_SOURCE` (its comment lines say so), with the file's
    name; another file (``--paper``): its path, whose own comments the notes quote. ``None`` without a
    frame or a ``source``.
    """
    if published is None or "source" not in published.attrs:
        return None
    source = published.attrs["source"]
    return (
        f"{PAPER_SOURCE} (feclip/report/paper/{DEFAULT_PAPER.name})" if is_packaged(source) else str(source)
    )


def is_packaged(source: str | os.PathLike) -> bool:
    """Whether a paper numbers file is the packaged ``paper_numbers.csv`` (:data:`DEFAULT_PAPER`)."""
    try:
        return Path(source).resolve() == DEFAULT_PAPER.resolve()
    except OSError:
        return False


def method_name(method: str) -> str:
    """A method as the tables name it: the paper's spelling (``aprilgan`` -> ``APRIL-GAN``), else itself."""
    return PAPER_METHODS.get(method, method)


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


def variant_method(variant: str) -> str | None:
    """The method a variant name asks for: ``<name>`` of its ``method=<name>`` item, else ``None``.

    ``method=aprilgan,protocol=mvtec_to_all`` -> ``aprilgan``; an ``eval,`` prefix or a ``ckpt=`` part
    is allowed. A run's ``config.yaml`` is the better witness (:func:`feclip.report.load.run_methods`
    prefers it): an experiment file may set the method without the variant name saying so.
    """
    found = None
    for item in _split_overrides(str(variant)):
        name, sep, value = item.strip().lstrip("+").partition("=")
        if sep and name == "method" and value:
            found = value
    return found


def paper_train_dataset(dataset: str) -> str:
    """The paper's auxiliary training set for a target dataset."""
    return PAPER_AUX_FOR_MVTEC if dataset == "mvtec" else PAPER_AUX_DEFAULT
