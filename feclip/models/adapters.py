"""The FE-CLIP adapters: FFE (frequency-aware feature extraction) and LFS (local frequency statistics).

Every adapter maps a patch-token grid to a grid of the same shape, ``(B, H, W, D) -> (B, H, W, D)``;
the fusion ``lam * sum(adapters) + (1 - lam) * tokens`` (paper Eq. 2) happens in :class:`TapAdapter`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from feclip.models.frequency import (
    sliding_coefficients,
    sliding_mean_kernel,
    window_inverse,
    window_transform,
)

LFS_STATS = ("mean", "abs", "power", "log_abs")
ADAPTER_SETS = ("both", "ffe", "lfs", "conv")
LOG_ABS_EPS = 1e-6  # log(|c| + eps) for the log-abs statistic (F3-Net lineage)


class FFEAdapter(nn.Module):
    """FFE: windowed transform -> Linear(D, D) + GELU on the coefficients -> inverse transform.

    The grid is replicate-padded to a multiple of ``p`` and cropped back. For the DFT variant the real
    and imaginary parts go through the same Linear + GELU separately and are recombined (paper Table 4).

    Shape: ``(B, H, W, D) -> (B, H, W, D)``.
    """

    def __init__(self, dim: int, p: int = 3, transform: str = "dct"):
        super().__init__()
        self.p, self.transform = p, transform
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coeffs = window_transform(x, self.p, self.transform)  # (B, G, h, w, p*p, D)
        mixed = F.gelu(self.linear(coeffs))  # the Linear mixes channels, shared over frequencies and parts
        return window_inverse(mixed, self.p, (x.shape[1], x.shape[2]), self.transform)


class LFSAdapter(nn.Module):
    """LFS: sliding ``q x q`` transform, a statistic over the ``q*q`` coefficients, Conv + GELU.

    ``stat``: ``mean`` (signed mean; a fixed linear filter, computed as one depthwise convolution),
    ``abs`` (mean of ``|c|``), ``power`` (mean of ``c**2``), ``log_abs`` (mean of ``log(|c| + 1e-6)``).
    For the DFT the statistic of the real part and of the imaginary part are summed (paper Table 4).

    Shape: ``(B, H, W, D) -> (B, H, W, D)``.
    """

    def __init__(
        self, dim: int, q: int = 3, stat: str = "mean", kernel_size: int = 3, transform: str = "dct"
    ):
        super().__init__()
        self.q, self.stat, self.transform = q, stat, transform
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.register_buffer("mean_kernel", sliding_mean_kernel(q, transform), persistent=False)

    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token frequency statistic. Shape: ``(B, D, H, W) -> (B, D, H, W)``."""
        q = self.q
        if self.stat == "mean":
            d = x.shape[1]
            xp = F.pad(x, (q // 2, (q - 1) // 2, q // 2, (q - 1) // 2), mode="replicate")
            weight = self.mean_kernel.to(x.dtype).expand(d, 1, q, q)
            return F.conv2d(xp, weight, groups=d)
        coeffs = sliding_coefficients(x, q, self.transform)  # (B, G, D, Q*Q, H, W)
        if self.stat == "abs":
            values = coeffs.abs()
        elif self.stat == "power":
            values = coeffs.square()
        else:  # log_abs
            values = torch.log(coeffs.abs() + LOG_ABS_EPS)
        return values.mean(dim=3).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.statistic(x.permute(0, 3, 1, 2))
        return F.gelu(self.conv(y)).permute(0, 2, 3, 1)


class ConvAdapter(nn.Module):
    """The paper's "CLIP + Conv adapter" baseline (Table 3): Conv(D, D) + GELU on the token grid.

    Shape: ``(B, H, W, D) -> (B, H, W, D)``.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class TapAdapter(nn.Module):
    """The adapters of one tap and the fusion of paper Eq. 2.

    ``fused = lam * (sum of adapter outputs) + (1 - lam) * tokens``.
    ``adapters``: ``both`` (FFE + LFS, the paper), ``ffe``, ``lfs`` or ``conv`` (Table 3 baselines).

    Shape: ``(B, H, W, D) -> (B, H, W, D)``.
    """

    def __init__(
        self,
        dim: int,
        adapters: str = "both",
        lam: float = 0.1,
        p: int = 3,
        q: int = 3,
        lfs_stat: str = "mean",
        lfs_kernel: int = 3,
        transform: str = "dct",
    ):
        super().__init__()
        self.lam = lam
        self.ffe = FFEAdapter(dim, p, transform) if adapters in ("both", "ffe") else None
        self.lfs = (
            LFSAdapter(dim, q, lfs_stat, lfs_kernel, transform) if adapters in ("both", "lfs") else None
        )
        self.conv = ConvAdapter(dim, lfs_kernel) if adapters == "conv" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = sum(m(x) for m in (self.ffe, self.lfs, self.conv) if m is not None)
        return self.lam * delta + (1.0 - self.lam) * x
