"""The training loop: plain PyTorch over the device-resident model, readable top to bottom.

Sections: setup (optimizer groups, resume) -> epochs (seeded order, step, NaN guard, fc_patch policy)
-> checkpoint (adapters as safetensors + optimizer state, every epoch, atomically). The module is
longer than feclip's usual ~400 lines on purpose: the whole loop, with what it needs (optimizer groups,
the checkpoint, the deterministic switch), reads top to bottom in one file.

The host never waits for the device inside a step: the losses of the steps are kept on the device and
read every :data:`CHECK_EVERY` steps and at the end of each epoch (the NaN guard, the progress bar and
the epoch's mean loss all use that one read), the map losses choose their images by 0/1 weights, and a
prefix-cached epoch uploads its image order once (:meth:`PrefixCache.epoch`). A NaN loss still stops
the run with the step it appeared at, and no checkpoint is written after it: the last good one stays.

Precision is the model's (:attr:`FEClip.precision`; :func:`feclip.engine.run.run` builds it from
``train.amp``). ``train.deterministic`` (:func:`deterministic_algorithms`) holds for the training
alone and is switched off when it returns.

Resuming a killed run restarts at the first unfinished epoch. The image order of epoch ``e`` depends
only on ``(seed, e)`` and the optimizer state is restored, so on the CPU a resumed run ends with the
same weights, bit for bit, as an uninterrupted one.

Under ``torchrun`` (:mod:`feclip.engine.distributed`) every rank runs this same loop on its share of
each global batch, its loss weighted by that share and the gradients summed over the ranks; rank 0
alone writes the checkpoints and the log.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from feclip.data.dataset import collate
from feclip.engine import distributed as dist
from feclip.engine import hostsync
from feclip.engine.cache import PrefixCache, prefix_bytes
from feclip.errors import ConfigError, FEClipError
from feclip.fileio import atomic_write
from feclip.losses import feclip_loss, mask_loss_images
from feclip.methods.model import is_peer
from feclip.models.checkpoint import read_metadata, save_adapters
from feclip.progress import progress

log = logging.getLogger("feclip.train")

ADAPTERS_FILE = "adapters.safetensors"
STATE_FILE = "train_state.pt"
FC_PATCH_LR_FACTOR = {"same": 1.0, "lr_div_10": 0.1, "lr_div_100": 0.01, "frozen_after": 0.01, "frozen": 0.0}
# train.compile: off, or a torch.compile mode for the training forward (RunConfig.validate checks it)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
CHECK_EVERY = 25  # steps between two reads of the losses (NaN guard, progress): one wait each
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for reproducible results (NVIDIA's cuBLAS docs)
_LOSS_COLUMNS = ("batch", "cls", "focal", "dice", "total")  # one row per step, kept on the device


def prepare_deterministic_cuda() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` (unless already set) for deterministic cuBLAS. cuBLAS reads it
    when its workspace is made: call this before the first matrix product on CUDA (``run`` does, before
    the model is built); :func:`deterministic_algorithms` calls it too, for library users."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device):
    """``train.deterministic``: deterministic kernels for the block, the previous settings restored after.

    On: ``torch.use_deterministic_algorithms(True)`` in its strict form (an op without a deterministic
    kernel raises instead of warning: flash and memory-efficient attention then run their deterministic
    backward, cuDNN attention is not chosen), cuDNN deterministic without autotuning, and
    ``CUBLAS_WORKSPACE_CONFIG`` for cuBLAS. Nothing in FE-CLIP's training step lacks a deterministic
    CUDA kernel (the loss upsamples with matrix products, not ``F.interpolate``; tested on the CPU by
    listing the step's ops). Off: nothing changes.
    """
    if not enabled:
        yield
        return
    if device.type == "cuda":
        prepare_deterministic_cuda()
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


class TrainingDivergedError(FEClipError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    epochs_run: int  # epochs trained in this call (0 when a finished run was resumed)
    steps: int  # optimizer steps in total, resumed ones included
    last_loss: float  # mean total loss of the last epoch trained in this call (nan if none)
    seconds: float


def build_optimizer(model, cfg) -> torch.optim.Adam:
    """Adam with two parameter groups: adapters at ``lr``, fc_patch at ``lr * factor(policy)``.

    ``frozen`` leaves fc_patch out (and stops its gradients); ``frozen_after`` trains it at lr/100
    until ``frozen_after_batches`` steps, then freezes it.
    """
    if is_peer(model):  # a peer method (feclip.methods.model.PeerModel): its own groups
        return torch.optim.Adam(model.param_groups(cfg.lr), lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    policy = cfg.fc_patch.policy
    groups = [{"params": list(model.adapters.parameters()), "lr": cfg.lr, "name": "adapters"}]
    if policy == "frozen":
        model.fc_patch.requires_grad_(False)
    else:
        model.fc_patch.requires_grad_(True)
        groups.append(
            {
                "params": list(model.fc_patch.parameters()),
                "lr": cfg.lr * FC_PATCH_LR_FACTOR[policy],
                "name": "fc_patch",
            }
        )
    # fused: one kernel over all parameters (7x faster than the default loop for 42 M weights on the CPU)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The image order of one epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` under a unique temporary name, then a rename: ``path`` is old or new, never half.

    A failure (disk full, ...) removes the temporary file and raises :class:`FEClipError`.
    """
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except OSError as e:
        raise FEClipError(
            f"could not write {path} ({e.strerror or e}); the previous checkpoint is kept, "
            "free space and run the same command again to resume"
        ) from None


def save_checkpoint(model, optimizer, run_dir: Path, epoch: int, step: int, fingerprint: str) -> None:
    """One file marks an epoch as done: ``train_state.pt`` holds the adapters *and* the optimizer state,
    written atomically, so the two can never disagree. ``adapters.safetensors`` (what users and
    ``feclip-eval`` read) is exported from it afterwards; :func:`try_resume` re-exports it when an
    interrupted save left it behind."""
    state = {
        "epoch": epoch,
        "step": step,
        "adapters": {k: v.detach().to("cpu").clone() for k, v in model.trainable_state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "fingerprint": fingerprint,
        "fc_patch_frozen": _fc_patch_frozen(model),
    }
    _atomic_torch_save(state, run_dir / STATE_FILE)
    _export_adapters(model, run_dir, epoch, step)


def _fc_patch_frozen(model) -> bool:
    """Whether FE-CLIP's fc_patch is frozen (a peer method has none: False)."""
    return not is_peer(model) and not model.fc_patch.weight.requires_grad


def _export_adapters(model, run_dir: Path, epoch: int, step: int) -> None:
    try:
        save_adapters(model, run_dir / ADAPTERS_FILE, {"epoch": str(epoch), "step": str(step)})
    except OSError as e:
        raise FEClipError(
            f"could not write {run_dir / ADAPTERS_FILE} ({e.strerror or e}); the checkpoint of epoch "
            f"{epoch + 1} is safe in {STATE_FILE}: free space and run the same command again"
        ) from None


def _read_state(state_path: Path) -> dict:
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same remedy
        raise FEClipError(
            f"{state_path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); delete it to "
            "train this run from the start, or pass force=true"
        ) from None
    if not isinstance(state, dict) or not {"epoch", "step", "optimizer", "adapters"} <= set(state):
        raise FEClipError(
            f"{state_path} is not a training state of this feclip version; delete it to train this run "
            "from the start, or pass force=true"
        )
    return state


def try_resume(model, optimizer, run_dir: Path, fingerprint: str) -> tuple[int, int]:
    """Load the last epoch checkpoint if there is one; returns (first epoch to run, steps done)."""
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        return 0, 0
    state = _read_state(state_path)
    if state.get("fingerprint") != fingerprint:
        raise FEClipError(
            f"{run_dir} holds a checkpoint of a different configuration; use force=true to start over "
            "or another results directory"
        )
    model.load_state_dict(state["adapters"], strict=False)
    if state["fc_patch_frozen"] and not is_peer(model):
        model.fc_patch.requires_grad_(False)
    optimizer.load_state_dict(state["optimizer"])
    if dist.is_main() and _exported_epoch(run_dir / ADAPTERS_FILE) != state["epoch"]:
        log.info("re-exporting %s from %s (an earlier save was interrupted)", ADAPTERS_FILE, STATE_FILE)
        _export_adapters(model, run_dir, state["epoch"], state["step"])
    log.info("resumed from %s after epoch %d (%d steps)", run_dir, state["epoch"], state["step"])
    return state["epoch"] + 1, state["step"]


def _exported_epoch(path: Path) -> int | None:
    """The epoch recorded in an exported adapter file (None when missing or unreadable)."""
    try:
        return int(read_metadata(path).get("epoch", -1))
    except (FEClipError, ValueError):
        return None


def make_prefix_cache(model, dataset, cfg, device: torch.device, num_workers: int = 0) -> PrefixCache | None:
    """The frozen-prefix cache when ``cfg.prefix_cache`` asks for it and it fits the memory budget."""
    if cfg.prefix_cache == "off" or is_peer(model):  # a peer method runs its whole forward
        return None
    size = prefix_bytes(model, len(dataset), model.token_dtype)
    if size > cfg.prefix_cache_max_gb * 1e9:
        msg = f"the prefix cache needs {size / 1e9:.1f} GB, over train.prefix_cache_max_gb={cfg.prefix_cache_max_gb}"
        if cfg.prefix_cache == "on":
            raise ConfigError(
                msg + "; raise the limit, use train.prefix_cache_storage=pinned, or train.prefix_cache=off"
            )
        log.info("%s: training without it", msg)
        return None
    return PrefixCache(
        model,
        dataset,
        device,
        batch_size=cfg.batch_size,
        storage=cfg.prefix_cache_storage,
        num_workers=num_workers,
        progress=cfg.progress and dist.is_main(),
    )


def train(
    model,
    dataset,
    cfg,
    run_dir: str | os.PathLike,
    seed: int,
    device: torch.device,
    fingerprint: str = "",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    num_workers: int = 0,
) -> TrainResult:
    """Train ``model``'s adapters and fc_patch on ``dataset`` (an :class:`~feclip.data.AnomalyDataset`).

    Args:
        cfg: a :class:`feclip.config.TrainConfig`. The precision is the model's own
            (:attr:`FEClip.precision`; ``run`` builds the model from ``cfg.amp``).
        run_dir: where the checkpoints go (and are resumed from when ``cfg.resume``).
        fingerprint: identifies the configuration; a checkpoint with another one is not resumed.
        on_epoch: called after each epoch's checkpoint with ``(epoch, {"loss": ..., "images_per_s": ...})``
            (on rank 0 only under torchrun).
        num_workers: ``DataLoader`` processes that decode images (``data.num_workers``), for the prefix
            cache's build and for uncached epochs (the dataset's image cache is filled first, in
            threads, so that the workers inherit it).

    Under torchrun, ``cfg.batch_size`` is the global batch and ``device`` this rank's device; every rank
    reads the checkpoint when resuming, rank 0 alone writes them.
    """
    # -- setup ------------------------------------------------------------------------------------
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dist.check_batch_size(cfg.batch_size)
    optimizer = build_optimizer(model, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start_epoch, step = try_resume(model, optimizer, run_dir, fingerprint) if cfg.resume else (0, 0)
    if not cfg.resume and dist.is_main():
        for f in (ADAPTERS_FILE, STATE_FILE):
            (run_dir / f).unlink(missing_ok=True)
    dist.broadcast_parameters(params)  # also: no rank writes a checkpoint before every rank has read it
    log.info(
        "precision %s (tokens %s), deterministic %s", model.precision, model.token_dtype, cfg.deterministic
    )
    epochs_run, last_loss = 0, math.nan
    with deterministic_algorithms(cfg.deterministic, device):
        cache = None
        if start_epoch < cfg.epochs:
            cache = make_prefix_cache(model, dataset, cfg, device, num_workers)
            if cache is None and num_workers > 0 and getattr(dataset, "cache", False):
                dataset.preload(num_threads=num_workers)  # forked workers inherit the decoded images
        forward = model.forward_from_prefix if cache is not None else model.forward
        peer = model if is_peer(model) else None  # a peer method: its own loss
        if cfg.compile != "off":
            forward = torch.compile(forward, mode=cfg.compile)
        model.train()
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            # -- one epoch ------------------------------------------------------------------------
            # this rank's share of each global batch (alone: the batches themselves)
            mine, batch_sizes = dist.micro_batches(epoch_order(len(dataset), seed, epoch), cfg.batch_size)
            if cache is not None:  # tokens, masks and labels already on the device
                loader = cache.epoch(mine)
            else:
                loader = DataLoader(
                    dataset,
                    batch_sampler=mine,
                    collate_fn=_collate_share,
                    num_workers=num_workers,
                    pin_memory=device.type == "cuda",
                )
            bar = _progress(
                loader, cfg.progress and dist.is_main(), f"epoch {epoch + 1}/{cfg.epochs}", len(mine)
            )
            guard = _LossGuard(len(mine), device, epoch, step, run_dir, start_epoch + epochs_run)
            t_epoch = time.perf_counter()
            for batch, n_batch in zip(bar, batch_sizes):
                loss, parts = _batch_loss(forward, batch, cfg, device, peer)
                batch_loss = dist.sum_over_ranks(loss.detach())  # of the global batch (``loss`` itself alone)
                guard.record(batch_loss, parts, n_batch)
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:  # an empty share has no graph
                    loss.backward()
                dist.all_reduce_gradients(params)
                optimizer.step()
                step += 1
                if (
                    cfg.fc_patch.policy == "frozen_after"
                    and step == cfg.fc_patch.frozen_after_batches
                    and not is_peer(model)
                ):
                    model.fc_patch.requires_grad_(False)
                    log.info("fc_patch frozen after %d batches", step)
                if guard.steps % CHECK_EVERY == 0:  # one read of the losses so far (raises on NaN)
                    guard.check()
                    if bar is not loader:
                        bar.set_postfix(
                            loss=f"{guard.last_loss:.4f}",
                            img_s=f"{guard.n_images / (time.perf_counter() - t_epoch):.1f}",
                        )
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            # -- checkpoint (only after the epoch's losses were all read finite) ------------------
            last_loss = guard.check()
            epochs_run += 1
            if dist.is_main():
                save_checkpoint(model, optimizer, run_dir, epoch, step, fingerprint)
            speed = guard.n_images / (time.perf_counter() - t_epoch)
            log.info(
                "epoch %d/%d: loss %.4f, %d images, %.1f images/s",
                epoch + 1,
                cfg.epochs,
                last_loss,
                guard.n_images,
                speed,
            )
            if on_epoch is not None and dist.is_main():
                on_epoch(epoch + 1, {"loss": last_loss, "images_per_s": speed})
    model.eval()
    return TrainResult(epochs_run, step, last_loss, time.perf_counter() - t_start)


class _LossGuard:
    """The losses of one epoch's steps, kept on the device (one row per step, :data:`_LOSS_COLUMNS`)
    and read in one transfer by :meth:`check`, which raises :class:`TrainingDivergedError` naming the
    first step whose global batch loss is not finite."""

    def __init__(self, n_steps: int, device, epoch: int, first_step: int, run_dir: Path, good_epochs: int):
        self.rows = torch.zeros(max(n_steps, 1), len(_LOSS_COLUMNS), device=device)
        self.sizes: list[int] = []
        self.epoch, self.first_step, self.run_dir, self.good_epochs = epoch, first_step, run_dir, good_epochs
        self.checked = 0
        self.mean = math.nan
        self.last_loss = math.nan

    @property
    def steps(self) -> int:
        return len(self.sizes)

    @property
    def n_images(self) -> int:
        return sum(self.sizes)

    def record(self, batch_loss: torch.Tensor, parts: dict[str, torch.Tensor], n_batch: int) -> None:
        row = torch.stack([batch_loss.float(), *(parts[k].float() for k in _LOSS_COLUMNS[1:])])
        self.rows[self.steps].copy_(row)  # device to device: no wait
        self.sizes.append(n_batch)

    def check(self) -> float:
        """Read the rows recorded so far (one wait); return the epoch's mean batch loss so far."""
        if self.steps == 0:
            return math.nan
        if self.steps > self.checked:
            (rows,) = hostsync.to_host(self.rows[: self.steps])
            values = rows.tolist()
            for j in range(self.checked, self.steps):
                if not math.isfinite(values[j][0]):
                    self._diverged(j, values[j])
            self.checked = self.steps
            self.last_loss = values[-1][0]
            self.mean = sum(v[0] * n for v, n in zip(values, self.sizes)) / max(self.n_images, 1)
        return self.mean

    def _diverged(self, j: int, values: list[float]):
        kept = (
            f"the last good checkpoint (epoch {self.good_epochs}) is kept in {self.run_dir}"
            if (self.run_dir / ADAPTERS_FILE).exists()
            else "no checkpoint was written yet"
        )
        parts_txt = ", ".join(f"{k}={v:.4g}" for k, v in zip(_LOSS_COLUMNS[1:], values[1:]))
        raise TrainingDivergedError(
            f"loss is {values[0]} at epoch {self.epoch + 1}, step {self.first_step + j + 1} ({parts_txt}); {kept}"
        )


def _batch_loss(forward, batch: dict, cfg, device: torch.device, peer=None):
    """Forward and loss of one batch (this rank's micro-batch under torchrun): ``(loss, parts)``.

    ``batch`` holds prefix ``tokens`` (from :meth:`PrefixCache.epoch`; ``forward`` is then the model's
    ``forward_from_prefix``) or the ``image`` (``forward`` is the model's ``forward``). How many images
    the map losses see is counted from the labels on the host (``host_label`` of a cached batch, the
    collated ``label`` otherwise): no wait on the device. Under torchrun the loss is weighted by this
    rank's share of the global batch, so that the ranks' losses sum to the loss of the whole batch; an
    empty share gives a constant 0 (and still joins the all-reduce of the shares).

    ``peer``: the :class:`~feclip.methods.model.PeerModel` being trained (``forward`` is its forward),
    whose own loss replaces FE-CLIP's; None for FE-CLIP.
    """
    host_labels = batch.get("host_label", batch["label"])
    labels = batch["label"].to(device, non_blocking=True)
    shares = dist.loss_shares(mask_loss_images(labels, cfg.loss)) if dist.world_size() > 1 else None
    if len(host_labels) == 0:
        zero = torch.zeros((), device=device)
        return zero, dict.fromkeys(("cls", "focal", "dice", "total"), zero)
    if cfg.loss.mask_loss_on == "abnormal":
        n_kept = int((host_labels > 0).sum())  # host tensor: no device synchronisation
    else:
        n_kept = len(host_labels)
    masks = batch["mask"].to(device, non_blocking=True)
    inputs = batch["tokens"] if "tokens" in batch else batch["image"].to(device, non_blocking=True)
    if peer is not None:  # its own forward (with the categories, for prompts that name them) and loss
        return peer.loss(forward(inputs, categories=batch.get("category")), masks, labels)
    out = forward(inputs)  # at the model's precision (FEClip.precision)
    return feclip_loss(out, masks, labels, cfg.loss, shares, n_kept=n_kept)


def _collate_share(items: list[dict]) -> dict:
    """:func:`~feclip.data.dataset.collate`; an empty batch for a rank's empty share of a last batch
    with fewer images than ranks."""
    if items:
        return collate(items)
    empty = torch.zeros(0, dtype=torch.int64)
    return {"label": empty, "index": empty}


def _progress(loader, enabled: bool, desc: str, total: int):
    """:func:`feclip.progress.progress` of an epoch's batches (lines on the training log)."""
    return progress(loader, enabled, desc, total, unit="batch", logger=log)
