"""One run end to end: build the model, train on the auxiliary dataset, evaluate every target, write files.

``<results_dir>/<study>/<variant>/seed=<seed>/`` receives ``config.yaml``, ``env.txt``, ``train.log``,
``adapters.safetensors`` (+ ``train_state.pt`` for resuming) and, last, ``metrics.csv``. A run whose
metrics.csv is complete is skipped unless ``force``; a killed run resumes from its last epoch.

Under ``torchrun`` every rank trains (:mod:`feclip.engine.distributed`); rank 0 alone writes the run
directory and evaluates, the other ranks return once training is done.
"""

from __future__ import annotations

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
from feclip.engine.identity import (
    RunLock,
    check_folder,
    data_fingerprint,
    make_identity,
    plain,
    write_identity,
)
from feclip.errors import DatasetError, FEClipError, WeightsNotFoundError
from feclip.fileio import atomic_write_text
from feclip.loggers import NullLogger, make_logger
from feclip.models.provenance import (
    RANDOM,
    SHA_CHARS,
    WeightsSource,
    align_with_checkpoint,
    file_sha256,
    plan,
)
from feclip.results import (
    METRICS_FILE,
    PARTIAL_METRICS_FILE,
    MetricRow,
    config_hash,
    git_sha,
    is_complete,
    run_dir,
    write_metrics,
)

