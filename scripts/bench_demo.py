"""The demo's numbers at CUDA's precision and under CUDA's non-determinism, emulated on the CPU: the
``precision``, ``precision_wide`` and ``spread`` sections of ``scripts/bench.py`` (accuracy figures, not
speed).

  precision the demo (feclip-tiny, synthetic set A, 30 epochs) evaluated on set B in fp32 and in
           emulated bf16 (CPU autocast; FE-CLIP's bf16 policy): image/pixel AUROC and map differences.
  precision_wide the same trained demo evaluated in fp32 and bf16 on larger sets B (120 normal + 240
           anomalous test images per category) drawn with several seeds: the image AUROC difference per
           seed, its mean with a 95 % t-interval, the normal-anomalous pairs whose order bf16 changes,
           and the resolution (points per flipped pair), below the demo's 0.116 points per pair.
  spread   the demo trained again with the same seed and gradient noise at float rounding level (what
           non-deterministic CUDA reductions do), and with other seeds: the ranges of the metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from benchlib import feclip_model

MACRO_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro_zsad")
DEMO_SEED = 42  # the demo's seed: the backbone, the adapters and the training
DEMO_IMAGE_SIZE = 84


def _demo_model(precision: str, device: str | torch.device = "cpu", seed: int = DEMO_SEED):
    """The demo's FE-CLIP (feclip-tiny, backbone and adapters drawn from ``seed``, the demo's by
    default) at ``precision`` on ``device``."""
    from feclip.models import load_clip

    clip = load_clip("feclip-tiny", seed=seed, device=device)
    return feclip_model(clip, seed=seed, precision=precision)


def _train_on_set_a(model, sets: dict, epochs: int, seed: int, run_dir) -> None:
    """The demo's training of ``model`` on the CPU: ``epochs`` epochs of ``sets["set_a"]`` at lr 2e-3,
    fc_patch policy ``same``, 84 px, seed ``seed``, the run in ``run_dir``."""
    from feclip.config import TrainConfig
    from feclip.data import AnomalyDataset, list_samples
    from feclip.engine.train import train

    cfg = TrainConfig(epochs=epochs, lr=2e-3, progress=False, resume=False)
    cfg.fc_patch.policy = "same"
    train(
        model,
        AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=DEMO_IMAGE_SIZE),
        cfg,
        run_dir,
        seed,
        torch.device("cpu"),
    )


def _macro(rows, keys) -> dict[str, float]:
    """``{metric: mean over the categories in [0, 1]}`` of metric rows, ``__micro__`` left out."""
    return {
        k: float(np.mean([r.value for r in rows if r.metric == k and r.category != "__micro__"]))
        for k in keys
    }


def _train_demo(tmp: Path, epochs: int):
    """The demo trained in fp32 on the CPU: the default synthetic sets written under ``tmp / "syn"``,
    ``epochs`` epochs of set A (:func:`_train_on_set_a`), the run in ``tmp``. Returns ``(model, sets)``."""
    from feclip.data import make_synthetic

    sets = make_synthetic(Path(tmp) / "syn")
    model = _demo_model("fp32")
    _train_on_set_a(model, sets, epochs, DEMO_SEED, tmp)
    return model, sets


def _predict_precisions(model, set_root: Path, device: str | torch.device = "cpu") -> dict:
    """``model``'s adapters (a fresh demo model at each precision, ``load_state_dict(strict=False)``)
    evaluated on the synthetic set at ``set_root`` in fp32 and in bf16 on ``device``.
    Returns ``{precision: (predictions, {metric: macro value in [0, 1]})}``; macro: the mean over the
    categories (``__micro__`` left out)."""
    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset, list_samples
    from feclip.engine.evaluate import metric_rows, predict

    target = AnomalyDataset(list_samples("synthetic", set_root), image_size=DEMO_IMAGE_SIZE)
    results = {}
    for precision in ("fp32", "bf16"):
        m = _demo_model(precision, device)
        m.load_state_dict(model.state_dict(), strict=False)
        preds = predict(m, target, EvalConfig(), torch.device(device))
        rows = metric_rows("synthetic", preds, target.category_has_masks, EvalConfig())
        results[precision] = (preds, _macro(rows, MACRO_KEYS))
    return results


def bench_precision(epochs: int = 30) -> dict:
    """The demo trained in fp32, evaluated on set B in fp32 and in emulated bf16 (the same adapters)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model, sets = _train_demo(Path(tmp), epochs)
        results = _predict_precisions(model, sets["set_b"])
    (p32, m32), (p16, m16) = results["fp32"], results["bf16"]
    map_diff = max(float(np.abs(a - b).max()) for a, b in zip(p32.maps, p16.maps))
    figures = {
        "bf16_image_auroc_points": 100 * (m16["image_auroc"] - m32["image_auroc"]),
        "bf16_pixel_auroc_points": 100 * (m16["pixel_auroc"] - m32["pixel_auroc"]),
        "bf16_pro_zsad_points": 100 * (m16["pixel_aupro_zsad"] - m32["pixel_aupro_zsad"]),
        "bf16_max_map_diff": map_diff,
        "bf16_max_score_diff": float(np.abs(p32.scores - p16.scores).max()),
        "bf16_distinct_scores": int(len(np.unique(p16.scores))),
        "fp32_distinct_scores": int(len(np.unique(p32.scores))),
    }
    print(
        f"[precision] demo ({epochs} epochs, feclip-tiny) on set B, fp32 -> emulated bf16: image AUROC "
        f"{100 * m32['image_auroc']:.2f} -> {100 * m16['image_auroc']:.2f}, pixel AUROC "
        f"{100 * m32['pixel_auroc']:.2f} -> {100 * m16['pixel_auroc']:.2f}, PRO {100 * m32['pixel_aupro_zsad']:.2f} -> "
        f"{100 * m16['pixel_aupro_zsad']:.2f}; max |map diff| {map_diff:.4f}, max |score diff| "
        f"{figures['bf16_max_score_diff']:.4f}; distinct scores {figures['fp32_distinct_scores']} / "
        f"{figures['bf16_distinct_scores']} of {len(p32.scores)}"
    )
    return figures


