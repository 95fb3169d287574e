"""Which CLIP weights actually ran: recorded in every output, checked whenever a model is rebuilt.

A :class:`WeightsSource` names the open_clip model that was built and where its weights came from:
an open_clip tag (``openai``) or a file, with the SHA-256 of the file, or random weights with the seed
they were drawn with. Its one-line form (:meth:`WeightsSource.describe`) is the ``backbone`` column of
metrics.csv, e.g.::

    ViT-L-14-336-quickgelu:openai@sha256=3f2a9c0b1d2e
    ViT-L-14-336-quickgelu:file:ViT-L-14-336.pt@sha256=3f2a9c0b1d2e
    feclip-tiny:random(seed=42)

Adapter files keep it in their metadata (:func:`checkpoint_backbone`), so that whatever rebuilds a model
from an adapter file (``feclip-eval checkpoint=...``, ``feclip-predict``) rebuilds the backbone the
adapters were trained on, random draw included, or refuses (:func:`align_with_checkpoint`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from feclip.errors import CheckpointMismatchError

RANDOM = "random"
SHA_CHARS = 12  # hex characters of a SHA-256 kept in names and columns
_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_DESCRIBED = re.compile(r"^(?P<name>[^:]+):(?P<source>.+?)(?:@sha256=(?P<sha>[0-9a-f]+))?$")
_RANDOM_SEED = re.compile(r"^random\(seed=(?P<seed>-?\d+|None)\)$")


@dataclass(frozen=True)
class WeightsSource:
    """The backbone of a run as it was (or will be) built.

    Attributes:
        name: the open_clip model name built (``feclip-tiny`` after a fallback).
        source: an open_clip tag (``openai``), ``file:<file name>``, or ``random``.
        sha256: SHA-256 (hex) of the weights file; None for random weights.
        seed: the seed random weights are drawn with; None for loaded weights.
        path: the weights file (not part of the identity: the same file may live anywhere).
        fallback: True when the tiny random CLIP replaced a backbone whose weights were missing.
    """

    name: str
    source: str
    sha256: str | None = None
    seed: int | None = None
    path: str | None = None
    fallback: bool = False

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM

    def describe(self) -> str:
        """One line: ``name:source[@sha256=…]``, ``name:random(seed=S)`` for random weights."""
        if self.is_random:
            return f"{self.name}:random(seed={self.seed})"
        sha = f"@sha256={self.sha256[:SHA_CHARS]}" if self.sha256 else ""
        return f"{self.name}:{self.source}{sha}"


def parse(text: str) -> WeightsSource | None:
    """The inverse of :meth:`WeightsSource.describe` (hash shortened); None for anything else."""
    m = _DESCRIBED.match(text or "")
    if m is None:
        return None
    seed = _RANDOM_SEED.match(m["source"])
    if seed is not None:
        value = seed["seed"]
        return WeightsSource(m["name"], RANDOM, seed=None if value == "None" else int(value))
    return WeightsSource(m["name"], m["source"], sha256=m["sha"])


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, hex; computed once per process for a given (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def plan(name: str, pretrained: str | os.PathLike | None, seed: int | None) -> WeightsSource:
    """The :class:`WeightsSource` that ``load_clip(name, pretrained, seed=seed)`` would build, found
    without building anything: the weights file and its SHA-256, or random weights drawn with ``seed``.

    Raises what :func:`feclip.models.clip.locate_weights` raises (unknown name or tag, missing weights).
    """
    from feclip.models.clip import locate_weights

    path, source, _ = locate_weights(name, pretrained)
    if path is None:
        return WeightsSource(name, RANDOM, seed=seed)
    return WeightsSource(name, source, sha256=file_sha256(path), path=str(path))


def checkpoint_backbone(meta: dict[str, str]) -> WeightsSource | None:
    """The backbone recorded in an adapter file's metadata (None for files written before it was)."""
    return parse(meta.get("backbone_weights", ""))


def align_with_checkpoint(
    planned: WeightsSource, meta: dict[str, str], path: str | os.PathLike
) -> WeightsSource:
    """The backbone to build for an adapter file: ``planned`` (from the run's config), with the random
    seed the adapters were trained with. Refuses what would not rebuild the trained model.

    Raises:
        CheckpointMismatchError: another model, random vs loaded weights, another weights file (by
            hash), or random weights whose seed the file does not record (files older than this check).
    """
    saved = checkpoint_backbone(meta)
    if saved is None:
        if planned.is_random:
            raise CheckpointMismatchError(
                f"{path}: trained on a random backbone, but the file does not record its seed (written "
                "before feclip recorded backbones), so the model it was trained with cannot be rebuilt; "
                "re-train it"
            )
        return planned
    if saved.name != planned.name:
        raise CheckpointMismatchError(
            f"{path}: trained on backbone {saved.describe()}, but this run builds {planned.describe()} "
            "(set backbone=... to the one it was trained on)"
        )
    if saved.is_random != planned.is_random:
        raise CheckpointMismatchError(
            f"{path}: trained on backbone {saved.describe()}, but this run builds {planned.describe()}"
        )
    if saved.is_random:
        if saved.seed is None:
            raise CheckpointMismatchError(
                f"{path}: trained on {saved.describe()}, a random backbone drawn without a seed, which "
                "cannot be drawn again; re-train it"
            )
        return replace(planned, seed=saved.seed)
    if saved.sha256 and planned.sha256 and not planned.sha256.startswith(saved.sha256):
        raise CheckpointMismatchError(
            f"{path}: trained on backbone weights {saved.describe()}, but this run loads "
            f"{planned.describe()} (another weights file)"
        )
    return planned
