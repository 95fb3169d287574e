"""Files that appear only complete: every file feclip writes goes through :func:`atomic_write`.

The content is written under a unique hidden temporary name beside the target (no other process or
thread uses it), then renamed into place (``os.replace``, atomic on one file system): a reader sees
the old file or the new one, never half of one, and a crash leaves at most a ``.<name>.<pid>.<id>.tmp``
file, which the failed writer removes when it can.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "unique_tmp"]


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
