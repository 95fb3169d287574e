"""The frozen-prefix cache: tokens after the first tap block, computed once per image.

The blocks up to and including the first tap do not depend on any trainable weight, and the protocol
uses no augmentation, so their output is the same in every epoch. The cache runs them once over the
training set and every later step starts at the first tap (:meth:`FEClip.forward_from_prefix`), which
skips ``(first_tap + 1) / (last_tap + 1)`` of the backbone's forward and backward work (spread3: 16 of
24 blocks). The cache also keeps each image's mask and label, so a cached epoch reads nothing from the
dataset: a step's batch is three index lookups on the device, with no host work between the steps.

Storage: on the training device (tokens in bf16 on CUDA, the model dtype elsewhere; masks as uint8) or
in pinned host memory. The prefix runs under the same bf16 autocast as the training forward when
``amp`` is on, so a cached run sees the tokens an uncached bf16 run computes (up to the bf16 rounding
of the stored tokens).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from feclip.data.dataset import collate
from feclip.errors import ConfigError

log = logging.getLogger("feclip.cache")


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
        storage: ``device`` or ``pinned`` (host memory, copied to ``device`` per batch).
        dtype: of the stored tokens (default bf16 on CUDA, float32 elsewhere).
        amp: run the prefix under bf16 autocast (CUDA), as the training forward does.

    Shapes: ``tokens`` (N, 1 + h*w, D), ``masks`` (N, S, S) uint8 in {0, 1}, ``labels`` (N,) int64;
    :meth:`batch` gives them for a list of indices on ``device``.
    """

    def __init__(
        self,
        model,
        dataset,
        device: torch.device,
        batch_size: int = 32,
        storage: str = "device",
        dtype: torch.dtype | None = None,
        amp: bool = False,
    ):
        if storage not in ("device", "pinned"):
            raise ConfigError(f"train.prefix_cache_storage must be 'device' or 'pinned', got {storage!r}")
        self.device = device
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        h, w = model.grid
        shape = (len(dataset), 1 + h * w, model.fc_patch.in_features)
        where = device if storage == "device" else torch.device("cpu")
        pin = storage == "pinned" and device.type == "cuda"
        n, size = len(dataset), model.image_size
        self.tokens = torch.empty(shape, dtype=dtype, device=where, pin_memory=pin)
        self.masks = torch.empty((n, size, size), dtype=torch.uint8, device=where, pin_memory=pin)
        self.labels = torch.empty(n, dtype=torch.int64, device=device)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        was_training = model.training
        model.eval()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
        with torch.inference_mode(), autocast:  # the same precision as the training forward
            for batch in loader:
                at = batch["index"].to(where)
                self.tokens[at] = model.prefix(batch["image"].to(device)).to(dtype=dtype, device=where)
                self.masks[at] = batch["mask"].to(dtype=torch.uint8, device=where)
                self.labels[batch["index"].to(device)] = batch["label"].to(device)
        model.train(was_training)
        size_gb = sum(t.numel() * t.element_size() for t in (self.tokens, self.masks)) / 1e9
        log.info("prefix cache: %d images, %.2f GB on %s", n, size_gb, where)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The cached part of a training batch, on the training device.

        Returns ``tokens`` (B, 1 + h*w, D) float32, ``mask`` (B, S, S) float32, ``label`` (B,) int64
        and ``index`` (B,) int64; ``B = len(indices)`` may be 0 (a rank's empty share).
        """
        index = torch.tensor(indices, dtype=torch.int64)
        at = index.to(self.tokens.device, non_blocking=True)
        return {
            "tokens": self.tokens[at].to(self.device, non_blocking=True).float(),
            "mask": self.masks[at].to(self.device, non_blocking=True).float(),
            "label": self.labels[index.to(self.device, non_blocking=True)],
            "index": index,
        }
