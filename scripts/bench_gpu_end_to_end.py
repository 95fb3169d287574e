"""The sections of ``scripts/bench_gpu.py`` that run FE-CLIP's own training and evaluation code end to
end over MVTec-sized data: ``protocol`` (:func:`feclip.engine.train.train`, 9 epochs, checkpoints
included), ``eval`` (``predict`` and ``metric_rows``, timed apart) and ``pipeline`` (the evaluation from
PNG files, against the model alone). ``sizes`` is bench_gpu's ``Sizes``.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch
from benchlib import MVTEC_TEST_IMAGES, ByCategory, feclip_model, png_category, sync

from feclip.data.mvtec import MVTEC_CATEGORIES


def measure_protocol(clip, dataset, device: torch.device, sizes, compile_mode: str = "off") -> dict:
    """Wall time of :func:`feclip.engine.train.train` over ``dataset`` (prefix cache on, the paper's
    other defaults: Adam 5e-4, fc_patch at lr/100, not deterministic), checkpoints written to a temp dir."""
    from feclip.config import TrainConfig
    from feclip.engine.train import train

    model = feclip_model(clip)
    cfg = TrainConfig(
        epochs=sizes.epochs,
        batch_size=sizes.train_batch,
        prefix_cache="on",
        progress=False,
        resume=False,
        compile=compile_mode,
    )
    speeds = []
    with tempfile.TemporaryDirectory() as run_dir, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        sync(device)
        t0 = time.perf_counter()
        result = train(
            model, dataset, cfg, run_dir, 42, device, on_epoch=lambda e, v: speeds.append(v["images_per_s"])
        )
        sync(device)
        seconds = time.perf_counter() - t0
    figures = {
        "protocol_images": len(dataset),
        "protocol_epochs": sizes.epochs,
        "protocol_seconds": seconds,
        "protocol_images_per_s": len(dataset) * sizes.epochs / seconds,
        "protocol_epoch_images_per_s": speeds,
        # setup and the prefix cache's build (at the model's precision, as the steps): outside the epochs' clocks
        "protocol_outside_epochs_seconds": seconds - sum(len(dataset) / v for v in speeds),
        "protocol_last_loss": result.last_loss,
        "protocol_warnings": sorted({str(w.message)[:160] for w in caught}),
    }
    if sizes.epochs == 9 and len(dataset) == MVTEC_TEST_IMAGES:
        figures["protocol_9ep_seconds"] = seconds
    return figures


def measure_pipeline(clip, device: torch.device, sizes) -> dict:
    """Evaluation images/s from PNG files (decode, resize, normalise in ``DataLoader`` workers; model;
    maps; metrics) relative to the model alone on pre-loaded, pre-collated tensors; then the same from
    a warm decoded-image cache (``AnomalyDataset(disk_cache=)``, written before the timed runs)."""
    import os

    from feclip.config import EvalConfig
    from feclip.data import AnomalyDataset
    from feclip.data.dataset import collate
    from feclip.engine.evaluate import evaluate

    model = feclip_model(clip).eval()
    cfg = EvalConfig()  # batch 32, sigma 4, every metric
    n = sizes.pipeline_images
    workers = min(sizes.pipeline_workers, os.cpu_count() or 1)
    figures = {"pipeline_images": n, "pipeline_side": sizes.pipeline_side, "pipeline_workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        samples = png_category(Path(tmp) / "part", n, sizes.pipeline_side)
        figures["pipeline_png_writing_seconds"] = time.perf_counter() - t0
        pre = AnomalyDataset(samples, image_size=model.image_size).preload(num_threads=workers)
        batches = [
            collate([pre[i] for i in range(j, min(j + cfg.batch_size, n))])["image"].to(device)
            for j in range(0, n, cfg.batch_size)
        ]

        def model_alone():
            with torch.inference_mode():
                for x in batches:
                    model(x)
            sync(device)

        model_alone()  # warm-up
        t0 = time.perf_counter()
        model_alone()
        model_s = time.perf_counter() - t0
        figures["pipeline_model_images_per_s"] = n / model_s
        for w in (0, workers):
            t0 = time.perf_counter()
            evaluate(
                model,
                "bench",
                AnomalyDataset(samples, image_size=model.image_size),
                cfg,
                device,
                num_workers=w,
            )
            sync(device)
            seconds = time.perf_counter() - t0
            figures[f"eval_images_per_s_w{w}"] = n / seconds
            figures[f"eval_pipeline_ratio_w{w}"] = model_s / seconds
        # the same from a warm decoded-image cache (what every run after a dataset's first one reads)
        disk = Path(tmp) / "decoded"
        t0 = time.perf_counter()
        AnomalyDataset(samples, image_size=model.image_size, disk_cache=disk).preload(num_threads=workers)
        figures["pipeline_cache_build_seconds"] = time.perf_counter() - t0
        for w in (0, workers):
            t0 = time.perf_counter()
            evaluate(
                model,
                "bench",
                AnomalyDataset(samples, image_size=model.image_size, disk_cache=disk),
                cfg,
                device,
                num_workers=w,
            )
            sync(device)
            seconds = time.perf_counter() - t0
            figures[f"eval_images_per_s_cached_w{w}"] = n / seconds
            figures[f"eval_pipeline_ratio_cached_w{w}"] = model_s / seconds
        figures.update(
            pipeline_breakdown(
                model,
                AnomalyDataset(samples, image_size=model.image_size, disk_cache=disk),
                cfg,
                device,
                workers,
            )
        )
    return figures


def pipeline_breakdown(model, dataset, cfg, device: torch.device, workers: int) -> dict:
    """Where the cached evaluation's time goes, each part alone, ``workers`` loader processes: the feed
    (``predict``'s own ``DataLoader``: cache reads, collation, pinned copies to ``device``), ``predict``
    (feed, model, maps, their copies to the host) and ``metric_rows`` (every metric, pixel sorts on
    ``device``). ``evaluate`` is about predict + metrics; feed and model overlap inside predict."""
    from feclip.engine.evaluate import _loader, metric_rows, predict

    n = len(dataset)
    t0 = time.perf_counter()
    for batch in _loader(dataset, cfg.batch_size, device, workers, original=False):
        batch["image"].to(device, non_blocking=True)
    sync(device)
    t1 = time.perf_counter()
    preds = predict(model, dataset, cfg, device, num_workers=workers)
    sync(device)
    t2 = time.perf_counter()
    metric_rows("bench", preds, dataset.category_has_masks, cfg, device)
    t3 = time.perf_counter()
    return {
        "pipeline_cached_feed_images_per_s": n / (t1 - t0),
        "pipeline_cached_predict_images_per_s": n / (t2 - t1),
        "pipeline_cached_metrics_seconds": t3 - t2,
    }


def measure_eval(clip, dataset, device: torch.device, amp: bool) -> dict:
    """Seconds of ``predict`` (model and maps) and ``metric_rows`` (all metrics) over ``dataset``; the
    metrics twice, their pixel sorts on the GPU (``eval.metrics_device=auto``, the default) and with
    numpy (``cpu``), in turn, and their rows compared value for value; then ``evaluate`` with the
    metrics overlapped with the predictions (``overlap_metrics=True``) and after them, once each,
    their rows compared."""
    from dataclasses import replace

    from feclip.config import EvalConfig
    from feclip.engine.evaluate import evaluate, metric_rows, predict

    model = feclip_model(clip).eval()
    cfg = EvalConfig()  # the paper preset: sigma 4, both AUPROs, micro rows, batch 32
    sync(device)
    t0 = time.perf_counter()
    preds = predict(model, dataset, cfg, device)  # at the model's precision (bf16 on CUDA)
    sync(device)
    t1 = time.perf_counter()
    rows = metric_rows("random", preds, dataset.category_has_masks, cfg, device)
    t2 = time.perf_counter()
    host_rows = metric_rows("random", preds, dataset.category_has_masks, replace(cfg, metrics_device="cpu"))
    t3 = time.perf_counter()
    differ = sum(
        not (a.value == b.value or (a.value != a.value and b.value != b.value))
        for a, b in zip(rows, host_rows)
    )
    figures = {
        "eval_images": len(dataset),
        "eval_categories": len(dataset.category_has_masks),
        "eval_seconds": t2 - t0,
        "eval_predict_seconds": t1 - t0,
        "eval_metrics_seconds": t2 - t1,
        "eval_metrics_host_sort_seconds": t3 - t2,
        "eval_metrics_gpu_sort_speedup": (t3 - t2) / max(t2 - t1, 1e-9),
        "eval_metric_rows": len(rows),
        "eval_metric_values_differing": differ + abs(len(rows) - len(host_rows)),
    }
    if len(dataset) == MVTEC_TEST_IMAGES and len(dataset.category_has_masks) == len(MVTEC_CATEGORIES):
        figures["eval_mvtec_seconds"] = t2 - t0
    # evaluate() with each category's metrics started during the predictions vs after them (the default),
    # the categories in order as the readers list them (one of each: the GPU call has 600 s)
    ordered = ByCategory(dataset)
    seconds, values = {}, {}
    for overlap in (False, True):
        sync(device)
        t0 = time.perf_counter()
        out = evaluate(model, "random", ordered, cfg, device, overlap_metrics=overlap)
        seconds[overlap] = time.perf_counter() - t0
        values[overlap] = {(r.category, r.metric): r.value for r in out}
    figures["eval_overlap_seconds"] = seconds[True]
    figures["eval_after_seconds"] = seconds[False]
    figures["eval_overlap_speedup"] = seconds[False] / seconds[True]
    figures["eval_overlap_values_differing"] = sum(
        not (v == values[False].get(k) or (v != v and values[False].get(k) != values[False].get(k)))
        for k, v in values[True].items()
    ) + abs(len(values[True]) - len(values[False]))
    return figures
