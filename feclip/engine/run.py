"""One run end to end: build the model, train on the auxiliary dataset, evaluate every target, write files.

``<results_dir>/<study>/<variant>/seed=<seed>/`` receives ``config.yaml``, ``env.txt``, ``train.log``,
``adapters.safetensors`` (+ ``train_state.pt`` for resuming) and, last, ``metrics.csv``. A run whose
metrics.csv is complete is skipped unless ``force``; a killed run resumes from its last epoch.

Under ``torchrun`` every rank trains (:mod:`feclip.engine.distributed`); rank 0 alone writes the run
directory and evaluates, the other ranks return once training is done.
"""

from __future__ import annotations

import functools
import logging
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from feclip.config import BackboneConfig, DatasetRef, RunConfig
from feclip.device import resolve_device
from feclip.engine import distributed as dist
from feclip.engine.identity import (
    RunLock,
    check_folder,
    make_identity,
    outputs_identity,
    plain,
    training_fingerprint,
    training_identity,
    write_identity,
)
from feclip.engine.run_data import check_data, fewshot_references, list_dataset, make_dataset
from feclip.engine.run_files import attach_file_log, environment_text, format_table, make_run_dir, to_yaml
from feclip.engine.store import AdapterStore, OutputStore, store_key, weights_sha256
from feclip.errors import CheckpointMismatchError, ConfigError, FEClipError, WeightsNotFoundError
from feclip.fileio import atomic_write, atomic_write_text
from feclip.loggers import NullLogger, make_logger, protocol_label, run_labels
from feclip.methods.model import TRAINING_FREE, backbone_geometry, check_options_fit, checkpoint_options
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
    made_for = meta.get("method", "feclip")  # FE-CLIP's files record no method
    if made_for != cfg.method.name:
        raise CheckpointMismatchError(
            f"{path}: holds {made_for}'s weights, but this run is method={cfg.method.name}"
        )
    depth = meta.get("depth", "")  # a peer's file records its backbone's depth
    prefix = "model" if cfg.method.name == "feclip" else f"method.{cfg.method.name}"
    check_fits(meta, checkpoint_options(cfg, int(depth) if depth.isdigit() else None), path, prefix)
    return meta, f"{path}@sha256={file_sha256(path)[:SHA_CHARS]}"


def check_taps_fit(model_cfg, backbone_name: str) -> None:
    """``model.taps`` within the backbone's depth, read from open_clip's model config (nothing built)."""
    depth, _ = backbone_geometry(backbone_name)
    if depth is not None:
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


def build_banks(model, ref: DatasetRef, cfg: RunConfig, samples: list, out_dir: Path) -> tuple[list, dict]:
    """Few-shot memory banks of one target, one per category, from ``k`` normal images drawn by the run
    seed from ``eval.fewshot_source`` (:func:`~feclip.engine.run_data.fewshot_references`), recorded in
    ``fewshot_references.csv`` beside metrics.csv. Returns the samples to evaluate (``samples`` less the
    test images held out as references) and the banks."""
    from feclip.models.fewshot import record_references, reference_banks

    refs = fewshot_references(ref, cfg, samples)
    banks = reference_banks(model, refs, cfg.eval.fewshot_bank, cfg.data.resize, cfg.train.progress)
    record_references(out_dir / "fewshot_references.csv", ref.name, refs.k, refs.seed, banks, refs.sources)
    kept = refs.test_samples(samples)
    log.info(
        "few-shot references of %s (k=%d, seed=%d): %s%s",
        ref.name,
        refs.k,
        refs.seed,
        ", ".join(f"{c} from {src}" for c, src in refs.sources.items()),
        f"; {len(samples) - len(kept)} test images held out (not scored)" if len(kept) < len(samples) else "",
    )
    return kept, banks


