"""The ``overlap`` section of ``scripts/bench.py``: an evaluation whose categories' metrics start while
the model predicts the next categories (``evaluate(overlap_metrics=True)``, the default) against all
metrics after the predictions (``overlap_metrics=False``), on this CPU with an emulated GPU.

What a GPU changes is that the host is free while the device computes a batch. The emulation: feclip's
model on ``feclip-tiny`` at 336 (maps of 336 x 336, so the metrics cost what they cost at ViT-L's
resolution) plus a forward hook that sleeps ``device_ms`` per batch (the host idle, as while it waits
for a GPU: 60 ms is a batch of 32 at the 532 images/s ViT-L/14@336 made on an H200). The model alone
(the same forward passes with their sleeps, no maps or metrics) is timed too, for the pipeline ratio
``model alone / evaluation`` of each way. Rounds are interleaved; the rows of both ways are compared
value for value.
"""

from __future__ import annotations

import time

import torch
from benchlib import ByCategory, RandomAnomalySet, feclip_model, interleaved, median_ci, paired_ratio


def bench_overlap(
    n_images: int = 690,
    n_categories: int = 15,
    size: int = 336,
    batch: int = 32,
    device_ms: float = 60.0,
    repeats: int = 5,
) -> dict:
    """Seconds of the evaluation with and without the overlap, and of the model alone (see module)."""
    from feclip.config import EvalConfig
    from feclip.engine.evaluate import evaluate
    from feclip.models import load_clip

    device = torch.device("cpu")
    model = feclip_model(load_clip("feclip-tiny", image_size=size, seed=0)).eval()
    model.register_forward_hook(lambda *_: time.sleep(device_ms / 1000.0))
    data = ByCategory(RandomAnomalySet(n_images, size, n_categories))
    cfg = EvalConfig(batch_size=batch)  # sigma 4, both AUPROs, micro rows
    rows = {}

    def run(overlap: bool):
        def go():
            rows[overlap] = evaluate(model, "bench", data, cfg, device, overlap_metrics=overlap)

        return go

    def model_alone():
        with torch.inference_mode():
            for j in range(0, n_images, batch):
                model(data.data.images[j : j + batch])

    run(True)()  # warm-up
    times = interleaved({"overlap": run(True), "after": run(False), "model": model_alone}, repeats)
    same = {(r.category, r.metric): r.value for r in rows[True]} == {
        (r.category, r.metric): r.value for r in rows[False]
    }
    med = {k: median_ci(v)[0] for k, v in times.items()}
    speedup = paired_ratio(times, "after", "overlap")
    figures = {
        "overlap_images": n_images,
        "overlap_categories": n_categories,
        "overlap_device_ms_per_batch": device_ms,
        "overlap_eval_seconds": med["overlap"],
        "overlap_eval_seconds_after": med["after"],
        "overlap_model_alone_seconds": med["model"],
        "overlap_speedup": speedup[0],
        "overlap_speedup_ci95": [speedup[1], speedup[2]],
        "overlap_pipeline_ratio": med["model"] / med["overlap"],
        "overlap_pipeline_ratio_after": med["model"] / med["after"],
        "overlap_rows_identical": same,
    }
    print(
        f"[overlap] {n_images} images of {size}^2 in {n_categories} categories, feclip-tiny + {device_ms:g} ms "
        f"of emulated device time per batch of {batch}, {repeats} rounds: evaluation {med['after']:.2f} s "
        f"with the metrics after the predictions -> {med['overlap']:.2f} s overlapped "
        f"(x{speedup[0]:.2f}, 95% CI {speedup[1]:.2f}-{speedup[2]:.2f}); model alone {med['model']:.2f} s, "
        f"pipeline ratio {med['model'] / med['after']:.3f} -> {med['model'] / med['overlap']:.3f}; "
        f"rows identical: {same}"
    )
    return figures
