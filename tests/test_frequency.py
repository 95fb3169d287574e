"""DCT/DFT helpers against scipy and against explicit window-by-window references."""

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F

from feclip.models.frequency import (
    dct2,
    dct_matrix,
    idct2,
    sliding_basis,
    sliding_coefficients,
    sliding_mean_kernel,
    window_inverse,
    window_transform,
)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_dct_matrix_is_orthonormal_and_equals_scipy(n):
    c = dct_matrix(n, torch.float64)
    assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    ref = scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)  # column j = DCT of e_j
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-12)


def test_dct2_equals_scipy_dctn_and_idct2_inverts():
    x = torch.randn(4, 7, 3, 3, dtype=torch.float64)
    ref = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(dct2(x).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(idct2(dct2(x)).numpy(), x.numpy(), atol=1e-12)
    # non-square windows too
    y = torch.randn(2, 3, 5, dtype=torch.float64)
    np.testing.assert_allclose(
        dct2(y).numpy(), scipy.fft.dctn(y.numpy(), norm="ortho", axes=(-2, -1)), atol=1e-12
    )


def test_signed_mean_filter_matches_the_spec_numbers():
    # docs/method.md, A3 (the signed mean is a fixed linear filter): w = C^T 1 = [1.6927, -0.2391, 0.2785]; kernel = w w^T / 9, sum 1/3, corner 0.318
    w = dct_matrix(3, torch.float64).sum(0)
    np.testing.assert_allclose(w.numpy(), [1.6927, -0.2391, 0.2785], atol=1e-4)
    k = sliding_mean_kernel(3, "dct", torch.float64)
    np.testing.assert_allclose(k.numpy(), np.outer(w, w) / 9, atol=1e-12)
    assert abs(k.sum().item() - 1 / 3) < 1e-12
    assert abs(k[0, 0].item() - 0.3184) < 1e-4


@pytest.mark.parametrize("transform", ["dct", "fft"])
@pytest.mark.parametrize("hw", [(6, 6), (7, 5), (24, 24), (37, 37)])
def test_window_transform_shapes_and_inverse(transform, hw):
    x = torch.randn(2, *hw, 4, dtype=torch.float64)
    y = window_transform(x, 3, transform)
    groups = 1 if transform == "dct" else 2
    assert y.shape == (2, groups, -(-hw[0] // 3), -(-hw[1] // 3), 9, 4)
    back = window_inverse(y, 3, hw, transform)
    assert back.shape == x.shape
    assert torch.allclose(back, x, atol=1e-10)


@pytest.mark.parametrize("transform", ["dct", "fft"])
def test_window_transform_is_per_window_transform_with_replicate_padding(transform):
    x = torch.randn(1, 5, 4, 2, dtype=torch.float64)
    y = window_transform(x, 3, transform)
    padded = x[:, [0, 1, 2, 3, 4, 4]][:, :, [0, 1, 2, 3, 3, 3]]  # replicate bottom/right to 6 x 6
    for i in range(2):
        for j in range(2):
            for d in range(2):
                win = padded[0, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3, d].numpy()
                if transform == "dct":
                    np.testing.assert_allclose(
                        y[0, 0, i, j, :, d].numpy(), scipy.fft.dctn(win, norm="ortho").ravel(), atol=1e-12
                    )
                else:
                    ref = np.fft.fft2(win, norm="ortho").ravel()
                    np.testing.assert_allclose(y[0, 0, i, j, :, d].numpy(), ref.real, atol=1e-12)
                    np.testing.assert_allclose(y[0, 1, i, j, :, d].numpy(), ref.imag, atol=1e-12)


def _unfold_reference(x, q, fn):
    """Explicit neighbourhoods: pad replicate, take every q x q patch, transform it."""
    b, d, h, w = x.shape
    xp = F.pad(x, (q // 2, (q - 1) // 2, q // 2, (q - 1) // 2), mode="replicate")
    out = torch.empty(b, d, q * q, h, w, dtype=torch.complex128)
    for i in range(h):
        for j in range(w):
            patch = xp[:, :, i : i + q, j : j + q]
            out[:, :, :, i, j] = fn(patch).reshape(b, d, q * q)
    return out


@pytest.mark.parametrize("q", [3, 4])
def test_sliding_dct_equals_unfold_then_dct(q):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    got = sliding_coefficients(x, q, "dct")
    assert got.shape == (2, 1, 3, q * q, 6, 5)
    ref = _unfold_reference(x, q, dct2).real
    assert torch.allclose(got[:, 0], ref, atol=1e-10)
    # the signed mean is the fixed filter
    mean_ref = ref.mean(2)
    xp = F.pad(x, (q // 2, (q - 1) // 2, q // 2, (q - 1) // 2), mode="replicate")
    k = sliding_mean_kernel(q, "dct", torch.float64).expand(3, 1, q, q)
    assert torch.allclose(F.conv2d(xp, k, groups=3), mean_ref, atol=1e-10)


def test_sliding_fft_equals_unfold_then_fft2():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    got = sliding_coefficients(x, 3, "fft")
    ref = _unfold_reference(x, 3, lambda p: torch.fft.fft2(p, norm="ortho"))
    assert torch.allclose(got[:, 0], ref.real, atol=1e-10)
    assert torch.allclose(got[:, 1], ref.imag, atol=1e-10)
    assert sliding_basis(3, "fft").shape == (2, 9, 3, 3)


def test_unknown_transform_is_refused():
    with pytest.raises(ValueError, match="transform must be one of"):
        window_transform(torch.zeros(1, 3, 3, 1), 3, "wavelet")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv2d_nhwc_equals_conv2d(k):
    from feclip.models.adapters import conv2d_nhwc

    conv = torch.nn.Conv2d(6, 4, k, padding=k // 2).double()
    x = torch.randn(2, 7, 5, 6, dtype=torch.float64)
    ref = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.allclose(conv2d_nhwc(x, conv), ref, atol=1e-12)


def test_filter2d_nhwc_equals_depthwise_conv_with_replicate_padding():
    from feclip.models.adapters import filter2d_nhwc

    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    k = torch.randn(3, 3, dtype=torch.float64)
    xp = F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate")
    ref = F.conv2d(xp, k.expand(3, 1, 3, 3), groups=3).permute(0, 2, 3, 1)
    assert torch.allclose(filter2d_nhwc(x, k), ref, atol=1e-12)
