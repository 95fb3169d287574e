"""Evaluation: a model over a target dataset -> scores and maps -> metric rows of the CSV schema.

Scores and maps are made on the device in batches by :mod:`feclip.scoring` (tap selection,
aggregation, upsampling and Gaussian smoothing as :class:`~feclip.scoring.ScoringConfig` says, and the
few-shot part), then the maps are optionally post-processed on the CPU (:func:`postprocess`), and the
metrics are computed per category and pooled (``__micro__``).

The host keeps the device busy: ``DataLoader`` workers (``data.num_workers``) decode and collate the
next batches (into pinned memory on CUDA, copied without blocking), and each batch's scores and maps
travel to the host by non-blocking copies that are waited for (one synchronisation per batch) only
after the next batch has been queued on the device. The precision is the model's
(:attr:`~feclip.models.FEClip.precision`), as in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch
from torch.utils.data import DataLoader

from feclip.data.dataset import collate
from feclip.engine import hostsync
from feclip.engine.store import OutputSlot, RawOutputs
from feclip.errors import DatasetError
from feclip.metrics.aggregate import AUPRO_METRIC_NAMES, category_metric_sets
from feclip.metrics.aupro import aupro_from_regions, check_aupro_options, region_pixels
from feclip.results import MICRO, MetricRow
from feclip.scoring import image_scores, maps_at_sizes, scores_and_maps

log = logging.getLogger("feclip.eval")


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
) -> Predictions:
    """Run ``model`` over ``dataset`` (an :class:`~feclip.data.AnomalyDataset`) with the options of ``cfg``
    (a :class:`feclip.config.EvalConfig`), at the model's precision.

    ``banks``: per category, a :class:`~feclip.models.fewshot.MemoryBank` of normal reference images;
    when given, the few-shot map is added to each map and its maximum to each score (paper Table 5).
    ``num_workers``: ``DataLoader`` processes that decode the images (``data.num_workers``).
    ``stored``: the model's outputs over ``dataset`` (:mod:`feclip.engine.store`), scored instead of
    running the model (no forward pass; the same batches, so the same numbers); not with ``banks``.
    ``keep_outputs``: return the model's outputs in :attr:`Predictions.outputs` (for the store).
    """
    if stored is not None and banks is not None:
        raise ValueError("predict: stored outputs hold no tap tokens for the few-shot banks")
    was_training = model.training
    model.eval()
    scoring = cfg.scoring()
    original = cfg.resolution != "input"
    scores, maps, masks, labels = [], [], [], []
    kept_cls, kept_patch = [], []

    def launch(batch):
        """Queue one batch's work on the device; its results start travelling to the host."""
        if stored is not None:
            out = stored.output(batch["index"].tolist(), device)  # host tensor: no device wait
        else:
            images = batch["image"].to(device, non_blocking=True)
            out = model(images, return_tokens=banks is not None)
        if not original:
            cats = None
            if banks is not None:
                cats = [dataset.samples[i].category for i in batch["index"].tolist()]  # host tensor
            batch_scores, batch_maps = scores_and_maps(model, out, scoring, banks=banks, categories=cats)
            results = [batch_scores.float(), batch_maps.float()]
        else:  # each image at its own size
            batch_scores = image_scores(out.tap_cls_logits, model.config.taps, scoring)
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
        if not original:
            maps.extend(batch_maps[0].numpy())
            masks.extend(batch["mask"].numpy().astype(np.uint8))
        else:
            maps.extend(m.numpy() for m in batch_maps)
            masks.extend(batch["original_mask"])
        scores.append(batch_scores)
        labels.append(batch["label"])

    pending = None
    for batch in _loader(dataset, cfg.batch_size, device, num_workers, original):
        launched = launch(batch)  # batch i+1 is queued before batch i is waited for
        if pending is not None:
            collect(pending)
        pending = launched
    if pending is not None:
        collect(pending)
    if _needs_postprocess(cfg.postprocess):
        maps = [postprocess(m, cfg.postprocess) for m in maps]
    model.train(was_training)
    return Predictions(
        scores=torch.cat(scores).double().numpy(),
        maps=maps,
        masks=masks,
        labels=torch.cat(labels).numpy().astype(np.int64),
        categories=[s.category for s in dataset.samples],
        outputs=RawOutputs.from_batches(kept_cls, kept_patch) if keep_outputs and kept_cls else None,
    )


