"""Pictures: heatmap overlays, per-category montages of the best and worst cases, ROC/PRO curves.

Conventions:

* images are RGB ``uint8 (H, W, 3)`` (gray ``(H, W)`` and floats in [0, 1] are converted); masks are
  ``(H, W)`` with anomalous pixels ``> 0``; maps are ``(H, W)`` floats, higher = more anomalous;
* every file is written atomically (a temporary name in the same folder, then a rename);
* matplotlib is imported lazily and used through its object API with the Agg canvas (no pyplot, no
  global backend switch, safe in worker threads and on machines without a display).

Best and worst cases (:func:`category_montage`): when the category has anomalous images with a
non-empty mask, those images are ranked by their **per-image pixel AUROC** (map against mask; ties
broken by the image score): *best* = highest, the defect is found where it is; *worst* = lowest.
Without pixel ground truth, all images are ranked by how well the image score agrees with the label
(min-max-scaled score for an anomalous image, one minus it for a normal one): *best* = confidently
right, *worst* = most wrong (a high-scoring normal image or a low-scoring anomalous one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from feclip.fileio import atomic_write

__all__ = [
    "category_montage",
    "overlay",
    "plot_roc_pro",
    "pro_points",
    "rank_cases",
    "roc_points",
    "save_category_figures",
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


def _save_figure(fig, path: str | os.PathLike) -> Path:
    """Render a matplotlib Figure with the Agg canvas and write it atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


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
# Curves (numpy, exact: one point per distinct score)
# ----------------------------------------------------------------------------------------------------


def _descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable descending order and the mask of the last position of each distinct score in it."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    last = np.r_[s[1:] != s[:-1], True]
    return order, last


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray] | None:
    """ROC curve ``(fpr, tpr)`` starting at (0, 0), one point per distinct score (predict positive for
    ``score >= t``); ``None`` when only one class is present. Shape: ``(M,), (M,) -> (P,), (P,)``."""
    y = np.asarray(labels).ravel() > 0
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order, last = _descending(s)
    tp = np.cumsum(y[order])[last]
    fp = np.cumsum(~y[order])[last]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under ``y(x)``."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _regions(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Flattened region ids over all masks: 0 normal, 1..R the 8-connected anomalous regions."""
    from skimage.measure import label

    out, offset = [], 0
    for m in masks:
        lab = label(np.asarray(m) > 0, connectivity=2).astype(np.int64)
        n = int(lab.max())
        out.append(np.where(lab > 0, lab + offset, 0).ravel())
        offset += n
    return np.concatenate(out)


def _fpr_limit(fpr_limit: float | None) -> float:
    """``fpr_limit``, or AUPRO's default (:data:`feclip.metrics.aupro.DEFAULT_FPR_LIMIT`, imported here
    when needed: the metrics import scikit-learn, which the overlays of ``feclip-predict`` do not need)."""
    if fpr_limit is not None:
        return fpr_limit
    from feclip.metrics.aupro import DEFAULT_FPR_LIMIT

    return DEFAULT_FPR_LIMIT