def flipped_pairs(normal_a, anomalous_a, normal_b, anomalous_b) -> tuple[int, int]:
    """The normal-anomalous pairs ``(i, j)`` whose order differs between two scorings ``a`` and ``b``
    of the same images: ``sign(anomalous[j] - normal[i])`` in ``a`` vs in ``b``, a tie (sign 0) its own
    value (a tie that becomes an order, or the reverse, is a flip: half a pair of AUROC).
    Returns ``(flipped, pairs)``, ``pairs = len(normal) * len(anomalous)``."""
    normal_a, anomalous_a = np.asarray(normal_a, dtype=np.float64), np.asarray(anomalous_a, dtype=np.float64)
    normal_b, anomalous_b = np.asarray(normal_b, dtype=np.float64), np.asarray(anomalous_b, dtype=np.float64)
    if normal_a.shape != normal_b.shape or anomalous_a.shape != anomalous_b.shape:
        raise ValueError("flipped_pairs: the two scorings must be of the same images")
    order_a = np.sign(anomalous_a[None, :] - normal_a[:, None])
    order_b = np.sign(anomalous_b[None, :] - normal_b[:, None])
    return int(np.count_nonzero(order_a != order_b)), int(order_a.size)


def _category_flips(p32, p16) -> dict[str, tuple[int, int]]:
    """Per category of the predictions (the same images in the same order): ``(flipped, pairs)`` of
    :func:`flipped_pairs` between the fp32 and the bf16 image scores."""
    if list(p32.categories) != list(p16.categories) or not np.array_equal(p32.labels, p16.labels):
        raise ValueError("the two predictions are not of the same images")
    categories = np.asarray(p32.categories)
    out = {}
    for c in dict.fromkeys(p32.categories):
        normal = (categories == c) & (p32.labels == 0)
        anomalous = (categories == c) & (p32.labels == 1)
        out[c] = flipped_pairs(
            p32.scores[normal], p32.scores[anomalous], p16.scores[normal], p16.scores[anomalous]
        )
    return out


