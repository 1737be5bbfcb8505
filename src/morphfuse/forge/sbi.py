"""Self-blended images (SBI; Shiohara & Yamasaki, CVPR 2022), as released, with the blend mask kept.

A copy of a real image is blended into itself inside the face hull after one of the two copies got colour
transforms and the source got a small affine warp; the ground-truth mask is where the blend alpha is > 0
(FORGERIES.md, steps 1-6). numpy + OpenCV only, every random draw from the forgery's own ``rng``.

Where this differs from (or pins down) the release, on purpose:
- The release works on a face crop (``crop_face(margin=True)``: the 68-landmark box widened by w/2 left and
  right, h above, 0.4 h below) and returns that crop. We do steps 4-5 on the same crop window, then put the
  blended crop back into the whole (colour-transformed) target, so the fake is the full photo and the blur and
  the affine keep the release's scale relative to the face. The colour transforms (step 3) act on the whole image.
- Hull (step 2): ``faces.landmarks.hull_mask(forehead=True)`` when ``forehead`` is on, else (and always with
  p 0.25, as the release's ``landmark[:68]``) the plain 68-point hull. The Face X-ray hull shapes are not used.
- Hue/saturation/value ±0.3: the release feeds uint8 images to albumentations, where these limits are added to
  0-179 / 0-255 channel values and are truncated away (a no-op but for an occasional -1). Here a limit is a
  fraction of the channel's range times ``hsv_scale`` (default 0.1): hue ±5.4 OpenCV units (±10.8°),
  saturation and value ±7.65 levels, i.e. visible but weaker than brightness ±0.1 (±25.5 levels).
  ``hsv_scale: 0`` switches the step off.
- Blend-mask step 5 follows the release: the intermediate size is drawn per side (192-256 each, not square);
  the first blur runs in float64 and "zero below 1" keeps only pixels whose blurred value equals the maximum,
  i.e. an erosion by the first kernel's radius.
- No "tinted ⇒ fake" shortcut (``target_transform``, FORGERIES.md): when the colour transforms hit the TARGET
  (p 0.5) every pixel of the fake differs from the original photo, though only the blended region is manipulated.
  In SBI's own training the real of each pair is that transformed target. ``pair`` (default) hands the transformed
  target back as ``ForgeResult.extra["companion_real"]``; the forge stage adds it to the manifest as a real (label 0,
  the photo's identity and split, method ``sbi_target``), so outside its mask every SBI fake equals a real of the
  manifest. ``source_only`` puts the colour transforms on the source always (the target stays the untouched photo);
  ``as_released`` keeps the p 0.5 draw and adds no real (the authors' data set, with its shortcut).
- Output is ``(m·source + (1-m)·target).astype(uint8)`` as released (truncation, not rounding). So outside the
  mask (m = 0) the fake equals the target exactly; inside, a pixel can keep the target's value where m is tiny
  and source ≥ target in every channel, or where source and target agree (saturated pixels). Tests allow for it.
"""
from __future__ import annotations

from typing import Mapping

import cv2
import numpy as np

from .common import ForgeResult, Skip, has_landmarks, largest_face, odd_kernel

DEFAULTS = {
    "forehead": True,        # extend the 68-point hull over the forehead (faces.landmarks.hull_mask)
    "p_plain_hull": 0.25,    # probability of the plain 68-point hull even with forehead on (release)
    "p_source": 0.5,         # probability that the colour transforms hit the source (else the target)
    "hsv_scale": 0.1,        # see the module docstring
    "rgb_shift": 20.0, "p_rgb_shift": 0.3,
    "hsv_limit": 0.3, "brightness": 0.1, "contrast": 0.1,
    "translate_x": 0.03, "translate_y": 0.015, "scale": (0.95, 1 / 0.95),
    "elastic_alpha": 50.0, "elastic_sigma": 7.0,
    "blend_ratios": (0.25, 0.5, 0.75, 1.0, 1.0, 1.0),
    "target_transform": "pair",   # pair | source_only | as_released (see the module docstring)
}
TARGET_TRANSFORMS = ("pair", "source_only", "as_released")


# ------------------------------------------------------------------------------------------ step 3: colour
def _lut_apply(img: np.ndarray, luts: list[np.ndarray]) -> np.ndarray:
    """Apply one 256-entry float LUT per channel (rounded, clipped to uint8)."""
    lut = np.stack([np.clip(np.rint(t), 0, 255) for t in luts], axis=1).astype(np.uint8).reshape(256, 1, 3)
    return cv2.LUT(img, lut)


