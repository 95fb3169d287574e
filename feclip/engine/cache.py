"""The frozen-prefix cache: tokens after the first tap block, computed once per image.

The blocks up to and including the first tap do not depend on any trainable weight, and the protocol
uses no augmentation, so their output is the same in every epoch. The cache runs them once over the
training set and every later step starts at the first tap (:meth:`FEClip.forward_from_prefix`), which
skips ``(first_tap + 1) / (last_tap + 1)`` of the backbone's forward and backward work (spread3: 16 of
24 blocks).

Storage: on the training device (bf16 on CUDA, the model dtype elsewhere) or in pinned host memory.
The prefix runs under the same bf16 autocast as the training forward when ``amp`` is on, so a cached
run sees the tokens an uncached bf16 run computes (up to the bf16 rounding of the stored tokens).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from feclip.data.dataset import collate
from feclip.errors import ConfigError

log = logging.getLogger("feclip.cache")


def prefix_bytes(model, n_images: int, dtype: torch.dtype) -> int:
    """Size of the cache for ``n_images``: ``n * (1 + h*w) * D`` elements."""
    h, w = model.grid
    width = model.fc_patch.in_features
    return n_images * (1 + h * w) * width * torch.empty((), dtype=dtype).element_size()


class PrefixCache:
    """Prefix tokens of every image of a dataset, indexed like the dataset.

    Args:
        model: the :class:`~feclip.models.FEClip` whose ``prefix`` is cached.
        dataset: an :class:`~feclip.data.AnomalyDataset`; ``cache[i]`` holds its image ``i``.
        storage: ``device`` or ``pinned`` (host memory, copied to ``device`` per batch).
        dtype: of the stored tokens (default bf16 on CUDA, float32 elsewhere).
        amp: run the prefix under bf16 autocast (CUDA), as the training forward does.

    Shape: ``cache[indices] -> (B, 1 + h*w, D)`` float32 on ``device``.
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
        self.tokens = torch.empty(
            shape, dtype=dtype, device=where, pin_memory=storage == "pinned" and device.type == "cuda"
        )
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        was_training = model.training
        model.eval()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
        with torch.inference_mode(), autocast:  # the same precision as the training forward
            for batch in loader:
                tokens = model.prefix(batch["image"].to(device)).to(dtype=dtype, device=where)
                self.tokens[batch["index"].to(where)] = tokens
        model.train(was_training)
        log.info(
            "prefix cache: %d images, %.2f GB on %s",
            len(dataset),
            self.tokens.numel() * self.tokens.element_size() / 1e9,
            where,
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.tokens[index.to(self.tokens.device)].to(self.device, non_blocking=True).float()
