"""Readable names for tables and plots: a variant by its swept values, a metric by what it measures.

A variant name is Hydra's override string (``protocol=visa_to_mvtec,taps=spread3``; any order, an
``eval`` prefix, a ``ckpt=``/``fallback=`` part). :func:`variant_axes` reads it as axes and values;
:func:`axis_roles` sorts the axes of a study into the ones it studies (they vary between the variants of
one panel: ``taps``), the ones the panels already tell (they vary only between panels: ``protocol``,
whose value is the panel's training set) and the fixed ones (one value in every variant); and
:func:`variant_labels` names each variant by its studied values only: ``taps=spread3`` -> ``spread3``, two
axes ``spread3 · lr/100``.

:func:`metric_label` says which AUPRO a number is: ``pixel_aupro_zsad`` is ``PRO (zsad, FPR<0.3)``
(AnomalyCLIP's evaluation, the paper's PRO) and ``pixel_aupro`` is ``AUPRO@0.3 (exact)`` (the
MVTec-style integral), with the FPR limit the variants ran with (``eval.aupro.fpr_limit``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from feclip.report.references import _split_overrides

__all__ = [
    "BARE",
    "DEFAULT_FPR_LIMIT",
    "FPR_LIMIT_KEY",
    "PRO_METRICS",
    "AxisRoles",
    "axis_roles",
    "format_value",
    "fpr_limit",
    "metric_label",
    "paper_aupro_options",
    "pro_caption",
    "pro_note",
    "variant_axes",
    "variant_labels",
    "variant_order",
]

#: The axis of the items of a variant name without ``=``: a plain name (``default``, ``spread3``) or the
#: ``eval`` prefix of evaluation-only runs.
BARE = ""
#: ``feclip.metrics.aupro.DEFAULT_FPR_LIMIT`` (not imported: the report stays free of scikit-image).
DEFAULT_FPR_LIMIT = "0.3"
#: The override that sets both AUPROs' FPR limit.
FPR_LIMIT_KEY = "eval.aupro.fpr_limit"
#: The two AUPROs of a metrics.csv: exact (MVTec AD / anomalib) and zsad (AnomalyCLIP, the paper's PRO).
PRO_METRICS = ("pixel_aupro", "pixel_aupro_zsad")
#: How plots name the other metrics.
_METRIC_NAMES = {
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1_max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
}
#: Values shown without their axis name: a word, not a number, a boolean, ``null`` or a list.
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_./+-]*")
_NOT_WORDS = {"true", "false", "null", "none"}


def variant_axes(variant: str) -> dict[str, str]:
    """The axes a variant name sets: ``protocol=visa_to_mvtec,taps=spread3`` -> ``{protocol: ..., taps: ...}``.

    Commas inside brackets do not split (``eval.map_taps=[15,18,21]``); a leading ``+``/``~`` of a key is
    dropped. Items without ``=`` (a plain name such as ``spread3`` or ``default``, the ``eval`` prefix)
    are joined under the axis :data:`BARE`.
    """
    axes: dict[str, str] = {}
    bare = []
    for item in _split_overrides(str(variant)):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if sep and key:
            axes[key] = value
        else:
            bare.append(item)
    if bare:
        axes[BARE] = ",".join(bare)
    return axes


def _value_rank(value: str | None) -> tuple:
    """Sort key of one axis value: missing first, then numbers by value, then text."""
    if value is None:
        return (0, 0.0, "")
    try:
        return (1, float(value), value)
    except ValueError:
        return (2, 0.0, value)


def variant_order(variants: Iterable[str], keys: Sequence[str]) -> list[str]:
    """``variants`` sorted by their values of ``keys`` in turn (numbers by value), then by name."""
    axes = {v: variant_axes(v) for v in set(variants)}
    return sorted(axes, key=lambda v: ([_value_rank(axes[v].get(k)) for k in keys], v))


@dataclass(frozen=True)
class AxisRoles:
    """The axes of a study's variant names, by the part they play in its tables and plots.

    ``studied``: values that differ between the variants of one panel (the study's question, ``taps``);
    ``facets``: values that differ only between panels (``protocol``: a panel is one training and
    evaluated dataset, so it already says which); ``fixed``: (axis, value) set alike in every variant.
    """

    studied: tuple[str, ...]
    facets: tuple[str, ...]
    fixed: tuple[tuple[str, str], ...]

    @property
    def label_axes(self) -> tuple[str, ...]:
        """The axes a variant's label shows: the studied ones, or the facets when nothing else varies."""
        return self.studied or self.facets


def _axis_keys(axes: Iterable[Mapping[str, str]]) -> list[str]:
    """Every axis of some variants: :data:`BARE` first, then by name."""
    keys = {k for a in axes for k in a}
    return sorted(keys, key=lambda k: (k != BARE, k))


def axis_roles(cells: pd.DataFrame, panel_columns: Sequence[str] = ("train_dataset", "dataset")) -> AxisRoles:
    """Sort the axes of the variants in ``cells`` (a frame with ``variant`` and ``panel_columns``).

    An axis is *fixed* when every variant has the same value for it, a *facet* when the variants of each
    panel (one value of ``panel_columns``) share its value, and *studied* otherwise. With no
    ``panel_columns`` every varying axis is studied.
    """
    variants = sorted(set(cells["variant"]))
    axes = {v: variant_axes(v) for v in variants}
    pairs = cells[["variant", *panel_columns]].drop_duplicates()
    studied, facets, fixed = [], [], []
    for key in _axis_keys(axes.values()):
        values = {axes[v].get(key) for v in variants}
        if len(values) == 1:
            value = values.pop()
            if value is not None:
                fixed.append((key, value))
            continue
        if panel_columns:
            per_panel = (
                pairs["variant"]
                .map(lambda v, k=key: axes[v].get(k, "\0missing"))
                .groupby([pairs[c] for c in panel_columns], sort=False)
                .nunique()
            )
            if (per_panel <= 1).all():
                facets.append(key)
                continue
        studied.append(key)
    return AxisRoles(tuple(studied), tuple(facets), tuple(fixed))


def _short_key(key: str) -> str:
    """An axis name without its config path: ``eval.aupro.fpr_limit`` -> ``fpr_limit``."""
    return key.rsplit(".", 1)[-1] if key else key


def format_value(key: str, value: str) -> str:
    """One axis value as a label shows it.

    A word stands alone (``spread3``; ``lr_div_100`` reads ``lr/100``); a number, a boolean, ``null`` or a
    list keeps the last part of its axis name (``fpr_limit=0.1``, ``include_normal=true``), which alone
    it would not tell.
    """
    text = value.replace("_div_", "/")
    if key == BARE or (_WORD.fullmatch(value) and value.lower() not in _NOT_WORDS):
        return text
    return f"{_short_key(key)}={text}"


def variant_labels(
    cells: pd.DataFrame, panel_columns: Sequence[str] = ("train_dataset", "dataset")
) -> tuple[dict[str, str], AxisRoles]:
    """Short labels of the variants in ``cells``: their values of the studied axes joined by `` · ``.

    ``protocol=visa_to_mvtec,taps=spread3`` in a study of taps sets over both protocols is ``spread3``
    (its panel tells the protocol). A study whose variants differ only by the panel shows the facets'
    values (``mvtec_to_all``), a single variant its name. Where two variants of one panel (and backbone)
    would read the same, every label is the full variant name instead.

    Returns the labels by variant and the :class:`AxisRoles` they were made from.
    """
    roles = axis_roles(cells, panel_columns)
    keys = roles.label_axes
    labels = {}
    for variant in set(cells["variant"]):
        axes = variant_axes(variant)
        parts = [format_value(k, axes[k]) for k in keys if k in axes]
        labels[variant] = " · ".join(parts) or variant
    group = [*panel_columns, "backbone"] if "backbone" in cells else list(panel_columns)
    rows = cells[["variant", *group]].drop_duplicates()
    named = rows.assign(label=rows["variant"].map(labels))
    if group:
        clash = named.groupby([*group, "label"], sort=False)["variant"].nunique().gt(1).any()
    else:
        clash = named.groupby("label")["variant"].nunique().gt(1).any()
    if clash:
        labels = {v: v for v in labels}
    return labels, roles


def fpr_limit(variant: str) -> str:
    """The FPR limit both AUPROs of a variant ran with: its ``eval.aupro.fpr_limit`` item, else 0.3.

    The report reads metrics.csv only: a limit set elsewhere than on the command line (an experiment
    file that fixes it without sweeping it) is not seen.
    """
    return variant_axes(variant).get(FPR_LIMIT_KEY, DEFAULT_FPR_LIMIT)


def paper_aupro_options(variant: str) -> bool:
    """Whether a variant's AUPROs ran with the paper's options: FPR limit 0.3, normal images included,
    no per-image normalisation (``eval.aupro.*`` items of its name; absent = the defaults)."""
    axes = variant_axes(variant)
    try:
        limit_ok = float(axes.get(FPR_LIMIT_KEY, DEFAULT_FPR_LIMIT)) == float(DEFAULT_FPR_LIMIT)
    except ValueError:
        limit_ok = False
    normal = axes.get("eval.aupro.include_normal", "true").lower() == "true"
    per_image = axes.get("eval.aupro.per_image_norm", "false").lower() == "true"
    return limit_ok and normal and not per_image


def metric_label(metric: str, limits: Iterable[str] | None = None) -> str:
    """How a metric is named in a plot or a table header; for an AUPRO, which one and its FPR limit.

    ``pixel_aupro_zsad`` -> ``PRO (zsad, FPR<0.3)``: AnomalyCLIP's 200-threshold PRO, points with
    FPR < L kept and rescaled, the PRO of FE-CLIP's tables; ``pixel_aupro`` -> ``AUPRO@0.3 (exact)``: the
    exact MVTec-style integral up to FPR = L. ``limits``: the FPR limits of the variants shown (default
    0.3); several read ``L``.
    """
    found = sorted(set(limits or [DEFAULT_FPR_LIMIT]))
    limit = found[0] if len(found) == 1 else "L"
    if metric == "pixel_aupro_zsad":
        return f"PRO (zsad, FPR<{limit})"
    if metric == "pixel_aupro":
        return f"AUPRO@{limit} (exact)"
    return _METRIC_NAMES.get(metric, metric)


def pro_caption(metric: str, limits: Iterable[str] | None = None) -> str:
    """What an AUPRO figure shows, in one clause (``PRO (zsad, FPR<0.3) = pixel_aupro_zsad: ...``)."""
    label = metric_label(metric, limits)
    if metric == "pixel_aupro_zsad":
        return f"{label} = pixel_aupro_zsad: AnomalyCLIP's evaluation, the PRO of FE-CLIP's tables"
    return f"{label} = pixel_aupro: the exact MVTec-style integral, not the paper's PRO"


def pro_note(metrics: Iterable[str], limits: Iterable[str] | None = None) -> str | None:
    """The note that says what each AUPRO among ``metrics`` is, or ``None`` when none is shown."""
    limits = sorted(set(limits or [DEFAULT_FPR_LIMIT]))
    shown = [m for m in PRO_METRICS[::-1] if m in set(metrics)]
    if not shown:
        return None
    limit = limits[0] if len(limits) == 1 else "L"
    parts = []
    if "pixel_aupro_zsad" in shown:
        parts.append(
            f"{metric_label('pixel_aupro_zsad', limits)} = pixel_aupro_zsad: AnomalyCLIP's evaluation code "
            f"(200 thresholds, the points with FPR < {limit} kept and their FPRs rescaled to [0, 1]), "
            "the PRO of FE-CLIP's tables and the one compared with the paper"
        )
    if "pixel_aupro" in shown:
        parts.append(
            f"{metric_label('pixel_aupro', limits)} = pixel_aupro: the exact MVTec-style area under the "
            f"PRO curve up to FPR = {limit}, divided by {limit}; a different number, never compared with "
            "the paper"
        )
    text = "; ".join(parts)
    if len(limits) > 1:
        text += f"; L = the variant's {FPR_LIMIT_KEY} ({DEFAULT_FPR_LIMIT} where it sets none)"
    return text + " (docs/metrics.md)."
