"""Facial regions from landmarks: reference rectangles (SSPSL), hull masks (SBI, random combination).

Two landmark layouts are understood, both as ``(K, 2)`` arrays of ``x, y`` in original pixels:

- 68 points (dlib, FAN; the iBUG 300-W order): jaw 0–16, brows 17–26, nose 27–35 (bridge 27–30, nostrils
  31–35), eyes 36–47, mouth 48–67 (outer 48–59, inner 60–67);
- 5 points (MTCNN order): eye on the image's left, eye on the image's right, nose tip, mouth corner on the
  left, mouth corner on the right.

Five points only mark the centres of the eyes, the nose tip and the mouth corners, so the regions of a 5-point
face are drawn from a template in the face's own frame: origin at a landmark, ``u`` the unit vector from the left
to the right eye, ``v`` perpendicular to it pointing down the face, lengths in units of the inter-ocular distance
``d`` (eye centre to eye centre). The template numbers are the means of the 68-point regions measured in that
frame on the 204 London Set photos (dlib's 68-point model; standard deviations 0.01–0.09 d); the tests check that
both give nearly the same boxes. Every box is axis-aligned in image coordinates, so a rolled face gets the box
around its rotated template.
"""
from __future__ import annotations

import numpy as np

REGIONS = ("nose", "mouth", "eyes", "face")

# 68-point index sets (iBUG 300-W order)
REGION_INDICES_68: dict[str, np.ndarray] = {
    "nose": np.arange(27, 36),
    "mouth": np.arange(48, 68),
    "eyes": np.arange(36, 48),
    "face": np.arange(0, 68),
}
BROWS_68 = np.arange(17, 27)
CHIN_68 = 8

# 5-point template, in units of the inter-ocular distance d (see the module docstring).
EYE_HALF_WIDTH = 0.20          # eye corners are ±0.20 d from the eye centre along u
EYE_TOP, EYE_BOTTOM = -0.08, 0.065   # eyelids above / below the eye centre along v
NOSE_HALF_WIDTH = 0.21         # alae ±0.21 d from the nose tip along u
NOSE_TOP = -0.06               # top of the nose bridge (point 27) relative to the eye line's midpoint, along v
NOSE_BOTTOM = 0.22             # base of the nose (point 33) below the tip, along v
MOUTH_TOP, MOUTH_BOTTOM = -0.14, 0.18   # outer lips relative to the midpoint of the mouth corners, along v
FACE_HALF_WIDTH = 1.13         # jaw extremes ±1.13 d from the eye midpoint along u
FACE_TOP = -0.40               # brows above the eye line, along v
FACE_BOTTOM = 0.79             # chin below the midpoint of the mouth corners, along v
BROW_ABOVE_EYES = 0.33         # the brows' mean above the eye line, along v (forehead extension)

# Geometric nose estimate from a face box without landmarks, as fractions of the box's width and height.
# Measured on the 204 London Set photos: OpenCV's Haar frontal-face boxes against dlib's 68-point nose
# (27–35): x 0.422–0.578 (sd 0.014), y 0.383–0.669 (sd 0.011–0.020) of the box.
NOSE_IN_FACE_BOX = (0.42, 0.38, 0.58, 0.67)


def _as_points(landmarks) -> np.ndarray | None:
    if landmarks is None:
        return None
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.size == 0:
        return None
    if pts.ndim == 1:
        if pts.size % 2:
            raise ValueError(f"flat landmarks need an even number of values (x0, y0, x1, y1, ...), got {pts.size}")
        pts = pts.reshape(-1, 2)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) not in (5, 68):
        raise ValueError(f"landmarks must be (68, 2) or (5, 2) x,y points, got shape {np.asarray(landmarks).shape}")
    return pts


