"""Train once, evaluate many: the adapter store, the store of the model's outputs, and the listing and
clearing of every cache under ``<paths.cache_dir>``.

Many runs of a study differ from another run only in evaluation options (map kind, taps of the map,
post-processing, AUPRO variant, resolution): they would train the same adapters and run the same
forward pass over the same images, only to score the same logits differently. Two stores let the
first such run do it and the others read the result:

``adapters/<key>/`` (:class:`AdapterStore`, ``train.reuse``)
    ``adapters.safetensors`` exactly as a training wrote it, and ``meta.json``. The key is the SHA-256
    of the training identity (:func:`feclip.engine.identity.training_identity`: seed, backbone built,
    model, ``train.*`` but resume/progress/reuse, training data and its fingerprint, the data options,
    the precision; nothing of ``eval.*``). A run whose training identity is stored copies the file into
    its folder (byte for byte: the folder stays self-contained and the file's SHA-256 is the trained
    one's) and loads it instead of training; a run that trains stores its file.
``outputs/<key>/`` (:class:`OutputStore`, ``eval.reuse_outputs``)
    ``cls.npy`` ``(n, N, 2)`` and ``patch.npy`` ``(n, N, h, w, 2)``, float32: per image of a target,
    the class-token and patch logits of the ``N`` taps (:class:`~feclip.models.FEClipOutput`'s
    ``tap_cls_logits`` ``(N, B, 2)`` and ``tap_patch_logits`` ``(N, B, h, w, 2)``, image axis first),
    and ``meta.json``. The key is the SHA-256 of :func:`feclip.engine.identity.outputs_identity`: the
    evaluated weights (:func:`weights_sha256`: trained, loaded or untrained alike), backbone, model
    config, precision, device type, input size, the target and its fingerprint, the data options,
    ``eval.batch_size``. Every scoring option (map kind, tap aggregation and subsets, weights, sigma,
    post-processing, resolution, AUPRO variants) is computed from these, by :mod:`feclip.scoring` as
    from the model: an evaluation that finds them runs no forward pass.

Precision of the stored outputs: float32, what :meth:`FEClip.head <feclip.models.FEClip.head>`
computes under every precision policy, so that scoring them on the same device gives the numbers of
scoring the model's output, bit for bit. float16 would halve the 18 KB an image takes (ViT-L/14@336, 4
taps: 24 x 24 x 2 x 4 x 4 bytes) but round each logit to 11 bits: the normal/abnormal margin, whose
ranking the metrics measure, would change in its 4th digit, and a cached run would no longer
reproduce a fresh one.

Not stored: few-shot evaluation (``eval.fewshot_k > 0``) needs the tap tokens ``(N, B, h, w, D)``
(9.4 MB an image for ViT-L in float32) for its memory banks, and runs the model as before.

Safety. Entries are written in a temporary sibling folder (``.tmp-<key>-<pid>-<rand>``) and renamed
into place: an interrupted write leaves no entry, only a temporary folder that is never read (removed
by a later write once a day old, or by ``feclip-cache clear``). A lock file per key
(``.lock-<key>``, ``flock``) makes a second process (Hydra's parallel launcher, SLURM jobs) that wants
the same entry wait for the first and then read it, instead of training or evaluating again. On read,
``meta.json`` must name the kind, the format, the key and the whole identity record the reader expects
(another backbone or config is never used, even under a colliding key) and the files must match it
(the adapter file its recorded SHA-256, the arrays their shapes); an entry that does not is ignored
with a warning and rebuilt. ``force=true`` reads neither store and replaces the entries it writes.

``feclip-cache list`` / ``clear`` (:mod:`feclip.apps.cache`) show and remove entries of the two stores
and of the decoded-image cache (:mod:`feclip.data.decoded`) through :func:`list_entries` and
:func:`clear`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from feclip.engine.identity import STORE_FORMAT
from feclip.fileio import LOCK_PREFIX, TMP_PREFIX, TRASH_PREFIX, clean_stale, fsync_file, key_lock

__all__ = [
    "ADAPTERS",
    "DECODED",
    "KINDS",
    "OUTPUTS",
    "AdapterStore",
    "CacheEntry",
    "OutputSlot",
    "OutputStore",
    "RawOutputs",
    "clear",
    "list_entries",
    "store_key",
    "weights_sha256",
]

log = logging.getLogger("feclip.store")

ADAPTERS, OUTPUTS, DECODED = "adapters", "outputs", "decoded"
KINDS = (ADAPTERS, OUTPUTS, DECODED)  # the folders under <paths.cache_dir> that feclip-cache manages
META = "meta.json"
ADAPTER_FILE = "adapters.safetensors"
CLS_FILE, PATCH_FILE = "cls.npy", "patch.npy"
KEY_CHARS = 32  # hex characters of a store key (128 bits; meta.json holds the whole record anyway)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def store_key(identity: dict) -> str:
    """The key of an identity record: SHA-256 of its canonical JSON, :data:`KEY_CHARS` hex."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:KEY_CHARS]


