"""Which backbone a run used, as the report groups and labels it.

The ``backbone`` column (the CLIP that ran, :mod:`feclip.results`) is part of every grouping key, so
runs of two backbones never average together; a random init's seed is dropped from it
(:func:`backbone_group`), so the seeds of a random-backbone study still form one row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd

from feclip.results import UNKNOWN

__all__ = ["backbone_group", "backbone_label"]

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
