"""Optional experiment trackers beside the plain-text run log (which is always written).

``logger.kind=none`` (default) logs nothing extra; ``logger.kind=wandb`` sends a run to Weights & Biases,
offline by default (``logger.mode=offline``: no account, no network; ``wandb sync`` uploads later):

* the config as it ran (with its provenance) and, per epoch, the training losses (``train/<part>``);
* per target, the macro means over its categories of every metric (``eval/<target>/macro/<metric>``:
  image/pixel AUROC, AP, F1-max, the AUPROs) and the pooled rows (``eval/<target>/micro/<metric>``);
* every per-category metric in one table (``eval/per_category``: a row per target and category);
* per target, up to :data:`MAX_OVERLAYS` anomalous images (``eval/<target>/overlays``): the highest and
  the lowest scored, each as image | heatmap overlay | ground truth, the maps on one colour scale.

A run is named ``<variant>/seed=<seed>`` and grouped by ``<study>/<variant>``, so that the seeds of a
variant sit together in the UI; its tags name the study, the variant and the protocol
(:func:`run_labels`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from feclip.errors import ConfigError

log = logging.getLogger("feclip")

LOGGERS = ("none", "wandb")  # logger.kind (feclip.config.RunConfig.validate checks it against this)
MAX_OVERLAYS = 4  # anomalous images shown per target: half the highest scored, half the lowest
MAX_OVERLAY_SIDE = 512  # px: a larger panel is scaled down before it is logged
MAX_TAG = 64  # characters of a wandb tag (longer ones are refused by wandb)
MAX_TARGETS_NAMED = 3  # a protocol label names at most this many targets, else counts them


def protocol_label(train: str, targets: list[str]) -> str:
    """``<train>_to_<target>[+<target>...]`` (``<train>_to_<n>_datasets`` for more than
    :data:`MAX_TARGETS_NAMED` distinct targets); ``train`` is ``none`` for a run that trains nothing."""
    names = list(dict.fromkeys(targets))
    where = "+".join(names) if len(names) <= MAX_TARGETS_NAMED else f"{len(names)}_datasets"
    return f"{train}_to_{where}"


def run_labels(study: str, variant: str, seed: int, protocol: str, job_type: str) -> dict:
    """The tracker's ``name`` (``<variant>/seed=<seed>``), ``group`` (``<study>/<variant>``: the seeds of
    one variant together), ``tags`` (``study:…``, ``variant:…``, ``protocol:…``, each cut to
    :data:`MAX_TAG` characters) and ``job_type`` (``train`` or ``eval``)."""
    tags = [f"study:{study}", f"variant:{variant}", f"protocol:{protocol}"]
    return {
        "name": f"{variant}/seed={seed}",
        "group": f"{study}/{variant}",
        "tags": [t[:MAX_TAG] for t in tags],
        "job_type": job_type,
    }


def macro_means(rows) -> dict[str, dict[str, float]]:
    """Per target: every metric's macro mean over its categories (``__micro__`` rows excluded; a ``nan``
    category gives ``nan``, as :func:`feclip.metrics.aggregate.macro_average`), in the rows' order."""
    from feclip.metrics.aggregate import macro_average
    from feclip.results import MICRO

    values: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        if r.category != MICRO:
            values.setdefault(r.dataset, {}).setdefault(r.metric, {})[r.category] = r.value
    return {
        dataset: {metric: macro_average(per_cat) for metric, per_cat in metrics.items()}
        for dataset, metrics in values.items()
    }


def per_category_table(rows) -> tuple[list[str], list[list]]:
    """Columns ``dataset, category, n_images, <metric>...`` (every metric of ``rows``, first seen
    first) and one row per (target, category), ``__micro__`` excluded; ``None`` where a target lacks a
    metric."""
    from feclip.results import MICRO

    metrics = list(dict.fromkeys(r.metric for r in rows))
    cells: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r.category != MICRO:
            cells.setdefault((r.dataset, r.category), {"n_images": r.n_images})[r.metric] = r.value
    data = [
        [dataset, category, cell["n_images"], *(cell.get(m) for m in metrics)]
        for (dataset, category), cell in cells.items()
    ]
    return ["dataset", "category", "n_images", *metrics], data