def weights_sha256(model) -> str:
    """SHA-256 (hex) of a model's trainable weights as they are now (adapters and fc_patch: names,
    dtypes, shapes and bytes), whether trained, loaded from a file or freshly initialised."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.trainable_state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return time.strftime(_TIME_FORMAT)


# ----------------------------------------------------------------------------------------------------
# Entries: lock, atomic write, verified read
# ----------------------------------------------------------------------------------------------------


@contextmanager
def _key_lock(root: Path, key: str, what: str) -> Iterator[None]:
    """:func:`~feclip.fileio.key_lock` on ``root/.lock-<key>``, or no lock where ``root`` cannot be
    written (correctness never depends on it: entries are renamed into place whole)."""
    with ExitStack() as held:
        try:
            root.mkdir(parents=True, exist_ok=True)
            held.enter_context(key_lock(root, key, what))
        except OSError as e:
            log.warning("%s: cannot lock %s (%s); going on without the lock", what, root, e.strerror or e)
        yield


def _write_entry(root: Path, key: str, files: dict[str, Callable[[Path], object]], meta: dict) -> Path:
    """Write ``files`` (name -> ``write(path)``) and ``meta.json`` in a temporary folder, then rename it
    to ``root/key``, replacing an entry already there (``force``, or a corrupt one). The temporary
    folder is removed in every case; a failure leaves ``root/key`` as it was."""
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    tmp = root / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, write in files.items():
            write(tmp / name)
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
        for name in [*files, META]:
            fsync_file(tmp / name)
        path = root / key
        if path.exists():  # replaced: set the old one aside first (a rename over a folder fails)
            trash = root / f"{TRASH_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, path)
        return path
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class _Corrupt(Exception):
    """An entry folder that does not match what its reader expects (the message says how)."""


def _read_meta(path: Path, kind: str, key: str, identity: dict) -> dict:
    """The entry's ``meta.json``, checked to name ``kind``, the format, ``key`` and ``identity``."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise _Corrupt(f"{path / META} is missing or unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise _Corrupt(f"{path / META} is not an object")
    want = {"kind": kind, "format": STORE_FORMAT, "key": key}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise _Corrupt(f"{path / META} says {got}, expected {want}")
    if meta.get("identity") != json.loads(json.dumps(identity, default=str)):
        raise _Corrupt(f"{path / META} was made from another identity under the same key")
    return meta


class _Store:
    kind = ""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.root = Path(cache_dir) / self.kind

    def lock(self, key: str):
        """Hold the key's lock for a block (see the module docstring)."""
        return _key_lock(self.root, key, f"{self.kind} store")

    def _warn_corrupt(self, key: str, e: Exception) -> None:
        log.warning("%s store: ignoring entry %s (%s); it is made again", self.kind, key, e)


# ----------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------


class AdapterStore(_Store):
    """Trained adapter files under ``<cache_dir>/adapters/<key>/``, keyed by the training identity."""

    kind = ADAPTERS

    def find(self, key: str, identity: dict) -> Path | None:
        """The stored adapter file of ``key`` (its ``meta.json`` checked against ``identity``, the
        file against its recorded SHA-256); None when there is none, or (with a warning) when the
        entry is incomplete, corrupt or of another identity."""
        path = self.root / key
        if not path.is_dir():
            return None
        try:
            meta = _read_meta(path, self.kind, key, identity)
            file = path / ADAPTER_FILE
            if not file.is_file():
                raise _Corrupt(f"{file} is missing")
            if _file_sha256(file) != meta.get("sha256"):
                raise _Corrupt(f"{file} does not match the SHA-256 in its meta.json")
        except (_Corrupt, OSError) as e:
            self._warn_corrupt(key, e)
            return None
        return file

    def put(self, key: str, identity: dict, source: Path, info: dict) -> Path | None:
        """Store a copy of the adapter file ``source`` under ``key`` (replacing an entry there);
        ``info`` joins ``meta.json`` (what made it). A failure (disk full, read-only cache) is a
        warning, never the run's failure; returns the stored file or None."""
        meta = {
            "kind": self.kind,
            "format": STORE_FORMAT,
            "key": key,
            "identity": identity,
            "sha256": _file_sha256(source),
            "created": _now(),
            "summary": _adapters_summary(identity),
            **info,
        }
        try:
            path = _write_entry(self.root, key, {ADAPTER_FILE: lambda p: shutil.copyfile(source, p)}, meta)
        except OSError as e:
            log.warning("adapter store: could not store %s (%s)", source, e.strerror or e)
            return None
        log.info("adapter store: stored the trained adapters as entry %s", key)
        return path / ADAPTER_FILE


