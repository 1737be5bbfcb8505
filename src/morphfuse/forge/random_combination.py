"""Random combination and "paste random" (the authors' release): hull-cut faces of other people pasted into a photo.

- ``random_combination``: the face of donor A (filled convex hull of its landmarks, cut out as an RGBA crop) is
  scaled to the largest face of target B (scale = max(w_B / w_A, h_B / h_A)), centred on B's face and alpha-pasted;
  the mask is the pasted hull, clipped to B.
- ``paste_random``: 1-3 hull-cut faces of other people are pasted at random positions inside B. Each is, with
  probability ``p_half`` (0.5), cut to a half face first (left or right half, or top or bottom half, all four
  equally likely), then scaled to a random ``scale`` (0.4-0.6) × the width of B's largest face; the mask is the
  union of the pasted hulls.

As released (``data_generate/paste_random``): the hull is the release's 81-point dlib model's, which reaches over
the forehead; with 68 points we extend it over the forehead (``forehead: true``, faces.landmarks.hull_mask); B's
face is the detector's box (``target_box: detector``; ``landmarks`` takes the box of B's 68 landmarks instead, the
previous behaviour). A pasted face is placed where it fits when it can; one wider or taller than B is clipped.

Donors come from a :class:`~morphfuse.forge.common.DonorPool`: same split as B, different identity (group),
and no two donors of one forgery show the same person. A's size is its hull's bounding box. The alpha is binary
(hard paste), so every mask pixel holds a donor pixel; a mask pixel keeps B's value only where the two photos
happen to agree in all three channels.
"""
from __future__ import annotations

from typing import Mapping

import cv2
import numpy as np

from .common import Donor, ForgeResult, Skip, has_landmarks, largest_face

DEFAULTS = {"forehead": True, "min_donors": 1, "max_donors": 3, "target_box": "detector",
            "scale": (0.4, 0.6), "p_half": 0.5}
TARGET_BOXES = ("detector", "landmarks")


def face_box(face, target_box: str = "landmarks") -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a face: the detector's box (``target_box="detector"``, as released), or its 68-landmark
    box when it has landmarks (``"landmarks"``)."""
    if target_box not in TARGET_BOXES:
        raise ValueError(f"target_box must be one of {', '.join(TARGET_BOXES)}, got {target_box!r}")
    if target_box == "landmarks" and has_landmarks(face):
        lm = np.asarray(face.landmarks, dtype=np.float64)[:68]
        return float(lm[:, 0].min()), float(lm[:, 1].min()), float(lm[:, 0].max()), float(lm[:, 1].max())
    return tuple(float(v) for v in face.box)


def hull_cut(rgb: np.ndarray, landmarks: np.ndarray, forehead: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """Cut the filled landmark hull out of ``rgb``: (crop H×W×3 uint8, alpha H×W bool) over the hull's bounding box."""
    from ..faces.landmarks import hull_mask

    hull = np.asarray(hull_mask(np.asarray(landmarks)[:68], rgb.shape[:2], forehead=forehead)) > 0
    ys, xs = np.nonzero(hull.any(axis=1))[0], np.nonzero(hull.any(axis=0))[0]
    if not len(ys):
        return None
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    return np.ascontiguousarray(rgb[y0:y1, x0:x1]), np.ascontiguousarray(hull[y0:y1, x0:x1])


