"""The FE-CLIP adapters: FFE (frequency-aware feature extraction) and LFS (local frequency statistics).

Every adapter maps a patch-token grid to a grid of the same shape, ``(B, H, W, D) -> (B, H, W, D)``;
the fusion ``lam * sum(adapters) + (1 - lam) * tokens`` (paper Eq. 2) happens in :class:`TapAdapter`.
The options have no defaults here: their one home is :class:`feclip.models.feclip.FEClipConfig`, whose
values :class:`~feclip.models.feclip.FEClip` passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from feclip.models.frequency import (
    replicate_pad,
    sliding_basis,
    sliding_coefficients,
    sliding_mean_kernel,
    window_basis,
    window_inverse,
    window_transform,
)

LFS_STATS = ("mean", "abs", "power", "log_abs")
ADAPTER_SETS = ("both", "ffe", "lfs", "conv")
LOG_ABS_EPS = 1e-6  # log(|c| + eps) for the log-abs statistic (F3-Net lineage)


def conv2d_nhwc(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A same-size, zero-padded ``conv`` applied to a channels-last grid, as one matrix product.

    The ``k x k`` neighbourhoods are laid side by side on the channel axis (im2col) and multiplied by
    the reshaped kernel: the same numbers as ``conv(x.permute(0, 3, 1, 2))``, but one large GEMM
    (about twice as fast as the direct convolution on the CPU for D = 1024 on a 24 x 24 grid).
    Shape: ``(B, H, W, C_in) -> (B, H, W, C_out)``.
    """
    k = conv.kernel_size[0]
    r = k // 2
    h, w = x.shape[1], x.shape[2]
    xp = F.pad(x, (0, 0, r, r, r, r))
    shifts = [xp[:, i : i + h, j : j + w] for i in range(k) for j in range(k)]
    cols = torch.stack(shifts, dim=-1).flatten(-2)  # (B, H, W, C_in*k*k), ordered like the kernel
    weight = conv.weight.flatten(1)  # (C_out, C_in*k*k): a view, no copy of the kernel
    return F.linear(cols, weight.to(cols.dtype), None if conv.bias is None else conv.bias.to(cols.dtype))


def filter2d_nhwc(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The same ``q x q`` filter on every channel, replicate padding, channels last.

    Shape: ``(B, H, W, D), (q, q) -> (B, H, W, D)``.
    """
    q = kernel.shape[0]
    h, w = x.shape[1], x.shape[2]
    xp = replicate_pad(x, q // 2, (q - 1) // 2, q // 2, (q - 1) // 2)
    kernel = kernel.to(x.dtype)
    out = kernel[0, 0] * xp[:, :h, :w]
    for i in range(q):
        for j in range(q):
            if i or j:
                out = out + kernel[i, j] * xp[:, i : i + h, j : j + w]
    return out


class FFEAdapter(nn.Module):
    """FFE: windowed transform -> Linear(D, D) + GELU on the coefficients -> inverse transform.

    The grid is replicate-padded to a multiple of ``p`` and cropped back. For the DFT variant the real
    and imaginary parts go through the same Linear + GELU separately and are recombined (paper Table 4).

    Shape: ``(B, H, W, D) -> (B, H, W, D)``.
    """

    def __init__(self, dim: int, p: int, transform: str):
        super().__init__()
        self.p, self.transform = p, transform
        self.linear = nn.Linear(dim, dim)
        # the transform's matrices: built once, moved with the module, never part of a checkpoint
        self.register_buffer("basis", window_basis(p, transform), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coeffs = window_transform(x, self.p, self.transform, self.basis)  # (B, G, h, w, p*p, D)
        mixed = F.gelu(self.linear(coeffs))  # the Linear mixes channels, shared over frequencies and parts
        return window_inverse(mixed, self.p, (x.shape[1], x.shape[2]), self.transform, self.basis)


class LFSAdapter(nn.Module):
    """LFS: sliding ``q x q`` transform, a statistic over the ``q*q`` coefficients, Conv + GELU.

    ``stat``: ``mean`` (signed mean; a fixed linear filter, computed as one depthwise convolution),
    ``abs`` (mean of ``|c|``), ``power`` (mean of ``c**2``), ``log_abs`` (mean of ``log(|c| + 1e-6)``).
    For the DFT the statistic of the real part and of the imaginary part are summed (paper Table 4).

    Shape: ``(B, H, W, D) -> (B, H, W, D)``.
    """

    def __init__(self, dim: int, q: int, stat: str, kernel_size: int, transform: str):
        super().__init__()
        self.q, self.stat, self.transform = q, stat, transform
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.register_buffer("mean_kernel", sliding_mean_kernel(q, transform), persistent=False)
        self.register_buffer("basis", sliding_basis(q, transform), persistent=False)

    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token frequency statistic. Shape: ``(B, H, W, D) -> (B, H, W, D)``."""
        if self.stat == "mean":  # linear in the window: one fixed filter
            return filter2d_nhwc(x, self.mean_kernel)
        coeffs = sliding_coefficients(x.permute(0, 3, 1, 2), self.q, self.transform, self.basis)
        # coeffs: (B, G, D, Q*Q, H, W)
        if self.stat == "abs":
            values = coeffs.abs()
        elif self.stat == "power":
            values = coeffs.square()
        else:  # log_abs
            values = torch.log(coeffs.abs() + LOG_ABS_EPS)
        return values.mean(dim=3).sum(dim=1).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(conv2d_nhwc(self.statistic(x), self.conv))


class ConvAdapter(nn.Module):
    """The paper's "CLIP + Conv adapter" baseline (Table 3): Conv(D, D) + GELU on the token grid.

    Shape: ``(B, H, W, D) -> (B, H, W, D)``.
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(conv2d_nhwc(x, self.conv))


class TapAdapter(nn.Module):
    """The adapters of one tap and the fusion of paper Eq. 2.

    ``fused = lam * (sum of adapter outputs) + (1 - lam) * tokens``.
    ``adapters``: ``both`` (FFE + LFS, the paper), ``ffe``, ``lfs`` or ``conv`` (Table 3 baselines).

    Shape: ``(B, H, W, D) -> (B, H, W, D)``.
    """

    def __init__(
        self,
        dim: int,
        adapters: str,
        lam: float,
        p: int,
        q: int,
        lfs_stat: str,
        lfs_kernel: int,
        transform: str,
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
