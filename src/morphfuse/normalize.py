"""The input normalisation of each network, in one place: the models apply it on the fly and the feature stage
applies it before precomputing SRM residuals and DCT bands, so both paths see the same numbers."""
from __future__ import annotations

import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # = timm IMAGENET_DEFAULT_*


def lfdl_input(rgb01: torch.Tensor) -> torch.Tensor:
    """LFDL network input (LFDL.md): ``(rgb − 0.5) / 0.5`` in [-1, 1]."""
    return (rgb01 - 0.5) / 0.5


def mitl_input(rgb01: torch.Tensor) -> torch.Tensor:
    """MITL network input (MITL.md): ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, device=rgb01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=rgb01.device).view(1, 3, 1, 1)
    return (rgb01 - mean) / std