def _adapters_summary(identity: dict) -> str:
    model, train, data = identity.get("model", {}), identity.get("train", {}), identity.get("data", {})
    return (
        f"{identity.get('weights')}, taps {model.get('taps')}, adapters {model.get('adapters')}; "
        f"trained on {data.get('name')}:{data.get('dir') or data.get('split')} "
        f"(data {identity.get('data_fingerprint')}), seed {identity.get('seed')}, {train.get('epochs')} "
        f"epochs, lr {train.get('lr')}, {identity.get('precision')}"
    )


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class RawOutputs:
    """The model's raw outputs over a dataset, image axis first, float32 on the host (arrays or
    read-only memory maps). ``n`` images, ``N`` taps, ``h x w`` token grid."""

    cls: np.ndarray  # (n, N, 2): class-token logits (normal, abnormal) per image and tap
    patch: np.ndarray  # (n, N, h, w, 2): patch logits on the token grid per image and tap

    def output(self, index, device):
        """The :class:`~feclip.models.FEClipOutput` of the images ``index`` (a list of positions), as
        the model returns it: ``tap_cls_logits`` ``(N, B, 2)``, ``tap_patch_logits`` ``(N, B, h, w,
        2)``, float32, contiguous, on ``device``."""
        import torch

        from feclip.models.feclip import FEClipOutput

        cls = np.ascontiguousarray(np.swapaxes(self.cls[index], 0, 1))
        patch = np.ascontiguousarray(np.swapaxes(self.patch[index], 0, 1))
        return FEClipOutput(
            tap_cls_logits=torch.from_numpy(cls).to(device, non_blocking=True),
            tap_patch_logits=torch.from_numpy(patch).to(device, non_blocking=True),
        )

    @staticmethod
    def from_batches(cls: list, patch: list) -> RawOutputs:
        """Join per-batch model outputs (``(N, B, 2)`` and ``(N, B, h, w, 2)`` host tensors)."""
        return RawOutputs(
            cls=np.concatenate([np.swapaxes(c.float().numpy(), 0, 1) for c in cls]),
            patch=np.concatenate([np.swapaxes(p.float().numpy(), 0, 1) for p in patch]),
        )


