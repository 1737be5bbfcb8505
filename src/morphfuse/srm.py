"""SRM noise residuals: the fixed (not learned) input of LFDL's second stream (LFDL.md, "SRM stream input").

Three 5×5 high-pass kernels, each applied to R, G and B and summed over the three, give 3 residual maps; stride 1,
zero padding 2 (as ``conv2d``), clamped to [-3, 3]:

- out 0, KB: the 3×3 second-order kernel ``[[-1,2,-1],[2,-4,2],[-1,2,-1]]`` zero-padded to 5×5, divided by 4;
- out 1, KV: the 5×5 "square" kernel, divided by 12;
- out 2: the horizontal second-order kernel ``[1,-2,1]`` in the centre row of a 5×5, divided by 2.

The input is the LFDL network input, already normalised to [-1, 1] (``(rgb - 0.5) / 0.5``). Pure functions: the
torch one is what the model calls on the fly and what ``morphfuse features`` stores in precompute mode; the numpy
one is an independent implementation (shifted sums) for tools and tests.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .normalize import no_autocast



CLAMP = 3.0
PADDING = 2

_KB = np.zeros((5, 5))
_KB[1:4, 1:4] = [[-1, 2, -1], [2, -4, 2], [-1, 2, -1]]
_KB /= 4.0
_KV = np.array([[-1, 2, -2, 2, -1],
                [2, -6, 8, -6, 2],
                [-2, 8, -12, 8, -2],
                [2, -6, 8, -6, 2],
                [-1, 2, -2, 2, -1]], dtype=np.float64) / 12.0
_KH = np.zeros((5, 5))
_KH[2, 1:4] = [1, -2, 1]
_KH /= 2.0
_BASE = np.stack([_KB, _KV, _KH])  # (3, 5, 5): one kernel per output map
_BASE.setflags(write=False)


def srm_kernels() -> np.ndarray:
    """The conv2d weight, ``(out=3, in=3, 5, 5)`` float64: out-channel k is kernel k on each of R, G, B (summed).

    A fresh copy: callers may modify it.
    """
    return np.repeat(_BASE[:, None], 3, axis=1).copy()


@functools.lru_cache(maxsize=16)
def _weight(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # a cached normal tensor, even when first built under inference_mode
        return torch.as_tensor(srm_kernels(), dtype=dtype, device=device)


def srm_residuals(x: torch.Tensor) -> torch.Tensor:
    """SRM residuals of a ``(B, 3, H, W)`` float tensor normalised to [-1, 1]; returns ``(B, 3, H, W)``, dtype of ``x``.

    Always computed in at least float32 with autocast disabled, so that under bf16 autocast the on-the-fly residuals
    still equal the precomputed float ones (these kernels cancel large terms); float64 input stays float64.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"srm_residuals expects a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"srm_residuals expects a float tensor normalised to [-1, 1], got {x.dtype}")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    with no_autocast(x.device.type):
        out = F.conv2d(work, _weight(work.device, work.dtype), stride=1, padding=PADDING)
        out = out.clamp_(-CLAMP, CLAMP)
    return out.to(x.dtype)


def srm_residuals_np(x: np.ndarray) -> np.ndarray:
    """numpy SRM residuals of ``(3, H, W)`` or ``(B, 3, H, W)``, same shape out; float32/float64 kept, else float64."""
    x = np.asarray(x)
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"srm_residuals_np expects (3, H, W) or (B, 3, H, W), got shape {x.shape}")
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    s = x.astype(dtype, copy=False).sum(axis=-3)  # the three kernels are the same for R, G, B: sum first
    h, w = s.shape[-2:]
    pad = [(0, 0)] * (s.ndim - 2) + [(PADDING, PADDING), (PADDING, PADDING)]
    sp = np.pad(s, pad)
    out = np.zeros(s.shape[:-2] + (3, h, w), dtype=dtype)
    for k in range(3):
        acc = out[..., k, :, :]
        for i in range(5):
            for j in range(5):
                c = _BASE[k, i, j]
                if c != 0.0:
                    acc += dtype.type(c) * sp[..., i:i + h, j:j + w]  # correlation, as conv2d
    return np.clip(out, -CLAMP, CLAMP, out=out)
