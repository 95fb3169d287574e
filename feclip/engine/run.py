"""One run end to end: build the model, train on the auxiliary dataset, evaluate every target, write files.

``<results_dir>/<study>/<variant>/seed=<seed>/`` receives ``config.yaml``, ``env.txt``, ``train.log``,
``adapters.safetensors`` (+ ``train_state.pt`` for resuming) and, last, ``metrics.csv``. A run whose
metrics.csv is complete is skipped unless ``force``; a killed run resumes from its last epoch.

Under ``torchrun`` every rank trains (:mod:`feclip.engine.distributed`); rank 0 alone writes the run
directory and evaluates, the other ranks return once training is done.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from feclip.config import BackboneConfig, DatasetRef, PathsConfig, RunConfig
from feclip.engine import distributed as dist
from feclip.errors import DatasetError, WeightsNotFoundError
from feclip.loggers import NullLogger, make_logger
from feclip.results import (
    METRICS_FILE,
    MetricRow,
    atomic_write_text,
    config_hash,
    git_sha,
    is_complete,
    run_dir,
    write_metrics,
)

log = logging.getLogger("feclip")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy global RNG other code may use
    torch.manual_seed(seed)


def build_clip(cfg: BackboneConfig, device: torch.device):
    """Load the backbone; with ``fallback_tiny`` a missing checkpoint falls back to ``feclip-tiny``, loudly."""
    from feclip.models import TINY_MODEL, load_clip

    try:
        return load_clip(
            cfg.name, cfg.pretrained, device=device, precision=cfg.precision, image_size=cfg.image_size
        )
    except WeightsNotFoundError as e:
        if not cfg.fallback_tiny:
            raise
        banner = "!" * 100
        log.warning(
            "\n%s\n%s\nFALLING BACK TO THE TINY RANDOM CLIP (%s): the numbers of this run say nothing about CLIP.\n%s",
            banner,
            e,
            TINY_MODEL,
            banner,
        )
        return load_clip(TINY_MODEL, None, device=device)


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
        raise DatasetError(
            f"dataset {ref.name!r} not found at {root} (paths.data_root={paths.data_root}, env DATA_ROOT). "
            f"Get it with `feclip-data download {ref.name} --root {root}` (or see docs/datasets.md), "
            f"then check it with `feclip-data check {root} --dataset {ref.name}`"
        )
    return root


def list_dataset(ref: DatasetRef, paths: PathsConfig) -> list:
    """The samples of one dataset reference (raises at once when the folder or its layout is wrong)."""
    from feclip.data import list_samples

    return list_samples(ref.name, dataset_root(ref, paths), split=ref.split, categories=ref.categories)


def build_banks(model, ref: DatasetRef, cfg: RunConfig, categories: list[str], out_dir: Path) -> dict:
    """Few-shot memory banks, one per category, from ``k`` normal training images drawn by the run seed.

    The chosen images are recorded in ``fewshot_references.csv`` beside metrics.csv.
    """
    from feclip.data import list_samples
    from feclip.models.fewshot import MemoryBank, pick_reference_samples

    pool = list_samples(ref.name, dataset_root(ref, cfg.paths), split="train", categories=categories)
    banks, lines = {}, ["dataset,category,k,seed,image_path"]
    for category in categories:
        chosen = pick_reference_samples(pool, cfg.eval.fewshot_k, cfg.seed, category)
        banks[category] = MemoryBank.from_samples(model, chosen, which=cfg.eval.fewshot_bank)
        lines += [f"{ref.name},{category},{cfg.eval.fewshot_k},{cfg.seed},{s.image_path}" for s in chosen]
    path = out_dir / "fewshot_references.csv"
    old = path.read_text().splitlines()[1:] if path.exists() else []
    atomic_write_text(
        path, "\n".join(lines[:1] + [x for x in old if not x.startswith(f"{ref.name},")] + lines[1:]) + "\n"
    )
    return banks


def _plain(obj):
    """Dataclass -> JSON-safe plain data (tuples become lists)."""
    return json.loads(json.dumps(asdict(obj), default=str))


def training_fingerprint(cfg: RunConfig) -> str:
    """What a resumable checkpoint must agree on."""
    train = _plain(cfg.train)
    for key in ("resume", "progress", "max_steps"):
        train.pop(key)
    return config_hash(
        {
            "seed": cfg.seed,
            "backbone": _plain(cfg.backbone),
            "model": _plain(cfg.model),
            "data": _plain(cfg.data.train),
            "train": train,
        }
    )


def environment_text(device: torch.device) -> str:
    import open_clip

    lines = [
        f"python {sys.version.split()[0]} on {platform.platform()}",
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, numpy {np.__version__}",
        f"feclip git {git_sha()}",
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"torch threads {torch.get_num_threads()}",
        dist.describe(),
    ]
    return "\n".join(lines) + "\n"


def _attach_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("feclip")
    if logger.getEffectiveLevel() > logging.INFO:  # the run log is always at INFO, whatever the console says
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def format_table(rows: list[MetricRow]) -> str:
    """Per-category table in percent, one block per dataset, with the macro mean."""
    from feclip.results import MICRO

    out = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        drows = [r for r in rows if r.dataset == dataset]
        metrics = list(dict.fromkeys(r.metric for r in drows))
        cats = list(dict.fromkeys(r.category for r in drows if r.category != MICRO))
        value = {(r.category, r.metric): r.value for r in drows}
        head = f"{'category':<16}" + "".join(f"{m:>17}" for m in metrics)
        out += [f"== {dataset} ==", head]
        for c in cats + ["macro mean"] + ([MICRO] if any(r.category == MICRO for r in drows) else []):
            vals = [
                np.mean([value[(k, m)] for k in cats]) if c == "macro mean" else value.get((c, m), np.nan)
                for m in metrics
            ]
            out.append(f"{c:<16}" + "".join(f"{100 * v:>17.1f}" for v in vals))
    return "\n".join(out)


def run(cfg: RunConfig, do_train: bool = True) -> Path:
    """Train (when ``do_train``), evaluate every target, and write the run directory. Returns it."""
    from feclip.data import AnomalyDataset
    from feclip.engine.evaluate import evaluate
    from feclip.engine.train import train
    from feclip.models import FEClip, load_adapters

    cfg.validate()
    device = dist.init(resolve_device(cfg.device))  # joins torchrun's process group, if any
    dist.check_batch_size(cfg.train.batch_size)
    main = dist.is_main()  # rank 0 (or the only process) writes the run directory and evaluates
    out_dir = run_dir(cfg.paths.results_dir, cfg.study, cfg.variant, cfg.seed)
    metrics_path = out_dir / METRICS_FILE
    if is_complete(metrics_path) and not cfg.force:
        log.info("skipping %s: metrics.csv is complete (force=true re-runs)", out_dir)
        return out_dir
    if main:
        if cfg.force and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    handler = _attach_file_log(out_dir / ("train.log" if do_train else "eval.log")) if main else None
    try:
        if main:
            atomic_write_text(out_dir / "config.yaml", _to_yaml(_plain(cfg)))
            atomic_write_text(out_dir / "env.txt", environment_text(device))

        # -- data: every listing first, so a missing target fails before any training ------------
        train_name = cfg.data.train.name if do_train and cfg.train.epochs > 0 else "none"
        # rank 0 first: it may generate the synthetic sets, and it has cleared the run directory (force)
        # before the other ranks look for a checkpoint to resume from
        with dist.main_first():
            train_samples = list_dataset(cfg.data.train, cfg.paths) if train_name != "none" else None
            target_samples = [list_dataset(ref, cfg.paths) for ref in cfg.data.targets]
        if not main and train_samples is None:
            return out_dir  # nothing to train: rank 0 evaluates alone

        # -- model ----------------------------------------------------------------------------------
        seed_everything(cfg.seed)
        clip = build_clip(cfg.backbone, device)
        model = FEClip(clip, cfg.model)
        if cfg.checkpoint:
            load_adapters(model, cfg.checkpoint)
            log.info("adapters loaded from %s", cfg.checkpoint)
        use_amp = cfg.train.amp == "bf16" and device.type == "cuda"
        name = f"{cfg.study}/{cfg.variant}/seed={cfg.seed}"
        tracker = make_logger(cfg.logger, out_dir, name, _plain(cfg)) if main else NullLogger()

        # -- train ----------------------------------------------------------------------------------
        if train_samples is not None:
            train_set = AnomalyDataset(
                train_samples, image_size=model.image_size, cache=cfg.data.cache_images
            )
            log.info("training on %s: %r", cfg.data.train.name, train_set)
            result = train(
                model,
                train_set,
                cfg.train,
                out_dir,
                cfg.seed,
                device,
                training_fingerprint(cfg),
                on_epoch=tracker.log_epoch,
            )
            log.info(
                "trained %d epochs (%d steps) in %.1f s, last loss %.4f",
                result.epochs_run,
                result.steps,
                result.seconds,
                result.last_loss,
            )

        # -- evaluate (rank 0 only) -----------------------------------------------------------------
        if not main:
            return out_dir
        rows: list[MetricRow] = []
        for ref, samples in zip(cfg.data.targets, target_samples):
            target = AnomalyDataset(samples, image_size=model.image_size, cache=cfg.data.cache_images)
            log.info("evaluating on %s: %r", ref.name, target)
            banks = build_banks(model, ref, cfg, target.categories, out_dir) if cfg.eval.fewshot_k else None
            rows += evaluate(model, ref.name, target, cfg.eval, device, use_amp, banks, out_dir)
        write_metrics(
            metrics_path,
            rows,
            study=cfg.study,
            variant=cfg.variant,
            seed=cfg.seed,
            train_dataset=train_name,
            config_hash=config_hash(_plain(cfg)),
            git_sha=git_sha(),
        )
        tracker.log_results(rows)
        tracker.finish()
        log.info("\n%s", format_table(rows))
        log.info("wrote %s", metrics_path)
        return out_dir
    finally:
        if handler is not None:
            logging.getLogger("feclip").removeHandler(handler)
            handler.close()


def _to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
