"""Plots, rendered in memory as PNG bytes: one figure per study and metric, one per metric against the paper.

- ``study_<study>_<metric>.png`` (:func:`study_plots`): one question, one figure. A panel per evaluated
  dataset and training set (small multiples), a row per variant named by its swept values only
  (:func:`feclip.report.labels.variant_labels`: ``spread3 · lr/100``), a dot for the mean over seeds and
  a bar for ± 1 sample std over seeds, the paper's number as a dashed line where the panel is compared
  with it, a cross for a reproduction study's number. Many variants are laid out horizontally (a row
  each, the figure growing with them); the value axis is zoomed on the data and says so when it does
  not start at 0.
- ``bars_<metric>.png`` (:func:`paper_bar_plots`): per dataset, our rows compared with the paper and the
  paper's bar, bars from 0, with the gap written on each bar; where FE-CLIP's peers ran too, each
  method's published bar with its own rows below it.

Every figure says what its error bars are, which AUPRO it shows (:func:`feclip.report.labels.metric_label`)
and keeps its legend outside the data. A :class:`Plot` keeps the figure with its title, caption, panel
titles and row labels; the PNG carries them as text chunks (``Title``, ``Description``,
``feclip.panels``, ``feclip.labels``, ``feclip.key``), so a test or a notebook can tell what a PNG shows.

matplotlib is imported lazily and only through its Agg canvas (no pyplot, so no global backend is
touched); writing the bytes into a folder is :mod:`feclip.report.write`'s.
"""

from __future__ import annotations

import io
import json
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from feclip.report.backbones import _backbone_labels
from feclip.report.labels import (
    BARE,
    PRO_METRICS,
    AxisRoles,
    format_value,
    fpr_limit,
    metric_label,
    pro_caption,
    variant_axes,
    variant_labels,
    variant_order,
)
from feclip.report.orders import DATASET_ORDER, METRIC_ORDER, _ordered
from feclip.report.references import (
    DEFAULT_METHOD,
    NO_TRAINING,
    PAPER_METHOD,
    PAPER_METHODS,
    PAPER_SETTING,
    method_name,
)
from feclip.report.render import _study_metrics

__all__ = ["ERROR_BARS", "Plot", "paper_bar_plots", "render_paper_bars", "render_studies", "study_plots"]

#: What the error bars of every figure are.
ERROR_BARS = "± 1 sample std over seeds"
#: Longer row labels are replaced by codes (V1, V2, ...) and a key beside the figure.
MAX_LABEL = 60
#: At most this many variants, all with short labels, stand side by side; more get a row each.
_MAX_COLUMNS = 6
_SHORT_TICK = 12
_ROW_INCHES = 0.26
_PANEL_INCHES = 3.2
_MAX_PANEL_COLUMNS = 3
_PAPER_COLOUR = "0.25"


@dataclass
class Plot:
    """One figure and what it shows: ``panels`` (panel titles), ``labels`` (row labels as drawn),
    ``key`` (code -> full label where labels were too long)."""

    figure: Any
    title: str
    caption: str
    panels: list[str]
    labels: list[str]
    key: dict[str, str] = field(default_factory=dict)

    def png(self) -> bytes:
        """The figure as PNG bytes, its title, caption, panels, labels and key as text chunks."""
        buf = io.BytesIO()
        metadata = {
            "Title": self.title,
            "Description": self.caption,
            "feclip.panels": json.dumps(self.panels),
            "feclip.labels": json.dumps(self.labels),
            "feclip.key": json.dumps(self.key),
        }
        self.figure.savefig(buf, format="png", bbox_inches="tight", metadata=metadata)
        return buf.getvalue()


