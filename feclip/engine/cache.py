"""The frozen-prefix cache: tokens after the first tap block, computed once per image.

The blocks up to and including the first tap do not depend on any trainable weight, and the protocol
uses no augmentation, so their output is the same in every epoch. The cache runs them once over the
training set and every later step starts at the first tap (:meth:`FEClip.forward_from_prefix`), which
skips ``(first_tap + 1) / (last_tap + 1)`` of the backbone's forward and backward work (spread3: 16 of
24 blocks). The cache also keeps each image's mask and label, so a cached epoch reads nothing from the
dataset: a step's batch is three index lookups on the device, with no host work between the steps.

Storage: on the training device or in pinned host memory; tokens in the model's
:attr:`~feclip.models.FEClip.token_dtype` (fp32: the residual stream stays fp32 under both precision
policies; 4.1 GB for MVTec AD's 1,725 images with ViT-L/14@336), masks as uint8. The prefix runs at
the model's own precision and the tokens are served in the dtype they were computed in, so a cached step
computes the same numbers as an uncached one: the blocks after the first tap see the same tokens, at
the same precision (bit for bit on the CPU, in fp32 and under bf16 autocast alike; tested).

The images are decoded by a ``DataLoader`` with ``num_workers`` processes (``data.num_workers``); the
build shows its progress (:mod:`feclip.progress`, ``train.progress``) and logs its time and images/s.
:meth:`PrefixCache.epoch` uploads an epoch's order to the device once, so that a step's batch is three
device-side gathers with no host work and no transfer.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.utils.data import DataLoader

from feclip.config import TrainConfig
from feclip.data.dataset import collate
from feclip.errors import ConfigError
from feclip.progress import progress as show_progress

log = logging.getLogger("feclip.cache")

# the values of train.prefix_cache (read by feclip.engine.train.make_prefix_cache) and of
# train.prefix_cache_storage (read here); feclip.config.RunConfig.validate checks them against these
PREFIX_CACHE_MODES = ("auto", "on", "off")  # auto: on when it fits train.prefix_cache_max_gb
PREFIX_CACHE_STORAGES = ("device", "pinned")


def prefix_bytes(model, n_images: int, dtype: torch.dtype) -> int:
    """Size of the cache for ``n_images``: ``n * (1 + h*w) * D`` tokens of ``dtype`` and ``n * S * S``
    mask bytes."""
    h, w = model.grid
    width = model.fc_patch.in_features
    tokens = n_images * (1 + h * w) * width * torch.empty((), dtype=dtype).element_size()
    return tokens + n_images * model.image_size**2


class PrefixCache:
    """Prefix tokens, masks and labels of every image of a dataset, indexed like the dataset.

    Args:
        model: the :class:`~feclip.models.FEClip` whose ``prefix`` is cached.
        dataset: an :class:`~feclip.data.AnomalyDataset`; ``cache[i]`` holds its image ``i``.
        batch_size: images decoded and run through the prefix at a time (``train.batch_size``).
        storage: ``device`` or ``pinned`` (host memory, copied to ``device`` per batch); default
            ``train.prefix_cache_storage``'s.
        dtype: of the stored tokens; ``None`` (default) = ``model.token_dtype``, the dtype the prefix
            computes (another dtype rounds the tokens, and a cached step no longer equals an uncached one).
        num_workers: ``DataLoader`` processes that decode the images (0: in this process).
        progress: show the build's progress (a bar on a terminal, log lines elsewhere).

    Shapes: ``tokens`` (N, 1 + h*w, D), ``masks`` (N, S, S) uint8 in {0, 1}, ``labels`` (N,) int64 on
    the device and ``host_labels`` (N,) int64 on the host; :meth:`batch` gives them for a list of
    indices on ``device``, :meth:`epoch` for all batches of an epoch.
    """

    def __init__(
        self,
        model,
        dataset,
        device: torch.device,
        batch_size: int,
        storage: str = TrainConfig.prefix_cache_storage,
        dtype: torch.dtype | None = None,
        num_workers: int = 0,
        progress: bool = False,
    ):
        if storage not in PREFIX_CACHE_STORAGES:
            raise ConfigError(
                f"train.prefix_cache_storage must be one of {PREFIX_CACHE_STORAGES}, got {storage!r}"
            )
        self.device = device
        dtype = dtype or model.token_dtype
        h, w = model.grid
        shape = (len(dataset), 1 + h * w, model.fc_patch.in_features)
        where = device if storage == "device" else torch.device("cpu")
        pin = storage == "pinned" and device.type == "cuda"
        n, size = len(dataset), model.image_size
        self.tokens = torch.empty(shape, dtype=dtype, device=where, pin_memory=pin)
        self.masks = torch.empty((n, size, size), dtype=torch.uint8, device=where, pin_memory=pin)
        self.labels = torch.empty(n, dtype=torch.int64, device=device)
        self.host_labels = torch.empty(n, dtype=torch.int64)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        batches = show_progress(
            loader, progress, "prefix cache", n, unit="image", count=lambda b: len(b["index"]), logger=log
        )
        with torch.inference_mode():  # at the model's own precision, as the training forward
            for batch in batches:
                at = batch["index"].to(where, non_blocking=True)
                images = batch["image"].to(device, non_blocking=True)
                self.tokens[at] = model.prefix(images).to(dtype=dtype, device=where)
                self.masks[at] = batch["mask"].to(device=where, non_blocking=True).to(torch.uint8)
                self.labels[batch["index"].to(device, non_blocking=True)] = batch["label"].to(
                    device, non_blocking=True
                )
                self.host_labels[batch["index"]] = batch["label"]
        model.train(was_training)
        seconds = time.perf_counter() - start  # the tokens' last copy may still run on the device
        size_gb = sum(t.numel() * t.element_size() for t in (self.tokens, self.masks)) / 1e9
        log.info(
            "prefix cache: %d images, %.2f GB on %s, built in %.1f s (%.1f images/s)",
            n,
            size_gb,
            where,
            seconds,
            n / max(seconds, 1e-9),
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _gather(self, host_index: torch.Tensor, at: torch.Tensor) -> dict[str, torch.Tensor]:
        """``at``: ``host_index`` on the storage device."""
        labels_at = (
            at if at.device == self.labels.device else host_index.to(self.labels.device, non_blocking=True)
        )
        return {
            "tokens": self.tokens[at].to(self.device, non_blocking=True),
            "mask": self.masks[at].to(self.device, non_blocking=True).float(),
            "label": self.labels[labels_at],
            "host_label": self.host_labels[host_index],
            "index": host_index,
        }

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The cached part of a training batch, on the training device.

        Returns ``tokens`` (B, 1 + h*w, D) in the stored dtype, ``mask`` (B, S, S) float32, ``label``
        (B,) int64 on the device, ``host_label`` (B,) and ``index`` (B,) int64 on the host;
        ``B = len(indices)`` may be 0 (a rank's empty share).
        """
        index = torch.tensor(indices, dtype=torch.int64)
        return self._gather(index, index.to(self.tokens.device, non_blocking=True))

    def epoch(self, batches: list[list[int]]):
        """The batches of an epoch, as :meth:`batch` gives them, with one transfer for the whole epoch:
        the order goes to the device once and every step gathers with a slice of it (no host work, no
        host-device copy between the steps)."""
        flat = torch.tensor([i for b in batches for i in b], dtype=torch.int64)
        if self.tokens.device.type == "cuda":
            flat = flat.pin_memory()
        on_storage = flat.to(self.tokens.device, non_blocking=True)
        start = 0
        for b in batches:
            stop = start + len(b)
            yield self._gather(flat[start:stop], on_storage[start:stop])
            start = stop
