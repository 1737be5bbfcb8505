"""FEIR frequency bands of MITL: a full-image orthonormal DCT-II split into high and low bands (MITL.md, FEIR).

Definitions, per channel of an ``H×W`` image ``x``, with ``D_N`` the orthonormal DCT-II matrix
(``D[k, n] = a_k cos(pi (2n+1) k / 2N)``, ``a_0 = sqrt(1/N)``, ``a_k = sqrt(2/N)``), ``X = D_H x D_Wᵀ`` and
``x = D_Hᵀ X D_W``:

- high: zero the top-left ``a×b`` block of ``X``, ``a = ⌊0.05 H⌋``, ``b = ⌊0.05 W⌋``, transform back;
- low, ``"l_shape"`` (as released): keep the coefficients with ``row < rH`` OR ``col < rW``,
  ``rH = H − ⌊0.95 H⌋``, ``rW = W − ⌊0.95 W⌋`` (i.e. zero the bottom-right ``⌊0.95H⌋×⌊0.95W⌋`` block);
- low, ``"square"`` (the paper's words): keep ``row < rH`` AND ``col < rW``.
The floors are taken in exact integer arithmetic (``⌊0.95 H⌋ = 95 H // 100``); they agree with the float
expressions ``int(0.95 * H)`` for every H below 5000.

Neither band needs the full transform. With ``A_r = D[:r]`` (the first r basis vectors, ``r×N``) and the projector
``P_r = A_rᵀ A_r``, a coefficient mask that is a product of a row and a column indicator becomes
``D_Hᵀ (1[row<r] 1[col<s] ⊙ X) D_W = P_r^H x P_s^W``, so

    high    = x − P_a^H x P_b^W
    l_shape = P_rH^H x + x P_rW^W − P_rH^H x P_rW^W        (indicator of a union: 1[r] + 1[c] − 1[r]1[c])
    square  = P_rH^H x P_rW^W

computed right to left through the thin factors (``V = x A_Wᵀ``, ``Z = A_H V``; l_shape =
``A_Hᵀ (A_H x − Z A_W) + V A_W``): about ``5·r·H·W`` multiply-adds per channel for both bands (r ≈ 0.05 N)
instead of the ``3·H·W·(H+W)`` of one forward and two inverse full transforms, 24× fewer at 512×512.
Exact up to rounding (1e-13 in float64).

Each band is then min-max normalised to [0, 1] per sample over (C, H, W). A constant band (range below
``1e3·eps·max(1, max|x|)``, i.e. rounding noise of a constant input) becomes all zeros instead of amplified noise.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .normalize import no_autocast



LOW_BANDS = ("l_shape", "square")


# ------------------------------------------------------------------------------------------------ band geometry
def high_cut(n: int) -> int:
    """Side of the zeroed top-left block along an axis of length n: ``⌊0.05 n⌋``."""
    return (5 * n) // 100


def low_cut(n: int) -> int:
    """Number of leading coefficients kept by the low band along an axis of length n: ``n − ⌊0.95 n⌋``."""
    return n - (95 * n) // 100


@functools.lru_cache(maxsize=32)
def _dct_matrix_cached(n: int) -> np.ndarray:
    k = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    d = np.cos(math.pi * (2.0 * i + 1.0) * k / (2.0 * n)) * math.sqrt(2.0 / n)
    d[0, :] = math.sqrt(1.0 / n)
    d.setflags(write=False)
    return d


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``D_n`` (n×n float64, read-only, cached): ``X = D x`` for a length-n signal."""
    if n < 1:
        raise ValueError(f"dct_matrix: size must be a positive integer, got {n}")
    return _dct_matrix_cached(int(n))


def _check_low_band(low_band: str) -> None:
    if low_band not in LOW_BANDS:
        raise ValueError(f"low_band must be one of {LOW_BANDS}, got {low_band!r}")


# ------------------------------------------------------------------------------------------------------- torch
@functools.lru_cache(maxsize=64)
def _basis(n: int, r: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, Aᵀ)`` with ``A = D_n[:r]`` on ``device``/``dtype``, both contiguous."""
    with torch.inference_mode(False):  # a cached normal tensor, even when first built under inference_mode
        a = torch.tensor(dct_matrix(n)[:r], dtype=dtype, device=device)
        return a, a.t().contiguous()


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _tolerance(rng: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return 1e3 * torch.finfo(rng.dtype).eps * scale.clamp(min=1.0)


def _minmax_(band: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation of ``band`` (B, ...) to [0, 1], in place unless it requires grad.

    Constant samples (range within the rounding noise of an input of magnitude ``scale`` (B,)) become zeros."""
    flat = band.flatten(1)
    mn = flat.amin(dim=1)
    rng = flat.amax(dim=1) - mn
    ok = rng > _tolerance(rng, scale)
    inv = torch.where(ok, 1.0 / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(rng))
    view = (-1,) + (1,) * (band.ndim - 1)
    if band.requires_grad:  # keep autograd usable (nothing in the pipeline needs it, but a caller may)
        return band * inv.view(view) + (-mn * inv).view(view)
    return band.mul_(inv.view(view)).add_((-mn * inv).view(view))


