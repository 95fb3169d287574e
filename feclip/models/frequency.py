"""Frequency transforms on token grids: the orthonormal DCT-II (and a DFT variant) over small windows.

FE-CLIP works on ViT patch tokens laid out as a grid ``(B, H, W, D)``. Two transforms are needed:

* the **windowed** transform of FFE: the grid is cut into non-overlapping ``P x P`` windows and each
  window is transformed per channel (:func:`window_transform` / :func:`window_inverse`), as one
  ``(P*P, P*P)`` basis matrix applied to the window's flattened positions;
* the **sliding-window** transform of LFS: a ``Q x Q`` transform centred at every token (stride 1,
  replicate padding), giving ``Q*Q`` coefficients per token and channel (:func:`sliding_coefficients`).

The DCT is the orthonormal DCT-II, ``C[k, i] = a_k cos(pi/P (i + 1/2) k)`` with ``a_0 = sqrt(1/P)`` and
``a_k = sqrt(2/P)``; the 2-D transform of a window ``X`` is ``C X C^T`` and the inverse ``C^T Y C``. It equals
``scipy.fft.dctn(X, type=2, norm="ortho")``. The DFT variant uses the unitary DFT basis (the same
coefficients as ``torch.fft.fft2(X, norm="ortho")``), kept as a real part and an imaginary part.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TRANSFORMS = ("dct", "fft")


def dct_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal DCT-II matrix.

    Shape: ``(n, n)``; row ``k`` is the k-th basis vector, so ``C @ x`` transforms a length-n signal and
    ``C @ C.T == I``.
    """
    i = torch.arange(n, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    c = torch.cos(math.pi / n * (i + 0.5) * k)
    c[0] *= math.sqrt(1.0 / n)
    c[1:] *= math.sqrt(2.0 / n)
    return c.to(dtype=dtype, device=device)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two axes. Shape: ``(..., P, P) -> (..., P, P)``."""
    c = dct_matrix(x.shape[-1], x.dtype, x.device)
    r = dct_matrix(x.shape[-2], x.dtype, x.device)
    return r @ x @ c.T


def idct2(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2` (DCT-III, orthonormal). Shape: ``(..., P, P) -> (..., P, P)``."""
    c = dct_matrix(y.shape[-1], y.dtype, y.device)
    r = dct_matrix(y.shape[-2], y.dtype, y.device)
    return r.T @ y @ c


def replicate_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Replicate-pad a channels-last grid by indexing (no permutes; friendly to torch.compile).

    Shape: ``(B, H, W, D) -> (B, H + top + bottom, W + left + right, D)``.
    """
    h, w = x.shape[1], x.shape[2]
    rows = (torch.arange(-top, h + bottom, device=x.device)).clamp(0, h - 1)
    cols = (torch.arange(-left, w + right, device=x.device)).clamp(0, w - 1)
    return x[:, rows][:, :, cols]


def pad_to_multiple(x: torch.Tensor, p: int) -> torch.Tensor:
    """Replicate-pad a grid at the bottom and right so both sides are multiples of ``p``.

    Shape: ``(B, H, W, D) -> (B, ceil(H/p)*p, ceil(W/p)*p, D)``.
    """
    ph, pw = (-x.shape[1]) % p, (-x.shape[2]) % p
    return x if ph == 0 and pw == 0 else replicate_pad(x, 0, ph, 0, pw)


def to_windows(x: torch.Tensor, p: int) -> torch.Tensor:
    """Pad a grid to multiples of ``p`` and gather each window's positions on one axis.

    Shape: ``(B, H, W, D) -> (B, ceil(H/p), ceil(W/p), p*p, D)``; position ``a*p + c`` is row ``a``,
    column ``c`` of the window. Channels stay last, so a Linear over D needs no further permute.
    """
    x = pad_to_multiple(x, p)
    b, h, w, d = x.shape
    return x.reshape(b, h // p, p, w // p, p, d).transpose(2, 3).reshape(b, h // p, w // p, p * p, d)


def from_windows(y: torch.Tensor, p: int, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_windows`, cropped to ``size = (H, W)``. Shape: ``(B, h, w, p*p, D) -> (B, H, W, D)``."""
    b, nh, nw, _, d = y.shape
    grid = y.reshape(b, nh, nw, p, p, d).transpose(2, 3).reshape(b, nh * p, nw * p, d)
    return grid[:, : size[0], : size[1]]


def window_basis(p: int, transform: str = "dct", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The windowed transform as matrices on the window's flattened positions.

    Shape: ``(G, p*p, p*p)``; ``G`` as in :func:`sliding_basis`. Modules keep it as a buffer (on the
    device, built once) and pass it to :func:`window_transform` / :func:`window_inverse`.
    """
    return sliding_basis(p, transform, dtype).flatten(2)


def _basis_for(x: torch.Tensor, basis: torch.Tensor | None, p: int, transform: str) -> torch.Tensor:
    if basis is None:  # built on the host: functional use; the adapters pass their device buffer
        return window_basis(p, transform, x.dtype).to(x.device)
    return basis.to(x.dtype)  # a no-op when the dtypes agree; a device-side cast otherwise


def window_transform(
    x: torch.Tensor, p: int, transform: str = "dct", basis: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-window, per-channel 2-D transform of a grid (replicate-padded to multiples of ``p``).

    Shape: ``(B, H, W, D) -> (B, G, h, w, p*p, D)`` with ``h = ceil(H/p)``, ``w = ceil(W/p)``;
    coefficient ``k*p + l`` is frequency ``(k, l)``. ``G = 1`` for the DCT; ``G = 2`` for the DFT
    (real part, imaginary part). ``basis``: :func:`window_basis` ``(p, transform)``, e.g. a buffer on
    ``x``'s device; ``None`` builds it.
    """
    basis = _basis_for(x, basis, p, transform)  # (G, p*p, p*p)
    windows = to_windows(x, p)  # (B, h, w, p*p, D)
    return torch.stack([k @ windows for k in basis], dim=1)


def window_inverse(
    y: torch.Tensor,
    p: int,
    size: tuple[int, int],
    transform: str = "dct",
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`window_transform` (real output), cropped to ``size = (H, W)``.

    Shape: ``(B, G, h, w, p*p, D) -> (B, H, W, D)``. For the DFT the inverse of ``Re + i Im`` is
    ``Kr^T Re + Ki^T Im`` (the basis is unitary), so the two parts recombine into a real grid.
    """
    basis = _basis_for(y, basis, p, transform)  # (G, p*p, p*p)
    windows = sum(k.T @ y[:, g] for g, k in enumerate(basis))
    return from_windows(windows, p, size)


def sliding_basis(q: int, transform: str = "dct", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``Q x Q`` basis images of a 2-D transform, as convolution kernels.

    Coefficient ``(k, l)`` of a window ``X`` is ``sum_ab K[g, k*Q + l, a, b] * X[a, b]``.
    Shape: ``(G, Q*Q, Q, Q)`` with ``G = 1`` for the DCT and ``G = 2`` (real part, imaginary part) for the DFT.
    """
    if transform == "dct":
        c = dct_matrix(q, torch.float64)
        basis = torch.einsum("ka,lb->klab", c, c).reshape(1, q * q, q, q)
    elif transform == "fft":
        a = torch.arange(q, dtype=torch.float64)
        # DFT with norm="ortho": F[k, l] = 1/Q * sum_ab X[a, b] exp(-2 pi i (k a + l b) / Q)
        phase = (
            2
            * math.pi
            * (
                a[:, None, None, None] * a[None, None, :, None]
                + a[None, :, None, None] * a[None, None, None, :]
            )
            / q
        )
        # phase[k, l, a, b] = 2 pi (k a + l b) / Q
        real = torch.cos(phase) / q
        imag = -torch.sin(phase) / q
        basis = torch.stack([real.reshape(q * q, q, q), imag.reshape(q * q, q, q)])
    else:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    return basis.to(dtype)


def sliding_coefficients(
    x: torch.Tensor, q: int, transform: str = "dct", basis: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ``Q x Q`` transform centred at every token (stride 1, replicate padding).

    Shape: ``(B, D, H, W) -> (B, G, D, Q*Q, H, W)``; ``G`` as in :func:`sliding_basis`.
    Computed as a depthwise convolution with the basis images, which equals unfolding the
    neighbourhoods and transforming each one. ``basis``: :func:`sliding_basis` ``(q, transform)``,
    e.g. a buffer on ``x``'s device; ``None`` builds it.
    """
    b, d, h, w = x.shape
    basis = sliding_basis(q, transform, x.dtype).to(x.device) if basis is None else basis.to(x.dtype)
    # basis: (G, Q*Q, Q, Q)
    g = basis.shape[0]
    xp = F.pad(x, (q // 2, (q - 1) // 2, q // 2, (q - 1) // 2), mode="replicate")
    weight = basis.reshape(g * q * q, 1, q, q).repeat(d, 1, 1, 1)  # (D*G*Q*Q, 1, Q, Q)
    y = F.conv2d(xp, weight, groups=d)  # (B, D*G*Q*Q, H, W)
    return y.reshape(b, d, g, q * q, h, w).transpose(1, 2)


def sliding_mean_kernel(q: int, transform: str = "dct", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed ``Q x Q`` filter equal to the signed mean of the sliding coefficients (summed over parts).

    The mean over the ``Q*Q`` coefficients is linear in the window, so it is one convolution.
    Shape: ``(Q, Q)``.
    """
    basis = sliding_basis(q, transform, torch.float64)
    return basis.mean(dim=1).sum(dim=0).to(dtype)
