"""Overlays and heatmaps of `morphfuse detect` that cannot be misread (issue 13 item 6): the mask is drawn to match
the verdict, a legend says what the marks mean and at which threshold, the probability maps are in a perceptual
colour map with a colour bar."""
from __future__ import annotations

import numpy as np
import pytest

from morphfuse.overlay import OUTLINE_REAL, colormap_lut, heatmap_image, overlay_image
from morphfuse.faces.crops import Crop

H, W = 240, 320


def _scene():
    rng = np.random.default_rng(0)
    rgb = rng.integers(40, 200, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), bool)
    mask[80:160, 100:220] = True
    crops = [Crop(0, 90, 60, 230, 180, "face", 0)]
    return rgb, mask, crops


def _interior(mask: np.ndarray, margin: int = 6) -> np.ndarray:
    import cv2

    return cv2.erode(mask.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)).astype(bool)


def _redness(img: np.ndarray) -> np.ndarray:
    return img[..., 0].astype(int) - (img[..., 1].astype(int) + img[..., 2].astype(int)) // 2


def test_a_real_verdict_tints_nothing_and_outlines_the_regions_above_t():
    rgb, mask, crops = _scene()
    out = overlay_image(rgb, mask, crops, 0.27, 0.4, False, 1, "mdmf", threshold=0.5, fake_threshold=0.5)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    inner = _interior(mask)
    inner[:40] = inner[-40:] = False  # away from the text bands
    assert inner.sum() > 3000
    assert np.array_equal(out[inner], rgb[inner])  # no tint at all inside the mask
    # the outline is there, in the REAL colour, not red
    ring = mask & ~_interior(mask, 3)
    hit = np.all(out == np.array(OUTLINE_REAL, np.uint8), axis=-1)
    assert hit[ring].mean() > 0.3
    assert not (_redness(out[mask]) > _redness(rgb[mask]) + 40).any()  # nothing in the mask turned redder


def test_a_fake_verdict_tints_the_mask_red():
    rgb, mask, crops = _scene()
    out = overlay_image(rgb, mask, crops, 0.81, 0.7, True, 1, "mdmf", threshold=0.5, fake_threshold=0.5)
    inner = _interior(mask)
    inner[:40] = inner[-40:] = False
    assert _redness(out[inner]).mean() > _redness(rgb[inner]).mean() + 60
    outside = ~mask & ~_interior(~mask, 0)
    outside[:40] = outside[-40:] = False
    outside[55:185, 85:235] = False  # the crop box
    assert np.array_equal(out[outside], rgb[outside])


@pytest.mark.parametrize("fake", [False, True])
def test_the_legend_and_verdict_bands_are_drawn(fake):
    rgb, mask, crops = _scene()
    out = overlay_image(rgb, mask, crops, 0.8 if fake else 0.2, 0.5, fake, 1, "mdmf")
    band = max(10, min(W // 32, 28)) + 8
    for rows in (slice(0, band), slice(H - band, H)):
        a, b = out[rows].astype(int), rgb[rows].astype(int)
        assert a.mean() < b.mean() - 30  # darkened band
        assert (a.max(axis=-1) > 200).sum() > 50  # with text (light pixels) on it
    # the legend's swatch shows the colour the mask is drawn in
    sw = out[H - band + 4:H - band + 10, 4:10]
    if fake:
        assert (_redness(sw) > 100).any()
    else:
        assert np.all(sw == np.array(OUTLINE_REAL, np.uint8), axis=-1).any()
    # REAL and FAKE legends differ (different text and swatch)
    other = overlay_image(rgb, mask, crops, 0.8 if fake else 0.2, 0.5, not fake, 1, "mdmf")
    assert not np.array_equal(other[H - band:], out[H - band:])


def _lstar(rgb_u8: np.ndarray) -> np.ndarray:
    """CIE L* of sRGB colours (D65), by hand from the sRGB and CIELAB definitions."""
    c = rgb_u8.astype(np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.2126, 0.7152, 0.0722])
    f = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29)
    return 116 * f - 16


def test_the_colour_map_is_perceptual_monotone_in_lightness():
    lut = colormap_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    L = _lstar(lut)
    assert L[0] < 20 and L[-1] > 85  # dark to light
    assert np.diff(L).min() > -0.3  # monotone up to the table's 8-bit rounding
    assert (np.diff(L[::8]) > 0).all()  # and strictly increasing at any step of 8 levels
    # not a grey ramp: it is a colour map (viridis: blue-purple to yellow)
    assert lut[0, 2] > lut[0, 1] and lut[-1, 0] > 200 and lut[-1, 2] < 80


def test_heatmap_panels_hold_the_colour_of_each_probability_and_a_colour_bar():
    h, w = 200, 300
    lfdl = np.zeros((h, w), np.uint8)
    lfdl[50:150, 100:200] = 200
    mitl = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    img = heatmap_image(lfdl, mitl, threshold=0.5)
    lut = colormap_lut()
    assert img.dtype == np.uint8 and img.shape[0] > h and img.shape[1] > 2 * w
    top = img.shape[0] - h  # the title band
    assert np.array_equal(img[top + 100, 150], lut[200]) and np.array_equal(img[top + 10, 10], lut[0])
    gap = 8
    assert np.array_equal(img[top + 100, w + gap + 299], lut[255])  # MITL panel, right edge: p = 1
    assert np.array_equal(img[top + 100, w + gap], lut[0])
    # the colour bar: a column from lut[255] (top) down to lut[0]
    bx = 2 * w + 2 * gap
    col = img[top:, bx + 2]
    assert np.array_equal(col[0], lut[255]) and np.array_equal(col[-1], lut[0])
    ty = round(0.5 * (h - 1))  # the threshold t = 0.5 is marked by a red line across the bar
    assert _redness(img[top + ty, bx + 2:bx + 3]).min() > 150
    keep = np.ones(h, bool)
    keep[ty - 3:ty + 4] = False
    assert (np.diff(_lstar(col[keep])) <= 0.3).all()
    # a large image is shown at most HEATMAP_SIDE px a side
    big = heatmap_image(np.zeros((3000, 1500), np.uint8), np.zeros((3000, 1500), np.uint8), max_side=512)
    assert big.shape[0] <= 512 + 40
