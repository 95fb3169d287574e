"""Pictures: heatmap overlays (with a colour bar and the image score), per-category montages of the best
and worst cases, ROC/PRO curves.

Conventions:

* images are RGB ``uint8 (H, W, 3)`` (gray ``(H, W)`` and floats in [0, 1] are converted); masks are
  ``(H, W)`` with anomalous pixels ``> 0``; maps are ``(H, W)`` floats, higher = more anomalous;
* every file is written atomically (a temporary name in the same folder, then a rename);
* matplotlib is imported lazily and used through its object API with the Agg canvas (no pyplot, no
  global backend switch, safe in worker threads and on machines without a display);
* the curves are those of :mod:`feclip.metrics` (:func:`~feclip.metrics.roc_curve`,
  :func:`~feclip.metrics.pro_curve`), and the numbers in their legends are the metrics' own, so a
  figure shows exactly what ``metrics.csv`` integrates.

The cases of a montage (:func:`montage_cases`), each drawn at its image's own aspect ratio:

* **best / worst anomalous**: with pixel ground truth, the anomalous images with a non-empty mask
  ranked by their **per-image pixel AUROC** (map against mask; ties broken by the image score): best =
  highest (the defect is found where it is), worst = lowest. Without pixel ground truth, the anomalous
  images ranked by their **image score**: best = highest, worst = lowest (the missed ones);
* **false positives**: the normal images with the **highest image scores** (the ones that would be
  flagged first).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feclip.fileio import atomic_write

__all__ = [
    "MontageCase",
    "category_montage",
    "montage_cases",
    "montage_figure",
    "overlay",
    "overlay_figure",
    "plot_roc_pro",
    "pro_points",
    "rank_cases",
    "roc_points",
    "roc_pro_figure",
    "save_category_figures",
    "save_figure",
    "save_png",
]


# ----------------------------------------------------------------------------------------------------
# Arrays and files
# ----------------------------------------------------------------------------------------------------


def _as_rgb(image) -> np.ndarray:
    """Any image array -> uint8 ``(H, W, 3)``: gray is repeated, floats in [0, 1] are scaled by 255."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return arr


def save_png(path: str | os.PathLike, array) -> Path:
    """Write ``array`` as a PNG atomically; returns the path (parent folders are created).

    Accepts uint8 ``(H, W)`` or ``(H, W, 3)``; a bool array is written as 0/255.
    """
    from PIL import Image

    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"save_png needs a uint8 (H, W) or (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return atomic_write(path, lambda tmp: Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG"))


_DPI = 100  # of every figure written: a figure's pixel layout (overlay_figure) assumes it


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Render a matplotlib Figure with the Agg canvas and write it atomically as PNG at 100 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))


# ----------------------------------------------------------------------------------------------------
# Overlay
# ----------------------------------------------------------------------------------------------------


_CHUNK_PIXELS = 1 << 18  # pixels blended at a time: the float64 temporaries stay a few MB at any size


