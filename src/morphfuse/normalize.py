"""The input normalisation of each network, in one place: the models apply it on the fly and the feature stage
applies it before precomputing SRM residuals and DCT bands, so both paths see the same numbers."""
from __future__ import annotations

import contextlib
import functools

import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # = timm IMAGENET_DEFAULT_*


def lfdl_input(rgb01: torch.Tensor) -> torch.Tensor:
    """LFDL network input (LFDL.md): ``(rgb − 0.5) / 0.5`` in [-1, 1]."""
    return (rgb01 - 0.5) / 0.5


@functools.lru_cache(maxsize=16)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) float32 on ``device``, built once: a ``torch.tensor(..., device=cuda)``
    per forward is a host-to-device copy that waits for every kernel queued before it."""
    with torch.inference_mode(False):  # a cached normal tensor, even when first built under inference_mode
        return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def mitl_input(rgb01: torch.Tensor) -> torch.Tensor:
    """MITL network input (MITL.md): ImageNet mean/std."""
    mean, std = _imagenet_stats(rgb01.device)
    return (rgb01 - mean) / std


def no_autocast(device_type: str):
    """Autocast off where the device type has autocast (not on the meta device, used for shape/FLOP counting): the
    SRM and DCT inputs are computed in float32 even inside a mixed-precision forward."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