def _save_npy(array: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.save(path, np.ascontiguousarray(array, dtype=np.float32))


class OutputStore(_Store):
    """Raw model outputs on a target under ``<cache_dir>/outputs/<key>/``, keyed by
    :func:`feclip.engine.identity.outputs_identity`."""

    kind = OUTPUTS

    def slot(self, identity: dict, force: bool = False, made_by: str = "") -> OutputSlot:
        return OutputSlot(self, store_key(identity), identity, force, made_by)

    def find(self, key: str, identity: dict, n: int, taps: int, grid: tuple[int, int]) -> RawOutputs | None:
        """The stored outputs of ``key`` for ``n`` images, ``taps`` taps and the token ``grid``
        (memory-mapped); None when there are none or (with a warning) when the entry does not match."""
        path = self.root / key
        if not path.is_dir():
            return None
        shapes = {CLS_FILE: (n, taps, 2), PATCH_FILE: (n, taps, *grid, 2)}
        try:
            _read_meta(path, self.kind, key, identity)
            arrays = {}
            for name, shape in shapes.items():
                try:
                    arr = np.load(path / name, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise _Corrupt(f"{path / name} is missing or unreadable ({e})") from None
                if arr.shape != shape or arr.dtype != np.float32:
                    raise _Corrupt(f"{path / name} is {arr.dtype}{arr.shape}, expected float32{shape}")
                arrays[name] = arr
        except _Corrupt as e:
            self._warn_corrupt(key, e)
            return None
        return RawOutputs(arrays[CLS_FILE], arrays[PATCH_FILE])

    def put(self, key: str, identity: dict, raw: RawOutputs, info: dict) -> None:
        """Store ``raw`` under ``key`` (replacing an entry there); a failure is a warning."""
        meta = {
            "kind": self.kind,
            "format": STORE_FORMAT,
            "key": key,
            "identity": identity,
            "n": int(raw.cls.shape[0]),
            "created": _now(),
            "summary": _outputs_summary(identity, int(raw.cls.shape[0])),
            **info,
        }
        try:
            _write_entry(
                self.root, key, {CLS_FILE: _save_npy(raw.cls), PATCH_FILE: _save_npy(raw.patch)}, meta
            )
        except OSError as e:
            log.warning("outputs store: could not store entry %s (%s)", key, e.strerror or e)
            return
        log.info("outputs store: stored the model's outputs on %d images as entry %s", raw.cls.shape[0], key)


def _outputs_summary(identity: dict, n: int) -> str:
    data = identity.get("data", {})
    return (
        f"{n} images of {data.get('name')} {data.get('split')} (data {data.get('fingerprint')}); weights "
        f"{str(identity.get('adapters_sha256'))[:12]} on {identity.get('weights')}, taps "
        f"{identity.get('model', {}).get('taps')}, {identity.get('precision')} on {identity.get('device_type')}"
    )


@dataclass
class OutputSlot:
    """The place of one target's outputs in the store, as evaluation uses it
    (:func:`feclip.engine.evaluate.evaluate`): :meth:`load` (None under ``force``), :meth:`lock`,
    :meth:`save`."""

    store: OutputStore
    key: str
    identity: dict
    force: bool = False
    made_by: str = ""

    def load(self, n: int, taps: int, grid: tuple[int, int]) -> RawOutputs | None:
        if self.force:
            return None
        return self.store.find(self.key, self.identity, n, taps, grid)

    def lock(self):
        return self.store.lock(self.key)

    def save(self, raw: RawOutputs) -> None:
        self.store.put(self.key, self.identity, raw, {"made_by": self.made_by})


# ----------------------------------------------------------------------------------------------------
# Listing and clearing (feclip-cache)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """One entry of a cache: its kind (:data:`KINDS`), key, folder, size in bytes, creation time
    (seconds since the epoch) and what it was made from (one line)."""

    kind: str
    key: str
    path: Path
    bytes: int
    created: float
    made_from: str


def _folder_bytes(path: Path) -> int:
    total = 0
    for child in path.rglob("*"):
        try:
            if child.is_file():
                total += child.stat().st_size
        except OSError:
            pass
    return total


def _created(meta: dict, path: Path) -> float:
    try:
        return datetime.strptime(str(meta.get("created")), _TIME_FORMAT).timestamp()
    except ValueError:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0


def _made_from(kind: str, meta: dict) -> str:
    if not meta:
        return "(no readable meta.json)"
    if kind == DECODED:
        files = [str(meta[k]) for k in ("first_image", "last_image") if meta.get(k)]
        try:
            where = os.path.commonpath(files) if len(files) == 2 else os.path.dirname(files[0])
        except (ValueError, IndexError):  # no files recorded, or on two drives
            where = "?"
        return (
            f"{meta.get('n')} images at {meta.get('image_size')} px ({meta.get('resize')}, masks "
            f"{meta.get('mask_resize')}) under {where}"
        )
    made_by = meta.get("made_by")
    return str(meta.get("summary", "?")) + (f"; by {made_by}" if made_by else "")


def list_entries(cache_dir: str | os.PathLike, kinds=KINDS) -> list[CacheEntry]:
    """The entries of the caches ``kinds`` under ``cache_dir`` (temporary and lock files left out),
    by kind, then oldest first. A missing cache folder has none."""
    out = []
    for kind in kinds:
        root = Path(cache_dir) / kind
        try:
            children = sorted(root.iterdir())
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            continue
        for child in children:
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                meta = json.loads((child / META).read_text())
                meta = meta if isinstance(meta, dict) else {}
            except (OSError, ValueError):
                meta = {}
            out.append(
                CacheEntry(
                    kind,
                    child.name,
                    child,
                    _folder_bytes(child),
                    _created(meta, child),
                    _made_from(kind, meta),
                )
            )
    return sorted(out, key=lambda e: (KINDS.index(e.kind), e.created, e.key))


def clear(
    cache_dir: str | os.PathLike, kinds=KINDS, older_than_days: float | None = None
) -> list[CacheEntry]:
    """Remove the entries of ``kinds`` (those created more than ``older_than_days`` ago, or all), and
    temporary folders of killed writes older than a day; returns the entries removed.

    An entry is renamed aside before it is deleted, so a reader sees it whole or not at all; an entry
    whose lock another process holds (being made or replaced now) is left alone.
    """
    now = time.time()
    removed = []
    for entry in list_entries(cache_dir, kinds):
        if older_than_days is not None and now - entry.created <= older_than_days * 86400:
            continue
        root = entry.path.parent
        if not _try_remove(root, entry.key, entry.path):
            log.warning("%s entry %s is in use by another process: left in place", entry.kind, entry.key)
            continue
        removed.append(entry)
    for kind in kinds:
        clean_stale(Path(cache_dir) / kind)
    return removed


def _try_remove(root: Path, key: str, path: Path) -> bool:
    """Rename ``path`` aside and delete it, holding its key's lock when nobody else does; False when
    another process holds it."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    fd = None
    lock = root / f"{LOCK_PREFIX}{key}"
    if fcntl is not None and lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
    try:
        trash = root / f"{TRASH_PREFIX}{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:  # removed meanwhile
            return True
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        if fd is not None:
            os.close(fd)