def colour_transform(rgb: np.ndarray, rng: np.random.Generator, opts: Mapping = DEFAULTS) -> np.ndarray:
    """The release's ``source_transforms`` on an H×W×3 uint8 image (a new array)."""
    base = np.arange(256, dtype=np.float64)
    out = rgb
    if rng.random() < opts["p_rgb_shift"]:                                   # RGB shift ±20, p 0.3
        s = rng.uniform(-opts["rgb_shift"], opts["rgb_shift"], 3)
        out = _lut_apply(out, [base + s[0], base + s[1], base + s[2]])
    dh, ds, dv = rng.uniform(-1.0, 1.0, 3) * opts["hsv_limit"] * opts["hsv_scale"]  # hue/sat/value
    if opts["hsv_scale"]:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)                          # H in 0..179
        lut_h = np.mod(np.rint(base + dh * 180.0), 180.0)
        hsv = _lut_apply(hsv, [lut_h, base + ds * 255.0, base + dv * 255.0])
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    alpha = 1.0 + rng.uniform(-opts["contrast"], opts["contrast"])         # brightness/contrast ±0.1
    beta = rng.uniform(-opts["brightness"], opts["brightness"]) * 255.0
    lut = base * alpha + beta
    out = _lut_apply(out, [lut, lut, lut])
    if rng.random() < 0.5:                                                   # one of: downscale ×2/×4 ...
        h, w = out.shape[:2]
        r = (2, 4)[int(rng.integers(2))]
        small = cv2.resize(out, (max(1, int(w / r)), max(1, int(h / r))), interpolation=cv2.INTER_NEAREST)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    else:                                                                     # ... or sharpen α 0.2-0.5
        a = rng.uniform(0.2, 0.5)
        light = rng.uniform(0.5, 1.0)
        nochange = np.zeros((3, 3), np.float32)
        nochange[1, 1] = 1
        effect = -np.ones((3, 3), np.float32)
        effect[1, 1] = 8 + light
        kernel = ((1 - a) * nochange + a * effect).astype(np.float32)
        out = cv2.filter2D(out, -1, kernel)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------- step 4: geometry
def random_affine(src: np.ndarray, mask: np.ndarray, rng: np.random.Generator, opts: Mapping = DEFAULTS):
    """Same random affine on source (bilinear) and mask (nearest): translate x ±3 %, y ±1.5 %, scale 0.95-1.053."""
    h, w = mask.shape
    tx = rng.uniform(-opts["translate_x"], opts["translate_x"]) * w
    ty = rng.uniform(-opts["translate_y"], opts["translate_y"]) * h
    s = rng.uniform(*opts["scale"])
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    m = np.array([[s, 0, cx - s * cx + tx], [0, s, cy - s * cy + ty]], dtype=np.float64)
    src = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return src, mask


def elastic_mask(mask: np.ndarray, rng: np.random.Generator, alpha: float = 50.0, sigma: float = 7.0) -> np.ndarray:
    """Elastic deformation (Simard): displacement = alpha · Gaussian(sigma)-smoothed uniform noise in [-1, 1]."""
    h, w = mask.shape
    dx = rng.random((h, w), dtype=np.float32) * 2 - 1
    dy = rng.random((h, w), dtype=np.float32) * 2 - 1
    dx = cv2.GaussianBlur(dx, (0, 0), sigma) * alpha
    dy = cv2.GaussianBlur(dy, (0, 0), sigma) * alpha
    xx, yy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(mask, xx + dx, yy + dy, interpolation=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)


# ------------------------------------------------------------------------------------------ step 5: blend
def blend_mask(mask: np.ndarray, rng: np.random.Generator, ratios=DEFAULTS["blend_ratios"]) -> np.ndarray | None:
    """The release's ``get_blend_mask`` × ratio: float32 H×W in [0, 1]; None if the mask vanished."""
    h, w = mask.shape
    sh, sw = int(rng.integers(192, 257)), int(rng.integers(192, 257))
    k1, k2 = odd_kernel(rng, 5, 25), odd_kernel(rng, 5, 25)
    sigma2 = int(rng.integers(5, 46))
    ratio = float(ratios[int(rng.integers(len(ratios)))])
    small = cv2.resize(mask.astype(np.float64), (sw, sh), interpolation=cv2.INTER_LINEAR)
    b = cv2.GaussianBlur(small, (k1, k1), 0)
    if b.max() <= 0:
        return None
    b /= b.max()
    b[b < 1.0 - 1e-9] = 0                       # keep the blur's plateau only: an erosion
    if b.max() <= 0:
        return None
    b = cv2.GaussianBlur(b, (k2, k2), sigma2)
    b /= b.max()
    m = cv2.resize(b, (w, h), interpolation=cv2.INTER_LINEAR)
    return (np.clip(m, 0, 1) * ratio).astype(np.float32)


