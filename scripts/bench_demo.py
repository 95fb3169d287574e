"""The demo's numbers at CUDA's precision and under CUDA's non-determinism, emulated on the CPU: the
``precision`` and ``spread`` sections of ``scripts/bench.py`` (accuracy figures, not speed).

  precision the demo (feclip-tiny, synthetic set A, 30 epochs) evaluated on set B in fp32 and in
           emulated bf16 (CPU autocast; FE-CLIP's bf16 policy): image/pixel AUROC and map differences.
  spread   the demo trained again with the same seed and gradient noise at float rounding level (what
           non-deterministic CUDA reductions do), and with other seeds: the ranges of the metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch
from benchlib import feclip_model


def bench_precision(epochs: int = 30) -> dict:
    """The demo trained in fp32, evaluated on set B in fp32 and in emulated bf16 (the same adapters)."""
    import tempfile

    import numpy as np

    from feclip.config import EvalConfig, TrainConfig
    from feclip.data import AnomalyDataset, list_samples, make_synthetic
    from feclip.engine.evaluate import metric_rows, predict
    from feclip.engine.train import train
    from feclip.models import load_clip

    def tiny(precision):  # the demo's seed for the backbone and the adapters
        return feclip_model(load_clip("feclip-tiny", seed=42), seed=42, precision=precision)

    with tempfile.TemporaryDirectory() as tmp:
        sets = make_synthetic(Path(tmp) / "syn")
        model = tiny("fp32")
        cfg = TrainConfig(epochs=epochs, lr=2e-3, progress=False, resume=False)
        cfg.fc_patch.policy = "same"
        train(
            model,
            AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84),
            cfg,
            tmp,
            42,
            torch.device("cpu"),
        )
        target = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)
        results = {}
        for precision in ("fp32", "bf16"):
            m = tiny(precision)
            m.load_state_dict(model.state_dict(), strict=False)
            preds = predict(m, target, EvalConfig(), torch.device("cpu"))
            rows = metric_rows("synthetic", preds, target.category_has_masks, EvalConfig())
            macro = {
                k: float(np.mean([r.value for r in rows if r.metric == k and r.category != "__micro__"]))
                for k in ("image_auroc", "pixel_auroc", "pixel_aupro_zsad")
            }
            results[precision] = (preds, macro)
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


def _demo_metrics(
    seed: int, epochs: int, sets: dict, grad_noise: float = 0.0, noise_seed: int = 0, precision: str = "fp32"
) -> dict:
    """Train the demo (feclip-tiny, set A) and evaluate set B at ``precision`` (``bf16``: emulated on
    the CPU, as on CUDA): macro metrics in points. With
    ``grad_noise``, every gradient is multiplied by ``1 + grad_noise * N(0, 1)`` per element and step:
    the rounding differences of CUDA's non-deterministic reductions (atomic adds in another order)."""
    import tempfile

    import numpy as np

    from feclip.config import EvalConfig, TrainConfig
    from feclip.data import AnomalyDataset, list_samples
    from feclip.engine.evaluate import metric_rows, predict
    from feclip.engine.train import train
    from feclip.models import load_clip

    model = feclip_model(load_clip("feclip-tiny", seed=seed), seed=seed, precision=precision)
    if grad_noise:
        g = torch.Generator().manual_seed(noise_seed)
        for p in list(model.adapters.parameters()) + list(model.fc_patch.parameters()):
            p.register_hook(lambda grad, g=g: grad * (1 + grad_noise * torch.randn(grad.shape, generator=g)))
    cfg = TrainConfig(epochs=epochs, lr=2e-3, progress=False, resume=False)
    cfg.fc_patch.policy = "same"
    with tempfile.TemporaryDirectory() as tmp:
        train(
            model,
            AnomalyDataset(list_samples("synthetic", sets["set_a"]), image_size=84),
            cfg,
            tmp,
            seed,
            torch.device("cpu"),
        )
    target = AnomalyDataset(list_samples("synthetic", sets["set_b"]), image_size=84)
    rows = metric_rows(
        "synthetic",
        predict(model, target, EvalConfig(), torch.device("cpu")),
        target.category_has_masks,
        EvalConfig(),
    )
    return {
        k: 100 * float(np.mean([r.value for r in rows if r.metric == k and r.category != "__micro__"]))
        for k in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro_zsad")
    }


def bench_spread(epochs: int = 30, runs: int = 3, grad_noise: float = 1e-6, precision: str = "bf16") -> dict:
    """How far apart two runs of the same seed end when the reductions are not deterministic (emulated:
    gradient noise at float rounding level), next to how far apart two seeds end; at the CUDA
    precision (bf16, emulated), where a rounding difference can cross a bf16 rounding boundary."""
    import tempfile

    import numpy as np

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