log = logging.getLogger("feclip")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU (the name is checked by
    :meth:`RunConfig.validate`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy global RNG other code may use
    torch.manual_seed(seed)


def plan_backbone(cfg: BackboneConfig, seed: int) -> WeightsSource:
    """The backbone this run will build, found without building it: the weights file and its SHA-256,
    or random weights drawn with ``seed``. With ``fallback_tiny`` missing weights give ``feclip-tiny``
    (random, ``seed``), said loudly and recorded as a fallback."""
    from feclip.models import TINY_MODEL

    try:
        return plan(cfg.name, cfg.pretrained, seed)
    except WeightsNotFoundError as e:
        if not cfg.fallback_tiny:
            raise
        banner = "!" * 100
        log.warning(
            "\n%s\n%s\nFALLING BACK TO THE TINY RANDOM CLIP (%s): the numbers of this run say nothing about "
            "CLIP; its folder and every output name it (fallback=%s).\n%s",
            banner,
            e,
            TINY_MODEL,
            TINY_MODEL,
            banner,
        )
        return WeightsSource(TINY_MODEL, RANDOM, seed=seed, fallback=True)


def build_clip(cfg: BackboneConfig, weights: WeightsSource, device: torch.device):
    """Build the backbone ``weights`` describes (:func:`plan_backbone`), with ``cfg``'s precision/size."""
    from feclip.models import load_clip

    if weights.fallback:
        return load_clip(weights.name, None, device=device, seed=weights.seed)
    return load_clip(
        weights.name,
        weights.path if not weights.is_random else None,
        device=device,
        precision=cfg.precision,
        image_size=cfg.image_size,
        seed=weights.seed,
    )


def inspect_checkpoint(cfg: RunConfig) -> tuple[dict | None, str]:
    """The adapter file's metadata and its identity (``<path>@sha256=…``), checked against the run's
    model options before anything is built; ``(None, "trained"/"untrained")`` without one."""
    from feclip.models.checkpoint import check_fits, read_metadata

    if not cfg.checkpoint:
        return None, "untrained"
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise FEClipError(
            f"checkpoint={cfg.checkpoint}: no such file (expected an adapters.safetensors written by feclip-train)"
        )
    meta = read_metadata(path)
    check_fits(meta, asdict(cfg.model), path)
    return meta, f"{path}@sha256={file_sha256(path)[:SHA_CHARS]}"


def check_taps_fit(model_cfg, backbone_name: str) -> None:
    """``model.taps`` within the backbone's depth, read from open_clip's model config (nothing built)."""
    from feclip.models.clip import _open_clip

    vision = (_open_clip().get_model_config(backbone_name) or {}).get("vision_cfg", {})
    depth = vision.get("layers")
    if isinstance(depth, int):
        model_cfg.validate(depth=depth)


def run_variant(variant: str, weights: WeightsSource, checkpoint_id: str) -> str:
    """The variant name of the run folder: the configured one, plus ``ckpt=<hash>`` for an evaluated
    adapter file and ``fallback=<model>`` when the tiny CLIP replaced missing weights, so that runs
    that differ in these never share a folder."""
    parts = [] if variant == "default" else [variant]
    if "@sha256=" in checkpoint_id:
        parts.append(f"ckpt={checkpoint_id.rsplit('@sha256=', 1)[1][:8]}")
    if weights.fallback:
        parts.append(f"fallback={weights.name}")
    return ",".join(parts) or "default"


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


def build_banks(model, ref: DatasetRef, cfg: RunConfig, categories: list[str], out_dir: Path) -> dict:
    """Few-shot memory banks, one per category, from ``k`` normal training images drawn by the run seed
    (:func:`feclip.models.fewshot.category_banks`), recorded in ``fewshot_references.csv`` beside
    metrics.csv."""
    from feclip.models.fewshot import category_banks, record_references

    pool = list_samples_of(ref, cfg.paths, "train", categories)
    k, seed = cfg.eval.fewshot_k, cfg.seed
    banks = category_banks(model, pool, categories, k, seed, cfg.eval.fewshot_bank, cfg.data.resize)
    record_references(out_dir / "fewshot_references.csv", ref.name, k, seed, banks)
    return banks


def training_fingerprint(cfg: RunConfig, weights: WeightsSource | None = None) -> str:
    """What a resumable checkpoint must agree on (``weights``: the backbone built, when known)."""
    train = plain(cfg.train)
    for key in ("resume", "progress", "max_steps"):
        train.pop(key)
    return config_hash(
        {
            "seed": cfg.seed,
            "backbone": plain(cfg.backbone),
            "weights": weights.describe() if weights is not None else None,
            "model": plain(cfg.model),
            "data": plain(cfg.data.train),
            "train": train,
        }
    )


def environment_text(device: torch.device, weights: WeightsSource | None = None) -> str:
    import open_clip

    lines = [
        f"backbone {weights.describe() if weights else 'unknown'}"
        + (" (FALLBACK: the configured weights were missing)" if weights and weights.fallback else "")
        + (f" from {weights.path}" if weights and weights.path else ""),
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
    """Train (when ``do_train``), evaluate every target, and write the run directory. Returns it.

    Everything that can be checked is checked before the run folder is touched and before training:
    the config, the adapter file, the backbone's weights, every dataset (listed and validated). A
    folder holding another identity (:mod:`feclip.engine.identity`) is refused, a complete run of the
    same identity is skipped, a killed one resumed; a second process on the same folder is refused.
    """
    cfg.expand_paths()
    cfg.validate()
    if do_train and cfg.train.deterministic:
        from feclip.engine.train import prepare_deterministic_cuda

        prepare_deterministic_cuda()  # before the first matrix product on CUDA (cuBLAS reads it once)
    device = dist.init(resolve_device(cfg.device))  # joins torchrun's process group, if any
    dist.check_batch_size(cfg.train.batch_size)
    main = dist.is_main()  # rank 0 (or the only process) writes the run directory and evaluates

    # -- what will run: adapter file, backbone, data; nothing is built or written yet ------------
    checkpoint_meta, checkpoint_id = inspect_checkpoint(cfg)
    weights = plan_backbone(cfg.backbone, cfg.seed)
    if checkpoint_meta is not None:
        weights = align_with_checkpoint(weights, checkpoint_meta, cfg.checkpoint)
    check_taps_fit(cfg.model, weights.name)
    train_name = cfg.data.train.name if do_train and cfg.train.epochs > 0 else "none"
    if train_name != "none":
        checkpoint_id = "trained" if checkpoint_meta is None else f"{checkpoint_id}+trained"
    with dist.main_first():  # rank 0 first: it may generate the synthetic sets
        train_samples = list_dataset(cfg.data.train, cfg.paths) if train_name != "none" else None
        target_samples = [list_dataset(ref, cfg.paths) for ref in cfg.data.targets]
    fingerprints = check_data(cfg, train_samples, target_samples)
    identity = make_identity(cfg, weights.describe(), checkpoint_id, fingerprints)
    cfg.variant = run_variant(cfg.variant, weights, checkpoint_id)
    out_dir = run_dir(cfg.paths.results_dir, cfg.study, cfg.variant, cfg.seed)
    metrics_path = out_dir / METRICS_FILE
    if not cfg.force and out_dir.is_dir() and check_folder(out_dir, identity) and is_complete(metrics_path):
        log.info("skipping %s: metrics.csv is complete (force=true re-runs)", out_dir)
        return out_dir
    if not main and train_samples is None:
        return out_dir  # nothing to train: rank 0 evaluates alone

    # the config as it ran, with what produced its numbers: config.yaml and the tracker's config
    record = {
        **plain(cfg),
        "provenance": {
            "backbone": weights.describe(),
            "checkpoint": checkpoint_id,
            "identity": identity["hash"],
        },
    }
    lock = RunLock(out_dir).acquire() if main else None
    handler = None
    try:
        if main:
            if cfg.force and out_dir.exists():
                shutil.rmtree(out_dir)
            _make_run_dir(out_dir)
            handler = _attach_file_log(out_dir / ("train.log" if do_train else "eval.log"))
            write_identity(out_dir, identity)
            atomic_write_text(out_dir / "config.yaml", _to_yaml(record))
            atomic_write_text(out_dir / "env.txt", environment_text(device, weights))
        dist.barrier()  # force=true has cleared the folder before any rank looks for a checkpoint
        try:
            return _train_and_evaluate(
                cfg, do_train, device, weights, checkpoint_id, train_samples, target_samples, out_dir, record
            )
        except BaseException as e:
            if handler is not None:  # the run's own log says why it stopped
                what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
                log.error(
                    "run failed: %s", what, exc_info=not isinstance(e, (FEClipError, KeyboardInterrupt))
                )
            raise
    finally:
        if handler is not None:
            logging.getLogger("feclip").removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()


def _make_run_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # temporary files of a killed process
            stale.unlink()
    except OSError as e:
        raise FEClipError(
            f"cannot write the run folder {out_dir} ({e.strerror or e}); set paths.results_dir to a writable folder"
        ) from None


def check_data(cfg: RunConfig, train_samples, target_samples) -> dict[str, str]:
    """Validate every listed dataset before any training (one line naming the dataset, category or file
    on a problem) and return their fingerprints (label -> :func:`data_fingerprint`)."""
    from feclip.data.validate import check_fewshot, check_target, check_train

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
            categories = sorted({s.category for s in samples})
            pool = list_samples_of(ref, cfg.paths, "train", categories)
            check_fewshot(ref.name, pool, categories, cfg.eval.fewshot_k)
            fingerprints[f"fewshot{i}:{ref.name}"] = data_fingerprint(root, pool)
    return fingerprints


def _dataset(samples, cfg: RunConfig, model):
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


def _train_and_evaluate(
    cfg: RunConfig,
    do_train,
    device,
    weights: WeightsSource,
    checkpoint_id,
    train_samples,
    target_samples,
    out_dir,
    record: dict,
) -> Path:
    """Build the model, train, evaluate every target and write metrics.csv (``record``: the config as
    it ran, for the tracker)."""
    from feclip.engine.evaluate import evaluate
    from feclip.engine.train import train
    from feclip.models import FEClip, load_adapters
    from feclip.models.feclip import precision_for

    main = dist.is_main()
    # -- model ----------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    clip = build_clip(cfg.backbone, weights, device)
    # one precision for training (cached or not), few-shot banks and evaluation: train.amp's
    model = FEClip(clip, cfg.model, precision=precision_for(cfg.train.amp, device))
    if cfg.checkpoint:
        load_adapters(model, cfg.checkpoint)
        log.info("adapters loaded from %s", cfg.checkpoint)
    workers = cfg.data.num_workers
    name = f"{cfg.study}/{cfg.variant}/seed={cfg.seed}"
    tracker = make_logger(cfg.logger, out_dir, name, record) if main else NullLogger()

    # -- train ----------------------------------------------------------------------------------
    if train_samples is not None:
        train_set = _dataset(train_samples, cfg, model)
        log.info("training on %s: %r", cfg.data.train.name, train_set)
        result = train(
            model,
            train_set,
            cfg.train,
            out_dir,
            cfg.seed,
            device,
            training_fingerprint(cfg, weights),
            on_epoch=tracker.log_epoch,
            num_workers=workers,
        )
        log.info(
            "trained %d epochs (%d steps) in %.1f s, last loss %.4f",
            result.epochs_run,
            result.steps,
            result.seconds,
            result.last_loss,
        )

    # -- evaluate (rank 0 only); a failing target does not lose the others' rows ----------------
    if not main:
        return out_dir
    rows: list[MetricRow] = []
    failed: list[str] = []
    for ref, samples in zip(cfg.data.targets, target_samples):
        try:
            target = _dataset(samples, cfg, model)
            log.info("evaluating on %s: %r", ref.name, target)
            banks = build_banks(model, ref, cfg, target.categories, out_dir) if cfg.eval.fewshot_k else None
            rows += evaluate(model, ref.name, target, cfg.eval, device, banks, out_dir, workers)
        except FEClipError as e:
            log.error("evaluation on %s failed: %s", ref.name, e)
            failed.append(f"{ref.name}: {e}")
    columns = {
        "study": cfg.study,
        "variant": cfg.variant,
        "seed": cfg.seed,
        "train_dataset": cfg.data.train.name if train_samples is not None else "none",
        "config_hash": config_hash(plain(cfg)),
        "git_sha": git_sha(),
        "backbone": weights.describe(),
        "checkpoint": checkpoint_id,
    }
    if failed:
        partial = out_dir / PARTIAL_METRICS_FILE
        write_metrics(partial, rows, **columns)
        raise FEClipError(
            f"evaluation failed on {len(failed)} of {len(cfg.data.targets)} target(s) ({'; '.join(failed)}); "
            f"the rows of the others are in {partial}"
        )
    write_metrics(out_dir / METRICS_FILE, rows, **columns)
    (out_dir / PARTIAL_METRICS_FILE).unlink(missing_ok=True)
    tracker.log_results(rows)
    tracker.finish()
    log.info("\n%s", format_table(rows))
    log.info("wrote %s", out_dir / METRICS_FILE)
    return out_dir


def _to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