def crop_window(landmarks: np.ndarray, hull: np.ndarray, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The release's ``crop_face(margin=True)`` window around the 68 landmarks, grown to hold the hull."""
    lm = np.asarray(landmarks, dtype=np.float64)[:68]
    x0, y0 = lm.min(axis=0)
    x1, y1 = lm.max(axis=0)
    w, h = x1 - x0, y1 - y0
    x0, x1, y0, y1 = x0 - w / 2, x1 + w / 2, y0 - h, y1 + 0.4 * h
    ys, xs = np.nonzero(hull.any(axis=1))[0], np.nonzero(hull.any(axis=0))[0]
    if len(ys):
        x0, x1 = min(x0, xs[0] - 8), max(x1, xs[-1] + 9)
        y0, y1 = min(y0, ys[0] - 8), max(y1, ys[-1] + 9)
    H, W = hw
    return max(0, int(np.floor(x0))), max(0, int(np.floor(y0))), min(W, int(np.ceil(x1))), min(H, int(np.ceil(y1)))


def face_hull(landmarks: np.ndarray, hw: tuple[int, int], forehead: bool) -> np.ndarray:
    """H×W uint8 0/1 filled hull from the faces module (68 points, optionally extended over the forehead)."""
    from ..faces.landmarks import hull_mask

    return (np.asarray(hull_mask(np.asarray(landmarks)[:68], hw, forehead=forehead)) > 0).astype(np.uint8)


def self_blend(
    rgb: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, options: Mapping | None = None
) -> dict | None:
    """SBI on one image. Returns ``fake`` (uint8), ``mask`` (bool), ``target`` (the possibly colour-transformed
    target: fake == target outside the mask), ``blend`` (m, float32, full size), ``source`` (the transformed,
    warped source over the crop window ``box`` = x0, y0, x1, y1),
    ``transformed`` ("source" | "target"), ``hull`` ("forehead" | "68"); None if the blend mask vanished."""
    opts = {**DEFAULTS, **(options or {})}
    if opts["target_transform"] not in TARGET_TRANSFORMS:
        raise ValueError(f"forge.sbi.target_transform must be one of {', '.join(TARGET_TRANSFORMS)}, "
                         f"got {opts['target_transform']!r}")
    H, W = rgb.shape[:2]
    plain = rng.random() < opts["p_plain_hull"]                                        # step 2
    forehead = bool(opts["forehead"]) and not plain
    hull = face_hull(landmarks, (H, W), forehead)
    if not hull.any():
        return None
    on_source = rng.random() < opts["p_source"]                                        # step 3
    if opts["target_transform"] == "source_only":
        on_source = True  # the same draws as the other modes, so only the choice of copy differs
    source, target = rgb, rgb
    if on_source:
        source = colour_transform(rgb, rng, opts)
    else:
        target = colour_transform(rgb, rng, opts)
    x0, y0, x1, y1 = crop_window(landmarks, hull, (H, W))
    src = np.ascontiguousarray(source[y0:y1, x0:x1])
    tgt = target[y0:y1, x0:x1]
    src, m = random_affine(src, hull[y0:y1, x0:x1], rng, opts)                         # step 4
    m = elastic_mask(m, rng, opts["elastic_alpha"], opts["elastic_sigma"])
    blend = blend_mask(m, rng, opts["blend_ratios"])                                   # step 5
    if blend is None:
        return None
    b3 = blend[..., None]
    out = (b3 * src.astype(np.float32) + (1.0 - b3) * tgt.astype(np.float32)).astype(np.uint8)
    fake = target.copy()
    fake[y0:y1, x0:x1] = out
    full_blend = np.zeros((H, W), np.float32)
    full_blend[y0:y1, x0:x1] = blend
    return {"fake": fake, "mask": full_blend > 0, "target": target, "blend": full_blend,          # step 6
            "source": src, "box": (x0, y0, x1, y1), "transformed": "source" if on_source else "target",
            "hull": "forehead" if forehead else "68"}


class SBIGenerator:
    """Generator protocol (forge/common.py) for SBI: the largest face of the target, no donors."""

    method = "sbi"
    needs_donors = False
    needs_landmarks = True

    def __init__(self, options: Mapping | None = None):
        self.options = dict(options or {})

    def __call__(self, target, rgb, faces, rng, options=None, donors=None) -> ForgeResult | Skip:
        opts = {**self.options, **(options or {})}
        face = largest_face(faces)
        if not has_landmarks(face):
            return Skip("no 68-point landmarks for the largest face")
        res = self_blend(rgb, face.landmarks, rng, opts)
        if res is None or not res["mask"].any():
            return Skip("SBI blend mask is empty (face hull too small for the blur kernels)")
        extra = {k: res[k] for k in ("target", "blend", "source", "box", "transformed", "hull")}
        if res["transformed"] == "target" and opts.get("target_transform", DEFAULTS["target_transform"]) == "pair":
            extra["companion_real"] = res["target"]  # the real of the pair: forge/cli.py adds it as `sbi_target`
        return ForgeResult(fake_rgb=res["fake"], mask=res["mask"], source_ids=[str(target["image_id"])],
                           source_groups=[str(target["group"])], method=self.method, extra=extra)


def make_sbi(options: Mapping | None = None) -> SBIGenerator:
    return SBIGenerator(options)