def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas with constrained layout (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _safe_name(name: str) -> str:
    """A file-name-safe version of a study or metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _panel_title(train: str, dataset: str) -> str:
    """``visa (trained on mvtec)``; ``(evaluation only)`` for runs without training."""
    return f"{dataset} (evaluation only)" if train == NO_TRAINING else f"{dataset} (trained on {train})"


def _panels(cells: pd.DataFrame) -> list[tuple[str, str]]:
    """The (train_dataset, dataset) panels of ``cells``, datasets in the paper's order."""
    rank = {d: i for i, d in enumerate(DATASET_ORDER)}
    found = set(zip(cells["train_dataset"], cells["dataset"]))
    return sorted(found, key=lambda p: (rank.get(p[1], len(rank)), p[1], p[0]))


#: Marks a study figure's cell of an evaluation-only variant drawn in the panel of a trained one.
_JOINED = "evaluation_only"


def _join_evaluation_only(cells: pd.DataFrame) -> pd.DataFrame:
    """Evaluation-only rows (a training-free method such as WinCLIP) in the panel of the variants trained
    for the same dataset, where the study trained them on one set only: a method is then compared with
    the others on one axis. Such rows keep a :data:`_JOINED` mark for the panel's title."""
    cells = cells.assign(**{_JOINED: False})
    trains = cells.groupby("dataset")["train_dataset"].agg(lambda s: set(s) - {NO_TRAINING})
    for dataset, trained in trains.items():
        rows = (cells["dataset"] == dataset) & (cells["train_dataset"] == NO_TRAINING)
        if len(trained) == 1 and rows.any():
            cells.loc[rows, "train_dataset"] = next(iter(trained))
            cells.loc[rows, _JOINED] = True
    return cells


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns of a grid of ``n`` panels."""
    ncols = min(n, _MAX_PANEL_COLUMNS)
    return math.ceil(n / ncols), ncols


def _wrap(text: str, width_inches: float) -> str:
    """``text`` wrapped to a figure's width (about 13 characters per inch at the caption's size)."""
    return "\n".join(textwrap.wrap(text, max(60, int(width_inches * 13))))


def _codes(labels: Sequence[str], limit: int = MAX_LABEL) -> tuple[list[str], dict[str, str]]:
    """The labels as drawn and the key: codes ``V1``, ``V2``, ... when one label is longer than ``limit``."""
    if not labels or max(len(s) for s in labels) <= limit:
        return list(labels), {}
    codes = [f"V{i}" for i in range(1, len(labels) + 1)]
    return codes, dict(zip(codes, labels))


def _draw_key(fig, key: dict[str, str]) -> None:
    """The code -> label key, beside the figure (outside every panel)."""
    if key:
        text = "\n".join(f"{code}  {label}" for code, label in key.items())
        fig.text(1.01, 0.98, "key\n" + text, va="top", ha="left", fontsize=7, family="monospace")


def _zoom(values: np.ndarray) -> tuple[float, float]:
    """Value-axis limits around the finite ``values`` (points, within [0, 100] where they are)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 100.0
    low, high = float(finite.min()), float(finite.max())
    pad = max(0.5, 0.08 * (high - low))
    return max(0.0, low - pad), (min(100.0, high + pad) if high <= 100.0 else high + pad)


def _axis_text(low: float) -> str:
    """The value axis' label: the unit, and where it starts when that is not 0."""
    return "%" if low <= 0 else f"%, axis from {low:.1f} (not 0)"


def _axes_text(roles: AxisRoles) -> str:
    """What the rows of a study figure are: the studied axes, or what else tells the variants apart."""
    if roles.studied:
        return " · ".join(k or "variant" for k in roles.studied)
    if roles.facets:
        return " · ".join(k or "variant" for k in roles.facets)
    return "variant"


def _series(cells: pd.DataFrame, labels: dict[str, str], backbone_names: dict[str, str] | None):
    """``cells`` with a ``series`` column (label, plus the backbone where several ran) and its order."""
    cells = cells.copy()
    cells["series"] = cells["variant"].map(labels)
    if backbone_names is not None:
        cells["series"] += " [" + cells["backbone"].map(backbone_names) + "]"
    return cells


def _series_order(cells: pd.DataFrame, roles: AxisRoles) -> list[str]:
    """The rows of a study figure: variants in the order of their studied values, then the backbone."""
    order = {v: i for i, v in enumerate(variant_order(cells["variant"], [*roles.studied, *roles.facets]))}
    ranked = sorted(
        zip(cells["variant"].map(order), cells["backbone"], cells["series"]), key=lambda t: (t[0], t[1])
    )
    return list(dict.fromkeys(s for _, _, s in ranked))


