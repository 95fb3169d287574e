"""Files that appear only complete: every file feclip writes goes through :func:`atomic_write`.

The content is written under a unique hidden temporary name beside the target (no other process or
thread uses it), then renamed into place (``os.replace``, atomic on one file system): a reader sees
the old file or the new one, never half of one, and a crash leaves at most a ``.<name>.<pid>.<id>.tmp``
file, which the failed writer removes when it can.

Folder entries of the caches (the decoded images, the adapters and outputs stores) share the same
discipline one level up: an entry is built in a ``.tmp-*`` folder and renamed into place, a replaced or
corrupt one is set aside as ``.trash-*`` first, one ``.lock-<key>`` file per key serialises the
builders (:func:`key_lock`), and left-overs of killed builds are removed after a day
(:func:`clean_stale`).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "LOCK_PREFIX",
    "STALE_SECONDS",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale",
    "fsync_file",
    "key_lock",
    "unique_tmp",
]

log = logging.getLogger(__name__)

#: Name prefixes of a cache folder's entries in the making, set aside, and their lock files.
TMP_PREFIX, LOCK_PREFIX, TRASH_PREFIX = ".tmp-", ".lock-", ".trash-"
STALE_SECONDS = 24 * 3600  # temporary folders older than this are left-overs of killed builds


def unique_tmp(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` that no other process or thread uses (hidden, ``.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``; returns ``path``.

    The parent folder is created. When ``write`` or the rename raises, the temporary file is removed
    and the exception propagates: ``path`` keeps its previous content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s content to the disk (before an entry holding it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_stale(root: Path) -> None:
    """Remove ``.tmp-*`` and ``.trash-*`` folders of ``root`` older than :data:`STALE_SECONDS`."""
    now = time.time()
    try:
        children = list(root.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            try:
                if now - child.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:
                pass


@contextmanager
def key_lock(root: Path, key: str, what: str) -> Iterator[None]:
    """Hold ``root/.lock-<key>`` exclusively (``flock``, blocking) for the block; when another process
    holds it, the log says who (the holder writes its pid and host into the file) and for how long.
    Without ``fcntl`` (not POSIX): no lock, concurrent builders both build and the rename keeps one.

    Raises:
        OSError: the lock file cannot be created in ``root``; the caller decides how to degrade.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(root / f"{LOCK_PREFIX}{key}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            log.info("%s: waiting for %s, which is making entry %s", what, holder, key)
            t0 = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.info("%s: entry %s released after %.0f s of waiting", what, key, time.perf_counter() - t0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