def pro_points(masks, maps, fpr_limit: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """PRO-vs-FPR curve up to ``fpr_limit`` (the last point interpolated at the limit); ``None``: AUPRO's
    default limit (:data:`feclip.metrics.aupro.DEFAULT_FPR_LIMIT`, ``eval.aupro.fpr_limit``'s).

    PRO(t) = mean over anomalous regions of the fraction of the region with ``map >= t``; FPR(t) = the
    fraction of normal pixels with ``map >= t``. ``None`` without both normal and anomalous pixels.
    Shape: lists (or stacks) of ``(H_i, W_i)`` masks and maps -> ``(P,), (P,)``.
    """
    fpr_limit = _fpr_limit(fpr_limit)
    region = _regions(masks)
    s = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    sizes = np.bincount(region)[1:]
    n_normal = int((region == 0).sum())
    if n_normal == 0 or sizes.size == 0:
        return None
    order, last = _descending(s)
    r = region[order]
    fpr = np.cumsum(r == 0)[last] / n_normal
    weight = np.where(r > 0, 1.0 / (sizes[np.maximum(r, 1) - 1] * sizes.size), 0.0)
    pro = np.cumsum(weight)[last]
    fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
    i = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if i < fpr.size:
        p_lim = np.interp(fpr_limit, fpr[i - 1 : i + 1], pro[i - 1 : i + 1])
        fpr, pro = np.r_[fpr[:i], fpr_limit], np.r_[pro[:i], p_lim]
    return fpr, pro


def plot_roc_pro(
    labels, scores, masks, maps, path: str | os.PathLike, fpr_limit: float | None = None
) -> Path:
    """Write a PNG with three panels: image ROC, pixel ROC, and PRO vs FPR up to ``fpr_limit``.

    Args:
        labels, scores: ``(N,)`` image labels (0/1) and scores.
        masks, maps: ``N`` masks and maps ``(H_i, W_i)`` (a list or an ``(N, H, W)`` stack), or ``None``
            for a dataset without pixel ground truth (the pixel panels then say so).
        path: the PNG file.
        fpr_limit: the FPR integration limit of AUPRO (its normalised value is in the legend); ``None``:
            AUPRO's default (:func:`pro_points`).
    """
    fpr_limit = _fpr_limit(fpr_limit)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    image_roc = roc_points(labels, scores)
    pixel_roc = pro = None
    if masks is not None and maps is not None:
        pixel_roc = roc_points(
            np.concatenate([np.asarray(m).ravel() for m in masks]),
            np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps]),
        )
        pro = pro_points(masks, maps, fpr_limit)
    no_gt = "undefined\n(no pixel ground truth)" if masks is None or maps is None else None
    _roc_panel(axes[0], image_roc, "image ROC", "image AUROC")
    _roc_panel(axes[1], pixel_roc, "pixel ROC", "pixel AUROC", no_gt)
    _pro_panel(axes[2], pro, fpr_limit)
    return _save_figure(fig, path)


def _roc_panel(ax, curve, title: str, what: str, why_empty: str | None = None) -> None:
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
    ax.plot(fpr, tpr, color="C0", label=f"{what} {_auc(fpr, tpr):.3f}")
    ax.legend(loc="lower right")


