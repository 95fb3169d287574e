"""Reading a results tree: every ``metrics.csv`` under a folder, checked line by line, as one DataFrame.

The files follow the schema of :mod:`feclip.results` (the legacy 12-column one included, read with
``unknown`` provenance). Any problem (a missing folder, a malformed line, the same run stored twice)
is a :class:`~feclip.report.errors.ReportError` naming the file, and the line and field where there is
one.

:func:`run_methods` tells which method (FE-CLIP or a peer) each variant ran: the ``method.name`` of the
``config.yaml`` beside its metrics.csv, else the ``method=<name>`` item of its variant name, else FE-CLIP.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pandas as pd

from feclip.report.backbones import _grouped
from feclip.report.errors import ReportError
from feclip.report.references import DEFAULT_METHOD, variant_method
from feclip.results import COLUMNS, LEGACY_COLUMNS, UNKNOWN, find_metrics

__all__ = ["CONFIG_FILE", "load_results", "run_methods"]

#: The text columns of metrics.csv that must not be empty.
_TEXT_FIELDS = ("study", "variant", "train_dataset", "dataset", "category", "metric")
_PROVENANCE_FIELDS = ("backbone", "checkpoint")
#: The resolved config a run writes beside its metrics.csv (``method: {name: ...}`` among its keys).
CONFIG_FILE = "config.yaml"
#: Float rounding a metric may carry past [0, 1] (an integral of 1.0000000000000002); a percentage
#: written by mistake (85.3) is far outside.
_VALUE_TOLERANCE = 1e-6


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


def _config_method(path: Path) -> str | None:
    """``method.name`` of a run's config.yaml; ``None`` when the file records no method (written before
    the ``method`` group existed).

    Raises:
        ReportError: the file cannot be read, is not YAML, is not a mapping, or its ``method.name`` is
            not a non-empty string.
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    except UnicodeDecodeError:
        raise ReportError(f"run config {path}: not UTF-8 text") from None
    except OSError as err:
        raise ReportError(f"cannot read run config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f"line {where.line + 1}: " if where is not None else ""
        raise ReportError(f"run config {path}: {line}not valid YAML") from None
    if not isinstance(config, dict):
        raise ReportError(f"run config {path}: not a mapping of config keys")
    method = config.get("method")
    if method is None:
        return None
    name = method.get("name") if isinstance(method, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise ReportError(f"run config {path}: method.name is {name!r}, not a method name")
    return name.strip()


def run_methods(df: pd.DataFrame) -> pd.DataFrame:
    """The method each (study, variant) of a results frame ran: columns ``study, variant, method``.

    Per run folder (the ``source`` column's folder), the ``method.name`` of its ``config.yaml``; where
    there is no such file (or it predates the ``method`` group), the ``method=<name>`` item of the variant
    name (:func:`~feclip.report.references.variant_method`); else :data:`DEFAULT_METHOD` (FE-CLIP). A frame
    without ``source`` reads only the variant names.

    Raises:
        ReportError: an unreadable or malformed config.yaml, or two runs of one (study, variant) that
            ran different methods (the message names both folders).
    """
    columns = ["study", "variant", "method"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    keys = ["study", "variant", "source"] if "source" in df else ["study", "variant"]
    found: dict[tuple[str, str], tuple[str, str]] = {}
    for key in df[keys].drop_duplicates().itertuples(index=False):
        study, variant = str(key[0]), str(key[1])
        folder = Path(key[2]).parent if len(key) > 2 else None
        config = folder / CONFIG_FILE if folder is not None else None
        method = _config_method(config) if config is not None and config.is_file() else None
        method = method or variant_method(variant) or DEFAULT_METHOD
        where = str(folder) if folder is not None else variant
        seen = found.setdefault((study, variant), (method, where))
        if seen[0] != method:
            raise ReportError(
                f"study {study} variant {variant}: runs of two methods, {seen[0]} ({seen[1]}) and {method} "
                f"({where}); keep one method per variant"
            )
    return pd.DataFrame([[s, v, m] for (s, v), (m, _) in found.items()], columns=columns)