def _frame5(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit vectors u (left eye → right eye) and v (down the face), and the inter-ocular distance d."""
    delta = pts[1] - pts[0]
    d = float(np.hypot(*delta))
    if d < 1e-6:
        raise ValueError("5-point landmarks with coincident eyes: cannot place the regions")
    u = delta / d
    v = np.array([-u[1], u[0]])
    return u, v, d


def _template_points_5(pts: np.ndarray, region: str) -> np.ndarray:
    u, v, d = _frame5(pts)
    eye_l, eye_r, nose, mouth_l, mouth_r = pts
    eye_mid = (eye_l + eye_r) / 2
    mouth_mid = (mouth_l + mouth_r) / 2
    if region == "eyes":
        out = [c + d * (a * u + b * v) for c in (eye_l, eye_r)
               for a in (-EYE_HALF_WIDTH, EYE_HALF_WIDTH) for b in (EYE_TOP, EYE_BOTTOM)]
    elif region == "nose":
        out = [nose + d * NOSE_HALF_WIDTH * u, nose - d * NOSE_HALF_WIDTH * u, nose + d * NOSE_BOTTOM * v,
               eye_mid + d * NOSE_TOP * v]
    elif region == "mouth":
        out = [mouth_l, mouth_r, mouth_mid + d * MOUTH_TOP * v, mouth_mid + d * MOUTH_BOTTOM * v]
    elif region == "face":
        out = [eye_mid + d * (s * FACE_HALF_WIDTH * u + FACE_TOP * v) for s in (-1, 1)]
        out += [mouth_mid + d * (s * FACE_HALF_WIDTH * u + FACE_BOTTOM * v) for s in (-1, 1)]
    else:  # pragma: no cover - checked by the caller
        raise AssertionError(region)
    return np.asarray(out)


def region_points(landmarks, region: str) -> np.ndarray | None:
    """The points whose bounding box is ``region``: the region's own landmarks (68) or its template (5)."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    pts = _as_points(landmarks)
    if pts is None:
        return None
    if len(pts) == 68:
        return pts[REGION_INDICES_68[region]]
    return _template_points_5(pts, region)


def region_box(landmarks, region: str, pad: float = 0.0) -> tuple[float, float, float, float] | None:
    """Axis-aligned box ``(x0, y0, x1, y1)`` around a facial region, ``pad`` pixels added on every side.

    ``landmarks``: ``(68, 2)`` or ``(5, 2)`` (or the flat ``x0, y0, x1, y1, ...`` list of the faces parquet);
    ``region``: ``nose`` | ``mouth`` | ``eyes`` | ``face``. Returns ``None`` when there are no landmarks. The box
    is not clipped to the image.
    """
    pts = region_points(landmarks, region)
    if pts is None:
        return None
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return (float(x0 - pad), float(y0 - pad), float(x1 + pad), float(y1 + pad))


def five_points(landmarks) -> np.ndarray | None:
    """The 5 landmarks of RetinaFace / MTCNN (eye on the image's left, eye on the right, nose tip, mouth corner
    left, mouth corner right) as a ``(5, 2)`` array: as given for 5 points; from 68 points the eye centres (means of
    36–41 and 42–47), the nose tip (30) and the mouth corners (48, 54). None without landmarks."""
    pts = _as_points(landmarks)
    if pts is None:
        return None
    if len(pts) == 5:
        return pts.copy()
    return np.stack([pts[36:42].mean(axis=0), pts[42:48].mean(axis=0), pts[30], pts[48], pts[54]])


def nose_box_from_face_box(box) -> tuple[float, float, float, float]:
    """Estimate the nose box from a face box alone, for landmark-free backends (OpenCV's Haar cascade).

    Rule: the nose spans the middle 16 % of the box's width (x from 0.42 to 0.58 of it) and y from 0.38 to 0.67
    of its height (``NOSE_IN_FACE_BOX``), measured for Haar frontal-face boxes, which reach from mid-forehead to
    the chin. Boxes of other detectors frame the face differently; use landmarks when there are any.
    """
    x0, y0, x1, y1 = (float(c) for c in box)
    w, h = x1 - x0, y1 - y0
    fx0, fy0, fx1, fy1 = NOSE_IN_FACE_BOX
    return (x0 + fx0 * w, y0 + fy0 * h, x0 + fx1 * w, y0 + fy1 * h)


def forehead_points(landmarks, fraction: float = 0.4) -> np.ndarray:
    """Points above the brows that extend a landmark hull over the forehead.

    Rule: the brows are copied and moved up the face by ``fraction`` × the face height, along the face's own
    vertical axis (from the chin to the brows' mean, so a tilted face gets a tilted forehead). Face height =
    distance from the brows' mean to the chin. 68 points: brows 17–26, chin 8. 5 points: the brows are the eye
    centres moved up by ``BROW_ABOVE_EYES`` d, the chin is ``FACE_BOTTOM`` d below the mouth corners' midpoint
    (template as in :func:`region_box`). 0.4 of brow-to-chin is about 0.8 of the brow-to-hairline height of a
    frontal face (facial thirds: hairline–brow ≈ brow–nose base ≈ nose base–chin), so hair is rarely included.
    """
    pts = _as_points(landmarks)
    if pts is None:
        raise ValueError("forehead_points needs landmarks")
    if len(pts) == 68:
        top = pts[BROWS_68]
        top_mid = top.mean(axis=0)
        down = pts[CHIN_68] - top_mid
    else:
        u, v, d = _frame5(pts)
        top = pts[:2] - BROW_ABOVE_EYES * d * v
        top_mid = top.mean(axis=0)
        down = (pts[3] + pts[4]) / 2 + FACE_BOTTOM * d * v - top_mid
    height = float(np.hypot(*down))
    if height < 1e-6:
        return top.copy()
    axis = down / height
    return top - fraction * height * axis


def hull_mask(landmarks, hw: tuple[int, int], forehead: bool = False, forehead_fraction: float = 0.4) -> np.ndarray:
    """Filled convex hull of the landmarks as an ``H×W`` bool mask (``hw = (H, W)``).

    With ``forehead=True`` the hull also takes :func:`forehead_points` (the brows moved up by
    ``forehead_fraction`` of the face height), so a 68-point hull covers the forehead instead of stopping at the
    brows. Points may lie outside the image; the hull is clipped by the raster. No landmarks: an all-False mask.
    """
    import cv2

    h, w = int(hw[0]), int(hw[1])
    mask = np.zeros((h, w), dtype=np.uint8)
    pts = _as_points(landmarks)
    if pts is None:
        return mask.astype(bool)
    if forehead:
        pts = np.concatenate([pts, forehead_points(pts, forehead_fraction)])
    # Sub-pixel vertices (shift=4 → 1/16 px) so the hull is not biased by rounding.
    hull = cv2.convexHull(np.round(pts * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)
