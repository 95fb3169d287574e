"""Evaluation: a model over a target dataset -> scores and maps -> metric rows of the CSV schema.

Scores and maps are made on the device in batches by :mod:`feclip.scoring` (tap selection,
aggregation, upsampling and Gaussian smoothing as :class:`~feclip.scoring.ScoringConfig` says, and the
few-shot part), then the maps are optionally post-processed on the CPU (:func:`postprocess`), and the
metrics are computed per category and pooled (``__micro__``).

Outputs beside a run's metrics (``out_dir``, the run folder): ``scores/<dataset>.csv``, one row per
image (:data:`SCORE_COLUMNS`: its category, label, image score, the maximum of its map, its image and
mask files), written whenever a target is evaluated, its predictions made by the model or read from
the outputs store; with ``eval.save_figures`` the per-category figures (:func:`save_figures`). The
forward pass (or the reading of stored outputs) and the figures show their progress
(:mod:`feclip.progress`, ``train.progress``); each target's time and images/s are logged (the run log).

The host keeps the device busy: ``DataLoader`` workers (``data.num_workers``) decode and collate the
next batches (into pinned memory on CUDA, copied without blocking), and each batch's scores and maps
travel to the host by non-blocking copies that are waited for (one synchronisation per batch) only
after the next batch has been queued on the device. The precision is the model's
(:attr:`~feclip.models.FEClip.precision`), as in training.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
from torch.utils.data import DataLoader

from feclip.data.dataset import collate
from feclip.engine import hostsync
from feclip.engine.store import OutputSlot, RawOutputs
from feclip.errors import DatasetError
from feclip.fileio import atomic_write_text
from feclip.methods.model import is_peer
from feclip.metrics.aggregate import AUPRO_METRIC_NAMES, MetricSets
from feclip.metrics.aupro import aupro_from_regions, check_aupro_options, region_pixels
from feclip.metrics.sorting import metrics_sort
from feclip.progress import progress as show_progress
from feclip.results import MICRO, MetricRow
from feclip.scoring import maps_at_sizes, output_image_scores, scores_and_maps

log = logging.getLogger("feclip.eval")

#: Values of ``eval.resolution``: ``input`` (maps and masks at the model's square input size) or
#: ``original`` (each map upsampled to its image's own size, masks read at that size).
RESOLUTIONS = ("input", "original")
SCORES_DIR = "scores"  # <run folder>/scores/<dataset>.csv
#: The columns of a target's scores file, one row per image in the dataset's order: the dataset (as in
#: metrics.csv), the category, the defect folder (``good`` for normal images), the label (0 normal, 1
#: anomalous), the image score the metrics rank, the maximum of the image's map (the map the pixel
#: metrics use: at the evaluation resolution, smoothed and post-processed), the image file and the
#: mask file (empty for normal images and for images without pixel ground truth).
SCORE_COLUMNS = ("dataset", "category", "defect", "label", "image_score", "map_max", "path", "mask_path")


@dataclass
class Predictions:
    """Everything the metrics need for one dataset. ``N`` images, maps at the evaluation size."""

    scores: np.ndarray  # (N,) float64 image scores
    maps: list[np.ndarray]  # N maps (H, W) float32; all of one size at the input resolution
    masks: list[np.ndarray]  # N masks (H, W) uint8 in {0, 1}; zeros for normal images
    labels: np.ndarray  # (N,) int64
    categories: list[str]  # (N,)
    outputs: RawOutputs | None = None  # the model's raw outputs, when predict() was asked to keep them


def postprocess(amap: np.ndarray, cfg) -> np.ndarray:
    """Map post-processing of the earlier study's experiment 5 (after smoothing), per image.

    ``percentile_keep``: values below the image's p-th percentile are set to the image minimum.
    ``morph_open``: grey opening with a (2r+1) x (2r+1) square.
    ``min_component_px``: in the region above the image's ``component_quantile``, 8-connected
    components smaller than this many pixels are set to the image minimum.
    Shape: ``(H, W) -> (H, W)``.
    """
    out = amap
    floor = float(amap.min())
    if cfg.percentile_keep is not None:
        out = np.where(out >= np.percentile(out, cfg.percentile_keep), out, floor)
    if cfg.morph_open > 0:
        out = ndi.grey_opening(out, size=(2 * cfg.morph_open + 1,) * 2)
    if cfg.min_component_px > 0:
        region = out >= np.quantile(out, cfg.component_quantile)
        labels, n = ndi.label(region, structure=np.ones((3, 3)))
        if n:
            sizes = np.bincount(labels.ravel())
            small = sizes < cfg.min_component_px
            small[0] = False
            out = np.where(small[labels], floor, out)
    return out.astype(np.float32, copy=False)


def _needs_postprocess(cfg) -> bool:
    return cfg.percentile_keep is not None or cfg.morph_open > 0 or cfg.min_component_px > 0


class _WithOriginalMasks(torch.utils.data.Dataset):
    """The items of an :class:`~feclip.data.AnomalyDataset` plus ``original_mask`` (the mask at the
    image's own size), so that the loader's workers decode those too (``eval.resolution=original``)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "original_mask": self.dataset.original_mask(index)}