def pick_overlay_images(labels, scores, n: int = MAX_OVERLAYS) -> list[tuple[int, str]]:
    """Up to ``n`` anomalous images: the ``ceil(n/2)`` highest scored then the ``floor(n/2)`` lowest
    (all of them when there are at most ``n``), as ``(index, "highest k" | "lowest k")``; ties by index."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    anomalous = [int(i) for i in np.flatnonzero(labels > 0)]
    ranked = sorted(anomalous, key=lambda i: (-scores[i], i))  # highest first
    n_high = min(len(ranked), -(-n // 2))
    high = ranked[:n_high]
    low = [i for i in reversed(ranked[n_high:])][: n - n_high]
    return [(i, f"highest {k + 1}") for k, i in enumerate(high)] + [
        (i, f"lowest {k + 1}") for k, i in enumerate(low)
    ]


def display_image(dataset, index: int, size: tuple[int, int]) -> np.ndarray:
    """Image ``index`` of ``dataset`` as its map sees it: at the original resolution when the map has that
    size (``eval.resolution=original``), else resized as the model's input was (``dataset.resize``:
    square, or centre crop). Shape: ``(H, W, 3)`` uint8 with ``(H, W) = size``."""
    from PIL import Image

    from feclip.data.transforms import resize_rgb

    image = dataset.original_image(index)
    if image.shape[:2] == tuple(size):
        return image
    if size[0] == size[1]:
        image = resize_rgb(image, size[0], getattr(dataset, "resize", "square"))
    if image.shape[:2] != tuple(size):  # not the model's square: stretch to the map
        image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))
    return image


def overlay_panel(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, lo: float, hi: float):
    """``image | heatmap overlay | ground truth`` side by side, uint8 ``(H, 3W, 3)`` (image, map and mask
    of one size ``(H, W)``; the map coloured between ``lo`` and ``hi``; no mask: a black panel), scaled
    down so that its height and each panel's width are at most :data:`MAX_OVERLAY_SIDE` px."""
    from PIL import Image

    from feclip.viz import overlay

    h, w = amap.shape
    truth = np.zeros((h, w), np.uint8) if mask is None else (np.asarray(mask) > 0).astype(np.uint8) * 255
    heat = overlay(image, amap, alpha=0.5, vmin=lo, vmax=hi)  # the one call into feclip.viz
    panel = np.concatenate([image, heat, np.repeat(truth[..., None], 3, axis=2)], axis=1)
    scale = MAX_OVERLAY_SIDE / max(h, w)
    if scale < 1:
        size = (max(1, round(panel.shape[1] * scale)), max(1, round(h * scale)))
        panel = np.asarray(Image.fromarray(panel).resize(size, Image.Resampling.BILINEAR))
    return panel


class NullLogger:
    """Logs nothing: ``logger.kind=none``."""

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        pass

    def log_predictions(self, dataset_name: str, dataset, preds) -> None:
        pass

    def log_results(self, rows) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases run in ``run_dir/wandb`` (what it logs: the module docstring)."""

    def __init__(self, cfg, run_dir: Path, config: dict, labels: dict):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("logger.kind=wandb needs the wandb package: pip install 'feclip[wandb]'") from e
        self._wandb = wandb
        self._run = wandb.init(
            project=cfg.project,
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
            reinit="create_new",
            **labels,
        )

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self._run.log({f"train/{k}": v for k, v in values.items()} | {"epoch": epoch})

    def log_predictions(self, dataset_name: str, dataset, preds) -> None:
        """Up to :data:`MAX_OVERLAYS` anomalous images of one target (:func:`pick_overlay_images`), as
        ``eval/<target>/overlays``; ``preds`` is the target's
        :class:`~feclip.engine.evaluate.Predictions`, ``dataset`` its :class:`~feclip.data.AnomalyDataset`."""
        try:
            self._log_overlays(dataset_name, dataset, preds)
        except Exception as e:  # noqa: BLE001 - a picture the tracker cannot take loses no metric
            log.warning(
                "wandb: the overlays of %s were not logged (%s: %s)", dataset_name, type(e).__name__, e
            )

    def _log_overlays(self, dataset_name: str, dataset, preds) -> None:
        picked = pick_overlay_images(preds.labels, preds.scores)
        if not picked:
            return
        shown = [np.asarray(preds.maps[i], dtype=np.float64) for i, _ in picked]
        finite = [m[np.isfinite(m)] for m in shown]
        values = np.concatenate(finite) if any(f.size for f in finite) else np.zeros(1)
        lo, hi = float(values.min()), float(values.max())
        masks = dataset.category_has_masks
        images = []
        for (i, which), amap in zip(picked, shown):
            category = preds.categories[i]
            mask = preds.masks[i] if masks.get(category, False) else None
            panel = overlay_panel(display_image(dataset, i, amap.shape), amap, mask, lo, hi)
            path = Path(dataset.samples[i].image_path)
            name = f"{path.parent.name}/{path.name}"
            caption = (
                f"{category}/{name}, {which}: score {float(preds.scores[i]):.4f}, map [{lo:.3g}, {hi:.3g}]"
            )
            images.append(self._wandb.Image(panel, caption=caption))
        self._run.log({f"eval/{dataset_name}/overlays": images})

    def log_results(self, rows) -> None:
        """Macro (and pooled) means per target as scalars, every per-category metric as a table."""
        from feclip.results import MICRO

        scalars = {
            f"eval/{dataset}/macro/{metric}": value
            for dataset, metrics in macro_means(rows).items()
            for metric, value in metrics.items()
        }
        scalars |= {f"eval/{r.dataset}/micro/{r.metric}": r.value for r in rows if r.category == MICRO}
        columns, data = per_category_table(rows)
        table = self._wandb.Table(columns=columns, data=data)
        self._run.log(scalars | {"eval/per_category": table})
        for key, value in scalars.items():
            self._run.summary[key] = value
        log.info("wandb: logged %d means and a table of %d per-category rows", len(scalars), len(data))

    def finish(self) -> None:
        self._run.finish()


def make_logger(cfg, run_dir: Path, config: dict, labels: dict) -> NullLogger:
    """The tracker named by ``cfg.kind`` (a :class:`feclip.config.LoggerConfig`); ``config`` is the run's
    config as it ran, ``labels`` its name, group, tags and job type (:func:`run_labels`)."""
    if cfg.kind == "none":
        return NullLogger()
    if cfg.kind == "wandb":
        return WandbLogger(cfg, run_dir, config, labels)
    raise ConfigError(f"logger.kind must be one of {LOGGERS}, got {cfg.kind!r}")
