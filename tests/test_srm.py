"""SRM residuals: the torch and numpy functions against scipy's correlation, and one kernel checked by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from morphfuse import srm


def _reference(x: np.ndarray) -> np.ndarray:
    """scipy: correlate each channel with each kernel (zero padding), sum over R, G, B, clip to [-3, 3]."""
    k = srm.srm_kernels()
    out = np.zeros((x.shape[0], 3) + x.shape[2:])
    for b in range(x.shape[0]):
        for o in range(3):
            out[b, o] = sum(ndimage.correlate(x[b, c], k[o, c], mode="constant", cval=0.0) for c in range(3))
    return np.clip(out, -3, 3)


def test_kernels_as_specified():
    k = srm.srm_kernels()
    assert k.shape == (3, 3, 5, 5) and k.dtype == np.float64
    for o in range(3):  # the same kernel on R, G and B
        assert np.array_equal(k[o, 0], k[o, 1]) and np.array_equal(k[o, 0], k[o, 2])
    kb, kv, kh = k[0, 0], k[1, 0], k[2, 0]
    assert kb[2, 2] == -1.0 and kb[1, 2] == 0.5 and kb[1, 1] == -0.25 and kb[0].sum() == 0 and kb[:, 0].sum() == 0
    assert kv[2, 2] == -1.0 and kv[0, 0] == -1 / 12 and kv[1, 2] == 8 / 12
    assert np.array_equal(kh[2], [0, 0.5, -1, 0.5, 0]) and np.count_nonzero(kh) == 3
    for kern in (kb, kv, kh):  # high-pass: a constant image gives zero
        assert abs(kern.sum()) < 1e-15
    k[0, 0, 0, 0] = 99.0  # a copy: the module's kernels are untouched
    assert srm.srm_kernels()[0, 0, 0, 0] == 0.0


def test_hand_computed_value():
    """A 7×7 image, channel G only, value 1 at (3,3) and 0.5 at (3,4); out 2 at (3,3): (0 − 2·1 + 0.5)/2."""
    x = np.zeros((1, 3, 7, 7))
    x[0, 1, 3, 3], x[0, 1, 3, 4] = 1.0, 0.5
    expected_h = (0.0 - 2 * 1.0 + 0.5) / 2  # = -0.75
    expected_kv = (-12 * 1.0 + 8 * 0.5) / 12  # centre weight on (3,3), right neighbour weight on (3,4)
    got_t = srm.srm_residuals(torch.from_numpy(x))[0].numpy()
    got_n = srm.srm_residuals_np(x)[0]
    for got in (got_t, got_n):
        assert got[2, 3, 3] == pytest.approx(expected_h)
        assert got[1, 3, 3] == pytest.approx(expected_kv)
    # a unit impulse in one channel gives each (symmetric) kernel itself around it
    impulse = np.zeros((1, 3, 7, 7))
    impulse[0, 2, 3, 3] = 1.0
    np.testing.assert_allclose(srm.srm_residuals(torch.from_numpy(impulse))[0, :, 1:6, 1:6].numpy(),
                               srm.srm_kernels()[:, 2], atol=1e-15)


@pytest.mark.parametrize("shape", [(2, 3, 23, 17), (1, 3, 5, 9)])
def test_matches_scipy(shape):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=shape) * 2.5  # large enough that the clamp is exercised
    ref = _reference(x)
    assert (np.abs(ref) == 3).any() and (np.abs(ref) < 3).any()
    got_t = srm.srm_residuals(torch.from_numpy(x)).numpy()
    assert got_t.dtype == np.float64 and got_t.shape == shape
    np.testing.assert_allclose(got_t, ref, atol=1e-12)
    np.testing.assert_allclose(srm.srm_residuals_np(x), ref, atol=1e-12)
    np.testing.assert_allclose(srm.srm_residuals_np(x[0]), ref[0], atol=1e-12)  # (3, H, W) too
    got32 = srm.srm_residuals(torch.from_numpy(x.astype(np.float32)))
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), ref, atol=1e-5)


def test_dtype_autocast_and_errors():
    x = torch.rand(1, 3, 12, 12) * 2 - 1
    ref = srm.srm_residuals(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = srm.srm_residuals(x)
    assert got.dtype == torch.float32 and torch.equal(got, ref)  # autocast does not reach it
    assert srm.srm_residuals(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        srm.srm_residuals(x[0])
    with pytest.raises(TypeError):
        srm.srm_residuals((x * 100).to(torch.uint8))


def test_cache_built_under_inference_mode_serves_autograd():
    srm._weight.cache_clear()
    with torch.inference_mode():
        srm.srm_residuals(torch.rand(1, 3, 8, 8))
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    srm.srm_residuals(x).sum().backward()
    assert x.grad is not None
