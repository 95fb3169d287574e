"""The data of one run: where each dataset lives, its listing with the reader options, the checks
made before any training, the few-shot references of a target, and the torch dataset built from a
listing as ``cfg.data`` says."""

from __future__ import annotations

import logging
from pathlib import Path

from feclip.config import DatasetRef, PathsConfig, RunConfig
from feclip.engine.identity import data_fingerprint
from feclip.errors import DatasetError

log = logging.getLogger("feclip")


def dataset_root(ref: DatasetRef, paths: PathsConfig) -> Path:
    """The folder of a dataset; the embedded synthetic sets are generated on first use."""
    from feclip.data import DEFAULT_DIRS, make_synthetic

    if ref.dir is None and ref.name not in DEFAULT_DIRS:
        raise DatasetError(
            f"data: dataset {ref.name!r} has no default folder; set its `dir` (relative to paths.data_root)"
        )
    root = Path(paths.data_root) / (ref.dir if ref.dir is not None else DEFAULT_DIRS[ref.name])
    if ref.name == "synthetic" and not root.exists() and root.name in ("set_a", "set_b"):
        log.info("generating the synthetic datasets under %s", root.parent)
        make_synthetic(root.parent)
    if not root.exists():
        from feclip.data.download import download_hint

        raise DatasetError(
            f"dataset {ref.name!r} not found at {root} (paths.data_root={paths.data_root}, env DATA_ROOT). "
            f"{download_hint(ref.name, paths.data_root, ref.dir)} (or see docs/datasets.md), "
            f"then check it with `feclip-data check {root} --dataset {ref.name}`"
        )
    return root


def list_dataset(ref: DatasetRef, paths: PathsConfig) -> list:
    """The samples of one dataset reference (raises at once when the folder or its layout is wrong)."""
    return list_samples_of(ref, paths, ref.split, ref.categories)


def list_samples_of(ref: DatasetRef, paths: PathsConfig, split: str, categories) -> list:
    """The samples of ``split`` of a dataset reference's folder, with its reader options."""
    from feclip.data import list_samples

    return list_samples(ref.name, dataset_root(ref, paths), split=split, categories=categories, **ref.options)


def check_data(cfg: RunConfig, train_samples, target_samples) -> dict[str, str]:
    """Validate every listed dataset before any training (one line naming the dataset, category or file
    on a problem) and return their fingerprints (label -> :func:`data_fingerprint`)."""
    from feclip.data.validate import check_target, check_train

    fingerprints = {}
    if train_samples is not None:
        for warning in check_train(cfg.data.train.name, train_samples):
            log.warning("data.train: %s", warning)
        root = dataset_root(cfg.data.train, cfg.paths)
        fingerprints[f"train:{cfg.data.train.name}"] = data_fingerprint(root, train_samples)
    for i, (ref, samples) in enumerate(zip(cfg.data.targets, target_samples)):
        one_size = cfg.eval.resolution == "original"  # maps of one category are stacked at their own size
        for warning in check_target(ref.name, samples, one_size_per_category=one_size):
            log.warning("data.targets[%d] (%s): %s", i, ref.name, warning)
        root = dataset_root(ref, cfg.paths)
        fingerprints[f"target{i}:{ref.name}"] = data_fingerprint(root, samples)
        if cfg.eval.fewshot_k:
            references = fewshot_references(ref, cfg, samples)
            for warning in references.warnings:
                log.warning("data.targets[%d] (%s): %s", i, ref.name, warning)
            fingerprints[f"fewshot{i}:{ref.name}"] = data_fingerprint(root, references.pool)
    return fingerprints


def fewshot_references(ref: DatasetRef, cfg: RunConfig, samples):
    """The few-shot references of one target (:func:`feclip.models.fewshot.choose_references`, with
    ``eval.fewshot_k``, ``eval.fewshot_source`` and the run's seed), its train split and ``reference/``
    images listed with its reader options where its layout has them. Raises one line when a category
    has too few candidates or the layout lacks the source asked for."""
    from feclip.models.fewshot import choose_references

    source = cfg.eval.fewshot_source
    categories = list(dict.fromkeys(s.category for s in samples))
    pools = {
        split: _optional_split(ref, cfg.paths, split, categories) if source in ("auto", split) else []
        for split in ("train", "reference")
    }
    return choose_references(
        ref.name, categories, cfg.eval.fewshot_k, cfg.seed, source, test=samples, **pools
    )


def _optional_split(ref: DatasetRef, paths: PathsConfig, split: str, categories: list[str]) -> list | None:
    """The samples of ``split`` of the target's ``categories``: None when the layout has no such split,
    ``[]`` when it holds no image. A split holding some categories but not others (a ``meta.json``
    whose ``train`` lists a few classes) gives those."""
    from feclip.data import dataset_info
    from feclip.data.layout import EmptyDatasetError

    if split not in dataset_info(ref.name).splits:
        return None
    try:
        return list_samples_of(ref, paths, split, sorted(categories))
    except EmptyDatasetError:
        return []
    except DatasetError:  # a category absent from the split: list it all, keep the target's
        try:
            listed = list_samples_of(ref, paths, split, None)
        except EmptyDatasetError:
            return []
        return [s for s in listed if s.category in set(categories)]


def make_dataset(samples, cfg: RunConfig, model):
    """The :class:`~feclip.data.AnomalyDataset` of listed samples, as ``cfg.data`` says."""
    from feclip.data import AnomalyDataset

    return AnomalyDataset(
        samples,
        image_size=model.image_size,
        cache=cfg.data.cache_images,
        mask_resize=cfg.data.mask_resize,
        resize=cfg.data.resize,
        # paths.cache_dir as given (relative: to the working folder; Hydra does not chdir)
        disk_cache=Path(cfg.paths.cache_dir) / "decoded" if cfg.data.decoded_cache else None,
    )
