"""What a run folder receives beside metrics.csv, and the console's table: the run log handler,
``env.txt``'s text, ``config.yaml``'s YAML, the per-category table, the folder itself."""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from feclip.engine import distributed as dist
from feclip.errors import FEClipError
from feclip.models.provenance import WeightsSource
from feclip.results import MetricRow, git_sha


def environment_text(device: torch.device, weights: WeightsSource | None = None) -> str:
    import open_clip

    lines = [
        f"backbone {weights.describe() if weights else 'unknown'}"
        + (" (FALLBACK: the configured weights were missing)" if weights and weights.fallback else "")
        + (f" from {weights.path}" if weights and weights.path else ""),
        f"python {sys.version.split()[0]} on {platform.platform()}",
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, numpy {np.__version__}",
        f"feclip git {git_sha()}",
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"torch threads {torch.get_num_threads()}",
        dist.describe(),
    ]
    return "\n".join(lines) + "\n"


def attach_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("feclip")
    if logger.getEffectiveLevel() > logging.INFO:  # the run log is always at INFO, whatever the console says
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def format_table(rows: list[MetricRow]) -> str:
    """Per-category table in percent, one block per dataset, with the macro mean."""
    from feclip.results import MICRO

    out = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        drows = [r for r in rows if r.dataset == dataset]
        metrics = list(dict.fromkeys(r.metric for r in drows))
        cats = list(dict.fromkeys(r.category for r in drows if r.category != MICRO))
        value = {(r.category, r.metric): r.value for r in drows}
        head = f"{'category':<16}" + "".join(f"{m:>17}" for m in metrics)
        out += [f"== {dataset} ==", head]
        for c in cats + ["macro mean"] + ([MICRO] if any(r.category == MICRO for r in drows) else []):
            vals = [
                np.mean([value[(k, m)] for k in cats]) if c == "macro mean" else value.get((c, m), np.nan)
                for m in metrics
            ]
            out.append(f"{c:<16}" + "".join(f"{100 * v:>17.1f}" for v in vals))
    return "\n".join(out)


def make_run_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # temporary files of a killed process
            stale.unlink()
    except OSError as e:
        raise FEClipError(
            f"cannot write the run folder {out_dir} ({e.strerror or e}); set paths.results_dir to a writable folder"
        ) from None


def to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
