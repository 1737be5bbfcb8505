"""Joint augmentation: image, mask and SSPSL box move together; sizes kept; masks stay binary."""
from __future__ import annotations

import numpy as np
import pytest

from morphfuse.training import augment as A

S = 48


def _sample(seed: int = 0, h: int = S, w: int = S):
    """An image whose red channel IS the mask (two rectangles), other channels random; the box of rectangle 1."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 5:20] = 255
    mask[35:40, 30:min(45, w)] = 255
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[..., 0] = mask
    return img, mask, np.array([5, 10, 20, 30], np.float32)


def _assert_aligned(img, mask, shape):
    assert img.shape == shape + (3,) and img.dtype == np.uint8
    assert mask.shape == shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    # Same geometry: the (interpolated) red channel binarised exactly as the mask was is the mask.
    np.testing.assert_array_equal(img[..., 0] > 127.5, mask > 0)


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


GEOMETRIC = {
    "hflip": lambda i, m, b, r: A.flip(i, m, b, 1),
    "vflip": lambda i, m, b, r: A.flip(i, m, b, 0),
    "flip_both": lambda i, m, b, r: A.flip(i, m, b, -1),
    "rot90": lambda i, m, b, r: A.rot90(i, m, b, 1),
    "rot180": lambda i, m, b, r: A.rot90(i, m, b, 2),
    "rot270": lambda i, m, b, r: A.rot90(i, m, b, 3),
    "random_resized_crop": lambda i, m, b, r: A.random_resized_crop(i, m, b, r, scale=(0.3, 1.0)),
    "shift_scale_rotate": lambda i, m, b, r: A.shift_scale_rotate(i, m, b, r),
    "rescale_down": lambda i, m, b, r: A.rescale(i, m, b, 0.8),
    "rescale_up": lambda i, m, b, r: A.rescale(i, m, b, 1.2),
}


@pytest.mark.parametrize("op", sorted(GEOMETRIC))
def test_geometric_ops_move_image_and_mask_alike(op):
    for seed in range(4):
        img, mask, box = _sample(seed)
        out_img, out_mask, _ = GEOMETRIC[op](img, mask, box, np.random.default_rng(seed))
        _assert_aligned(out_img, out_mask, (S, S))


@pytest.mark.parametrize("op", ["hflip", "vflip", "flip_both", "rot90", "rot180", "rot270"])
def test_box_follows_exact_ops(op):
    img, _, box = _sample()
    mask = np.zeros((S, S), np.uint8)
    mask[10:30, 5:20] = 255  # exactly the box
    _, out_mask, out_box = GEOMETRIC[op](img, mask, box, None)
    np.testing.assert_array_equal(out_box, _bbox(out_mask))


@pytest.mark.parametrize("op", ["random_resized_crop", "shift_scale_rotate"])
def test_box_follows_affine_ops(op):
    img, _, box = _sample()
    mask = np.zeros((S, S), np.uint8)
    mask[10:30, 5:20] = 255
    for seed in range(6):
        _, out_mask, out_box = GEOMETRIC[op](img, mask, box, np.random.default_rng(seed))
        if not out_mask.any():
            continue
        # The box is the hull of the moved corners: it holds the moved mask (1.5 px of interpolation slack).
        got = _bbox(out_mask)
        assert np.all(out_box[:2] <= got[:2] + 1.5) and np.all(out_box[2:] >= got[2:] - 1.5), (seed, out_box, got)


def test_box_leaving_the_picture_becomes_unknown():
    img, mask, _ = _sample()
    m = A.crop_resize_matrix(30, 30, 10, 10, S, S)  # zoom into a corner away from the box
    _, _, box = A.warp_affine(img, mask, np.array([0, 0, 5, 5], np.float32), m)
    assert np.all(np.isnan(box))


@pytest.mark.parametrize("model", ["lfdl", "mitl"])
def test_recipes_keep_size_binary_mask_and_are_seeded(model):
    img, mask, box = _sample()
    seen = set()
    for seed in range(12):
        i1, m1, b1 = A.augment(model, img, mask, np.random.default_rng(seed), box.copy())
        i2, m2, b2 = A.augment(model, img, mask, np.random.default_rng(seed), box.copy())
        assert i1.shape == img.shape and m1.shape == mask.shape and i1.dtype == np.uint8
        assert set(np.unique(m1)) <= {0, 255}
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(m1, m2)
        seen.add(i1.tobytes())
    assert len(seen) > 6  # different seeds, different samples


def test_non_square_inputs_keep_their_size():
    img, mask, box = _sample(0, 40, 56)
    for seed in range(8):
        for model in ("lfdl", "mitl"):
            i, m, _ = A.augment(model, img, mask, np.random.default_rng(seed), box)
            assert i.shape == img.shape and m.shape == mask.shape


def test_pixel_ops():
    img, _, _ = _sample()
    g = A.to_gray(img)
    assert g.shape == img.shape and np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    j = A.jpeg_opencv(img, 60)
    assert j.shape == img.shape and j.dtype == np.uint8 and not np.array_equal(j, img)
    assert np.array_equal(A.brightness_contrast(img, 0.0, 0.0), img)
    assert A.brightness_contrast(img, 0.1, 0.0).astype(int).mean() > img.astype(int).mean()
    assert np.array_equal(A.hue_saturation_value(np.zeros_like(img), 0, 0, 0), np.zeros_like(img))
    n = A.gaussian_noise(img, np.random.default_rng(0))
    assert n.shape == img.shape and n.dtype == np.uint8
    assert A.fancy_pca(img, np.random.default_rng(0)).shape == img.shape
    assert A.gaussian_blur(img, 5).shape == img.shape


# ------------------------------------------------------------------- IMDL-BenCo's copy-move and inpainting
def _textured(seed=0, h=40, w=56):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.zeros((h, w), np.uint8)


def test_copy_move_pastes_a_copied_window_and_marks_it():
    img, mask = _textured()
    for seed in range(8):
        rng = np.random.default_rng(seed)
        out, m = A.random_copy_move(img, mask, rng)
        # replay the draws: the source and the destination windows
        r = np.random.default_rng(seed)
        cy, cx, wh, ww = A.tamper_window(r, 40, 56)
        py, px, _, _ = A.tamper_window(r, 40, 56, size=(wh, ww))
        assert 2 <= wh < 32 and 2 <= ww < 44  # ⌊0.05·side⌋ .. ⌊0.8·side⌋ (exclusive), as IMDL-BenCo
        np.testing.assert_array_equal(out[py:py + wh, px:px + ww], img[cy:cy + wh, cx:cx + ww])
        expected = np.zeros_like(mask)
        expected[py:py + wh, px:px + ww] = 255
        np.testing.assert_array_equal(m, expected)
        outside = expected == 0
        np.testing.assert_array_equal(out[outside], img[outside])
        assert not mask.any()  # inputs untouched


def test_inpainting_fills_a_window_with_opencv_and_marks_it():
    import cv2

    img, mask = _textured(1)
    mask[:5, :5] = 255  # an existing manipulation stays
    flags = set()
    for seed in range(10):
        out, m = A.random_inpainting(img, mask, np.random.default_rng(seed))
        r = np.random.default_rng(seed)
        y, x, wh, ww = A.tamper_window(r, 40, 56)
        flag = cv2.INPAINT_TELEA if r.random() > 0.5 else cv2.INPAINT_NS
        flags.add(flag)
        region = np.zeros((40, 56), np.uint8)
        region[y:y + wh, x:x + ww] = 1
        np.testing.assert_array_equal(out, cv2.inpaint(img, region, 3, flag))
        assert (m[y:y + wh, x:x + ww] == 255).all() and (m[:5, :5] == 255).all()
        assert ((m == 255) == ((region == 1) | (mask == 255))).all()
        np.testing.assert_array_equal(out[region == 0], img[region == 0])
        assert not np.array_equal(out[region == 1], img[region == 1])
    assert flags == {cv2.INPAINT_TELEA, cv2.INPAINT_NS}


def test_mitl_recipe_tampers_about_one_sample_in_five():
    """p 0.1 each, independent: an empty mask gains manipulated pixels with probability 1 − 0.9² = 0.19."""
    img, mask = _textured(2, 32, 32)
    n = 400
    hits = sum(A.augment("mitl", img, mask, np.random.default_rng(seed))[1].any() for seed in range(n))
    assert 0.12 < hits / n < 0.27, hits
    assert not any(A.augment("lfdl", img, mask, np.random.default_rng(seed))[1].any() for seed in range(60))
    never = sum(A.imdl_tampering(img, mask, np.random.default_rng(s), 0.0, 0.0)[1].any() for s in range(50))
    always = sum(A.imdl_tampering(img, mask, np.random.default_rng(s), 1.0, 1.0)[1].any() for s in range(50))
    assert (never, always) == (0, 50)


def test_fast_pixel_ops_equal_their_reference_formulas():
    """The vectorised ops (look-up tables, cv2 threshold/rotate, exact colour covariance) give the numbers of the
    direct numpy formulas; the float32 Gaussian noise has the float64 version's distribution (KS test)."""
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (61, 47, 3), dtype=np.uint8)
    for b, c in ((0.13, -0.07), (-0.2, 0.2), (0.0, 0.0)):
        ref = np.clip(np.rint(img.astype(np.float32) * (1.0 + c) + b * 255.0), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(A.brightness_contrast(img, b, c), ref)
    x = img.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(A.colour_covariance(img), np.cov(x - x.mean(axis=0), rowvar=False), rtol=1e-10,
                               atol=1e-15)
    for seed in range(5):
        cov = np.cov(x - x.mean(axis=0), rowvar=False)
        vals, vecs = np.linalg.eigh(cov)
        delta = vecs @ (np.random.default_rng(seed).normal(0.0, 0.1, 3) * vals)
        ref = np.clip(np.rint(img.astype(np.float64) + delta * 255.0), 0, 255).astype(np.uint8)
        got = A.fancy_pca(img, np.random.default_rng(seed))
        assert np.abs(got.astype(int) - ref).max() <= 1 and (got != ref).mean() < 1e-3  # rounding ties at most
    m = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    np.testing.assert_array_equal(A.binarize_train_mask(m), np.where(m > 127.5, 255, 0).astype(np.uint8))
    for k in (1, 2, 3):
        i2, m2, _ = A.rot90(img[:47, :47], m[:20, :20], None, k)
        np.testing.assert_array_equal(i2, np.rot90(img[:47, :47], k, axes=(0, 1)))
        np.testing.assert_array_equal(m2, np.rot90(m[:20, :20], k, axes=(0, 1)))
    grey = np.full((64, 64, 3), 128, np.uint8)
    new = np.concatenate([A.gaussian_noise(grey, np.random.default_rng(s), (30.0, 30.0)).ravel() for s in range(4)])
    r = np.random.default_rng(99)
    old = np.concatenate([np.clip(grey.astype(np.float32) + r.normal(0.0, np.sqrt(30.0), grey.shape), 0, 255)
                          .astype(np.uint8).ravel() for _ in range(4)])
    assert ks_2samp(new.astype(float), old.astype(float)).pvalue > 1e-3
    assert abs(new.astype(float).var() - old.astype(float).var()) < 1.5
