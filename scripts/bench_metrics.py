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

With ``--rows``, instead: ``feclip.engine.evaluate.metric_rows`` (every category's metrics, both AUPROs,
the ``__micro__`` rows) on an MVTec-sized synthetic evaluation (``--rows-images 1725`` maps of
``--size`` squared in 15 categories, 73 % anomalous with blob masks as ``benchlib.blob_mask`` makes
them, maps = smoothed noise + the smoothed mask) against the implementation of commit
``--before`` (:data:`BEFORE_COMMIT`, its ``feclip/metrics`` read with ``git show``, its
``metric_rows`` loop copied below): interleaved rounds after one warm-up call each, medians of the
paired per-round ratios with 95 % intervals, the new code with one thread and with
``FECLIP_METRIC_THREADS`` unset (all CPUs), and every row value compared bit for bit. ``--stages``
adds the same comparison for one category's ``compute_category_metrics``, its two AUPROs alone, and
the pooled ``__micro__`` row.

With ``--rows-vs COMMIT``: ``metric_rows`` of this checkout against that of ``COMMIT`` (any commit
whose ``metric_rows`` takes today's arguments), each whole ``feclip`` package in its own worker process
on the same predictions, rounds interleaved, rows compared bit for bit.

Run: ``python scripts/bench_metrics.py [--n-maps 200] [--size 336] [--seed 0]`` or
``python scripts/bench_metrics.py --rows [--rows-images 1725] [--repeats 5] [--stages]`` or
``python scripts/bench_metrics.py --rows-vs 1498394 [--repeats 7]``. The last line
printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

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


# -- metric_rows: this code against an earlier commit's -------------------------------------------------

#: The last commit with the metrics before one sort, one labelling and merged pooled rows (2026-12-04).
BEFORE_COMMIT = "77715b9cc44dcad72ca17f112c563cfd74caac4f"
_BEFORE_MODULES = ("image", "pixel", "aupro", "aggregate")


def load_before(commit: str = BEFORE_COMMIT) -> SimpleNamespace:
    """``feclip/metrics`` of ``commit`` (``git show``) as the package ``feclip_metrics_before``."""
    root = Path(__file__).resolve().parents[1]
    pkg = Path(tempfile.mkdtemp(prefix="feclip_before_")) / "feclip_metrics_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in _BEFORE_MODULES:
        src = subprocess.run(
            ["git", "-C", str(root), "show", f"{commit}:feclip/metrics/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (pkg / f"{name}.py").write_text(src.replace("from feclip.metrics.", "from feclip_metrics_before."))
    sys.path.insert(0, str(pkg.parent))
    mods = {name: importlib.import_module(f"feclip_metrics_before.{name}") for name in _BEFORE_MODULES}
    return SimpleNamespace(commit=commit, **mods)


def metric_rows_before(before: SimpleNamespace, dataset_name, preds, category_has_masks, cfg) -> list:
    """``feclip.engine.evaluate.metric_rows`` as of :data:`BEFORE_COMMIT` (its loop, ``_stack`` inlined),
    on that commit's metrics."""
    from feclip.results import MICRO, MetricRow

    rows = []
    groups = {c: [i for i, x in enumerate(preds.categories) if x == c] for c in category_has_masks}
    if cfg.micro and len(groups) > 1:
        groups[MICRO] = list(range(len(preds.categories)))
    for category, idx in groups.items():
        with_masks = all(category_has_masks.values()) if category == MICRO else category_has_masks[category]
        masks = maps = None
        if with_masks:
            ms, mp = [preds.masks[i] for i in idx], [preds.maps[i] for i in idx]
            masks = ms if len({m.shape for m in ms}) > 1 else np.stack(ms)
            maps = mp if len({a.shape for a in mp}) > 1 else np.stack(mp)
        values = before.aggregate.compute_category_metrics(
            preds.labels[idx],
            preds.scores[idx],
            masks,
            maps,
            aupro_methods=tuple(cfg.aupro.methods),
            fpr_limit=cfg.aupro.fpr_limit,
        )
        rows.extend(MetricRow(dataset_name, category, k, float(v), len(idx)) for k, v in values.items())
    return rows


def make_predictions(n: int, size: int, n_categories: int = 15, seed: int = 0):
    """An MVTec-sized evaluation's :class:`~feclip.engine.evaluate.Predictions`: image i in category
    i % n_categories, 73 % of each category anomalous with ``benchlib.blob_mask`` masks (as
    ``benchlib.RandomAnomalySet``), maps = 0.4 + smoothed noise (sigma 4) + 0.15 x the smoothed mask
    times a random gain, float32; image score = the map's maximum."""
    from benchlib import MVTEC_ANOMALOUS_FRACTION, blob_mask

    from feclip.engine.evaluate import Predictions

    rng = np.random.default_rng(seed)
    masks = [np.zeros((size, size), np.uint8) for _ in range(n)]
    labels = np.zeros(n, np.int64)
    for c in range(n_categories):
        members = list(range(c, n, n_categories))
        k = min(max(round(len(members) * MVTEC_ANOMALOUS_FRACTION), 1), len(members) - 1)
        for i in rng.permutation(members)[:k].tolist():
            labels[i] = 1
            masks[i] = blob_mask(rng, size)
    maps = []
    for i in range(n):
        coarse = rng.standard_normal((size // 8 + 1, size // 8 + 1)).astype(np.float32)
        noise = gaussian_filter(np.kron(coarse, np.ones((8, 8), np.float32))[:size, :size], 4.0)
        noise /= max(float(noise.std()), 1e-6)
        signal = gaussian_filter(masks[i].astype(np.float32), 4.0) * rng.uniform(0.3, 1.5)
        maps.append((0.4 + 0.05 * noise + 0.15 * signal).astype(np.float32))
    scores = np.array([float(a.max()) for a in maps])
    return Predictions(scores, maps, masks, labels, [f"category_{i % n_categories}" for i in range(n)])


def _rows_diff(before_rows: list, after_rows: list) -> tuple[int, float]:
    """(values not equal bit for bit, largest absolute difference); nan == nan counts as equal."""
    assert [(r.category, r.metric) for r in before_rows] == [(r.category, r.metric) for r in after_rows]
    differ, worst = 0, 0.0
    for b, a in zip(before_rows, after_rows):
        if math.isnan(b.value) and math.isnan(a.value):
            continue
        if b.value != a.value:
            differ += 1
            worst = max(worst, abs(b.value - a.value))
    return differ, worst


def _with_threads(threads: str | None, fn):
    def run():
        old = os.environ.get("FECLIP_METRIC_THREADS")
        if threads is None:
            os.environ.pop("FECLIP_METRIC_THREADS", None)
        else:
            os.environ["FECLIP_METRIC_THREADS"] = threads
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("FECLIP_METRIC_THREADS", None)
            else:
                os.environ["FECLIP_METRIC_THREADS"] = old

    return run


def _ratio_figures(figures: dict, times: dict, prefix: str, base: str, others: dict, n_images: int) -> None:
    from benchlib import median_ci, paired_ratio

    for name, values in times.items():
        med = median_ci(values)[0]
        figures[f"{prefix}_seconds_{name}"] = med
        figures[f"{prefix}_ms_per_image_{name}"] = 1000 * med / n_images
    for name, tag in others.items():
        r = paired_ratio(times, base, name)
        figures[f"{prefix}_speedup_{tag}"] = r[0]
        figures[f"{prefix}_speedup_{tag}_ci"] = [r[1], r[2]]


def bench_rows(
    n_images: int = 1725,
    size: int = 336,
    n_categories: int = 15,
    repeats: int = 5,
    seed: int = 0,
    stages: bool = False,
    commit: str = BEFORE_COMMIT,
) -> dict:
    """``metric_rows`` before (``commit``) and now, one thread and all threads, side by side."""
    from benchlib import interleaved

    from feclip.config import EvalConfig
    from feclip.engine.evaluate import metric_rows
    from feclip.metrics.aggregate import metric_threads

    before = load_before(commit)
    preds = make_predictions(n_images, size, n_categories, seed)
    has_masks = dict.fromkeys(dict.fromkeys(preds.categories), True)
    cfg = EvalConfig()  # the paper preset: both AUPROs, micro rows
    fns = {
        "before": lambda: metric_rows_before(before, "b", preds, has_masks, cfg),
        "after_1thread": _with_threads("1", lambda: metric_rows("b", preds, has_masks, cfg)),
        "after": _with_threads(None, lambda: metric_rows("b", preds, has_masks, cfg)),
    }
    results = {name: fn() for name, fn in fns.items()}  # warm-up: first touch of the memory, imports
    figures = {
        "rows_before_commit": commit,
        "rows_images": n_images,
        "rows_size": size,
        "rows_categories": n_categories,
        "rows_anomalous_images": int(preds.labels.sum()),
        "rows_threads": _with_threads(None, metric_threads)(),
        "rows_repeats": repeats,
        "rows_count": len(results["after"]),
    }
    for name in ("after_1thread", "after"):
        differ, worst = _rows_diff(results["before"], results[name])
        figures[f"rows_differing_values_{name}"] = differ
        figures[f"rows_max_abs_diff_{name}"] = worst
    times = interleaved(fns, repeats)
    _ratio_figures(
        figures, times, "rows", "before", {"after_1thread": "1thread", "after": "threads"}, n_images
    )
    if stages:
        figures.update(bench_stages(before, preds, repeats))
    return figures


def bench_stages(before: SimpleNamespace, preds, repeats: int) -> dict:
    """One category (``compute_category_metrics``, and each AUPRO alone) and the ``__micro__`` row."""
    from benchlib import interleaved

    from feclip.metrics import aupro, compute_category_metrics
    from feclip.metrics.aggregate import _pixel_values
    from feclip.metrics.aupro import pixel_group, pool_groups

    cat = preds.categories[0]
    idx = [i for i, c in enumerate(preds.categories) if c == cat]
    labels, scores = preds.labels[idx], preds.scores[idx]
    masks, maps = np.stack([preds.masks[i] for i in idx]), np.stack([preds.maps[i] for i in idx])
    figures: dict = {"stage_category_images": len(idx)}
    fns = {
        "category_before": lambda: before.aggregate.compute_category_metrics(labels, scores, masks, maps),
        "category_after": lambda: compute_category_metrics(labels, scores, masks, maps),
        "exact_before": lambda: before.aupro.aupro(masks, maps, method="exact"),
        "exact_after": lambda: aupro(masks, maps, method="exact"),
        "zsad_before": lambda: before.aupro.aupro(masks, maps, method="zsad"),
        "zsad_after": lambda: aupro(masks, maps, method="zsad"),
    }
    for fn in fns.values():
        fn()
    times = interleaved(fns, repeats)
    for stage in ("category", "exact", "zsad"):
        _ratio_figures(
            figures,
            {k: times[f"{stage}_{k}"] for k in ("before", "after")},
            f"stage_{stage}",
            "before",
            {"after": "1thread"},
            len(idx),
        )

    # The pooled row: before, everything stacked and split again; now, the categories' split pixels merged.
    n = len(preds.labels)
    all_masks, all_maps = np.stack(preds.masks), np.stack(preds.maps)
    groups = {
        c: [i for i, x in enumerate(preds.categories) if x == c] for c in dict.fromkeys(preds.categories)
    }
    parts = [
        pixel_group(
            ((preds.masks[i] > 0, preds.maps[i]) for i in g), np.float32, sum(preds.maps[i].size for i in g)
        )
        for g in groups.values()
    ]
    positions = [np.array(g) for g in groups.values()]
    methods = ("exact", "zsad")
    fns = {
        "before": lambda: before.aggregate.compute_category_metrics(
            preds.labels, preds.scores, all_masks, all_maps
        ),
        "after": lambda: _pixel_values(pool_groups(parts, positions, 1), methods, 0.3, 1),
    }
    for fn in fns.values():
        fn()
    _ratio_figures(figures, interleaved(fns, repeats), "stage_micro", "before", {"after": "1thread"}, n)
    return figures


# -- metric_rows of two whole checkouts, each in its own process ------------------------------------------


def rows_worker(n_images: int, size: int, n_categories: int, seed: int) -> None:
    """``--rows-worker``: the ``feclip`` on ``sys.path`` (the driver sets ``PYTHONPATH``) answers one
    line of JSON per line read: ``run`` times ``metric_rows`` once on :func:`make_predictions` (the paper
    preset, all threads) and returns the seconds and the rows; ``quit`` ends. The first line says which
    ``feclip`` was imported."""
    import feclip
    from feclip.config import EvalConfig
    from feclip.engine.evaluate import metric_rows

    preds = make_predictions(n_images, size, n_categories, seed)
    has_masks = dict.fromkeys(dict.fromkeys(preds.categories), True)
    print(json.dumps({"feclip": feclip.__file__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        rows = metric_rows("b", preds, has_masks, EvalConfig())
        seconds = time.perf_counter() - t0
        values = [[r.category, r.metric, repr(r.value)] for r in rows]
        print(json.dumps({"seconds": seconds, "rows": values}), flush=True)


def _rows_vs_rounds(root: Path, before_root: Path, sizes: list[int], repeats: int) -> tuple[dict, dict]:
    """One :func:`rows_worker` on ``before_root``'s ``feclip`` and one on ``root``'s: the first call's
    answers (warm-up; their rows are compared) and the seconds of ``repeats`` interleaved rounds."""
    workers = {}
    for name, tree in (("before", before_root), ("now", root)):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p),
        }
        workers[name] = subprocess.Popen(
            [sys.executable, __file__, "--rows-worker", *map(str, sizes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
    try:
        imported = {name: json.loads(w.stdout.readline())["feclip"] for name, w in workers.items()}
        assert imported["before"].startswith(str(before_root)), imported
        assert imported["now"].startswith(str(root)), imported

        def run(name: str) -> dict:
            workers[name].stdin.write("run\n")
            workers[name].stdin.flush()
            return json.loads(workers[name].stdout.readline())

        first = {name: run(name) for name in workers}
        times = {name: [] for name in workers}
        for _ in range(repeats):
            for name in workers:
                times[name].append(run(name)["seconds"])
    finally:
        for w in workers.values():
            w.communicate("quit\n", timeout=60)
    return first, times


def bench_rows_vs(
    commit: str,
    n_images: int = 1725,
    size: int = 336,
    n_categories: int = 15,
    repeats: int = 5,
    seed: int = 0,
) -> dict:
    """``metric_rows`` of this checkout and of ``commit`` (its ``feclip/`` from ``git archive``), each
    in a worker process (:func:`rows_worker`) on the same predictions, rounds interleaved; the rows
    must be equal bit for bit. For commits whose ``metric_rows`` takes this one's arguments (since
    2026-12-04); ``--before`` compares older metrics in one process."""
    from benchlib import median_ci, paired_ratio

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="feclip_vs_") as tmp:
        before_root = Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "--format=tar", commit, "feclip"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(before_root)], input=archive, check=True)
        first, times = _rows_vs_rounds(root, before_root, [n_images, size, n_categories, seed], repeats)
    differ = sum(a != b for a, b in zip(first["before"]["rows"], first["now"]["rows"]))
    ratio = paired_ratio(times, "before", "now")
    return {
        "vs_commit": commit,
        "vs_images": n_images,
        "vs_size": size,
        "vs_categories": n_categories,
        "vs_repeats": repeats,
        "vs_rows": len(first["now"]["rows"]),
        "vs_row_names_equal": [r[:2] for r in first["before"]["rows"]]
        == [r[:2] for r in first["now"]["rows"]],
        "vs_differing_rows": differ,
        "vs_seconds_before": median_ci(times["before"])[0],
        "vs_seconds_now": median_ci(times["now"])[0],
        "vs_speedup": ratio[0],
        "vs_speedup_ci": [ratio[1], ratio[2]],
    }


def print_rows_vs(f: dict) -> None:
    lo, hi = f["vs_speedup_ci"]
    print(
        f"metric_rows, this checkout vs {f['vs_commit']}: {f['vs_images']} maps of {f['vs_size']}x{f['vs_size']}, "
        f"{f['vs_categories']} categories, {f['vs_rows']} rows, {f['vs_repeats']} rounds\n"
        f"  before {f['vs_seconds_before']:.2f} s, now {f['vs_seconds_now']:.2f} s: speed-up "
        f"{f['vs_speedup']:.2f}x (95% CI {lo:.2f}-{hi:.2f}); rows differing: {f['vs_differing_rows']}"
        f" (same names and order: {f['vs_row_names_equal']})"
    )


def print_rows(f: dict) -> None:
    print(
        f"metric_rows: {f['rows_images']} maps of {f['rows_size']}x{f['rows_size']}, {f['rows_categories']} "
        f"categories, {f['rows_anomalous_images']} anomalous, {f['rows_count']} rows, {f['rows_repeats']} rounds"
    )
    for name in ("before", "after_1thread", "after"):
        print(
            f"  {name:14s} {f[f'rows_seconds_{name}']:7.2f} s  {f[f'rows_ms_per_image_{name}']:6.2f} ms/image"
        )
    for tag, threads in (("1thread", "1 thread"), ("threads", f"{f['rows_threads']} threads")):
        lo, hi = f[f"rows_speedup_{tag}_ci"]
        print(f"  speed-up, {threads}: {f[f'rows_speedup_{tag}']:.2f}x (95% CI {lo:.2f}-{hi:.2f})")
    for name in ("after_1thread", "after"):
        print(
            f"  {name}: {f[f'rows_differing_values_{name}']} values differ from before, "
            f"max |diff| {f[f'rows_max_abs_diff_{name}']:.1e}"
        )
    for stage in ("category", "exact", "zsad", "micro"):
        if f"stage_{stage}_speedup_1thread" in f:
            lo, hi = f[f"stage_{stage}_speedup_1thread_ci"]
            print(
                f"  stage {stage:8s}: before {f[f'stage_{stage}_seconds_before']:.2f} s, after "
                f"{f[f'stage_{stage}_seconds_after']:.2f} s: {f[f'stage_{stage}_speedup_1thread']:.2f}x "
                f"(95% CI {lo:.2f}-{hi:.2f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", action="store_true", help="metric_rows now vs --before instead")
    parser.add_argument("--rows-images", type=int, default=1725)
    parser.add_argument("--rows-categories", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of --rows")
    parser.add_argument("--stages", action="store_true", help="with --rows: one category, each AUPRO, micro")
    parser.add_argument("--before", default=BEFORE_COMMIT, help="the commit to compare --rows against")
    parser.add_argument("--rows-vs", metavar="COMMIT", help="metric_rows now vs COMMIT's, one process each")
    parser.add_argument("--rows-worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows_worker:
        rows_worker(*args.rows_worker)
        return
    if args.rows_vs:
        f = bench_rows_vs(
            args.rows_vs, args.rows_images, args.size, args.rows_categories, args.repeats, args.seed
        )
        print_rows_vs(f)
        print(json.dumps(f))
        return
    if args.rows:
        f = bench_rows(
            args.rows_images,
            args.size,
            args.rows_categories,
            args.repeats,
            args.seed,
            args.stages,
            args.before,
        )
        print_rows(f)
        print(json.dumps(f))
        return
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
