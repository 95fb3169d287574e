"""The results CSV every run writes: schema, atomic writing, locating runs, reading a results tree.

``<results_dir>/<study>/<variant>/seed=<seed>/metrics.csv``, long format, one row per
(dataset, category, metric), columns :data:`COLUMNS`. ``category`` is a category name or ``__micro__``
for the pooled value; metric values are fractions in [0, 1] (``nan`` where undefined). A file appears
only when complete: it is written under a temporary name and renamed.

The last two columns say what produced the numbers: ``backbone`` is the CLIP that actually ran
(:func:`feclip.models.provenance.describe`, e.g. ``ViT-L-14-336-quickgelu:openai@sha256=3f2a…`` or
``feclip-tiny:random(seed=42)``) and ``checkpoint`` the adapters evaluated (``trained`` by this run,
``untrained``, or ``<file>@sha256=…``). Files written before these columns existed (the first 12
columns only) are still read, with ``unknown`` in both.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

from feclip.fileio import atomic_write_text

COLUMNS = (
    "study", "variant", "seed", "train_dataset", "dataset", "category", "metric", "value",
    "n_images", "git_sha", "config_hash", "finished_at", "backbone", "checkpoint",
)  # fmt: skip
LEGACY_COLUMNS = COLUMNS[:12]  # metrics.csv before the provenance columns (read with "unknown")
UNKNOWN = "unknown"
PAPER_BACKBONE_PREFIX = "ViT-L-14-336"  # the paper's CLIP; with OpenAI weights it is comparable
MICRO = "__micro__"
METRICS_FILE = "metrics.csv"
PARTIAL_METRICS_FILE = "metrics.partial.csv"  # rows of the targets that were evaluated when another failed


@dataclass
class MetricRow:
    """One row of metrics.csv before the run-level columns are filled in."""

    dataset: str
    category: str
    metric: str
    value: float
    n_images: int


def run_dir(results_dir: str | os.PathLike, study: str, variant: str, seed: int) -> Path:
    """``<results_dir>/<study>/<variant>/seed=<seed>``."""
    return Path(results_dir) / study / variant / f"seed={seed}"


def config_hash(config) -> str:
    """A short, stable hash of a config (a dataclass or a dict)."""
    data = asdict(config) if is_dataclass(config) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_sha() -> str:
    """The feclip checkout's commit (with ``-dirty`` when modified), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_metrics(
    path: str | os.PathLike,
    rows: Iterable[MetricRow],
    *,
    study: str,
    variant: str,
    seed: int,
    train_dataset: str,
    config_hash: str,
    git_sha: str,
    backbone: str,
    checkpoint: str,
) -> Path:
    """Write a complete metrics.csv atomically (``backbone``/``checkpoint``: the provenance columns)."""
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = []
    for r in rows:
        value = (
            "nan"
            if r.value is None or (isinstance(r.value, float) and math.isnan(r.value))
            else repr(float(r.value))
        )
        lines.append(
            [
                study,
                variant,
                seed,
                train_dataset,
                r.dataset,
                r.category,
                r.metric,
                value,
                r.n_images,
                git_sha,
                config_hash,
                finished,
                backbone,
                checkpoint,
            ]
        )
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(lines)
    return atomic_write_text(path, buf.getvalue())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of one metrics.csv as dicts (values as float, seed and n_images as int).

    A file of the legacy 12-column schema gets ``backbone`` and ``checkpoint`` = ``unknown``.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = tuple(reader.fieldnames or ())
        if fields not in (COLUMNS, LEGACY_COLUMNS):
            raise ValueError(
                f"{path}: columns {reader.fieldnames} are not the metrics.csv schema {list(COLUMNS)}"
            )
        rows = []
        for row in reader:
            if fields == LEGACY_COLUMNS:
                row["backbone"] = row["checkpoint"] = UNKNOWN
            row["value"] = float(row["value"])
            row["seed"] = int(row["seed"])
            row["n_images"] = int(row["n_images"])
            rows.append(row)
    return rows


def is_complete(path: str | os.PathLike) -> bool:
    """A metrics.csv exists and parses with the schema (files only ever appear complete)."""
    try:
        return bool(read_metrics(path))
    except (OSError, ValueError):
        return False


def is_paper_backbone(backbone: str) -> bool:
    """Whether a ``backbone`` provenance value is the paper's CLIP (ViT-L/14@336, OpenAI weights).

    Random weights, the tiny fallback, another model or an ``unknown`` (legacy) value are not.
    """
    name, _, source = backbone.partition(":")
    return (
        name.startswith(PAPER_BACKBONE_PREFIX)
        and source.startswith(("openai", "file:"))
        and "random" not in source
    )


def find_metrics(results_dir: str | os.PathLike) -> list[Path]:
    """Every ``metrics.csv`` under a results tree, sorted."""
    return sorted(Path(results_dir).rglob(METRICS_FILE))