def _collate_eval(items: list[dict]) -> dict:
    batch = collate(items)
    if items and "original_mask" in items[0]:
        batch["original_mask"] = [it["original_mask"] for it in items]
    return batch


def _loader(dataset, batch_size: int, device: torch.device, num_workers: int, original: bool) -> DataLoader:
    return DataLoader(
        _WithOriginalMasks(dataset) if original else dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=_collate_eval,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )


@torch.inference_mode()
def predict(
    model,
    dataset,
    cfg,
    device: torch.device,
    banks: dict | None = None,
    num_workers: int = 0,
    stored: RawOutputs | None = None,
    keep_outputs: bool = False,
    progress: bool = False,
    desc: str = "predict",
    on_category: Callable[[Predictions, str, list[int]], None] | None = None,
) -> Predictions:
    """Run ``model`` over ``dataset`` (an :class:`~feclip.data.AnomalyDataset`) with the options of ``cfg``
    (a :class:`feclip.config.EvalConfig`), at the model's precision.

    ``banks``: per category, a :class:`~feclip.models.fewshot.MemoryBank` of normal reference images;
    when given, the few-shot map is added to each map and its maximum to each score (paper Table 5).
    ``num_workers``: ``DataLoader`` processes that decode the images (``data.num_workers``).
    ``stored``: the model's outputs over ``dataset`` (:mod:`feclip.engine.store`), scored instead of
    running the model (no forward pass; the same batches, so the same numbers); not with ``banks``.
    ``keep_outputs``: return the model's outputs in :attr:`Predictions.outputs` (for the store).
    ``progress``: show the images done (:func:`feclip.progress.progress`, labelled ``desc``).
    ``on_category``: called as ``on_category(predictions, category, indices)`` as soon as the last
    image of a category is predicted (and post-processed): ``predictions`` holds the images up to
    there (its maps and masks lists keep growing; its scores and labels are filled in place).
    """
    if stored is not None and banks is not None:
        raise ValueError("predict: stored outputs hold no tap tokens for the few-shot banks")
    was_training = model.training
    model.eval()
    scoring = cfg.scoring()
    original = cfg.resolution != "input"
    peer = is_peer(model)  # a peer method (feclip.methods), not FE-CLIP
    n = len(dataset)
    preds = Predictions(
        scores=np.zeros(n, dtype=np.float64),
        maps=[],
        masks=[],
        labels=np.zeros(n, dtype=np.int64),
        categories=[s.category for s in dataset.samples],
    )
    maps, masks = preds.maps, preds.masks
    ends = _category_ends(preds.categories)  # (last index, category), in order of their last image
    kept_cls, kept_patch = [], []

    def launch(batch):
        """Queue one batch's work on the device; its results start travelling to the host."""
        if stored is not None:
            out = stored.output(batch["index"].tolist(), device)  # host tensor: no device wait
        else:
            images = batch["image"].to(device, non_blocking=True)
            if peer:  # feclip.methods.model.PeerModel: the categories, for prompts that name them
                out = model(images, categories=batch.get("category"))
            else:
                out = model(images, return_tokens=banks is not None)
        if not original:
            cats = None
            if banks is not None:
                cats = [dataset.samples[i].category for i in batch["index"].tolist()]  # host tensor
            batch_scores, batch_maps = scores_and_maps(model, out, scoring, banks=banks, categories=cats)
            results = [batch_scores.float(), batch_maps.float()]
        else:  # each image at its own size
            batch_scores = output_image_scores(model, out, scoring)
            sizes = batch["original_size"]
            results = [batch_scores.float()] + [m.float() for m in maps_at_sizes(model, out, scoring, sizes)]
        if keep_outputs:  # 18 KB an image for ViT-L: they travel with the maps, in the same wait
            results += [out.tap_cls_logits, out.tap_patch_logits]
        return hostsync.HostCopy(results), batch

    def collect(pending) -> None:
        """Wait for one batch's results (the one synchronisation of the batch) and keep them."""
        copy, batch = pending
        batch_scores, *batch_maps = copy.wait()
        if keep_outputs:
            *batch_maps, cls, patch = batch_maps
            kept_cls.append(cls)
            kept_patch.append(patch)
        start = len(maps)
        new_maps = batch_maps[0].numpy() if not original else [m.numpy() for m in batch_maps]
        if _needs_postprocess(cfg.postprocess):
            new_maps = [postprocess(m, cfg.postprocess) for m in new_maps]
        maps.extend(new_maps)
        masks.extend(batch["mask"].numpy().astype(np.uint8) if not original else batch["original_mask"])
        preds.scores[start : len(maps)] = batch_scores.double().numpy()
        preds.labels[start : len(maps)] = batch["label"].numpy()
        while on_category is not None and ends and ends[0][0] < len(maps):
            category = ends.pop(0)[1]
            on_category(preds, category, [i for i, c in enumerate(preds.categories) if c == category])

    pending = None
    loader = _loader(dataset, cfg.batch_size, device, num_workers, original)
    batches = show_progress(
        loader, progress, desc, len(dataset), unit="image", count=lambda b: len(b["index"]), logger=log
    )
    for batch in batches:
        launched = launch(batch)  # batch i+1 is queued before batch i is waited for
        if pending is not None:
            collect(pending)
        pending = launched
    if pending is not None:
        collect(pending)
    model.train(was_training)
    if keep_outputs and kept_cls:
        preds.outputs = RawOutputs.from_batches(kept_cls, kept_patch)
    return preds


