"""Perturbations of the robustness sweep: what an image goes through when it is re-uploaded, resized or filtered.

Pure functions on H×W×3 uint8 RGB arrays, each returning an array of the same size (so ground-truth masks stay
valid: the only geometric one, ``downscale``, resizes back to the original size):

- ``jpeg:Q``       re-encode as baseline JPEG at quality Q (Pillow/libjpeg, 4:2:0 chroma subsampling as Pillow's
                   default, the path most uploads take), decode again;
- ``downscale:F``  shrink by F with area averaging, then back up to the original size bilinearly;
- ``blur:S``       Gaussian blur with standard deviation S px (kernel 2·⌈3S⌉+1, border reflected);
- ``noise:S``      add Gaussian noise of standard deviation S on the 0–255 scale, rounded and clipped;
- ``none``         the image itself.

Noise is seeded per image (:func:`image_seed`: the run's seed, the perturbation and the image id), so a rerun gives
the same bytes. IMDL-BenCo's robustness protocol and DeepfakeBench use the same families (JPEG, Gaussian blur,
Gaussian noise, resizing).
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .errors import UserError

KINDS = ("none", "jpeg", "downscale", "blur", "noise")
# What a level means, and its valid range, per kind.
LEVELS = {
    "jpeg": ("quality", 1, 100),
    "downscale": ("factor", 0.01, 1.0),
    "blur": ("sigma (px)", 0.01, 100.0),
    "noise": ("sigma (0-255)", 0.0, 255.0),
}


@dataclass(frozen=True)
class Perturbation:
    kind: str
    level: float | None = None

    @property
    def id(self) -> str:
        """File-name-safe id: ``none``, ``jpeg_90``, ``downscale_0.75``, ``blur_1``, ``noise_3``."""
        if self.kind == "none":
            return "none"
        return f"{self.kind}_{_level_text(self.level)}"

    @property
    def spec(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{_level_text(self.level)}"

    def __call__(self, rgb: np.ndarray, seed: int = 0) -> np.ndarray:
        return apply(rgb, self, seed)


def _level_text(level: float | None) -> str:
    v = float(level)
    return str(int(v)) if v.is_integer() else repr(v)


def parse(spec: str) -> Perturbation:
    """``"jpeg:90"`` / ``"jpeg_90"`` / ``"none"`` → :class:`Perturbation` (an error names what is allowed)."""
    text = str(spec).strip()
    if text == "none":
        return Perturbation("none")
    kind, sep, level = text.replace("_", ":", 1).partition(":")
    if kind not in LEVELS or not sep:
        raise UserError(f"perturbation {spec!r}: expected none or KIND:LEVEL with KIND one of "
                        f"{', '.join(LEVELS)} (e.g. jpeg:70, downscale:0.5, blur:2, noise:7)")
    try:
        value = float(level)
    except ValueError:
        raise UserError(f"perturbation {spec!r}: level {level!r} is not a number") from None
    return check(Perturbation(kind, value))


def check(p: Perturbation) -> Perturbation:
    what, lo, hi = LEVELS[p.kind]
    if not (math.isfinite(p.level) and lo <= p.level <= hi):
        raise UserError(f"perturbation {p.spec}: the {what} must be in [{lo}, {hi}]")
    if p.kind == "jpeg" and not float(p.level).is_integer():
        raise UserError(f"perturbation {p.spec}: JPEG quality must be an integer")
    return p


def sweep(config_block: dict) -> list[Perturbation]:
    """The perturbations of ``evaluate.robustness`` (kind → levels), ``none`` first, in config order."""
    out = [Perturbation("none")]
    for kind, levels in (config_block or {}).items():
        if kind not in LEVELS:
            raise UserError(f"evaluate.robustness.{kind}: unknown perturbation (allowed: {', '.join(LEVELS)})")
        for level in levels:
            p = check(Perturbation(kind, float(level)))
            if p not in out:
                out.append(p)
    return out


def image_seed(seed: int, perturbation: Perturbation, image_id: str) -> int:
    """A 64-bit seed from the run's seed, the perturbation and the image (stable across processes and runs)."""
    h = hashlib.sha256(f"{int(seed)}\0{perturbation.id}\0{image_id}".encode()).digest()
    return int.from_bytes(h[:8], "little")


# ---------------------------------------------------------------------------------------------- the kinds
def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def downscale(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
    down = cv2.resize(rgb, small, interpolation=cv2.INTER_AREA)
    return cv2.resize(down, (w, h), interpolation=cv2.INTER_LINEAR)


def blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    k = 2 * int(math.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(rgb, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def noise(rgb: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n = rng.normal(0.0, sigma, rgb.shape)
    return np.clip(np.rint(rgb.astype(np.float64) + n), 0, 255).astype(np.uint8)


def apply(rgb: np.ndarray, p: Perturbation, seed: int = 0) -> np.ndarray:
    """``p`` applied to an H×W×3 uint8 image; ``seed`` feeds the noise (see :func:`image_seed`)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 image, got {rgb.shape} {rgb.dtype}")
    if p.kind == "none":
        return rgb.copy()
    if p.kind == "jpeg":
        return jpeg(rgb, int(p.level))
    if p.kind == "downscale":
        return downscale(rgb, float(p.level))
    if p.kind == "blur":
        return blur(rgb, float(p.level))
    if p.kind == "noise":
        return noise(rgb, float(p.level), np.random.default_rng(seed))
    raise ValueError(f"unknown perturbation kind {p.kind!r}")
