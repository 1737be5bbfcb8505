"""MDMF: fuse the LFDL and MITL masks by morphology (SYSTEM.md, paper section 3.5): pure functions on arrays. The
stage that applies them to folders of masks is ``morphfuse fuse`` (:mod:`morphfuse.stages.fuse`).

Both masks are stored probability maps (uint8, ``v = round(255·p)``) at the original image size, binarised as
``v / 255 >= threshold`` (:func:`morphfuse.imageio.binarize_prob_u8`), then fused by the chosen variant:

  lfdl        M_LFDL
  mitl        M_MITL
  naive_or    M_LFDL ∪ M_MITL
  mdmf        dilate(M_LFDL, B) ∪ erode(M_MITL, B)              (the paper)
  closing_or  closing(M_LFDL, B) ∪ closing(M_MITL, B)           (the authors' released code)

B is a k×k square of ones (k odd, 5 by default); dilation and erosion follow OpenCV's border rule: the image border
neither dilates nor erodes a mask.
"""
from __future__ import annotations

import cv2
import numpy as np

from .imageio import binarize_prob_u8

VARIANTS = ("lfdl", "mitl", "naive_or", "mdmf", "closing_or")



# ------------------------------------------------------------------------------------------- pure functions
def check_kernel(kernel) -> int:
    """Validate a structuring-element side: an odd integer >= 1. Returns it as ``int``."""
    if isinstance(kernel, bool) or not isinstance(kernel, (int, np.integer)):
        raise ValueError(f"kernel must be an odd integer >= 1, got {kernel!r} ({type(kernel).__name__})")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd integer >= 1 (3, 5, 7, ...), got {kernel}")
    return int(kernel)


def _structuring_element(kernel: int) -> np.ndarray:
    return np.ones((check_kernel(kernel),) * 2, np.uint8)


def _as_u8(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == bool:
        return mask.view(np.uint8)
    if mask.dtype != np.uint8:
        raise ValueError(f"a mask must be bool or uint8, got {mask.dtype}")
    return mask


def dilate(mask: np.ndarray, kernel: int = 5) -> np.ndarray:
    """Dilation by a k×k square, OpenCV border rule (pixels outside the image never switch a pixel on)."""
    out = cv2.dilate(_as_u8(mask), _structuring_element(kernel))
    return out.view(bool) if mask.dtype == bool else out


def erode(mask: np.ndarray, kernel: int = 5) -> np.ndarray:
    """Erosion by a k×k square, OpenCV border rule (pixels outside the image never switch a pixel off)."""
    out = cv2.erode(_as_u8(mask), _structuring_element(kernel))
    return out.view(bool) if mask.dtype == bool else out


def closing(mask: np.ndarray, kernel: int = 5) -> np.ndarray:
    """Closing: dilation then erosion by the same k×k square (``cv2.MORPH_CLOSE``)."""
    return erode(dilate(mask, kernel), kernel)


def _fuse_u8(lfdl_u8: np.ndarray, mitl_u8: np.ndarray, variant: str, kernel: int, threshold: float) -> np.ndarray:
    """The fused mask as uint8 0/255 (what the CLI writes)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown fusion variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    check_kernel(kernel)
    if lfdl_u8.shape != mitl_u8.shape:
        raise ValueError(f"the LFDL mask is {lfdl_u8.shape[1]}x{lfdl_u8.shape[0]} but the MITL mask is "
                         f"{mitl_u8.shape[1]}x{mitl_u8.shape[0]}: both must be at the original image size")
    if variant == "lfdl":
        return binarize_prob_u8(lfdl_u8, threshold)
    if variant == "mitl":
        return binarize_prob_u8(mitl_u8, threshold)
    a = binarize_prob_u8(lfdl_u8, threshold)
    b = binarize_prob_u8(mitl_u8, threshold)
    if variant == "mdmf":
        a, b = dilate(a, kernel), erode(b, kernel)
    elif variant == "closing_or":
        a, b = closing(a, kernel), closing(b, kernel)
    return cv2.bitwise_or(a, b)


def fuse_masks(lfdl_u8: np.ndarray, mitl_u8: np.ndarray, variant: str, kernel: int = 5,
               threshold: float = 0.5) -> np.ndarray:
    """Fuse two stored probability masks (uint8 H×W, ``v = round(255·p)``) into one boolean mask.

    ``variant`` is one of :data:`VARIANTS`; both masks must have the same size (else ``ValueError``).
    """
    return _fuse_u8(lfdl_u8, mitl_u8, variant, kernel, threshold) != 0
