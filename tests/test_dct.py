"""FEIR DCT bands: the low-rank projector form against scipy's FFT DCT with the same coefficient masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import fft

from morphfuse import dct


def _masks(h: int, w: int, low_band: str) -> tuple[np.ndarray, np.ndarray]:
    """Coefficient masks written from MITL.md's words, independently of the module's helpers."""
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    high = ~((rows < int(np.floor(0.05 * h))) & (cols < int(np.floor(0.05 * w))))
    r, c = rows < h - int(np.floor(0.95 * h)), cols < w - int(np.floor(0.95 * w))
    low = (r | c) if low_band == "l_shape" else (r & c)
    return high, low


def _reference(x: np.ndarray, low_band: str, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    X = fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))
    mh, ml = _masks(*x.shape[-2:], low_band)
    bands = [fft.idctn(X * m, type=2, norm="ortho", axes=(-2, -1)) for m in (mh, ml)]
    if normalize:
        out = []
        for b in bands:
            mn = b.min(axis=(1, 2, 3), keepdims=True)
            rng = b.max(axis=(1, 2, 3), keepdims=True) - mn
            const = rng < 1e-9  # a constant band (e.g. DC only) is all zeros, not 0/0
            out.append(np.where(const, 0.0, (b - mn) / np.where(const, 1.0, rng)))
        bands = out
    return bands[0], bands[1]


def test_dct_matrix_is_scipys_orthonormal_dct():
    for n in (1, 2, 7, 32):
        d = dct.dct_matrix(n)
        np.testing.assert_allclose(d, fft.dct(np.eye(n), type=2, norm="ortho", axis=0), atol=1e-14)
        np.testing.assert_allclose(d @ d.T, np.eye(n), atol=1e-13)
    assert dct.dct_matrix(16) is dct.dct_matrix(16)  # cached
    assert not dct.dct_matrix(16).flags.writeable


def test_band_sizes():
    assert (dct.high_cut(512), dct.low_cut(512)) == (25, 26)  # MITL.md: 25×25 block, r = 26 at 512
    for n in range(1, 3000):
        assert dct.high_cut(n) == int(0.05 * n) and dct.low_cut(n) == n - int(0.95 * n)


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 72, 50), (2, 2, 41, 97), (1, 1, 3, 5)])
@pytest.mark.parametrize("low_band", ["l_shape", "square"])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_scipy(shape, low_band, normalize):
    rng = np.random.default_rng(abs(hash((shape, low_band))) % 2**32)
    x = rng.standard_normal(shape) + np.linspace(0, 3, shape[-1])  # some low-frequency content too
    ref_h, ref_l = _reference(x, low_band, normalize)
    # float64: torch (batched) and numpy (batched and single sample)
    th, tl = dct.dct_bands(torch.from_numpy(x), low_band, normalize=normalize)
    assert th.dtype == torch.float64 and th.shape == shape
    np.testing.assert_allclose(th.numpy(), ref_h, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tl.numpy(), ref_l, atol=1e-6, rtol=0)
    nh, nl = dct.dct_bands_np(x, low_band, normalize=normalize)
    np.testing.assert_allclose(nh, ref_h, atol=1e-6, rtol=0)
    np.testing.assert_allclose(nl, ref_l, atol=1e-6, rtol=0)
    sh, sl = dct.dct_bands_np(x[0], low_band, normalize=normalize)
    np.testing.assert_allclose(sh, ref_h[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(sl, ref_l[0], atol=1e-6, rtol=0)
    # float32: 1e-3 of the band's range
    x32 = x.astype(np.float32)
    for got, ref in zip(dct.dct_bands(torch.from_numpy(x32), low_band, normalize=normalize), (ref_h, ref_l)):
        assert got.dtype == torch.float32
        assert np.abs(got.numpy() - ref).max() <= 1e-3 * np.abs(ref).max()
    for got, ref in zip(dct.dct_bands_np(x32, low_band, normalize=normalize), (ref_h, ref_l)):
        assert got.dtype == np.float32
        assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def test_exact_at_paper_size():
    """512×512 (the paper's size), one channel, both low bands: 1e-12 in float64."""
    x = np.random.default_rng(3).standard_normal((1, 1, 512, 512))
    for low_band in dct.LOW_BANDS:
        ref_h, ref_l = _reference(x, low_band, normalize=False)
        h, lo = dct.dct_bands(torch.from_numpy(x), low_band, normalize=False)
        assert np.abs(h.numpy() - ref_h).max() < 1e-12 and np.abs(lo.numpy() - ref_l).max() < 1e-12


def test_normalised_range_and_constant_input():
    x = torch.randn(3, 3, 40, 32)
    x[1] = 0.7  # a constant image: both bands are rounding noise (high) or the constant (low) → zeros
    x[2] = -2.1
    h, lo = dct.dct_bands(x)
    for b in (h, lo):
        assert torch.isfinite(b).all()
        assert b[0].min() == 0 and b[0].max() == pytest.approx(1.0)
        assert torch.count_nonzero(b[1:]) == 0
    nh, nl = dct.dct_bands_np(x.double().numpy())
    assert np.count_nonzero(nh[1:]) == 0 and np.count_nonzero(nl[1:]) == 0
    np.testing.assert_allclose(nh[0], h[0].numpy(), atol=1e-5)


def test_half_types_autocast_and_errors():
    x = torch.randn(2, 3, 24, 24)
    ref_h, ref_l = dct.dct_bands(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, lo = dct.dct_bands(x)
    assert h.dtype == torch.float32 and torch.equal(h, ref_h) and torch.equal(lo, ref_l)
    hb, lb = dct.dct_bands(x.bfloat16())
    assert hb.dtype == torch.bfloat16 and (hb.float() - ref_h).abs().max() < 0.05
    assert dct.dct_bands(x[:0])[0].shape == (0, 3, 24, 24)
    assert dct.dct_bands_np(x[:0].numpy())[1].shape == (0, 3, 24, 24)
    with pytest.raises(ValueError, match="low_band"):
        dct.dct_bands(x, "round")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        dct.dct_bands(x[0])
    with pytest.raises(ValueError, match="low_band"):
        dct.dct_bands_np(x.numpy(), "round")


def test_cache_built_under_inference_mode_serves_autograd():
    """Bands cached while precomputing (inference_mode) still work, with gradients, in a training process."""
    with torch.inference_mode():
        dct.dct_bands(torch.rand(1, 3, 33, 35))
    y = torch.rand(1, 3, 33, 35, requires_grad=True)
    h, lo = dct.dct_bands(y)
    (h.sum() + lo.sum()).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
    h2, l2 = dct.dct_bands(y.detach())
    assert torch.equal(h.detach(), h2) and torch.equal(lo.detach(), l2)  # in-place and autograd paths agree
