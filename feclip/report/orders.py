"""Display orders: how the report sorts metrics, datasets and averagings in its tables and plots.

:data:`DATASET_ORDER` is the paper's order, from the dataset catalogue
(:data:`feclip.data.catalogue.PAPER_ORDER`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from feclip.data.catalogue import PAPER_ORDER

__all__ = ["DATASET_ORDER", "METRIC_ORDER"]

#: Display order of metrics; unknown metrics follow alphabetically.
METRIC_ORDER = (
    "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
    "pixel_aupro", "pixel_aupro_zsad",
)  # fmt: skip
#: Display order of datasets (the paper's); unknown datasets follow alphabetically.
DATASET_ORDER = PAPER_ORDER


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """Unique values in display order (known names first, the rest alphabetically)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), v))


def _sort_key(column: pd.Series) -> pd.Series:
    """Sort datasets and metrics in display order, everything else alphabetically."""
    orders = {"dataset": DATASET_ORDER, "metric": METRIC_ORDER, "averaging": ("macro", "micro")}
    if column.name in orders:
        rank = {name: i for i, name in enumerate(orders[column.name])}
        return column.map(lambda v: (rank.get(v, len(rank)), str(v)))
    return column.map(str)