def predict_through_store(
    model, dataset, cfg, device: torch.device, slot: OutputSlot, num_workers: int = 0
) -> Predictions:
    """:func:`predict` with the outputs store (``eval.reuse_outputs``): the stored outputs of ``slot``
    when they are there (no forward pass), else the model's, then stored. A second process after the
    same outputs waits for the first (the slot's lock) and reads them."""
    shape = (len(dataset), len(model.config.taps), tuple(model.grid))
    raw = slot.load(*shape)
    if raw is None:
        with slot.lock():
            raw = slot.load(*shape)  # made by another process while this one waited?
            if raw is None:
                preds = predict(model, dataset, cfg, device, num_workers=num_workers, keep_outputs=True)
                if preds.outputs is not None:
                    slot.save(preds.outputs)
                return preds
    log.info(
        "model outputs on %d images read from the outputs store (entry %s): no forward pass",
        shape[0],
        slot.key,
    )
    return predict(model, dataset, cfg, device, num_workers=num_workers, stored=raw)


def save_figures(out_dir, dataset_name: str, dataset, preds: Predictions) -> None:
    """Per category: the best/worst montage and the ROC/PRO curves (``<out_dir>/figures/``)."""
    from PIL import Image

    from feclip.viz import save_category_figures

    for category, has_masks in dataset.category_has_masks.items():
        idx = [i for i, c in enumerate(preds.categories) if c == category]
        size = preds.maps[idx[0]].shape
        images = [
            np.asarray(Image.fromarray(dataset.original_image(i)).resize(size[::-1], Image.BILINEAR))
            for i in idx
        ]
        masks = [preds.masks[i] for i in idx] if has_masks else None
        save_category_figures(
            out_dir,
            f"{dataset_name}_{category}",
            images,
            masks,
            [preds.maps[i] for i in idx],
            preds.scores[idx],
            preds.labels[idx],
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


def metric_rows(
    dataset_name: str, preds: Predictions, category_has_masks: dict[str, bool], cfg
) -> list[MetricRow]:
    """Per-category metrics, plus pooled ``__micro__`` rows when ``cfg.micro``.

    The categories are computed in parallel threads (``FECLIP_METRIC_THREADS``, default: the CPUs
    this process may use) and the pooled rows reuse their sorted pixels and labelled regions
    (:func:`feclip.metrics.aggregate.category_metric_sets`); the numbers are those of
    :func:`~feclip.metrics.compute_category_metrics` per group, bit for bit.
    """
    groups = {c: [i for i, x in enumerate(preds.categories) if x == c] for c in category_has_masks}
    if cfg.micro and len(groups) > 1:
        groups[MICRO] = list(range(len(preds.categories)))
    with_masks = {
        c: all(category_has_masks.values()) if c == MICRO else category_has_masks[c] for c in groups
    }
    one_size = {}
    for category, idx in groups.items():
        if with_masks[category]:
            one_size[category] = _one_size([preds.masks[i] for i in idx], "masks", category) and _one_size(
                [preds.maps[i] for i in idx], "maps", category
            )
    per_group = category_metric_sets(
        preds.labels,
        preds.scores,
        preds.masks,
        preds.maps,
        groups,
        with_masks,
        pooled=MICRO if MICRO in groups else None,
        aupro_methods=tuple(cfg.aupro.methods),
        fpr_limit=cfg.aupro.fpr_limit,
    )
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
    figures_dir=None,
    num_workers: int = 0,
    outputs: OutputSlot | None = None,
) -> list[MetricRow]:
    """Metric rows of ``model`` on one dataset (see :func:`predict` and :func:`metric_rows`); with
    ``figures_dir`` (and ``cfg.save_figures``) also the per-category figures. ``outputs``: the place of
    the model's outputs on this dataset in the outputs store (:func:`predict_through_store`; never with
    ``banks``)."""
    if outputs is not None and banks is None:
        preds = predict_through_store(model, dataset, cfg, device, outputs, num_workers)
    else:
        preds = predict(model, dataset, cfg, device, banks, num_workers)
    if cfg.save_figures and figures_dir is not None:
        save_figures(figures_dir, dataset_name, dataset, preds)
    return metric_rows(dataset_name, preds, dataset.category_has_masks, cfg)