def adapters_slot(
    cfg: RunConfig, weights: WeightsSource, fingerprints: dict[str, str], device: torch.device
) -> tuple[str, dict] | None:
    """The adapter store's key and identity record of this run's training
    (:func:`~feclip.engine.identity.training_identity`); None when ``train.reuse`` is off."""
    from feclip.models.feclip import precision_for

    if not cfg.train.reuse:
        return None
    record = training_identity(
        cfg,
        weights,
        fingerprints[f"train:{cfg.data.train.name}"],
        precision_for(cfg.train.amp, device),
        init=file_sha256(cfg.checkpoint) if cfg.checkpoint else None,
    )
    return store_key(record), record


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
    if cfg.method.name == "feclip":
        check_taps_fit(cfg.model, weights.name)
    else:  # the peer's taps and windows against the backbone, before any folder is made
        check_options_fit(cfg, weights.name)
    train_name = cfg.data.train.name if do_train and cfg.train.epochs > 0 else "none"
    if train_name != "none" and cfg.method.name in TRAINING_FREE:
        raise ConfigError(
            f"method={cfg.method.name} is training-free: evaluate it with feclip-eval (or train.epochs=0)"
        )
    if train_name != "none" and cfg.method.name != "feclip" and dist.world_size() > 1:
        # a peer's loss is its reference's, not split into the ranks' shares of a batch (its dice is
        # over the whole batch): under torchrun it would train other weights than in one process
        raise ConfigError(
            f"method={cfg.method.name} trains in one process: run feclip-train without torchrun "
            "(torchrun trains FE-CLIP)"
        )
    if train_name != "none":
        checkpoint_id = "trained" if checkpoint_meta is None else f"{checkpoint_id}+trained"
    with dist.main_first():  # rank 0 first: it may generate the synthetic sets
        train_samples = list_dataset(cfg.data.train, cfg.paths) if train_name != "none" else None
        target_samples = [list_dataset(ref, cfg.paths) for ref in cfg.data.targets]
    fingerprints = check_data(cfg, train_samples, target_samples)
    identity = make_identity(cfg, weights.describe(), checkpoint_id, fingerprints)
    slot = adapters_slot(cfg, weights, fingerprints, device) if train_samples is not None else None
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
            # the adapter store's entry of this training (train once, evaluate many), or null
            "adapters_store": slot[0] if slot is not None else None,
        },
    }
    lock = RunLock(out_dir).acquire() if main else None
    handler = None
    try:
        if main:
            if cfg.force and out_dir.exists():
                shutil.rmtree(out_dir)
            make_run_dir(out_dir)
            handler = attach_file_log(out_dir / ("train.log" if do_train else "eval.log"))
            write_identity(out_dir, {**identity, "adapters_store": record["provenance"]["adapters_store"]})
            atomic_write_text(out_dir / "config.yaml", to_yaml(record))
            atomic_write_text(out_dir / "env.txt", environment_text(device, weights))
        dist.barrier()  # force=true has cleared the folder before any rank looks for a checkpoint
        try:
            return _train_and_evaluate(
                cfg,
                device,
                weights,
                checkpoint_id,
                train_samples,
                target_samples,
                out_dir,
                record,
                fingerprints,
                slot,
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


def _train_and_evaluate(
    cfg: RunConfig,
    device,
    weights: WeightsSource,
    checkpoint_id,
    train_samples,
    target_samples,
    out_dir,
    record: dict,
    fingerprints: dict[str, str],
    slot: tuple[str, dict] | None,
) -> Path:
    """Build the model, train (or load the adapters of the same training from the store: ``slot``),
    evaluate every target and write metrics.csv (``record``: the config as it ran, for the tracker;
    ``fingerprints``: the datasets', :func:`~feclip.engine.run_data.check_data`)."""
    from feclip.engine.evaluate import evaluate
    from feclip.methods.model import build_model
    from feclip.models import load_adapters
    from feclip.models.feclip import precision_for

    main = dist.is_main()
    # -- model ----------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    clip = build_clip(cfg.backbone, weights, device)
    # one precision for training (cached or not), few-shot banks and evaluation: train.amp's
    model = build_model(cfg, clip, precision_for(cfg.train.amp, device), weights.name)
    if cfg.checkpoint:
        load_adapters(model, cfg.checkpoint)
        log.info("adapters loaded from %s", cfg.checkpoint)
    workers = cfg.data.num_workers
    trained = train_samples is not None
    protocol = protocol_label(cfg.data.train.name if trained else "none", [t.name for t in cfg.data.targets])
    labels = run_labels(cfg.study, cfg.variant, cfg.seed, protocol, "train" if trained else "eval")
    tracker = make_logger(cfg.logger, out_dir, record, labels) if main else NullLogger()

    # -- train, or load the adapters of the same training identity from the store --------------
    if train_samples is not None:
        _train_or_load(cfg, model, train_samples, device, weights, out_dir, tracker, slot)

    # -- evaluate (rank 0 only); a failing target does not lose the others' rows ----------------
    if not main:
        return out_dir
    # the model's outputs on a target come from the outputs store when these weights saw it before
    # (FE-CLIP's raw per-tap outputs; a peer's outputs are recomputed)
    reuse = cfg.eval.reuse_outputs and not cfg.eval.fewshot_k and cfg.method.name == "feclip"
    outputs = OutputStore(cfg.paths.cache_dir) if reuse else None
    weights_sha = weights_sha256(model) if outputs is not None else None
    rows: list[MetricRow] = []
    failed: list[str] = []
    for i, (ref, samples) in enumerate(zip(cfg.data.targets, target_samples)):
        try:
            banks = None
            if cfg.eval.fewshot_k:  # first: test images held out as references are not evaluated
                samples, banks = build_banks(model, ref, cfg, samples, out_dir)
            target = make_dataset(samples, cfg, model)
            log.info("evaluating on %s: %r", ref.name, target)
            place = None
            if outputs is not None:
                key_record = outputs_identity(
                    cfg,
                    weights,
                    ref,
                    fingerprints[f"target{i}:{ref.name}"],
                    weights_sha,
                    model.precision,
                    device.type,
                    model.image_size,
                )
                place = outputs.slot(key_record, force=cfg.force, made_by=str(out_dir))
            show = functools.partial(tracker.log_predictions, ref.name, target)  # the tracker's overlays
            rows += evaluate(
                model,
                ref.name,
                target,
                cfg.eval,
                device,
                banks,
                out_dir,
                workers,
                place,
                progress=cfg.train.progress,
                on_predictions=show,
            )
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


def _train_or_load(
    cfg: RunConfig, model, train_samples, device, weights, out_dir: Path, tracker, slot
) -> None:
    """Train the adapters into ``out_dir``, or, when the adapter store holds this training identity
    (``slot``: its key and record; None when ``train.reuse`` is off), copy the stored file there and
    load it. What is trained is stored. A second process of the same identity waits for the first
    (the key's lock) and then loads; under torchrun rank 0 looks the entry up alone and the ranks
    follow it, without waiting for other jobs. ``force=true`` trains and replaces the entry."""
    from feclip.engine.train import ADAPTERS_FILE, STATE_FILE, train
    from feclip.models import load_adapters

    store = AdapterStore(cfg.paths.cache_dir) if slot is not None else None
    key, identity = slot if slot is not None else (None, None)
    alone = dist.world_size() == 1
    with store.lock(key) if store is not None and alone else nullcontext():
        stored = store.find(key, identity) if store is not None and not cfg.force and dist.is_main() else None
        hit = stored is not None
        if not alone:  # every rank follows rank 0
            hit = bool(dist.sum_over_ranks(torch.tensor(float(hit), device=device)).item() > 0)
        if hit:
            if dist.is_main():
                atomic_write(out_dir / ADAPTERS_FILE, lambda tmp: shutil.copyfile(stored, tmp))
                (out_dir / STATE_FILE).unlink(missing_ok=True)  # nothing left to resume
                meta = load_adapters(model, out_dir / ADAPTERS_FILE)
                log.info(
                    "adapters of this training identity loaded from the adapter store (%s: %s epochs, %s "
                    "steps): not trained again (train.reuse=false or force=true trains)",
                    stored.parent,
                    int(meta.get("epoch", -1)) + 1,
                    meta.get("step", "?"),
                )
            return
        train_set = make_dataset(train_samples, cfg, model)
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
            num_workers=cfg.data.num_workers,
        )
        log.info(
            "trained %d epochs (%d steps) in %.1f s, last loss %.4f",
            result.epochs_run,
            result.steps,
            result.seconds,
            result.last_loss,
        )
        if store is not None and dist.is_main():
            info = {"made_by": str(out_dir), "steps": result.steps}
            store.put(key, identity, out_dir / ADAPTERS_FILE, info)