def _finite_range(amap: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the finite values of ``amap``, read in chunks; None when there is none."""
    flat = np.asarray(amap).reshape(-1)
    lo, hi = np.inf, -np.inf
    for start in range(0, flat.size, _CHUNK_PIXELS):
        part = flat[start : start + _CHUNK_PIXELS]
        part = part[np.isfinite(part)]
        if part.size:
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    return (lo, hi) if lo <= hi else None


def _colour_range(amap: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """``vmin`` and ``vmax``, each defaulting to the map's finite minimum / maximum (0 / 1 if none)."""
    if vmin is None or vmax is None:
        found = _finite_range(amap)
        if vmin is None:
            vmin = found[0] if found else 0.0
        if vmax is None:
            vmax = found[1] if found else 1.0
    return float(vmin), float(vmax)


def _normalise(amap: np.ndarray, vmin: float | None, vmax: float | None) -> np.ndarray:
    """Scale to [0, 1] between ``vmin`` and ``vmax`` (default: the map's range); NaN -> 0."""
    lo, hi = _colour_range(amap, vmin, vmax)
    return _scale(np.asarray(amap, dtype=np.float64), lo, hi)


def _scale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(a)
    return np.nan_to_num(np.clip((a - lo) / (hi - lo), 0.0, 1.0))


def overlay(
    image_rgb, amap, alpha: float = 0.5, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an image.

    ``out = (1 - alpha) * image + alpha * jet((amap - vmin) / (vmax - vmin))``, the map clipped to
    [vmin, vmax] (defaults: the map's own min and max). Shape: image ``(H, W, 3)`` uint8, amap
    ``(H, W)`` -> ``(H, W, 3)`` uint8. Computed in float64 a band of rows at a time, so the memory
    beyond the output stays a few MB whatever the image size.
    """
    from matplotlib import colormaps

    image = _as_rgb(image_rgb)
    amap = np.asarray(amap)
    if amap.shape != image.shape[:2]:
        raise ValueError(f"map shape {amap.shape} differs from the image's {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    lo, hi = _colour_range(amap, vmin, vmax)
    jet = colormaps["jet"]
    out = np.empty_like(image)
    rows = max(1, _CHUNK_PIXELS // max(1, image.shape[1]))
    for r in range(0, image.shape[0], rows):
        colour = jet(_scale(np.asarray(amap[r : r + rows], dtype=np.float64), lo, hi))[:, :, :3] * 255.0
        blend = (1.0 - alpha) * image[r : r + rows].astype(np.float64) + alpha * colour
        out[r : r + rows] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------------
# The overlay figure of feclip-predict: the overlay's own pixels, a colour bar, the image score
# ----------------------------------------------------------------------------------------------------


def overlay_figure(
    image_rgb,
    amap,
    score: float | None = None,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
):
    """A matplotlib Figure: :func:`overlay` drawn at its exact pixels (``figimage``: not resampled when
    saved at the figure's 100 dpi, as :func:`save_figure` does), a colour bar of the map values on its
    right and, above it, the image score and the colour range (the map's own min-max, or
    ``vmin``/``vmax``).

    Layout in pixels (fonts and margins grow for images over 600 px): a header of two text lines, the
    overlay at the top left below it (rows ``header .. header + H``, columns ``0 .. W``), the colour bar
    to its right. Shape: image ``(H, W, 3)``, amap ``(H, W)``; the saved PNG is at least
    ``(header + H, W + bar)``.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    pixels = overlay(image_rgb, amap, alpha, vmin, vmax)
    lo, hi = _colour_range(amap, vmin, vmax)
    h, w = pixels.shape[:2]
    s = max(1.0, max(h, w) / 600.0)
    top, bar, pad = round(44 * s), round(110 * s), round(8 * s)
    width, height = max(w + bar, round(260 * s)), top + max(h, round(200 * s))
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    fig.figimage(pixels, xo=0, yo=height - top - h, origin="upper")
    font = 9 * s
    lines = [f"image score {score:.4f}" if score is not None else "image score: none"]
    fixed = vmin is not None and vmax is not None
    lines.append(f"map [{lo:.3g}, {hi:.3g}]: " + ("fixed colour range" if fixed else "own colour range"))
    fig.text(pad / width, 1 - pad / height, "\n".join(lines), ha="left", va="top", fontsize=font)
    cax = fig.add_axes(
        (
            (w + 1.5 * pad) / width,
            pad / height,
            14 * s / width,
            (height - top - 2 * pad) / height,
        ),
        label="<colorbar>",
    )
    mappable = ScalarMappable(norm=Normalize(lo, hi if hi > lo else lo + 1e-12), cmap="jet")
    colorbar = fig.colorbar(mappable, cax=cax)
    colorbar.set_label("anomaly map", fontsize=font)
    cax.tick_params(labelsize=font * 0.9)
    return fig


# ----------------------------------------------------------------------------------------------------
# Curves: those of feclip.metrics, with the metrics' numbers
# ----------------------------------------------------------------------------------------------------


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`feclip.metrics.roc_curve` (``(fpr, tpr)`` from (0, 0) to (1, 1); ``None`` with one
    class). Shape: ``(M,), (M,) -> (P,), (P,)``."""
    from feclip.metrics import roc_curve

    return roc_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())


def _fpr_limit(fpr_limit: float | None) -> float:
    """``fpr_limit``, or AUPRO's default (:data:`feclip.metrics.aupro.DEFAULT_FPR_LIMIT`, imported here
    when needed: the metrics import scikit-learn, which the overlays of ``feclip-predict`` do not need)."""
    if fpr_limit is not None:
        return fpr_limit
    from feclip.metrics.aupro import DEFAULT_FPR_LIMIT

    return DEFAULT_FPR_LIMIT


def _aupro_methods(methods) -> tuple[str, ...]:
    if methods is not None:
        return tuple(methods)
    from feclip.metrics.aupro import DEFAULT_METHODS

    return tuple(DEFAULT_METHODS)


def pro_points(masks, maps, fpr_limit: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact PRO-vs-FPR curve up to ``fpr_limit`` (:func:`feclip.metrics.pro_curve`,
    ``method="exact"``); ``None``: AUPRO's default limit (``eval.aupro.fpr_limit``'s). ``None`` without
    both normal and anomalous pixels. Shape: ``N`` masks and maps ``(H_i, W_i)`` -> ``(P,), (P,)``."""
    from feclip.metrics import pro_curve

    return pro_curve(_as_list(masks), _as_list(maps), _fpr_limit(fpr_limit), "exact")


def _as_list(arrays) -> list[np.ndarray]:
    return [np.asarray(a) for a in arrays]


#: How the curves figure names each AUPRO: the metrics.csv column, the method, whose definition.
_AUPRO_LABEL = {
    "exact": "pixel_aupro: exact (MVTec AD / anomalib)",
    "zsad": "pixel_aupro_zsad: zsad (AnomalyCLIP, the paper's PRO)",
}


def roc_pro_figure(labels, scores, masks, maps, fpr_limit: float | None = None, aupro_methods=None):
    """A matplotlib Figure with three panels: image ROC, pixel ROC, and PRO vs FPR up to ``fpr_limit``.

    Every curve is the :mod:`feclip.metrics` one and every number in a legend is the metric that
    ``metrics.csv`` reports for these arrays: ``image_auroc``, ``pixel_auroc`` (the curves' areas), and
    per AUPRO method of ``aupro_methods`` (default both) its value: ``exact`` is drawn as its curve
    (area / ``fpr_limit``); ``zsad`` as the points of its 200-threshold grid with FPR < ``fpr_limit``,
    whose FPRs it rescales to [0, 1] before integrating (docs/metrics.md).

    Args:
        labels, scores: ``(N,)`` image labels (0/1) and scores.
        masks, maps: ``N`` masks and maps ``(H_i, W_i)`` (a list or an ``(N, H, W)`` stack), or ``None``
            for a dataset without pixel ground truth (the pixel panels then say so).
        fpr_limit: the FPR limit of AUPRO (``eval.aupro.fpr_limit``); ``None``: AUPRO's default.
        aupro_methods: ``eval.aupro.methods``; ``None``: AUPRO's default (both).
    """
    from matplotlib.figure import Figure

    from feclip.metrics import image_auroc, pixel_auroc, roc_curve
    from feclip.metrics.aupro import aupro_from_regions, region_pixels
    from feclip.metrics.curves import pro_curve_from_regions

    fpr_limit = _fpr_limit(fpr_limit)
    methods = _aupro_methods(aupro_methods)
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    image = roc_curve(labels, scores)
    _roc_panel(axes[0], image, "image ROC", "image_auroc", image_auroc(labels, scores))
    no_gt = "undefined\n(no pixel ground truth)"
    if masks is None or maps is None:
        _roc_panel(axes[1], None, "pixel ROC", "pixel_auroc", float("nan"), no_gt)
        _pro_panel(axes[2], fpr_limit, {}, no_gt)
        return fig
    masks, maps = _as_list(masks), _as_list(maps)
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    pixel = roc_curve(flat_masks, flat_maps)
    _roc_panel(axes[1], pixel, "pixel ROC", "pixel_auroc", pixel_auroc(flat_masks, flat_maps))
    del flat_masks, flat_maps
    rp = region_pixels(masks, maps)  # split, sorted and labelled once for both methods
    curves = {
        m: (pro_curve_from_regions(rp, fpr_limit, m), aupro_from_regions(rp, fpr_limit, m)) for m in methods
    }
    _pro_panel(axes[2], fpr_limit, curves, "undefined\n(no anomalous or no normal pixel)")
    return fig


def plot_roc_pro(
    labels, scores, masks, maps, path: str | os.PathLike, fpr_limit: float | None = None, aupro_methods=None
) -> Path:
    """Write :func:`roc_pro_figure` as a PNG (atomically); returns the path."""
    return save_figure(roc_pro_figure(labels, scores, masks, maps, fpr_limit, aupro_methods), path)


def _roc_panel(ax, curve, title: str, metric: str, value: float, why_empty: str | None = None) -> None:
    ax.set_title(title)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    if curve is None:
        ax.text(0.5, 0.5, why_empty or "undefined\n(one class only)", ha="center", va="center")
        return
    fpr, tpr = curve
    ax.plot(fpr, tpr, color="C0", label=f"{metric} {value:.3f}")
    ax.legend(loc="lower right")


def _pro_panel(ax, fpr_limit: float, curves: dict, why_empty: str) -> None:
    ax.set_title(f"PRO vs FPR, FPR <= {fpr_limit:g} (eval.aupro.fpr_limit)")
    ax.set_xlabel("false positive rate (normal pixels)")
    ax.set_ylabel("per-region overlap")
    ax.set_xlim(0, fpr_limit)
    ax.set_ylim(0, 1.02)
    drawn = False
    for method, (curve, value) in curves.items():
        if curve is None:
            continue
        fpr, pro = curve
        label = f"{_AUPRO_LABEL[method]}\n{value:.3f}"
        if method == "exact":
            label += f" = area to FPR {fpr_limit:g} / {fpr_limit:g}"
            ax.plot(fpr, pro, color="C1", label=label)
        else:
            label += f" ({len(fpr)} grid points with FPR < {fpr_limit:g}, FPR rescaled to [0, 1])"
            ax.plot(fpr, pro, color="C2", marker=".", markersize=4, linestyle="none", label=label)
        drawn = True
    if drawn:
        ax.legend(loc="lower right", fontsize=7.5)
    else:
        ax.text(fpr_limit / 2, 0.5, why_empty, ha="center", va="center")


# ----------------------------------------------------------------------------------------------------
# Montage: best and worst anomalous images, worst false positives
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MontageCase:
    """One row of a montage: ``kind`` (``"best anomalous 1"``, ``"worst anomalous 1"``,
    ``"false positive 1"``), the image's ``index`` and a short ``note`` (its pixel AUROC, its rank)."""

    kind: str
    index: int
    note: str


def _pixel_auroc(mask, amap) -> float:
    from feclip.metrics import pixel_auroc

    return pixel_auroc(np.asarray(mask) > 0, np.asarray(amap, dtype=np.float64))


def rank_cases(labels, scores, masks=None, maps=None) -> tuple[list[int], dict[int, str], str]:
    """The anomalous images ranked best first, a note per image, and what the ranking measures.

    With masks and maps, the anomalous images with a non-empty mask by per-image pixel AUROC
    (highest first; ties: higher image score, then index); otherwise all anomalous images by image
    score (highest first; ties: index). Shape: labels, scores ``(N,)``; masks, maps ``N`` arrays
    ``(H_i, W_i)`` or ``None``.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    anomalous = [i for i in range(labels.size) if labels[i] > 0]
    with_gt = []
    if masks is not None and maps is not None:
        with_gt = [i for i in anomalous if np.asarray(masks[i]).any()]
    if with_gt:
        auc = {i: _pixel_auroc(masks[i], maps[i]) for i in with_gt}
        ranked = sorted(with_gt, key=lambda i: (-np.nan_to_num(auc[i], nan=-1.0), -scores[i], i))
        return ranked, {i: f"pixel AUROC {auc[i]:.3f}" for i in ranked}, "per-image pixel AUROC"
    ranked = sorted(anomalous, key=lambda i: (-scores[i], i))
    return ranked, {i: "" for i in ranked}, "image score"


def _split_best_worst(ranked: list[int], n_best: int, n_worst: int) -> tuple[list[int], list[int]]:
    """Best ``ranked[:n_best]`` and worst (the last, worst first) without repeating an index; with fewer
    cases than ``n_best + n_worst`` they are shared in proportion (best rounded up)."""
    n_best, n_worst = max(0, n_best), max(0, n_worst)
    if 0 < len(ranked) < n_best + n_worst:
        n_best = -(-len(ranked) * n_best // (n_best + n_worst))
    best = ranked[:n_best]
    worst = list(reversed(ranked[len(best) :]))[:n_worst]
    return best, worst


def montage_cases(
    labels, scores, masks=None, maps=None, n_best: int = 2, n_worst: int = 2, n_false_pos: int = 2
) -> tuple[list[MontageCase], str]:
    """The rows of a montage and the sentence that says what best and worst mean (module docstring).

    Rows: the ``n_best`` best anomalous images, the ``n_worst`` worst ones, then the ``n_false_pos``
    normal images with the highest image scores (ties: index). Each note gives the pixel AUROC (when
    ranked by it) and how the image score compares with the other class.
    Shape: labels, scores ``(N,)``; masks, maps ``N`` arrays ``(H_i, W_i)`` or ``None``.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    ranked, notes, measure = rank_cases(labels, scores, masks, maps)
    best, worst = _split_best_worst(ranked, n_best, n_worst)
    normal = sorted((i for i in range(labels.size) if labels[i] == 0), key=lambda i: (-scores[i], i))
    normal_scores, anomalous_scores = scores[labels == 0], scores[labels > 0]

    def note(i: int) -> str:
        parts = [notes[i]] if notes.get(i) else []
        if labels[i] > 0 and normal_scores.size:
            higher = int((normal_scores > scores[i]).sum())
            parts.append(f"{higher}/{normal_scores.size} normal images score higher")
        if labels[i] == 0 and anomalous_scores.size:
            lower = int((anomalous_scores < scores[i]).sum())
            parts.append(f"scores above {lower}/{anomalous_scores.size} anomalous images")
        return ", ".join(parts)

    cases = [MontageCase(f"best anomalous {r + 1}", i, note(i)) for r, i in enumerate(best)]
    cases += [MontageCase(f"worst anomalous {r + 1}", i, note(i)) for r, i in enumerate(worst)]
    cases += [MontageCase(f"false positive {r + 1}", i, note(i)) for r, i in enumerate(normal[:n_false_pos])]
    what = "pixel AUROC of the map against the mask" if measure != "image score" else "image score"
    meaning = (
        f"best/worst anomalous: highest/lowest {what}; "
        "false positives: normal images with the highest image scores"
    )
    return cases, meaning


_MONTAGE_SIDE = 384  # longest side of a montage picture, in pixels (enough to see; bounded memory)


def _resize_float(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (h, w) (PIL, float32)."""
    from PIL import Image

    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape == tuple(size):
        return amap
    return np.asarray(Image.fromarray(amap, mode="F").resize(size[::-1], Image.Resampling.BILINEAR))


def _display_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    if max(h, w) <= max_side:
        return h, w
    return (
        (max_side, max(1, round(w * max_side / h))) if h >= w else (max(1, round(h * max_side / w)), max_side)
    )


def _fit(image, mask, amap, max_side: int = _MONTAGE_SIDE):
    """The image at its own aspect ratio, its longer side at most ``max_side`` (Lanczos), with the mask
    (nearest) and the map (bilinear) brought to the same size. Returns ``(image (h, w, 3) uint8,
    mask (h, w) bool or None, map (h, w) float32)``."""
    from PIL import Image

    image = _as_rgb(image)
    size = _display_size(*image.shape[:2], max_side)
    if image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.LANCZOS))
    if mask is not None:
        mask = np.asarray(mask) > 0
        if mask.shape != size:
            pil = Image.fromarray(mask.astype(np.uint8) * 255)
            mask = np.asarray(pil.resize(size[::-1], Image.Resampling.NEAREST)) > 127
    return image, mask, _resize_float(amap, size)


def montage_figure(
    cases: Sequence[MontageCase],
    picture: Callable[[int], tuple],
    scores,
    labels,
    title: str | None = None,
    meaning: str | None = None,
    names: Sequence[str] | None = None,
):
    """A matplotlib Figure: one row per case, columns image, ground truth, map over the image (one
    colour scale for all rows, with a colour bar); every picture at its own aspect ratio.

    Args:
        cases: the rows (:func:`montage_cases`).
        picture: ``picture(i) -> (image (H, W, 3), mask (H', W') or None, map (H'', W''))`` of image ``i``;
            the mask and map are resized to the image's size (:func:`_fit`), so an original image can be
            shown with its evaluation-size map.
        scores, labels: ``(N,)``.
        title, meaning: the title's lines (the category, what best and worst mean).
        names: ``N`` short names of the images (e.g. ``defect/000.png``), shown in each row's caption.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not cases:
        raise ValueError("montage_figure: no cases to show")
    shown = [_fit(*picture(c.index)) for c in cases]
    lo = min(float(np.nanmin(m)) for _, _, m in shown)
    hi = max(float(np.nanmax(m)) for _, _, m in shown)
    hi = hi if hi > lo else lo + 1e-12
    aspect = max(img.shape[1] / img.shape[0] for img, _, _ in shown)
    panel_h = 2.4
    panel_w = panel_h * min(max(aspect, 0.5), 3.0)
    header = 0.25 + 0.25 * sum(bool(t) for t in (title, meaning))
    fig = Figure(figsize=(3 * panel_w + 1.3, panel_h * len(cases) + header + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(len(cases), 3, squeeze=False))
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    for r, (case, (image, mask, amap)) in enumerate(zip(cases, shown)):
        row = axes[r]
        row[0].imshow(image)
        if mask is None:
            row[1].text(0.5, 0.5, "no pixel GT", ha="center", va="center", transform=row[1].transAxes)
            row[1].set_aspect(image.shape[0] / image.shape[1], adjustable="box")
        else:
            row[1].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        row[2].imshow(image)
        row[2].imshow(amap, cmap="jet", vmin=lo, vmax=hi, alpha=0.5)
        if mask is not None and mask.any():
            row[2].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        name = f": {names[case.index]}" if names is not None else ""
        kind = "anomalous" if labels[case.index] > 0 else "normal"
        caption = f"{case.kind}{name} ({kind})\nscore {scores[case.index]:.4f}"
        caption += f", {case.note}" if case.note else ""
        row[0].set_title(caption, fontsize=8, loc="left")
    for c, name in enumerate(("image", "ground truth", "map over the image (GT outlined)")):
        axes[-1, c].set_xlabel(name, fontsize=8)
    colorbar = fig.colorbar(
        ScalarMappable(norm=Normalize(lo, hi), cmap="jet"), ax=axes[:, 2].tolist(), shrink=0.9, aspect=30
    )
    colorbar.set_label("anomaly map (one scale for all rows)", fontsize=8)
    head = [t for t in (title, meaning) if t]
    if head:
        fig.suptitle("\n".join(head), fontsize=9)
    return fig


def category_montage(
    images,
    masks,
    maps,
    scores,
    labels,
    path: str | os.PathLike,
    n_best: int = 2,
    n_worst: int = 2,
    n_false_pos: int = 2,
    title: str | None = None,
    picture: Callable[[int], tuple] | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """Write a montage PNG of one category: the best and worst anomalous images and the worst false
    positives (:func:`montage_cases`), drawn by :func:`montage_figure`.

    Args:
        images: ``N`` RGB images ``(H_i, W_i, 3)`` uint8 (a list or a stack); may be ``None`` with
            ``picture``.
        masks: ``N`` masks or ``None`` (no pixel ground truth); with ``maps``, the ranking's input.
        maps: ``N`` anomaly maps (the evaluated ones: ranking and display).
        scores, labels: ``(N,)``.
        path: the PNG file.
        n_best, n_worst, n_false_pos: rows of each kind (fewer when there are fewer cases).
        title: the first title line (e.g. the dataset and category).
        picture: ``picture(i) -> (image, mask or None, map)`` to show image ``i`` (e.g. the original
            image and mask, read only for the rows shown); default ``(images[i], masks[i], maps[i])``.
        names: ``N`` short image names for the captions.
    """
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        raise ValueError("category_montage: no images")
    cases, meaning = montage_cases(labels, scores, masks, maps, n_best, n_worst, n_false_pos)
    if picture is None:

        def picture(i: int) -> tuple:
            return images[i], None if masks is None else masks[i], maps[i]

    n_anomalous = int((labels > 0).sum())
    counts = f"{n_anomalous} anomalous, {labels.size - n_anomalous} normal images"
    head = f"{title}: {counts}" if title else counts
    fig = montage_figure(cases, picture, scores, labels, head, meaning, names)
    return save_figure(fig, path)


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "category"


def save_category_figures(
    out_dir,
    category: str,
    images,
    masks,
    maps,
    scores,
    labels,
    fpr_limit: float | None = None,
    *,
    aupro_methods=None,
    picture: Callable[[int], tuple] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/figures/<category>_montage.png`` and ``<category>_curves.png``.

    Arguments as in :func:`category_montage` and :func:`roc_pro_figure` (one category's images or
    ``None`` with ``picture``, masks or ``None``, maps, scores, labels; ``fpr_limit`` and
    ``aupro_methods`` of the PRO panel, a run's ``eval.aupro.*``). Returns ``{"montage": path,
    "curves": path}``.
    """
    folder = Path(out_dir) / "figures"
    stem = _safe_name(category)
    montage = category_montage(
        images,
        masks,
        maps,
        scores,
        labels,
        folder / f"{stem}_montage.png",
        title=str(category),
        picture=picture,
        names=names,
    )
    curves = plot_roc_pro(
        labels, scores, masks, maps, folder / f"{stem}_curves.png", fpr_limit, aupro_methods
    )
    return {"montage": montage, "curves": curves}
