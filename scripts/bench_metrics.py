"""Benchmark feclip.metrics against straightforward reference implementations (speed and equality).

On ``n_maps`` synthetic anomaly maps of ``size`` x ``size`` (about half the images carry random
elliptic defects plus a few specks; maps = smoothed noise + a smoothed signal over the defects):

- ``aupro(method="zsad")`` vs :func:`aupro_zsad_loop`, a literal loop in the manner of AnomalyCLIP's
  ``cal_pro_score`` (for every threshold: binarise all maps, label every mask, loop over its regions);
- ``aupro(method="exact")`` vs :func:`aupro_exact_sort`, the MVTec-script way (one argsort of all
  pixels, cumulative sums of per-pixel FPR/PRO weights, points at distinct scores, interpolation at
  the limit, trapezoid);
- ``pixel_auroc`` / ``pixel_ap`` vs scikit-learn on the flattened arrays;
- peak traced memory of ``aupro(method="exact")`` relative to the input size.

Run: ``python scripts/bench_metrics.py [--n-maps 200] [--size 336] [--seed 0]``. The last line printed
is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.measure import label, regionprops
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from feclip.metrics import aupro, pixel_ap, pixel_auroc


def make_data(n_maps: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N, S, S) uint8, maps (N, S, S) float32): blob defects on about half of the images."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_maps, size, size), dtype=np.uint8)
    maps = np.empty((n_maps, size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n_maps):
        if rng.random() < 0.5:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0, size, 2)
                ay, ax = rng.uniform(size / 60, size / 8, 2)
                theta = rng.uniform(0, np.pi)
                dy, dx = yy - cy, xx - cx
                u = (dx * np.cos(theta) + dy * np.sin(theta)) / ax
                v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ay
                masks[i][u * u + v * v <= 1.0] = 1
            for _ in range(rng.integers(0, 4)):  # specks: tiny regions of a few pixels
                y, x = rng.integers(0, size - 2, 2)
                masks[i, y : y + rng.integers(1, 3), x : x + rng.integers(1, 3)] = 1
        noise = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=size / 64)
        signal = gaussian_filter(masks[i].astype(np.float32), sigma=4.0) * rng.uniform(0.5, 2.0)
        maps[i] = 0.4 + 0.05 * noise / max(float(noise.std()), 1e-6) + 0.15 * signal
    return masks, maps


def aupro_zsad_loop(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, steps: int = 200) -> float:
    """Reference: the threshold loop of AnomalyCLIP's ``cal_pro_score``, written out plainly."""
    gt = masks > 0
    normal = ~gt
    n_normal = normal.sum()
    lo, hi = maps.min(), maps.max()
    binary = np.zeros(maps.shape, dtype=bool)
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        np.greater(maps, th, out=binary)
        overlaps = []
        for image_binary, image_gt in zip(binary, gt):
            for region in regionprops(label(image_gt, connectivity=2)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(image_binary[rows, cols].sum() / region.area)
        pros.append(np.array(overlaps).mean())
        fprs.append(np.logical_and(normal, binary).sum() / n_normal)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < fpr_limit
    kept = fprs[keep]
    kept = (kept - kept.min()) / (kept.max() - kept.min())
    return float(auc(kept, pros[keep]))


def aupro_exact_sort(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Reference: exact AUPRO from one argsort of all pixels and cumulative per-pixel weights."""
    gt = masks > 0
    pro_weight = np.zeros(gt.shape, dtype=np.float64)
    n_regions = 0
    for i in range(gt.shape[0]):
        lab, n = label(gt[i], connectivity=2, return_num=True)
        if n:
            area = np.bincount(lab.ravel())
            inside = lab > 0
            pro_weight[i][inside] = 1.0 / area[lab[inside]]
            n_regions += n
    pro_weight /= n_regions
    fpr_weight = (~gt).astype(np.float64) / np.count_nonzero(~gt)
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fpr = np.cumsum(fpr_weight.ravel()[order])
    pro = np.cumsum(pro_weight.ravel()[order])
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    fpr = np.concatenate(([0.0], fpr[last_of_tie]))
    pro = np.concatenate(([0.0], pro[last_of_tie]))
    j = np.searchsorted(fpr, fpr_limit, side="right")
    x = np.append(fpr[:j], fpr_limit)
    y = np.append(pro[:j], np.interp(fpr_limit, fpr, pro))
    return float(np.trapezoid(y, x) / fpr_limit)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - t0


def bench_metrics(n_maps: int = 200, size: int = 336, seed: int = 0) -> dict:
    """Time and cross-check the metrics on synthetic data; returns the named figures."""
    masks, maps = make_data(n_maps, size, seed)
    n_anomalous = int(np.count_nonzero(masks.reshape(n_maps, -1).any(axis=1)))
    n_regions = sum(label(m, connectivity=2, return_num=True)[1] for m in masks)

    zsad, t_zsad = _timed(aupro, masks, maps, method="zsad")
    zsad_ref, t_zsad_loop = _timed(aupro_zsad_loop, masks, maps)
    exact, t_exact = _timed(aupro, masks, maps, method="exact")
    exact_ref, t_exact_ref = _timed(aupro_exact_sort, masks, maps)
    p_auroc, t_auroc = _timed(pixel_auroc, masks, maps)
    sk_auroc, t_sk_auroc = _timed(roc_auc_score, masks.ravel(), maps.ravel())
    p_ap = pixel_ap(masks, maps)
    sk_ap = average_precision_score(masks.ravel(), maps.ravel())

    tracemalloc.start()
    aupro(masks, maps, method="exact")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    figures = {
        "n_maps": n_maps,
        "size": size,
        "n_anomalous_images": n_anomalous,
        "n_regions": int(n_regions),
        "aupro_zsad": zsad,
        "aupro_zsad_loop": zsad_ref,
        "aupro_zsad_max_abs_diff": abs(zsad - zsad_ref),
        "aupro_zsad_seconds": t_zsad,
        "aupro_zsad_loop_seconds": t_zsad_loop,
        "aupro_zsad_speedup": t_zsad_loop / t_zsad,
        "aupro_exact": exact,
        "aupro_exact_ref": exact_ref,
        "aupro_exact_max_abs_diff": abs(exact - exact_ref),
        "aupro_exact_seconds": t_exact,
        "aupro_exact_ref_seconds": t_exact_ref,
        "aupro_exact_speedup": t_exact_ref / t_exact,
        "aupro_exact_peak_memory_over_input": peak / (maps.nbytes + masks.nbytes),
        "pixel_auroc": p_auroc,
        "pixel_auroc_max_abs_diff": abs(p_auroc - sk_auroc),
        "pixel_ap_max_abs_diff": abs(p_ap - sk_ap),
        "pixel_auroc_seconds": t_auroc,
        "pixel_auroc_sklearn_seconds": t_sk_auroc,
    }
    assert figures["aupro_zsad_max_abs_diff"] < 1e-9, figures
    assert figures["aupro_exact_max_abs_diff"] < 1e-9, figures
    assert figures["pixel_auroc_max_abs_diff"] < 1e-9, figures
    assert figures["pixel_ap_max_abs_diff"] < 1e-9, figures
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    f = bench_metrics(args.n_maps, args.size, args.seed)
    print(
        f"{f['n_maps']} maps of {f['size']}x{f['size']}, {f['n_anomalous_images']} anomalous, {f['n_regions']} regions"
    )
    print(
        f"aupro zsad : {f['aupro_zsad']:.6f} in {f['aupro_zsad_seconds']:.2f} s; loop {f['aupro_zsad_loop_seconds']:.1f} s "
        f"-> {f['aupro_zsad_speedup']:.0f}x, |diff| {f['aupro_zsad_max_abs_diff']:.1e}"
    )
    print(
        f"aupro exact: {f['aupro_exact']:.6f} in {f['aupro_exact_seconds']:.2f} s; sort ref {f['aupro_exact_ref_seconds']:.1f} s "
        f"-> {f['aupro_exact_speedup']:.0f}x, |diff| {f['aupro_exact_max_abs_diff']:.1e}, "
        f"peak memory {f['aupro_exact_peak_memory_over_input']:.2f}x input"
    )
    print(
        f"pixel auroc: {f['pixel_auroc']:.6f} in {f['pixel_auroc_seconds']:.2f} s; sklearn {f['pixel_auroc_sklearn_seconds']:.1f} s, "
        f"|diff| auroc {f['pixel_auroc_max_abs_diff']:.1e}, ap {f['pixel_ap_max_abs_diff']:.1e}"
    )
    print(json.dumps(f))


if __name__ == "__main__":
    main()
