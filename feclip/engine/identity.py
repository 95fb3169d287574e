"""A run's identity: everything that changes its numbers, recorded in its folder and checked on reuse.

The identity of a run is

- every config value that changes a number (:func:`number_config`: the whole :class:`RunConfig` less
  :data:`NOT_IDENTITY`: names, paths, logging, progress, figures, the device, loader workers);
- the backbone that is actually built (:class:`~feclip.models.provenance.WeightsSource`, with the
  weights file's SHA-256 or the seed of a random draw);
- the adapter file evaluated (its SHA-256), for ``feclip-eval checkpoint=...``;
- the data (:func:`data_fingerprint`: every listed image and mask by path relative to its dataset
  root, size and label).

The *training identity* (:func:`training_identity`: what changes the trained adapters, a part of the
run's identity with the training data's fingerprint and the precision) keys the adapter store, and
:func:`outputs_identity` (the evaluated weights, the backbone, the target) the store of the model's
outputs (:mod:`feclip.engine.store`): runs that differ only in evaluation options share both.

``identity.json`` in the run folder holds it. A folder is reused (a complete run skipped, a killed
run resumed) only when its identity is the same; another identity is refused before anything in the
folder is touched. :class:`RunLock` keeps two processes out of one run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict
from pathlib import Path

from feclip.errors import FEClipError
from feclip.fileio import atomic_write_text

IDENTITY_FILE = "identity.json"
# config keys that do not change a number (dotted; a key names its whole sub-tree)
NOT_IDENTITY = (
    "study",
    "variant",
    "force",
    "device",
    "checkpoint",  # replaced by the file's hash
    "paths",
    "logger",
    "train.progress",
    "train.resume",
    "data.num_workers",  # how many processes decode the images: the same numbers
    "data.decoded_cache",  # decoded images read from the disk cache are bit-identical to fresh ones
    "eval.save_figures",
    "train.reuse",  # adapters of the same training identity loaded from the store: the same weights
    "eval.reuse_outputs",  # the model's outputs read from the store: the same numbers, bit for bit
    "eval.metrics_device",  # where the metrics sort the pixels' scores: the same numbers, bit for bit
)
# train.* keys that change no trained weight (the rest of train.*, max_steps included, does)
TRAIN_NOT_WEIGHTS = ("resume", "progress", "reuse")
# bumped whenever the same key would name other trained adapters or other outputs (feclip.engine.store)
STORE_FORMAT = 1
# the files whose presence means a folder already holds (part of) a run
RUN_FILES = ("metrics.csv", "adapters.safetensors", "train_state.pt", "metrics.partial.csv")


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key, {})
    tree.pop(leaf, None)


def plain(obj) -> dict:
    """Dataclass -> JSON-safe plain data (tuples become lists)."""
    return json.loads(json.dumps(asdict(obj), default=str))


def number_config(cfg) -> dict:
    """The config values that change a number, as plain JSON data (a :class:`RunConfig` in). Of
    ``method.*``, the name and the options of that method alone (the others' change nothing)."""
    plain_cfg = plain(cfg)
    for key in NOT_IDENTITY:
        _drop(plain_cfg, key)
    plain_cfg["method"] = method_record(cfg)
    return plain_cfg


def method_record(cfg) -> dict:
    """``{"name": ...}`` for FE-CLIP (its options are ``model.*``), plus ``"options"`` for a peer."""
    name = cfg.method.name
    if name == "feclip":
        return {"name": name}
    return {"name": name, "options": plain(getattr(cfg.method, name))}


def _stat_size(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return path.stat().st_size
    except OSError:
        return None


def data_fingerprint(root: Path, samples) -> str:
    """SHA-256 (12 hex) of a listed dataset: per sample the image and mask paths relative to ``root``,
    their sizes in bytes, the label and the category. Moving the dataset does not change it; adding,
    removing, relabelling or replacing a file by one of another size does."""

    def rel(path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            return Path(path).as_posix()

    rows = [
        [s.category, rel(s.image_path), _stat_size(Path(s.image_path)), s.label]
        + [rel(s.mask_path), _stat_size(Path(s.mask_path) if s.mask_path else None)]
        for s in samples
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]


def make_identity(cfg, backbone: str, checkpoint: str, data: dict[str, str]) -> dict:
    """The identity record: ``{"hash", "backbone", "checkpoint", "data", "config"}``.

    ``backbone``: :meth:`WeightsSource.describe`; ``checkpoint``: ``trained``/``untrained`` or
    ``<file>@sha256=…``; ``data``: dataset label -> :func:`data_fingerprint`.
    """
    checkpoint_id = checkpoint.rsplit("@", 1)[-1] if "@sha256=" in checkpoint else checkpoint
    body = {"backbone": backbone, "checkpoint": checkpoint_id, "data": data, "config": number_config(cfg)}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "hash": digest,
        "backbone": backbone,
        "checkpoint": checkpoint,
        "data": data,
        "config": body["config"],
    }


def _training_config(cfg, weights) -> dict:
    """The config values that change the trained weights: the seed, the backbone (``weights``: the
    :class:`~feclip.models.provenance.WeightsSource` built, when known), the model, the training
    dataset's reference and ``train.*`` less :data:`TRAIN_NOT_WEIGHTS`."""
    train = plain(cfg.train)
    for key in TRAIN_NOT_WEIGHTS:
        train.pop(key, None)
    record = {
        "seed": cfg.seed,
        "backbone": plain(cfg.backbone),
        "weights": weights.describe() if weights is not None else None,
        "model": plain(cfg.model),
        "data": plain(cfg.data.train),
        "train": train,
    }
    if cfg.method.name != "feclip":  # FE-CLIP's keys stay as they were (its stored adapters keep theirs)
        record["method"] = method_record(cfg)
    return record


def training_fingerprint(cfg, weights=None) -> str:
    """What a resumable checkpoint (``train_state.pt``) must agree on: the training config less
    ``train.max_steps`` (a run may be resumed with another one). 12 hex."""
    from feclip.results import config_hash

    record = _training_config(cfg, weights)
    record["train"].pop("max_steps", None)
    return config_hash(record)


def training_identity(cfg, weights, data_fingerprint: str, precision: str, init: str | None = None) -> dict:
    """Everything that changes the trained adapters: the key record of the adapter store
    (:class:`feclip.engine.store.AdapterStore`).

    The training config (:func:`training_fingerprint`'s, ``train.max_steps`` included), the training
    data's :func:`data_fingerprint`, the data options that change the training inputs (``resize``,
    ``mask_resize``; the input size is ``backbone.image_size``), the model ``precision`` the training
    ran at (:func:`feclip.models.feclip.precision_for` of ``train.amp`` and the device: bf16 only on
    CUDA) and ``init``, the SHA-256 of the adapter file training started from (``checkpoint=`` with
    training; None: the seeded initialisation). Nothing of ``eval.*``, paths, names or logging.
    """
    return {
        "format": STORE_FORMAT,
        **_training_config(cfg, weights),
        "data_fingerprint": data_fingerprint,
        "data_options": {"resize": cfg.data.resize, "mask_resize": cfg.data.mask_resize},
        "precision": precision,
        "init": init,
    }


def outputs_identity(
    cfg,
    weights,
    ref,
    data_fingerprint: str,
    adapters_sha256: str,
    precision: str,
    device_type: str,
    image_size: int,
) -> dict:
    """Everything the model's raw outputs on one target depend on: the key record of the outputs store
    (:class:`feclip.engine.store.OutputStore`).

    ``adapters_sha256``: of the adapter and fc_patch weights as evaluated
    (:func:`feclip.engine.store.weights_sha256`: trained, loaded or untrained alike); the backbone built
    and its options, the model config, the precision, the device type (outputs are kept bit for bit as
    this device computes them), the input size, the target (reader, split, categories, options and its
    :func:`data_fingerprint`), the data options and ``eval.batch_size`` (a batch's size may change
    the rounding of a product). Not the scoring, post-processing, resolution or AUPRO options: those
    are computed from the outputs.
    """
    return {
        "format": STORE_FORMAT,
        "adapters_sha256": adapters_sha256,
        "backbone": plain(cfg.backbone),
        "weights": weights.describe(),
        "model": plain(cfg.model),
        "precision": precision,
        "device_type": device_type,
        "image_size": int(image_size),
        "data": {
            "name": ref.name,
            "split": ref.split,
            "categories": list(ref.categories) if ref.categories is not None else None,
            "options": json.loads(json.dumps(dict(ref.options), default=str)),
            "fingerprint": data_fingerprint,
        },
        "data_options": {"resize": cfg.data.resize, "mask_resize": cfg.data.mask_resize},
        "batch_size": cfg.eval.batch_size,
    }


def read_identity(out_dir: Path) -> dict | None:
    """The identity stored in a run folder (None when there is none or it is unreadable)."""
    try:
        data = json.loads((out_dir / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "hash" in data else None


def write_identity(out_dir: Path, identity: dict) -> None:
    atomic_write_text(out_dir / IDENTITY_FILE, json.dumps(identity, indent=1, sort_keys=True) + "\n")


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def differences(old: dict, new: dict, limit: int = 4) -> str:
    """What differs between two identities, as ``key: old -> new`` items (at most ``limit``)."""
    a = _flatten({k: old.get(k) for k in ("backbone", "checkpoint", "data", "config")})
    b = _flatten({k: new.get(k) for k in ("backbone", "checkpoint", "data", "config")})
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    items = [f"{k.removeprefix('config.')}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    return "; ".join(items) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_folder(out_dir: Path, identity: dict) -> bool:
    """Whether ``out_dir`` may be used for a run of ``identity``: True when it holds the same run
    (to skip or resume), False when it holds no run yet.

    Raises:
        FEClipError: the folder holds a run of another identity, or a run from before identities were
            recorded (nothing in the folder is changed).
    """
    stored = read_identity(out_dir)
    if stored is not None:
        if stored["hash"] == identity["hash"]:
            return True
        raise FEClipError(
            f"{out_dir} holds a run of another configuration ({differences(stored, identity)}); "
            "pass force=true to replace it, or use another study/variant/paths.results_dir"
        )
    present = [f for f in RUN_FILES if (out_dir / f).exists()]
    if present:
        raise FEClipError(
            f"{out_dir} holds {', '.join(present)} of a run whose identity was not recorded (made by an "
            "older feclip), so it cannot be trusted to match this configuration; pass force=true to replace it"
        )
    return False


class RunLock:
    """An exclusive lock on a run folder, held for the life of the run (released if the process dies).

    The lock file sits beside the folder (``.<folder>.lock``), so ``force=true`` can remove the folder
    while holding it. A second process asking for the lock gets :class:`FEClipError` naming the holder.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self._file = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the lock
        except OSError as e:
            raise FEClipError(
                f"cannot write in {self.path.parent} ({e.strerror or e}); set paths.results_dir to a "
                "writable folder"
            ) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise FEClipError(
                f"{self.path.parent / self.path.name[1:-5]} is in use by {holder}; wait for it to finish "
                "(or stop it) before running the same run again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