def _pro_panel(ax, curve, fpr_limit: float) -> None:
    ax.set_title(f"PRO vs FPR (FPR <= {fpr_limit:g})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("per-region overlap")
    ax.set_xlim(0, fpr_limit)
    ax.set_ylim(0, 1.02)
    if curve is None:
        ax.text(fpr_limit / 2, 0.5, "undefined\n(no pixel ground truth)", ha="center", va="center")
        return
    fpr, pro = curve
    ax.plot(fpr, pro, color="C1", label=f"AUPRO@{fpr_limit:g} {_auc(fpr, pro) / fpr_limit:.3f}")
    ax.legend(loc="lower right")


# ----------------------------------------------------------------------------------------------------
# Montage of the best and worst cases
# ----------------------------------------------------------------------------------------------------


def _pixel_auroc(mask: np.ndarray, amap: np.ndarray) -> float:
    curve = roc_points(np.asarray(mask).ravel(), np.asarray(amap, dtype=np.float64).ravel())
    return float("nan") if curve is None else _auc(*curve)


def rank_cases(labels, scores, masks=None, maps=None) -> tuple[list[int], dict[int, str]]:
    """Indices ranked best first (see the module docstring) and a short note per ranked index.

    Shape: labels, scores ``(N,)``; masks, maps ``N`` arrays ``(H_i, W_i)`` or ``None``.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    with_gt = []
    if masks is not None and maps is not None:
        with_gt = [i for i in range(labels.size) if labels[i] == 1 and np.asarray(masks[i]).any()]
    if with_gt:
        auc = {i: _pixel_auroc(masks[i], maps[i]) for i in with_gt}
        ranked = sorted(with_gt, key=lambda i: (-np.nan_to_num(auc[i], nan=-1.0), -scores[i], i))
        return ranked, {i: f"pixel AUROC {auc[i]:.3f}" for i in ranked}
    span = scores.max() - scores.min() if scores.size else 0.0
    scaled = (scores - scores.min()) / span if span > 0 else np.full_like(scores, 0.5)
    agreement = np.where(labels == 1, scaled, 1.0 - scaled)
    ranked = sorted(range(labels.size), key=lambda i: (-agreement[i], i))
    return ranked, {i: ("anomalous" if labels[i] == 1 else "normal") for i in ranked}


def _pick_rows(ranked: list[int], n_best: int, n_worst: int) -> list[tuple[str, int]]:
    """``[("best 1", i), ..., ("worst 1", j), ...]`` without repeating an index.

    With fewer ranked cases than ``n_best + n_worst`` they are shared in proportion (best rounded up).
    """
    n_best, n_worst = max(0, n_best), max(0, n_worst)
    if 0 < len(ranked) < n_best + n_worst:
        n_best = -(-len(ranked) * n_best // (n_best + n_worst))
    best = ranked[:n_best]
    rest = ranked[len(best) :]
    worst = list(reversed(rest))[:n_worst]
    return [(f"best {r + 1}", i) for r, i in enumerate(best)] + [
        (f"worst {r + 1}", i) for r, i in enumerate(worst)
    ]


def category_montage(
    images,
    masks,
    maps,
    scores,
    labels,
    path: str | os.PathLike,
    n_best: int = 3,
    n_worst: int = 3,
    title: str | None = None,
) -> Path:
    """Write a PNG grid: one row per case (best then worst), columns image, ground truth, map.

    Args:
        images: ``N`` RGB images ``(H_i, W_i, 3)`` uint8 (a list or a stack).
        masks: ``N`` masks ``(H_i, W_i)`` or ``None`` (no pixel ground truth).
        maps: ``N`` anomaly maps ``(H_i, W_i)``, shown with one colour scale (the range over the
            shown rows).
        scores, labels: ``(N,)``.
        path: the PNG file.
        n_best, n_worst: how many rows of each kind (fewer when there are fewer cases).
        title: the figure title (default none).
    """
    from matplotlib.figure import Figure

    if len(images) == 0:
        raise ValueError("category_montage: no images")
    ranked, notes = rank_cases(labels, scores, masks, maps)
    rows = _pick_rows(ranked, n_best, n_worst)
    lo = min(float(np.nanmin(maps[i])) for _, i in rows)
    hi = max(float(np.nanmax(maps[i])) for _, i in rows)
    fig = Figure(figsize=(9, 3 * len(rows) + (0.4 if title else 0)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), 3, squeeze=False))
    for r, (name, i) in enumerate(rows):
        _montage_row(axes[r], images[i], None if masks is None else masks[i], maps[i], lo, hi)
        axes[r, 0].set_title(
            f"{name}: score {float(np.asarray(scores)[i]):.3f}, {notes[i]}", fontsize=9, loc="left"
        )
    for c, name in enumerate(("image", "ground truth", f"map [{lo:.3g}, {hi:.3g}]")):
        axes[-1, c].set_xlabel(name)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def _montage_row(axes, image, mask, amap, lo: float, hi: float) -> None:
    axes[0].imshow(_as_rgb(image))
    if mask is None:
        axes[1].text(0.5, 0.5, "no pixel GT", ha="center", va="center", transform=axes[1].transAxes)
    else:
        axes[1].imshow(np.asarray(mask) > 0, cmap="gray", vmin=0, vmax=1)
    axes[2].imshow(np.asarray(amap, dtype=np.float64), cmap="jet", vmin=lo, vmax=hi if hi > lo else lo + 1)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "category"


def save_category_figures(
    out_dir, category: str, images, masks, maps, scores, labels, fpr_limit: float | None = None
) -> dict[str, Path]:
    """Write ``<out_dir>/figures/<category>_montage.png`` and ``<category>_curves.png``.

    Arguments as in :func:`category_montage` and :func:`plot_roc_pro` (one category's images, masks or
    ``None``, maps, scores, labels; ``fpr_limit`` of the PRO curve, a run's ``eval.aupro.fpr_limit``).
    Returns ``{"montage": path, "curves": path}``.
    """
    folder = Path(out_dir) / "figures"
    stem = _safe_name(category)
    montage = category_montage(
        images, masks, maps, scores, labels, folder / f"{stem}_montage.png", title=str(category)
    )
    curves = plot_roc_pro(labels, scores, masks, maps, folder / f"{stem}_curves.png", fpr_limit)
    return {"montage": montage, "curves": curves}