def _category_ends(categories: list[str]) -> list[tuple[int, str]]:
    """``(index of its last image, category)`` of each category, in the order of those indices."""
    last = {c: i for i, c in enumerate(categories)}
    return sorted((i, c) for c, i in last.items())


def predict_through_store(
    model,
    dataset,
    cfg,
    device: torch.device,
    slot: OutputSlot,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "predict",
    on_category: Callable[[Predictions, str, list[int]], None] | None = None,
) -> Predictions:
    """:func:`predict` with the outputs store (``eval.reuse_outputs``): the stored outputs of ``slot``
    when they are there (no forward pass), else the model's, then stored. A second process after the
    same outputs waits for the first (the slot's lock) and reads them. ``on_category``: as for
    :func:`predict`."""
    shape = (len(dataset), len(model.config.taps), tuple(model.grid))
    raw = slot.load(*shape)
    if raw is None:
        with slot.lock():
            raw = slot.load(*shape)  # made by another process while this one waited?
            if raw is None:
                preds = predict(
                    model,
                    dataset,
                    cfg,
                    device,
                    num_workers=num_workers,
                    keep_outputs=True,
                    progress=progress,
                    desc=desc,
                    on_category=on_category,
                )
                if preds.outputs is not None:
                    slot.save(preds.outputs)
                return preds
    log.info(
        "model outputs on %d images read from the outputs store (entry %s): no forward pass",
        shape[0],
        slot.key,
    )
    return predict(
        model,
        dataset,
        cfg,
        device,
        num_workers=num_workers,
        stored=raw,
        progress=progress,
        desc=desc,
        on_category=on_category,
    )


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "dataset"


def _format_value(value: float) -> str:
    """The shortest text that reads back as the same float32 (scores and maps are float32 values);
    a float64 that is not a float32 value keeps its full repr."""
    value = float(value)
    as32 = np.float32(value)
    return str(as32) if float(as32) == value else repr(value)


def scores_path(out_dir, dataset_name: str) -> Path:
    """``<out_dir>/scores/<dataset>.csv`` (the name made file-safe)."""
    return Path(out_dir) / SCORES_DIR / f"{_safe_name(dataset_name)}.csv"