def mean_t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its Student-t confidence interval (``nan`` bounds for fewer than 2
    values; a zero-width interval when all values are equal)."""
    from scipy.stats import t

    xs = np.asarray(values, dtype=np.float64)
    mean = float(xs.mean())
    if len(xs) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + confidence / 2, len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs)))
    return mean, mean - half, mean + half


def bench_precision_wide(
    epochs: int = 30,
    seeds=(0, 1, 2, 3, 4),
    n_test_good: int = 120,
    n_test_bad: int = 240,
    device: str = "cpu",
    goal_points: float = 0.05,
) -> dict:
    """The demo trained in fp32 (as :func:`bench_precision`), evaluated in fp32 and in bf16 (emulated
    on the CPU, real on CUDA) on larger sets B, one per seed in ``seeds`` (``make_synthetic``'s seed;
    ``n_test_good`` normal and ``n_test_bad`` anomalous test images per category): the image AUROC
    difference per seed and over the seeds (mean, 95 % t-interval, max), the pixel AUROC and PRO
    differences, the normal-anomalous pairs whose order bf16 changes, and the resolution (the most a
    single flipped pair moves the macro image AUROC, in points). ``device``: where the evaluation
    runs (the training stays on the CPU)."""
    import tempfile

    from feclip.data import make_synthetic

    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("bench_precision_wide: at least one seed")
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = _train_demo(Path(tmp), epochs)
        for s in seeds:
            sets = make_synthetic(
                Path(tmp) / f"wide{s}", seed=s, n_test_good=n_test_good, n_test_bad=n_test_bad
            )  # its set_a and train images are unused
            results = _predict_precisions(model, sets["set_b"], device)
            (p32, m32), (p16, m16) = results["fp32"], results["bf16"]
            flips = _category_flips(p32, p16)
            r = {
                "seed": s,
                "images": len(p32.scores),
                "categories": len(flips),
                "fp32_image_auroc": 100 * m32["image_auroc"],
                "bf16_image_auroc": 100 * m16["image_auroc"],
                "image_auroc": 100 * (m16["image_auroc"] - m32["image_auroc"]),
                "pixel_auroc": 100 * (m16["pixel_auroc"] - m32["pixel_auroc"]),
                "pro_zsad": 100 * (m16["pixel_aupro_zsad"] - m32["pixel_aupro_zsad"]),
                "flipped": sum(f for f, _ in flips.values()),
                "pairs": sum(n for _, n in flips.values()),
                # one flipped pair of category c moves the macro AUROC by 100 / (pairs_c * categories)
                "resolution": max(100 / (n * len(flips)) for _, n in flips.values()),
                "max_map_diff": max(float(np.abs(a - b).max()) for a, b in zip(p32.maps, p16.maps)),
                "max_score_diff": float(np.abs(p32.scores - p16.scores).max()),
            }
            per_seed.append(r)
            print(
                f"[precision_wide] seed {s}: set B of {r['images']} images ({r['categories']} categories of "
                f"{n_test_good} normal + {n_test_bad} anomalous), fp32 -> bf16 on {device}: image AUROC "
                f"{r['fp32_image_auroc']:.3f} -> {r['bf16_image_auroc']:.3f} ({r['image_auroc']:+.3f} points), "
                f"pixel AUROC {r['pixel_auroc']:+.4f}, PRO {r['pro_zsad']:+.4f} points; flipped pairs "
                f"{r['flipped']} of {r['pairs']} ({r['resolution']:.5f} points per pair); max |map diff| "
                f"{r['max_map_diff']:.4f}, max |score diff| {r['max_score_diff']:.4f}"
            )
    diffs = [r["image_auroc"] for r in per_seed]
    mean, lo, hi = mean_t_interval(diffs)
    flipped, pairs = sum(r["flipped"] for r in per_seed), sum(r["pairs"] for r in per_seed)
    resolution = max(r["resolution"] for r in per_seed)
    mean_within = abs(mean) <= goal_points
    interval_within = bool(-goal_points <= lo and hi <= goal_points)  # False with nan bounds
    figures = {
        "bf16_wide_seeds": list(seeds),
        "bf16_wide_images_per_seed": per_seed[0]["images"],
        "bf16_wide_fp32_image_auroc_points": [r["fp32_image_auroc"] for r in per_seed],
        "bf16_wide_image_auroc_points": diffs,
        "bf16_wide_image_auroc_points_mean": mean,
        "bf16_wide_image_auroc_points_ci95": [lo, hi],
        "bf16_wide_image_auroc_points_max_abs": float(max(abs(d) for d in diffs)),
        "bf16_wide_pixel_auroc_points_mean": float(np.mean([r["pixel_auroc"] for r in per_seed])),
        "bf16_wide_pro_zsad_points_mean": float(np.mean([r["pro_zsad"] for r in per_seed])),
        "bf16_wide_flipped_pairs_per_seed": [r["flipped"] for r in per_seed],
        "bf16_wide_flipped_pairs": flipped,
        "bf16_wide_pairs": pairs,
        "bf16_wide_flipped_fraction": flipped / pairs,
        "bf16_wide_resolution_points": resolution,
        "bf16_wide_max_map_diff": max(r["max_map_diff"] for r in per_seed),
        "bf16_wide_max_score_diff": max(r["max_score_diff"] for r in per_seed),
        "bf16_wide_goal_points": goal_points,
        "bf16_wide_mean_within_goal": bool(mean_within),
        "bf16_wide_ci95_within_goal": interval_within,
    }
    print(
        f"[precision_wide] demo ({epochs} epochs, feclip-tiny), fp32 -> bf16 on {device}, {len(seeds)} sets B "
        f"(seeds {', '.join(map(str, seeds))}): image AUROC difference mean {mean:+.3f} points (95% t-interval "
        f"{lo:+.3f} to {hi:+.3f}), max |difference| {figures['bf16_wide_image_auroc_points_max_abs']:.3f}; "
        f"pixel AUROC {figures['bf16_wide_pixel_auroc_points_mean']:+.4f}, PRO "
        f"{figures['bf16_wide_pro_zsad_points_mean']:+.4f} points (means); flipped pairs {flipped} of {pairs} "
        f"({100 * flipped / pairs:.3f}%), resolution {resolution:.5f} points per pair; goal +-{goal_points:g} "
        f"points: |mean| {'within' if mean_within else 'NOT within'}, 95% interval "
        f"{'within' if interval_within else 'NOT within'}"
    )
    return figures


def _demo_metrics(
    seed: int, epochs: int, sets: dict, grad_noise: float = 0.0, noise_seed: int = 0, precision: str = "fp32"
) -> dict:
    """Train the demo (feclip-tiny, set A) and evaluate set B at ``precision`` (``bf16``: emulated on
    the CPU, as on CUDA): macro metrics in points. With
    ``grad_noise``, every gradient is multiplied by ``1 + grad_noise * N(0, 1)`` per element and step:
    the rounding differences of CUDA's non-deterministic reductions (atomic adds in another order)."""
    import tempfile

    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset, list_samples
    from feclip.engine.evaluate import metric_rows, predict

    model = _demo_model(precision, seed=seed)
    if grad_noise:
        g = torch.Generator().manual_seed(noise_seed)
        for p in list(model.adapters.parameters()) + list(model.fc_patch.parameters()):
            p.register_hook(lambda grad, g=g: grad * (1 + grad_noise * torch.randn(grad.shape, generator=g)))
    with tempfile.TemporaryDirectory() as tmp:
        _train_on_set_a(model, sets, epochs, seed, tmp)
    target = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=DEMO_IMAGE_SIZE)
    rows = metric_rows(
        "synthetic",
        predict(model, target, EvalConfig(), torch.device("cpu")),
        target.category_has_masks,
        EvalConfig(),
    )
    macro = _macro(rows, ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro_zsad"))
    return {k: 100 * v for k, v in macro.items()}


def bench_spread(epochs: int = 30, runs: int = 3, grad_noise: float = 1e-6, precision: str = "bf16") -> dict:
    """How far apart two runs of the same seed end when the reductions are not deterministic (emulated:
    gradient noise at float rounding level), next to how far apart two seeds end; at the CUDA
    precision (bf16, emulated), where a rounding difference can cross a bf16 rounding boundary."""
    import tempfile

    from feclip.data import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        sets = make_synthetic(Path(tmp) / "syn")
        base = _demo_metrics(42, epochs, sets, precision=precision)
        noisy = [_demo_metrics(42, epochs, sets, grad_noise, i, precision) for i in range(runs)]
        seeds = [_demo_metrics(43 + i, epochs, sets, precision=precision) for i in range(runs)]
    figures = {}
    for k in base:
        same = [base[k]] + [m[k] for m in noisy]
        other = [base[k]] + [m[k] for m in seeds]
        figures[f"spread_same_seed_{k}_points"] = float(np.ptp(same))
        figures[f"spread_seeds_{k}_points"] = float(np.ptp(other))
        print(
            f"[spread] demo {epochs} epochs ({precision}), {k}: seed 42 {base[k]:.2f}; same seed, gradient noise "
            f"{grad_noise:g} ({runs} runs): range {np.ptp(same):.2f} points "
            f"({', '.join(f'{v:.2f}' for v in same[1:])}); {runs} other seeds: range {np.ptp(other):.2f} "
            f"({', '.join(f'{v:.2f}' for v in other[1:])})"
        )
    return figures
