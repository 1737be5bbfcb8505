"""Pictures of a prediction, for people who would rather look than read: the verdict overlay of ``morphfuse
detect``, the probability heatmaps, and the mask tint used on the forgeries' contact sheets (one drawing code for
all of them).

Colours: a FAKE verdict tints the fused mask red with a yellow outline; a REAL verdict tints nothing and outlines
the regions above the mask threshold in cyan; face crops are green boxes. Heatmaps use viridis, whose lightness
rises with the probability.
"""
from __future__ import annotations

import numpy as np


def load_font(size: int):
    """Pillow's default font at ``size`` px (its bitmap font on Pillow < 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def tint(rgb: np.ndarray, mask: np.ndarray, colour=(255, 0, 0), alpha: float = 0.45, rows: int = 512,
          outline=(255, 255, 0)) -> np.ndarray:
    """The masked pixels blended with ``colour`` (``(1 - alpha)·pixel + alpha·colour``, float32, truncated to
    uint8) and the mask's outer outline in ``outline``, computed a band of rows at a time (no full-size float copy
    of the image). ``colour=None``: the outline only."""
    import cv2

    out = rgb.copy()
    if colour is not None:
        c = np.asarray(colour, np.float32)
        for y in range(0, out.shape[0], rows):
            band, m = out[y:y + rows], mask[y:y + rows]
            if m.any():
                band[m] = ((1 - alpha) * band[m].astype(np.float32) + alpha * c).astype(np.uint8)
    contours, _ = cv2.findContours(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8),
                                   cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, outline, max(1, rgb.shape[0] // 256))
    return out


TINT = (255, 0, 0)          # the fused mask of an image judged FAKE
OUTLINE_FAKE = (255, 255, 0)
OUTLINE_REAL = (0, 200, 255)  # regions above t of an image judged REAL: outlined only, never tinted
CROP = (0, 220, 0)
HEATMAP_SIDE = 1024           # a heatmap panel's long side at most (a view; the exact values are in prob/)


def _text_fit(draw, texts: list[str], font, width: int) -> str:
    return next((t for t in texts if draw.textlength(t, font=font) <= width - 8), texts[-1])


def overlay_image(rgb: np.ndarray, fused: np.ndarray, crops, score: float, mitl_score: float, fake: bool,
                  n_faces: int, variant: str, threshold: float = 0.5, fake_threshold: float = 0.5) -> np.ndarray:
    """The image (same size) with the verdict, the mask drawn to match it, the face crops and a legend.

    FAKE (score >= ``fake_threshold``): the fused mask tinted red and outlined in yellow, labelled
    "manipulated (p >= t)". REAL: nothing is tinted; the regions where the fused mask is set (p >= t) are only
    outlined in cyan and labelled as such, "image judged real", so a real verdict never shows a red region.
    Face crops are green boxes. A top band gives the verdict and the scores, a bottom band the legend."""
    import cv2
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    mask = fused.astype(bool, copy=False)
    if fake:
        out = tint(rgb, mask, TINT, outline=OUTLINE_FAKE)
    else:
        out = tint(rgb, mask, None, outline=OUTLINE_REAL)
    thick = max(1, min(h, w) // 300)
    for c in crops:
        if c.face_idx >= 0:
            cv2.rectangle(out, (int(c.x0), int(c.y0)), (int(c.x1) - 1, int(c.y1) - 1), CROP, thick)
    size = max(10, min(w // 32, 28))
    font = load_font(size)
    verdict = "FAKE" if fake else "REAL"
    rel = ">=" if fake else "<"
    top = [f"{verdict}  score {score:.3f} {rel} {fake_threshold:g}  |  MITL {mitl_score:.3f}  |  faces {n_faces}  "
           f"|  mask {fused.mean():.1%} ({variant})", f"{verdict}  score {score:.3f} {rel} {fake_threshold:g}",
           f"{verdict} {score:.2f}", verdict]
    if fake:
        legend = [f"red: manipulated (fused mask, p >= {threshold:g})  |  green: face crop",
                  f"red: manipulated (p >= {threshold:g})", f"red: p >= {threshold:g}"]
    else:
        legend = [f"cyan outline: regions with p >= {threshold:g} (image judged real)  |  green: face crop",
                  f"cyan outline: p >= {threshold:g} (image judged real)", f"outline: p >= {threshold:g}"]
    band = min(h // 2, size + 8)
    for y0, texts, colour in ((0, top, (255, 70, 70) if fake else (120, 255, 120)),
                              (h - band, legend, (255, 255, 255))):
        strip = Image.fromarray(np.ascontiguousarray(out[y0:y0 + band]))  # only the bands go through Pillow
        draw = ImageDraw.Draw(strip, "RGBA")
        draw.rectangle([0, 0, w, band], fill=(0, 0, 0, 170))
        x = 4
        if y0:  # the legend's swatch: the colour the mask is drawn in
            sw = max(6, size - 4)
            draw.rectangle([x, 4, x + sw, 4 + sw], fill=TINT if fake else None,
                           outline=OUTLINE_FAKE if fake else OUTLINE_REAL, width=max(1, sw // 6))
            x += sw + 6
        draw.text((x, 3), _text_fit(draw, texts, font, w - x), fill=colour, font=font)
        out[y0:y0 + band] = np.asarray(strip)
    return out


def colormap_lut() -> np.ndarray:
    """The perceptual colour map of the heatmaps: viridis (OpenCV's table), 256 × 3 uint8 RGB, dark to light
    (its luminance increases with the probability)."""
    import cv2

    return np.ascontiguousarray(
        cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_VIRIDIS)[:, 0, ::-1])


def heatmap_image(lfdl_u8: np.ndarray, mitl_u8: np.ndarray, threshold: float = 0.5,
                  max_side: int = HEATMAP_SIDE) -> np.ndarray:
    """The two probability maps side by side in viridis (:func:`colormap_lut`), each titled, with a colour bar
    (0 to 1, the mask threshold ``t`` marked); each panel at most ``max_side`` px on its long side (area
    averaging). RGB uint8."""
    import cv2
    from PIL import Image, ImageDraw

    h, w = lfdl_u8.shape[:2]
    f = min(1.0, max_side / max(h, w))
    ph, pw = max(1, round(h * f)), max(1, round(w * f))
    lut = colormap_lut()
    panels = [lut[cv2.resize(m, (pw, ph), interpolation=cv2.INTER_AREA) if f < 1 else m] for m in (lfdl_u8, mitl_u8)]
    size = max(11, min(pw // 24, 22))
    font = load_font(size)
    title_h, gap, bar_w, label_w = size + 10, 8, max(12, pw // 40), 4 * size
    W = 2 * pw + gap + gap + bar_w + label_w
    H = title_h + ph
    canvas = np.full((H, W, 3), 255, np.uint8)
    canvas[title_h:, :pw] = panels[0]
    canvas[title_h:, pw + gap:2 * pw + gap] = panels[1]
    bx = 2 * pw + 2 * gap
    ramp = lut[np.linspace(255, 0, ph).round().astype(np.uint8)]  # top: p = 1
    canvas[title_h:, bx:bx + bar_w] = ramp[:, None, :]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), "LFDL probability (faces only)", fill=(0, 0, 0), font=font)
    draw.text((pw + gap + 4, 4), "MITL probability", fill=(0, 0, 0), font=font)
    ty = title_h + round((1 - threshold) * (ph - 1))
    draw.line([bx - 3, ty, bx + bar_w + 2, ty], fill=(255, 0, 0), width=max(1, size // 8))
    for v, text in ((1.0, "1"), (0.0, "0")):
        y = title_h + round((1 - v) * (ph - 1))
        draw.text((bx + bar_w + 4, min(max(y - size // 2, title_h), H - size - 2)), text, fill=(0, 0, 0), font=font)
    draw.text((bx + bar_w + 4, min(max(ty - size // 2, title_h + size + 2), H - 2 * size - 4)), f"t={threshold:g}",
              fill=(200, 0, 0), font=font)
    return np.asarray(img)