def write_scores(path, dataset_name: str, dataset, preds: Predictions) -> Path:
    """One row per image of ``dataset`` (:data:`SCORE_COLUMNS`), in its order, written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for i, sample in enumerate(dataset.samples):
        writer.writerow(
            [
                dataset_name,
                sample.category,
                sample.defect,
                int(preds.labels[i]),
                _format_value(preds.scores[i]),
                _format_value(np.max(preds.maps[i])),
                str(sample.image_path),
                "" if sample.mask_path is None else str(sample.mask_path),
            ]
        )
    return atomic_write_text(path, buf.getvalue())


def _central_square(array: np.ndarray) -> np.ndarray:
    """The central square of an original image or mask: what ``data.resize=center_crop`` shows the
    model (its map covers that square only). Shape: ``(H, W, ...) -> (s, s, ...)``, s = min(H, W)."""
    h, w = array.shape[:2]
    side = min(h, w)
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    return array[top : top + side, left : left + side]


def original_picture(dataset, index: int, amap: np.ndarray, with_mask: bool):
    """Image ``index`` as a montage shows it: the original image and mask at their own size (the
    central square with ``data.resize=center_crop``) and its evaluated map (resized to the image by
    :mod:`feclip.viz`). Returns ``(image (H, W, 3) uint8, mask (H, W) uint8 or None, map)``."""
    image = dataset.original_image(index)
    mask = dataset.original_mask(index) if with_mask else None
    if getattr(dataset, "resize", "square") == "center_crop":
        image = _central_square(image)
        mask = None if mask is None else _central_square(mask)
    return image, mask, amap


def save_figures(
    out_dir,
    dataset_name: str,
    dataset,
    preds: Predictions,
    fpr_limit: float | None = None,
    aupro_methods=None,
    progress: bool = False,
) -> None:
    """Per category: the montage (best and worst anomalous images, worst false positives, each at its
    original aspect ratio, read from its files only when shown) and the ROC/PRO curves with
    ``fpr_limit`` and ``aupro_methods`` (``eval.aupro.*``; ``None``: AUPRO's defaults), in
    ``<out_dir>/figures/`` (:func:`feclip.viz.save_category_figures`)."""
    from feclip.viz import save_category_figures

    categories = list(dataset.category_has_masks.items())
    shown = show_progress(
        categories, progress, f"{dataset_name}: figures", len(categories), unit="category", logger=log
    )
    for category, has_masks in shown:
        idx = [i for i, c in enumerate(preds.categories) if c == category]

        def picture(j: int, idx=idx, has_masks=has_masks):
            return original_picture(dataset, idx[j], preds.maps[idx[j]], has_masks)

        save_category_figures(
            out_dir,
            f"{dataset_name}_{category}",
            None,
            [preds.masks[i] for i in idx] if has_masks else None,
            [preds.maps[i] for i in idx],
            preds.scores[idx],
            preds.labels[idx],
            fpr_limit,
            aupro_methods=aupro_methods,
            picture=picture,
            names=[f"{dataset.samples[i].defect}/{Path(dataset.samples[i].image_path).name}" for i in idx],
        )


def _stack(arrays: list[np.ndarray], what: str, category: str) -> np.ndarray | list[np.ndarray]:
    """One array (N, H, W); the list itself for the pooled rows of categories of different sizes
    (original-resolution evaluation), which the metrics take as they are."""
    if not _one_size(arrays, what, category):
        return arrays
    return np.stack(arrays)


def _one_size(arrays: list[np.ndarray], what: str, category: str) -> bool:
    """Whether ``arrays`` share one size; different sizes are refused (DatasetError) except in the
    pooled rows."""
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) > 1:
        if category == MICRO:
            return False
        raise DatasetError(
            f"category {category!r}: {what} of different sizes {sorted(shapes)[:3]}; original-resolution "
            "evaluation needs one image size per category (use eval.resolution=input)"
        )
    return True


def metric_groups(
    categories: list[str], category_has_masks: dict[str, bool], cfg
) -> tuple[dict[str, list[int]], dict[str, bool]]:
    """The groups of images that get metric rows (each category of ``category_has_masks``, then
    ``__micro__``, all images, when ``cfg.micro`` and there are several) and whether each gets pixel
    metrics (``__micro__`` only when every category has masks)."""
    groups = {c: [i for i, x in enumerate(categories) if x == c] for c in category_has_masks}
    if cfg.micro and len(groups) > 1:
        groups[MICRO] = list(range(len(categories)))
    with_masks = {
        c: all(category_has_masks.values()) if c == MICRO else category_has_masks[c] for c in groups
    }
    return groups, with_masks


def start_metrics(
    categories: list[str], category_has_masks: dict[str, bool], cfg, device=None, background: bool = False
) -> MetricSets:
    """The :class:`~feclip.metrics.aggregate.MetricSets` of :func:`metric_rows` for images of
    ``categories``: ``cfg.aupro`` options, the sort of ``cfg.metrics_device`` on ``device``, the
    categories' pixels kept for the ``__micro__`` rows; ``background``: every category computed in a
    background thread (while the model predicts the next ones)."""
    groups, _ = metric_groups(categories, category_has_masks, cfg)
    return MetricSets(
        sum(g != MICRO for g in groups),
        keep_pixels=MICRO in groups,
        aupro_methods=tuple(cfg.aupro.methods),
        fpr_limit=cfg.aupro.fpr_limit,
        sort=metrics_sort(cfg.metrics_device, device),
        background=background,
    )


def add_group(sets: MetricSets, preds: Predictions, name: str, idx: list[int], with_masks: bool) -> None:
    """Start the metrics of images ``idx`` of ``preds`` as group ``name`` (:meth:`MetricSets.add`; the
    pooled ``__micro__`` group: :meth:`MetricSets.pool`)."""
    arrays = ([preds.masks[i] for i in idx], [preds.maps[i] for i in idx]) if with_masks else (None, None)
    start = sets.pool if name == MICRO else sets.add
    start(name, idx, preds.labels[idx], preds.scores[idx], *arrays)


def metric_rows(
    dataset_name: str,
    preds: Predictions,
    category_has_masks: dict[str, bool],
    cfg,
    device=None,
    started: MetricSets | None = None,
) -> list[MetricRow]:
    """Per-category metrics, plus pooled ``__micro__`` rows when ``cfg.micro``.

    The categories are computed in parallel threads (``FECLIP_METRIC_THREADS``, default: the CPUs
    this process may use) and the pooled rows reuse their sorted pixels and labelled regions
    (:class:`feclip.metrics.aggregate.MetricSets`); the numbers are those of
    :func:`~feclip.metrics.compute_category_metrics` per group, bit for bit. ``device``: the
    evaluation's torch device; with ``cfg.metrics_device=auto`` and a GPU there, the normal pixels'
    scores are sorted on it (:mod:`feclip.metrics.sorting`; the same numbers). ``started``: the
    :func:`start_metrics` to which some categories were already added (during the predictions), the
    others are added here; closed on return.
    """
    groups, with_masks = metric_groups(preds.categories, category_has_masks, cfg)
    one_size = {}
    for category, idx in groups.items():
        if with_masks[category]:
            one_size[category] = _one_size([preds.masks[i] for i in idx], "masks", category) and _one_size(
                [preds.maps[i] for i in idx], "maps", category
            )
    sets = (
        started if started is not None else start_metrics(preds.categories, category_has_masks, cfg, device)
    )
    with sets:
        for category, idx in groups.items():
            if category not in sets:
                add_group(sets, preds, category, idx, with_masks[category])
        per_group = sets.results()
    rows: list[MetricRow] = []
    variant = not cfg.aupro.include_normal or cfg.aupro.per_image_norm
    for category, idx in groups.items():
        values = per_group[category]
        if with_masks[category] and variant and one_size[category]:  # (pooled maps of several sizes: none)
            masks = np.stack([preds.masks[i] for i in idx])
            maps = np.stack([preds.maps[i] for i in idx])
            values.update(_aupro_variant(masks, maps, preds.labels[idx], cfg.aupro))
        rows.extend(MetricRow(dataset_name, category, k, float(v), len(idx)) for k, v in values.items())
    return rows


def _aupro_variant(masks: np.ndarray, maps: np.ndarray, labels: np.ndarray, cfg) -> dict[str, float]:
    """AUPRO on anomalous images only and/or on per-image min-max normalised maps (study 2)."""
    if not cfg.include_normal:
        masks, maps = masks[labels > 0], maps[labels > 0]
    if cfg.per_image_norm:
        lo = maps.min(axis=(1, 2), keepdims=True)
        span = maps.max(axis=(1, 2), keepdims=True) - lo
        maps = (maps - lo) / np.where(span > 0, span, 1.0)
    for method in cfg.methods:
        check_aupro_options(cfg.fpr_limit, method)
    rp = region_pixels(masks, maps)  # labelled and sorted once for both methods
    return {AUPRO_METRIC_NAMES[m]: aupro_from_regions(rp, float(cfg.fpr_limit), m) for m in cfg.methods}


def evaluate(
    model,
    dataset_name: str,
    dataset,
    cfg,
    device: torch.device,
    banks: dict | None = None,
    out_dir=None,
    num_workers: int = 0,
    outputs: OutputSlot | None = None,
    progress: bool = False,
    on_predictions: Callable[[Predictions], None] | None = None,
    overlap_metrics: bool = False,
) -> list[MetricRow]:
    """Metric rows of ``model`` on one dataset (see :func:`predict` and :func:`metric_rows`).

    ``out_dir`` (the run folder; ``None``: nothing written): ``scores/<dataset>.csv``
    (:func:`write_scores`) and, with ``cfg.save_figures``, the per-category figures. ``outputs``: the
    place of the model's outputs on this dataset in the outputs store (:func:`predict_through_store`;
    never with ``banks``). ``progress``: show the progress of the forward pass and the figures
    (``train.progress``). ``on_predictions``: called with the :class:`Predictions` once they are made
    (e.g. the tracker's pictures). The time of each step and the images/s are logged.

    ``overlap_metrics``: each category's metrics start in a background thread as soon as its last map
    is made, while the model predicts the next categories (:func:`start_metrics`); default ``False``:
    all of them after the predictions. The same numbers either way. Off by default until a GPU run
    shows a gain: on the CPU the background thread competes with the forward pass for the GIL
    (BENCHMARKS.md, 2026-12-05 "overlap"); ``scripts/bench_gpu.py``'s eval section times both ways.
    """
    start = time.perf_counter()
    desc = f"{dataset_name}: predict"
    has_masks = dataset.category_has_masks
    categories = [s.category for s in dataset.samples]
    with start_metrics(categories, has_masks, cfg, device, background=overlap_metrics) as sets:

        def on_category(preds: Predictions, category: str, idx: list[int]) -> None:
            if overlap_metrics and category in has_masks:  # its metrics run while the model goes on
                add_group(sets, preds, category, idx, has_masks[category])

        if outputs is not None and banks is None:
            preds = predict_through_store(
                model, dataset, cfg, device, outputs, num_workers, progress, desc, on_category
            )
        else:
            preds = predict(
                model,
                dataset,
                cfg,
                device,
                banks,
                num_workers,
                progress=progress,
                desc=desc,
                on_category=on_category,
            )
        predicted = time.perf_counter()
        if on_predictions is not None:
            on_predictions(preds)
        written = ""
        if out_dir is not None:
            path = write_scores(scores_path(out_dir, dataset_name), dataset_name, dataset, preds)
            written = f"; per-image scores in {path.relative_to(out_dir)}"
            if cfg.save_figures:
                save_figures(
                    out_dir, dataset_name, dataset, preds, cfg.aupro.fpr_limit, cfg.aupro.methods, progress
                )
        drawn = time.perf_counter()
        rows = metric_rows(dataset_name, preds, has_masks, cfg, device, started=sets)
    done = time.perf_counter()
    n = len(dataset)
    figures = f", figures {drawn - predicted:.1f} s" if out_dir is not None and cfg.save_figures else ""
    log.info(
        "evaluated %s: %d images in %.1f s (%.1f images/s): predictions %.1f s (%.1f images/s)%s, "
        "metrics %.1f s after them%s",
        dataset_name,
        n,
        done - start,
        n / max(done - start, 1e-9),
        predicted - start,
        n / max(predicted - start, 1e-9),
        figures,
        done - drawn,
        written,
    )
    return rows
