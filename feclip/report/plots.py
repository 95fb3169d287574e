"""Plots, rendered in memory as PNG bytes: ``bars_<metric>.png`` (ours vs the paper, per dataset) and
``study_<study>.png`` (mean ± std per variant).

matplotlib is imported lazily and only through its Agg canvas (no pyplot, so no global backend is
touched); writing the bytes into a folder is :mod:`feclip.report.write`'s.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from feclip.report.backbones import _backbone_labels
from feclip.report.orders import DATASET_ORDER, METRIC_ORDER, _ordered
from feclip.report.render import _study_metrics

__all__ = ["render_paper_bars", "render_studies"]


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