def resize_cut(crop: np.ndarray, alpha: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = alpha.shape
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (nw, nh), interpolation=interp)
    alpha = cv2.resize(alpha.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
    return crop, alpha


def paste(dst: np.ndarray, mask: np.ndarray, crop: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    """Alpha-paste ``crop`` with top-left (x, y) into ``dst`` in place, clipped to ``dst``; ``mask`` |= pasted."""
    H, W = mask.shape
    h, w = alpha.shape
    ax0, ay0 = max(0, -x), max(0, -y)
    bx0, by0 = max(0, x), max(0, y)
    bx1, by1 = min(W, x + w), min(H, y + h)
    if bx1 <= bx0 or by1 <= by0:
        return
    a = alpha[ay0:ay0 + (by1 - by0), ax0:ax0 + (bx1 - bx0)]
    c = crop[ay0:ay0 + (by1 - by0), ax0:ax0 + (bx1 - bx0)]
    region = dst[by0:by1, bx0:bx1]
    region[a] = c[a]
    mask[by0:by1, bx0:bx1] |= a


def _donor_cut(d: Donor, forehead: bool):
    face = largest_face([f for f in d.faces if has_landmarks(f)])
    return hull_cut(d.rgb, face.landmarks, forehead)


def _usable(d: Donor) -> bool:
    return any(has_landmarks(f) for f in d.faces)


def half_face(crop: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """The release's half-face cut: with p 1/2 a vertical split (left or right half), else a horizontal one (top or
    bottom half), each half with p 1/2. Returns (crop, alpha, which)."""
    h, w = alpha.shape
    if rng.random() < 0.5:
        which = "left" if rng.random() < 0.5 else "right"
        sl = (slice(None), slice(0, w // 2) if which == "left" else slice(w // 2, None))
    else:
        which = "top" if rng.random() < 0.5 else "bottom"
        sl = (slice(0, h // 2) if which == "top" else slice(h // 2, None), slice(None))
    return np.ascontiguousarray(crop[sl]), np.ascontiguousarray(alpha[sl]), which


def combine(rgb: np.ndarray, target_face, donor_cut, target_box: str = "detector"):
    """Paste one donor cut (crop, alpha) into a copy of ``rgb``, scaled to cover B's face box and centred on it.
    Returns (fake, mask, info)."""
    fake, mask = rgb.copy(), np.zeros(rgb.shape[:2], bool)
    x0, y0, x1, y1 = face_box(target_face, target_box)
    wb, hb = max(1.0, x1 - x0), max(1.0, y1 - y0)
    crop, alpha = donor_cut
    ha, wa = alpha.shape
    s = max(wb / wa, hb / ha)
    crop, alpha = resize_cut(crop, alpha, s)
    h, w = alpha.shape
    x, y = int(round((x0 + x1) / 2 - w / 2)), int(round((y0 + y1) / 2 - h / 2))
    paste(fake, mask, crop, alpha, x, y)
    return fake, mask, {"scale": s, "xy": (x, y), "size": (w, h)}


class RandomCombination:
    """Generator protocol (forge/common.py): ``random_combination`` or ``paste_random`` (``mode``)."""

    needs_donors = True
    needs_landmarks = False   # the target needs a face box; donors need 68 landmarks

    def __init__(self, options: Mapping | None = None, mode: str = "random_combination"):
        if mode not in ("random_combination", "paste_random"):
            raise ValueError(f"mode must be random_combination or paste_random, got {mode!r}")
        self.method = mode
        self.options = dict(options or {})

    def __call__(self, target, rgb, faces, rng, options=None, donors=None) -> ForgeResult | Skip:
        opts = {**DEFAULTS, **self.options, **(options or {})}
        if donors is None:
            raise ValueError(f"{self.method} needs a DonorPool (donors=...)")
        tface = largest_face(faces)
        n = 1 if self.method == "random_combination" else int(rng.integers(opts["min_donors"], opts["max_donors"] + 1))
        picked = donors.draw(rng, target, n, distinct_groups=True, accept=_usable)
        if not picked:
            return Skip(f"no usable donor of another identity in split {target['split']!r}")
        forehead = bool(opts["forehead"])
        target_box = str(opts["target_box"])
        H, W = rgb.shape[:2]
        if self.method == "random_combination":
            cut = _donor_cut(picked[0], forehead)
            if cut is None:
                return Skip(f"donor {picked[0].row['image_id']}: empty face hull")
            fake, mask, info = combine(rgb, tface, cut, target_box)
            placements, used = [info], picked
        else:
            fake, mask = rgb.copy(), np.zeros((H, W), bool)
            x0, _, x1, _ = face_box(tface, target_box)
            width = max(1.0, x1 - x0)
            lo, hi = (float(v) for v in opts["scale"])
            placements, used = [], []
            for d in picked:
                cut = _donor_cut(d, forehead)
                if cut is None:
                    continue
                crop, alpha = cut
                which = "whole"
                if rng.random() < float(opts["p_half"]):
                    crop, alpha, which = half_face(crop, alpha, rng)
                if not alpha.any():
                    continue
                s = rng.uniform(lo, hi) * width / alpha.shape[1]
                crop, alpha = resize_cut(crop, alpha, s)
                h, w = alpha.shape
                x, y = int(rng.integers(0, max(0, W - w) + 1)), int(rng.integers(0, max(0, H - h) + 1))
                paste(fake, mask, crop, alpha, x, y)
                placements.append({"scale": s, "xy": (x, y), "size": (w, h), "part": which})
                used.append(d)
        if not used or not mask.any():
            return Skip("pasted face hull falls outside the image")
        return ForgeResult(
            fake_rgb=fake, mask=mask,
            source_ids=[str(target["image_id"])] + [str(d.row["image_id"]) for d in used],
            source_groups=[str(target["group"])] + [str(d.row["group"]) for d in used],
            method=self.method,
            extra={"target": rgb, "placements": placements,
                   "donor_splits": [str(d.row["split"]) for d in used]})


def make_random_combination(options: Mapping | None = None) -> RandomCombination:
    return RandomCombination(options, "random_combination")


def make_paste_random(options: Mapping | None = None) -> RandomCombination:
    return RandomCombination(options, "paste_random")