def dct_bands(x: torch.Tensor, low_band: str = "l_shape", normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low DCT bands of ``x`` (B, C, H, W) (the ImageNet-normalised MITL input); each (B, C, H, W).

    ``normalize`` (default, as the model uses them): each band min-max normalised to [0, 1] per sample over
    (C, H, W). Works on any device; the result has the dtype of ``x`` (computed in float32 for half types, with
    autocast disabled, so that on-the-fly bands equal the precomputed ones).
    """
    _check_low_band(low_band)
    if x.ndim != 4:
        raise ValueError(f"dct_bands expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"dct_bands expects a float tensor, got {x.dtype}")
    shape = x.shape
    if x.numel() == 0:
        return x.new_zeros(shape), x.new_zeros(shape)
    h, w = shape[-2:]
    a, b = high_cut(h), high_cut(w)
    rh, rw = low_cut(h), low_cut(w)
    wd = _work_dtype(x.dtype)
    with no_autocast(x.device.type):
        xw = x.to(wd).contiguous()
        n = shape[0] * shape[1]
        x3 = xw.view(n, h, w)
        ah, aht = _basis(h, max(a, rh), xw.device, wd)    # A_H = D_H[:RH] and its transpose
        aw, awt = _basis(w, max(b, rw), xw.device, wd)
        v = torch.mm(x3.view(n * h, w), awt).view(n, h, awt.shape[1])  # V = x A_Wᵀ                     (n, H, RW)
        z = torch.matmul(ah, v)                                 # Z = A_H x A_Wᵀ, leading coeffs (n, RH, RW)
        # high = x − A_aᵀ (Z[:a, :b] A_b)
        high = torch.baddbmm(x3, aht[:, :a].expand(n, h, a), torch.matmul(z[:, :a, :b], aw[:b]), alpha=-1.0)
        zr = z[:, :rh, :rw]
        aht_r = aht[:, :rh].expand(n, h, rh)
        if low_band == "square":                                # A_Hᵀ Z_r A_W
            low = torch.bmm(aht_r, torch.matmul(zr, aw[:rw]))
        else:                                                   # A_Hᵀ (A_H x − Z_r A_W) + V A_W
            y = torch.matmul(ah[:rh], x3)
            vaw = torch.mm(v[:, :, :rw].reshape(n * h, rw), aw[:rw]).view(n, h, w)
            low = vaw.baddbmm_(aht_r, torch.baddbmm(y, zr, aw[:rw].expand(n, rw, w), alpha=-1.0))
        high = high.view(shape)
        low = low.view(shape)
        if normalize:
            flat = xw.flatten(1)
            scale = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1))
            high = _minmax_(high, scale)
            low = _minmax_(low, scale)
    return high.to(x.dtype), low.to(x.dtype)


# ------------------------------------------------------------------------------------------------------- numpy
def minmax_normalize_np(band: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Per-sample min-max normalisation of a ``(B, ...)`` array to [0, 1], as :func:`dct_bands` does; constant
    samples become zeros (``scale``: the input magnitude the tolerance is relative to, default the band's own)."""
    flat = band.reshape(band.shape[0], int(np.prod(band.shape[1:])))
    mn = flat.min(axis=1)
    rng = flat.max(axis=1) - mn
    if scale is None:
        scale = np.abs(flat).max(axis=1)
    tol = 1e3 * np.finfo(band.dtype).eps * np.maximum(scale, 1.0)
    ok = rng > tol
    view = (-1,) + (1,) * (band.ndim - 1)
    out = (band - mn.reshape(view)) / np.where(ok, rng, 1.0).astype(band.dtype).reshape(view)
    return out * ok.astype(band.dtype).reshape(view)


def dct_bands_np(x: np.ndarray, low_band: str = "l_shape", normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """numpy :func:`dct_bands` of ``(C, H, W)`` (one sample) or ``(B, C, H, W)``; float32/float64 kept, else float64."""
    _check_low_band(low_band)
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"dct_bands_np expects (C, H, W) or (B, C, H, W), got shape {x.shape}")
    single = x.ndim == 3
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    xw = x.astype(dtype, copy=False)[None] if single else x.astype(dtype, copy=False)
    if xw.size == 0:
        z = np.zeros(x.shape, dtype)
        return z, z.copy()
    h, w = xw.shape[-2:]
    a, b = high_cut(h), high_cut(w)
    rh, rw = low_cut(h), low_cut(w)
    ah = dct_matrix(h)[:max(a, rh)].astype(dtype)
    aw = dct_matrix(w)[:max(b, rw)].astype(dtype)
    v = xw @ aw.T
    z = ah @ v
    high = xw - ah[:a].T @ (z[..., :a, :b] @ aw[:b])
    zr = z[..., :rh, :rw]
    if low_band == "square":
        low = ah[:rh].T @ (zr @ aw[:rw])
    else:
        low = ah[:rh].T @ (ah[:rh] @ xw - zr @ aw[:rw]) + v[..., :rw] @ aw[:rw]
    if normalize:
        scale = np.abs(xw.reshape(xw.shape[0], -1)).max(axis=1)
        high = minmax_normalize_np(high, scale)
        low = minmax_normalize_np(low, scale)
    if single:
        return high[0], low[0]
    return high, low