def _colours(cells: pd.DataFrame, roles: AxisRoles, several_backbones: bool, names: dict[str, str]):
    """What colours the dots: the backbone where several ran, else the last studied axis when two or
    more are studied (at most 10 values); ``None``: one colour."""
    if several_backbones:
        return "backbone", cells["backbone"].map(names)
    if len(roles.studied) >= 2:
        key = roles.studied[-1]
        values = cells["variant"].map(lambda v: format_value(key, variant_axes(v).get(key, "–")))
        if values.nunique() <= 10:
            return key, values
    return None, None


def _legend_text(key: str, value: str) -> str:
    """A colour's legend entry: ``train.fc_patch.policy = lr/100``; a value that names its axis alone."""
    return str(value) if "=" in str(value) else f"{key or 'variant'} = {value}"


def _study_plot(
    study: str, metric: str, cells: pd.DataFrame, roles: AxisRoles, series: list[str], colour_by
) -> Plot:
    """One study and metric: a panel per (train, dataset), a row (or column) per series."""
    from matplotlib.lines import Line2D

    panels = _panels(cells)
    drawn, key = _codes(series)
    code = dict(zip(series, drawn))
    # the panels share their rows when the study varies something within a panel; otherwise (one
    # variant per panel, e.g. one per protocol) each panel shows its own
    shared = bool(roles.studied)
    in_panel = cells.groupby(["train_dataset", "dataset"])["series"].agg(set)
    rows_of = {p: series if shared else [s for s in series if s in in_panel[p]] for p in panels}
    most = max(len(r) for r in rows_of.values())
    horizontal = most > _MAX_COLUMNS or max(len(s) for s in drawn) > _SHORT_TICK
    nrows, ncols = _grid(len(panels))
    longest = max(len(s) for s in drawn)
    if horizontal:
        width = ncols * _PANEL_INCHES + 0.075 * longest * (1 if shared else ncols)
        height = nrows * (_ROW_INCHES * most + 1.1) + 1.4
    else:
        width = ncols * max(2.8, 0.55 * most + 1.2)
        height = nrows * 3.0 + 1.4
    fig = _new_figure(width, height)
    share = ({"sharey": True} if horizontal else {"sharex": True}) if shared else {}
    grid = fig.subplots(nrows, ncols, squeeze=False, **share)
    axes = grid.ravel()
    for ax in axes[len(panels) :]:
        ax.remove()
    colour_name, colour_values = colour_by
    palette = {}
    if colour_values is not None:
        for i, value in enumerate(dict.fromkeys(sorted(colour_values, key=str))):
            palette[value] = f"C{i}"
    cells = cells.assign(colour=colour_values.values if colour_values is not None else "")
    first_axis = roles.studied[0] if len(roles.studied) >= 2 else None
    has_paper = has_study = has_flag = has_published = False
    paper_methods: set[str] = set()
    titles = []
    for ax, (train, dataset) in zip(axes, panels):
        title = _panel_title(train, dataset)
        panel = cells[(cells["train_dataset"] == train) & (cells["dataset"] == dataset)]
        if _JOINED in panel and panel[_JOINED].any():  # evaluation-only rows joined in (training-free)
            joined = ", ".join(dict.fromkeys(code[s] for s in panel.loc[panel[_JOINED], "series"]))
            title = f"{dataset} (trained on {train}; {joined}: evaluation only)"
        titles.append(title)
        rows = rows_of[(train, dataset)]
        pos, ticks = np.arange(len(rows)), [code[s] for s in rows]
        rank = {s: i for i, s in enumerate(rows)}
        panel = panel.assign(at=panel["series"].map(rank)).sort_values("at")
        values = [panel["mean"] - panel["std"].fillna(0.0), panel["mean"] + panel["std"].fillna(0.0)]
        paper = panel["paper"].dropna().unique() if "paper" in panel else []
        study_ref = panel["study_mean"] if "study_mean" in panel else pd.Series(dtype=float)
        extra = [np.asarray(paper, dtype=float), study_ref.to_numpy(dtype=float)]
        low, high = _zoom(np.concatenate([np.asarray(v, dtype=float) for v in values] + extra))
        for colour, part in panel.groupby("colour", sort=False):
            c = palette.get(colour, "C0")
            at, mean, std = part["at"].to_numpy(), part["mean"].to_numpy(), part["std"].fillna(0.0).to_numpy()
            flagged = part["flagged"].to_numpy(dtype=bool) if "flagged" in part else np.zeros(len(part), bool)
            has_flag |= bool(flagged.any())
            for hollow in (False, True):
                sel = flagged == hollow
                if not sel.any():
                    continue
                style = {"fmt": "o", "color": c, "capsize": 2, "markersize": 5, "elinewidth": 1}
                if hollow:
                    style["markerfacecolor"] = "white"
                if horizontal:
                    ax.errorbar(mean[sel], at[sel], xerr=std[sel], **style)
                else:
                    ax.errorbar(at[sel], mean[sel], yerr=std[sel], **style)
        missing = panel[panel["mean"].isna()]
        for at in missing["at"]:
            xy = (low, at) if horizontal else (at, low)
            ax.annotate(
                "n/a", xy, fontsize=7, color="0.4", va="center", ha="left" if horizontal else "center"
            )
        compared = panel.dropna(subset=["paper"]) if "paper" in panel else panel.iloc[:0]
        methods = set(compared["method"]) if "method" in compared else set()
        if len(methods) > 1:  # rows of several methods: each its own method's number, on its row
            has_published = True
            xy = (compared["paper"], compared["at"]) if horizontal else (compared["at"], compared["paper"])
            ax.plot(
                *xy, "|" if horizontal else "_", color=_PAPER_COLOUR, markersize=12, mew=2, linestyle="none"
            )
        elif len(paper) == 1:
            has_paper = True
            paper_methods |= methods
            line = ax.axvline if horizontal else ax.axhline
            line(float(paper[0]), color=_PAPER_COLOUR, linestyle="--", linewidth=1)
        ref = panel.dropna(subset=["study_mean"]) if "study_mean" in panel else panel.iloc[:0]
        if not ref.empty:
            has_study = True
            xy = (ref["study_mean"], ref["at"]) if horizontal else (ref["at"], ref["study_mean"])
            ax.plot(*xy, "x", color="black", markersize=6, linestyle="none")
        if first_axis is not None:
            firsts = (
                panel.drop_duplicates("at")
                .set_index("at")["variant"]
                .map(lambda v: variant_axes(v).get(first_axis))
            )
            for a, b in zip(firsts.index[:-1], firsts.index[1:]):
                if firsts[a] != firsts[b]:
                    (ax.axhline if horizontal else ax.axvline)((a + b) / 2, color="0.85", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        if horizontal:
            ax.set_xlim(low, high)
            ax.set_ylim(len(rows) - 0.5, -0.5)
            ax.set_yticks(pos, ticks, fontsize=8)
            ax.set_xlabel(_axis_text(low), fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        else:
            ax.set_ylim(low, high)
            ax.set_xlim(-0.5, len(rows) - 0.5)
            ax.set_xticks(pos, ticks, fontsize=8)
            ax.set_ylabel(_axis_text(low), fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=8)
    handles = []
    if colour_name is not None:
        handles += [
            Line2D([], [], marker="o", linestyle="none", color=c, label=_legend_text(colour_name, v))
            for v, c in palette.items()
        ]
    if has_flag:
        handles.append(
            Line2D(
                [], [], marker="o", linestyle="none", color="C0", markerfacecolor="white", label="fewer seeds"
            )
        )
    names = ", ".join(method_name(m) for m in sorted(paper_methods)) or PAPER_METHOD
    if has_paper:
        handles.append(Line2D([], [], color=_PAPER_COLOUR, linestyle="--", label=f"paper ({names})"))
    if has_published:
        marker = "|" if horizontal else "_"
        handles.append(
            Line2D(
                [],
                [],
                marker=marker,
                linestyle="none",
                color=_PAPER_COLOUR,
                mew=2,
                markersize=10,
                label="published, the row's method",
            )
        )
    if has_study:
        handles.append(
            Line2D([], [], marker="x", linestyle="none", color="black", label="reproduction study")
        )
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    _draw_key(fig, key)
    limits = {fpr_limit(v) for v in cells["variant"]}
    label = metric_label(metric, limits)
    n = sorted(set(cells["n_seeds"].astype(int)))
    seeds = f"n = {n[0]}" if len(n) == 1 else f"n = {n[0]}–{n[-1]}"
    title = f"study {study}: {label}"
    caption = (
        f"rows: {_axes_text(roles)}; panels: evaluated dataset (training set); dot: mean over seeds of the "
        f"macro over categories, bar: {ERROR_BARS} ({seeds} seeds)"
    )
    if has_paper:
        caption += f"; dashed line: the paper's {names} {PAPER_SETTING} number"
    if has_published:
        caption += f"; grey tick on a row: the {PAPER_SETTING} number published for the row's own method"
    if has_study:
        caption += "; cross: the reproduction study's number"
    fixed = [f"{k}={v}" for k, v in roles.fixed if k != BARE]
    if fixed:
        caption += "; all variants: " + ", ".join(fixed)
    if metric in PRO_METRICS:
        caption += "; " + pro_caption(metric, limits)
    fig.suptitle(title + "\n" + _wrap(caption, width), fontsize=9)
    return Plot(fig, title, caption, titles, drawn, key)


def study_plots(summary: pd.DataFrame, metrics: Sequence[str] | None = None) -> dict[str, Plot]:
    """``study_<study>_<metric>.png`` -> :class:`Plot`, one per study and metric (macro cells).

    ``metrics``: as the tables (default the main ones present, :data:`feclip.report.MAIN_METRICS`).
    """
    plots = {}
    macro = summary[summary["averaging"] == "macro"]
    names = _backbone_labels(summary["backbone"])
    for study in sorted(macro["study"].unique()):
        cells = _join_evaluation_only(macro[macro["study"] == study])
        shown = _study_metrics(cells, metrics)
        labels, roles = variant_labels(cells)
        several = cells["backbone"].nunique() > 1
        cells = _series(cells, labels, names if several else None)
        series = _series_order(cells, roles)
        for metric in shown:
            part = cells[cells["metric"] == metric]
            if part.empty:
                continue
            colour_by = _colours(part, roles, several, names)
            name = f"study_{_safe_name(study)}_{_safe_name(metric)}.png"
            present = [s for s in series if s in set(part["series"])]
            plots[name] = _study_plot(study, metric, part, roles, present, colour_by)
    return plots


def render_studies(summary: pd.DataFrame, metrics: Sequence[str] | None = None) -> dict[str, bytes]:
    """:func:`study_plots` as PNG bytes."""
    return {name: plot.png() for name, plot in study_plots(summary, metrics).items()}


def _paper_series(summary: pd.DataFrame, cells: pd.DataFrame) -> pd.Series:
    """The row label of each compared cell: ``study: variant label``, the variant label as in the study's
    own figures (its swept values), the backbone where several are compared."""
    labels = {}
    macro = summary[summary["averaging"] == "macro"]
    for study in cells["study"].unique():
        study_labels, _ = variant_labels(macro[macro["study"] == study])
        labels.update({(study, v): label for v, label in study_labels.items()})
    text = pd.Series(
        [f"{s}: {labels[(s, v)]}" for s, v in zip(cells["study"], cells["variant"])], cells.index
    )
    if cells["backbone"].nunique() > 1:
        names = _backbone_labels(summary["backbone"])
        text += " [" + cells["backbone"].map(names) + "]"
    return text


def _method_rank(method: str) -> tuple[int, str]:
    """FE-CLIP first, then the peers in :data:`PAPER_METHODS` order, then any other method by name."""
    order = list(PAPER_METHODS)
    return (order.index(method) if method in order else len(order), method)


def paper_bar_plots(summary: pd.DataFrame) -> dict[str, Plot]:
    """``bars_<metric>.png`` -> :class:`Plot` per metric with paper numbers: a panel per dataset, the
    paper's bar and one bar per compared row (study, variant, backbone), from 0, ± 1 std over seeds,
    the gap to the paper written on each bar. Only rows compared with the paper are drawn. Where rows of
    several methods are compared (FE-CLIP and its peers), each method's published bar comes first and its
    rows below it, each row's gap taken to its own method's number."""
    plots = {}
    cells = summary[(summary["averaging"] == "macro") & summary["paper"].notna()].copy()
    if cells.empty:
        return plots
    if "method" not in cells:
        cells["method"] = DEFAULT_METHOD
    cells["series"] = _paper_series(summary, cells)
    for metric in _ordered(cells["metric"], METRIC_ORDER):
        sub = cells[cells["metric"] == metric]
        # one training set per dataset under the paper's protocol, but evaluation-only runs may join it
        several_trains = sub.groupby(["dataset", "series"])["train_dataset"].nunique().gt(1).any()
        if several_trains:
            sub = sub.assign(series=sub["series"] + " (train " + sub["train_dataset"] + ")")
        methods = sorted(set(sub["method"]), key=_method_rank)
        names = {m: f"{method_name(m)} (paper)" if len(methods) > 1 else "paper" for m in methods}
        datasets = _ordered(sub["dataset"], DATASET_ORDER)
        every = list(dict.fromkeys(sorted(sub["series"])))
        drawn_all, key = _codes(every, MAX_LABEL + 8)
        code = dict(zip(every, drawn_all))
        most = int(sub.groupby("dataset")["series"].nunique().max()) + len(methods)
        nrows, ncols = _grid(len(datasets))
        longest = max(len(s) for s in drawn_all + list(names.values()))
        width = ncols * (_PANEL_INCHES + 0.075 * longest)
        height = nrows * (0.3 * most + 1.1) + 1.4
        fig = _new_figure(width, height)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(datasets) :]:
            ax.remove()
        labels_drawn = []
        for ax, dataset in zip(axes, datasets):
            part = sub[sub["dataset"] == dataset]
            rows, y = [], 0
            for method in sorted(set(part["method"]), key=_method_rank):
                mine = part[part["method"] == method].sort_values("series")
                paper = float(mine["paper"].iloc[0])
                ax.barh(y, paper, color="0.7", height=0.7)
                ax.text(1, y, f"{method_name(method)} {paper:.1f}", va="center", ha="left", fontsize=7)
                rows.append(names[method])
                at = np.arange(y + 1, y + 1 + len(mine))
                means = mine["mean"].to_numpy(dtype=float)
                stds = mine["std"].fillna(0.0).to_numpy(dtype=float)
                ax.barh(at, np.nan_to_num(means), xerr=stds, color="C0", height=0.7, capsize=2)
                for yy, mean, gap in zip(at, means, mine["gap"].to_numpy(dtype=float)):
                    text = "n/a" if math.isnan(mean) else f"{mean:.1f} (gap {gap:+.1f})".replace("-", "−")
                    colour = "white" if mean > 30 else "black"
                    ax.text(1, yy, text, va="center", ha="left", fontsize=7, color=colour)
                if len(methods) == 1:
                    ax.axvline(paper, color=_PAPER_COLOUR, linestyle="--", linewidth=1)
                drawn = [code[s] for s in mine["series"]]
                rows += drawn
                labels_drawn += drawn
                y += 1 + len(mine)
            ax.set_yticks(np.arange(len(rows)), rows, fontsize=8)
            ax.set_ylim(len(rows) - 0.5, -0.5)
            ax.set_xlim(0, 100)
            ax.set_xlabel("% (axis from 0)", fontsize=8)
            ax.set_title(dataset, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(axis="x", alpha=0.3)
        _draw_key(fig, key)
        label = metric_label(metric, {fpr_limit(v) for v in sub["variant"]})
        if len(methods) > 1:
            title = f"{label}: ours vs the published numbers ({PAPER_SETTING}) of each method"
            caption = (
                f"bars from 0; ours: mean over seeds of the macro over categories, error bar {ERROR_BARS}, "
                "gap = ours − the published number of the row's own method, in points; grey bar: a "
                "method's published number, its rows below it; only rows compared with the paper (its "
                "CLIP, a complete macro, its training protocol)"
            )
        else:
            title = f"{label}: ours vs the paper ({method_name(methods[0])} {PAPER_SETTING})"
            caption = (
                f"bars from 0; ours: mean over seeds of the macro over categories, error bar {ERROR_BARS}, "
                "gap = ours − paper in points; grey bar and dashed line: the paper's number; only rows "
                "compared with the paper (its CLIP, a complete macro, its training protocol)"
            )
        if metric in PRO_METRICS:
            caption += "; " + pro_caption(metric, {fpr_limit(v) for v in sub["variant"]})
        fig.suptitle(title + "\n" + _wrap(caption, width), fontsize=9)
        name = f"bars_{_safe_name(metric)}.png"
        plots[name] = Plot(fig, title, caption, list(datasets), list(dict.fromkeys(labels_drawn)), key)
    return plots


def render_paper_bars(summary: pd.DataFrame) -> dict[str, bytes]:
    """:func:`paper_bar_plots` as PNG bytes."""
    return {name: plot.png() for name, plot in paper_bar_plots(summary).items()}
