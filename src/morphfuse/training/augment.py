"""Joint training-time augmentation of an image, its mask and (LFDL) its SSPSL reference box.

Pure functions on ``uint8`` numpy arrays (``H×W×3`` RGB image, ``H×W`` mask 0/255), driven by a
``numpy.random.Generator`` so that a sample's augmentation is a function of its seed alone (the training engine
seeds one generator per (epoch, sample): that is what makes resuming exact and independent of data workers).

- Every geometric op moves image, mask and box by the SAME transform (same interpolation, same border), then the
  mask is binarised ``> 127.5`` back to 0/255. Output size equals input size.
- Pixel ops (grey, JPEG, blur, noise, colour) touch the image only.
- A box is ``(4,) float32 x0, y0, x1, y1`` in pixel-edge coordinates (pixel i spans [i, i+1)), or None / NaN
  when unknown; it becomes NaN when a transform moves it out of the picture.

Recipes, as in the releases (probabilities read from the authors' albumentations pipelines):
- LFDL (Locate-and-Verify ``datasets/factory.py``): flip (horizontal, vertical or both) p .5, rot90 p .5, random
  resized crop (scale .3–1, square) p .4, shift-scale-rotate (shift .0625, scale ±.2, rotate ±45°, zero border)
  p .5; grey p .1, JPEG 60–100 p .3, Gaussian blur 3×3 p .05, Gaussian noise (variance 10–50) p .1, one of
  brightness/contrast, FancyPCA, hue/saturation/value p .5.
- MITL (Mesorch / IMDL-BenCo): random scale ±.2 (resample to s·size and back: the release's ``RandomScale`` followed
  by its resize to the network size), IMDL-BenCo's RandomCopyMove p .1 and RandomInpainting p .1 (they write 255
  into the mask), horizontal and vertical flip p .5 each, brightness ±.1 / contrast ±.1, JPEG 70–100 p .2, rot90
  p .5, Gaussian blur 3–7 p .2.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

_BORDER = cv2.BORDER_CONSTANT  # the LFDL release pads with zeros (image and mask alike)


# ------------------------------------------------------------------------------------------------- helpers
def binarize_train_mask(mask: np.ndarray) -> np.ndarray:
    """0/255 uint8 from any mask: ``> 127.5`` is manipulated."""
    if mask.dtype == np.uint8:  # cv2's threshold: the same 0/255 (> 127 for integers), 10x faster than np.where
        return cv2.threshold(np.ascontiguousarray(mask), 127, 255, cv2.THRESH_BINARY)[1]
    return np.where(mask > 127.5, np.uint8(255), np.uint8(0))


def _box_valid(box) -> bool:
    return box is not None and np.all(np.isfinite(box))


def _box_from_points(pts: np.ndarray, w: int, h: int) -> np.ndarray:
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    out = np.array([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], dtype=np.float32)
    if out[2] - out[0] <= 0 or out[3] - out[1] <= 0:
        return np.full(4, np.nan, np.float32)  # moved out of the picture: unknown from now on
    return out


def _corners(box) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=np.float64)


def transform_box_affine(box, matrix: np.ndarray, w: int, h: int):
    """Move a box through a cv2 forward affine ``matrix`` (pixel-centre convention): edges → centres → M → edges."""
    if not _box_valid(box):
        return box
    pts = _corners(box) - 0.5
    pts = pts @ matrix[:, :2].T + matrix[:, 2]
    return _box_from_points(pts + 0.5, w, h)


# ------------------------------------------------------------------------------------------ geometric ops
def flip(img: np.ndarray, mask: np.ndarray, box=None, code: int = 1):
    """cv2 flip code: 1 horizontal, 0 vertical, -1 both."""
    h, w = img.shape[:2]
    img, mask = cv2.flip(img, code), cv2.flip(mask, code)
    if _box_valid(box):
        x0, y0, x1, y1 = (float(v) for v in box)
        if code in (1, -1):
            x0, x1 = w - x1, w - x0
        if code in (0, -1):
            y0, y1 = h - y1, h - y0
        box = np.array([x0, y0, x1, y1], np.float32)
    return img, mask, box


_ROTATE = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def rot90(img: np.ndarray, mask: np.ndarray, box=None, k: int = 1):
    """Rotate by ``k`` quarter turns counter-clockwise (``np.rot90``). Non-square inputs only turn by 180° so
    that the output keeps the input's size."""
    h, w = img.shape[:2]
    k = k % 4
    if h != w and k % 2:
        k = 2
    if k == 0:
        return img, mask, box
    code = _ROTATE[k]  # cv2.rotate: np.rot90's pixels, without the strided copy
    img, mask = cv2.rotate(np.ascontiguousarray(img), code), cv2.rotate(np.ascontiguousarray(mask), code)
    if _box_valid(box):
        pts = _corners(box)
        ww, hh = w, h
        for _ in range(k):  # one counter-clockwise quarter turn: (x, y) -> (y, W - x), size (W, H) -> (H, W)
            pts = np.stack([pts[:, 1], ww - pts[:, 0]], axis=1)
            ww, hh = hh, ww
        box = _box_from_points(pts, ww, hh)
    return img, mask, box


def warp_affine(img: np.ndarray, mask: np.ndarray, box, matrix: np.ndarray):
    """Apply one forward affine (2×3, pixel-centre convention) to image and mask alike; output keeps the size."""
    h, w = img.shape[:2]
    img = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=_BORDER, borderValue=0)
    mask = cv2.warpAffine(mask, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=_BORDER, borderValue=0)
    return img, binarize_train_mask(mask), transform_box_affine(box, matrix, w, h)


def crop_resize_matrix(x0: float, y0: float, cw: float, ch: float, w: int, h: int) -> np.ndarray:
    """The affine that maps the crop ``[x0, x0+cw) × [y0, y0+ch)`` onto the whole ``w×h`` output (as a resize)."""
    sx, sy = w / cw, h / ch
    return np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5], [0.0, sy, (0.5 - y0) * sy - 0.5]], dtype=np.float64)


def random_resized_crop(img, mask, box, rng: np.random.Generator, scale=(0.3, 1.0), ratio=(1.0, 1.0)):
    """Crop a random area fraction ``scale`` (aspect ``ratio``) and resize it back to the input size."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):  # torchvision's rule: 10 tries, then the whole image
        target = area * rng.uniform(*scale)
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        r = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * r)))
        ch = int(round(math.sqrt(target / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return warp_affine(img, mask, box, crop_resize_matrix(x0, y0, cw, ch, w, h))
    return img, mask, box


def shift_scale_rotate_matrix(w: int, h: int, dx: float, dy: float, scale: float, angle: float) -> np.ndarray:
    """Rotation by ``angle`` degrees and scaling about the image centre, then a shift of (dx·w, dy·h)."""
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, scale)
    m[0, 2] += dx * w
    m[1, 2] += dy * h
    return m


def shift_scale_rotate(img, mask, box, rng: np.random.Generator, shift=0.0625, scale=0.2, rotate=45.0):
    h, w = img.shape[:2]
    m = shift_scale_rotate_matrix(w, h, rng.uniform(-shift, shift), rng.uniform(-shift, shift),
                                  1.0 + rng.uniform(-scale, scale), rng.uniform(-rotate, rotate))
    return warp_affine(img, mask, box, m)


def rescale(img, mask, box, factor: float):
    """Resample to ``factor``× the size and back (the release's RandomScale then resize): same geometry, new
    resampling traces. The mask takes the same two bilinear resizes and is binarised."""
    h, w = img.shape[:2]
    sw, sh = max(1, int(round(w * factor))), max(1, int(round(h * factor)))
    if (sw, sh) == (w, h):
        return img, mask, box
    img = cv2.resize(cv2.resize(img, (sw, sh), interpolation=cv2.INTER_LINEAR), (w, h), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(
        cv2.resize(mask, (sw, sh), interpolation=cv2.INTER_LINEAR), (w, h), interpolation=cv2.INTER_LINEAR
    )
    return img, binarize_train_mask(mask), box


# ---------------------------------------------------------------------------------------------- pixel ops
def to_gray(img: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[..., None], 3, axis=2)


def jpeg_opencv(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - cv2 always encodes uint8 RGB
        return img
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def gaussian_blur(img: np.ndarray, ksize: int) -> np.ndarray:
    ksize = int(ksize) | 1
    return cv2.GaussianBlur(img, (ksize, ksize), 0)


def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply a uint8 look-up table (256 entries, or 256×C: one per channel) to a uint8 image."""
    table = np.ascontiguousarray(table, dtype=np.uint8)
    if table.ndim == 2:
        table = table.reshape(1, 256, table.shape[1])
    return cv2.LUT(np.ascontiguousarray(img), table)


def gaussian_noise(img: np.ndarray, rng: np.random.Generator, var_limit=(10.0, 50.0)) -> np.ndarray:
    """Add N(0, var) noise, var ~ U(var_limit), then clip to [0, 255] and truncate to uint8 (albumentations'
    GaussNoise). The standard normals come from a torch generator seeded by ``rng`` (float32, ~4x faster than
    numpy's float64 normals; the same distribution, still a function of ``rng`` alone)."""
    std = math.sqrt(rng.uniform(*var_limit))
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    noise = torch.randn(img.shape, generator=gen, dtype=torch.float32).numpy()
    noise *= np.float32(std)
    noise += img
    np.clip(noise, 0, 255, out=noise)
    return noise.astype(np.uint8)


def brightness_contrast(img: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """``img·(1+contrast) + brightness·255`` (albumentations' rule with brightness_by_max), rounded and clipped;
    a function of the pixel value alone, so applied as a look-up table (the same float32 arithmetic per value)."""
    values = np.arange(256, dtype=np.float32) * (1.0 + contrast) + brightness * 255.0
    return _lut(img, np.clip(np.rint(values), 0, 255))


def hue_saturation_value(img: np.ndarray, dh: float, ds: float, dv: float) -> np.ndarray:
    """Shift OpenCV's uint8 HSV: hue in [0, 180) wraps, saturation and value clip."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(round(dh))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + int(round(ds)), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + int(round(dv)), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def colour_covariance(img: np.ndarray) -> np.ndarray:
    """The 3×3 covariance of the pixel colours in [0, 1] (``np.cov`` of ``img/255``, ddof 1), from exact sums:
    the products of uint8 values summed in float64 are integers far below 2**53, so the BLAS product is exact."""
    x = img.reshape(-1, 3).astype(np.float64)
    n = x.shape[0]
    if n < 2:
        return np.full((3, 3), np.nan)
    s = np.asarray(cv2.sumElems(np.ascontiguousarray(img))[:3], np.float64)  # exact: double sums of integers
    return (x.T @ x - np.outer(s, s) / n) / ((n - 1) * 255.0 * 255.0)


def fancy_pca(img: np.ndarray, rng: np.random.Generator, alpha: float = 0.1) -> np.ndarray:
    """AlexNet's PCA colour noise: add ``Σ_i α_i λ_i e_i`` (α_i ~ N(0, alpha)) of the pixel colour covariance.
    The shift is one constant per channel, applied as a per-channel look-up table."""
    cov = colour_covariance(img)
    if not np.all(np.isfinite(cov)):
        return img
    vals, vecs = np.linalg.eigh(cov)
    delta = vecs @ (rng.normal(0.0, alpha, 3) * vals)
    table = np.clip(np.rint(np.arange(256, dtype=np.float64)[:, None] + delta[None, :] * 255.0), 0, 255)
    return _lut(img, table)


# ----------------------------------------------------------------- IMDL-BenCo's tampering augmentations (MITL)
def tamper_window(rng: np.random.Generator, h: int, w: int, min_frac: float = 0.05, max_frac: float = 0.8,
                  size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """A random window ``(y, x, height, width)`` as IMDL-BenCo draws it: each side uniform in
    [max(1, ⌊min_frac·side⌋), max(that + 1, ⌊max_frac·side⌋)) (upper bound excluded), or ``size``; the
    position uniform over the places where it fits."""
    if size is None:
        lo_h, lo_w = max(1, int(h * min_frac)), max(1, int(w * min_frac))
        hi_h, hi_w = max(lo_h + 1, int(h * max_frac)), max(lo_w + 1, int(w * max_frac))
        wh, ww = int(rng.integers(lo_h, hi_h)), int(rng.integers(lo_w, hi_w))
    else:
        wh, ww = size
    wh, ww = min(wh, h), min(ww, w)
    return int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1)), wh, ww


def random_copy_move(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, min_frac: float = 0.05,
                     max_frac: float = 0.8, mask_value: int = 255):
    """IMDL-BenCo's RandomCopyMove: a random window of the image is copied onto another random place of the same
    size; the pasted window becomes ``mask_value`` in the mask. Returns new ``(img, mask)``."""
    h, w = mask.shape
    cy, cx, wh, ww = tamper_window(rng, h, w, min_frac, max_frac)
    py, px, _, _ = tamper_window(rng, h, w, min_frac, max_frac, size=(wh, ww))
    img, mask = img.copy(), mask.copy()
    img[py:py + wh, px:px + ww] = img[cy:cy + wh, cx:cx + ww].copy()
    mask[py:py + wh, px:px + ww] = mask_value
    return img, mask


def random_inpainting(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, min_frac: float = 0.05,
                      max_frac: float = 0.8, mask_value: int = 255):
    """IMDL-BenCo's RandomInpainting: a random window is filled by OpenCV inpainting (radius 3, Telea or
    Navier-Stokes with probability 1/2 each); the window becomes ``mask_value`` in the mask."""
    h, w = mask.shape
    y, x, wh, ww = tamper_window(rng, h, w, min_frac, max_frac)
    flag = cv2.INPAINT_TELEA if rng.random() > 0.5 else cv2.INPAINT_NS
    region = np.zeros((h, w), np.uint8)
    region[y:y + wh, x:x + ww] = 1
    img = cv2.inpaint(np.ascontiguousarray(img), region, 3, flag)
    mask = mask.copy()
    mask[y:y + wh, x:x + ww] = mask_value
    return img, mask


def imdl_tampering(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, p_copy_move: float = 0.1,
                   p_inpainting: float = 0.1):
    """RandomCopyMove (p 0.1) then RandomInpainting (p 0.1), in IMDL-BenCo's training order (after the scale)."""
    if rng.random() < p_copy_move:
        img, mask = random_copy_move(img, mask, rng)
    if rng.random() < p_inpainting:
        img, mask = random_inpainting(img, mask, rng)
    return img, mask


# ------------------------------------------------------------------------------------------------ recipes
def augment_lfdl(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, box=None):
    """The LFDL (Locate-and-Verify) training augmentation. Returns ``(img, mask, box)``, same sizes as given."""
    if rng.random() < 0.5:
        img, mask, box = flip(img, mask, box, int(rng.integers(-1, 2)))
    if rng.random() < 0.5:
        img, mask, box = rot90(img, mask, box, int(rng.integers(1, 4)))
    if rng.random() < 0.4:
        img, mask, box = random_resized_crop(img, mask, box, rng, scale=(0.3, 1.0), ratio=(1.0, 1.0))
    if rng.random() < 0.5:
        img, mask, box = shift_scale_rotate(img, mask, box, rng, shift=0.0625, scale=0.2, rotate=45.0)
    if rng.random() < 0.1:
        img = to_gray(img)
    if rng.random() < 0.3:
        img = jpeg_opencv(img, int(rng.integers(60, 101)))
    if rng.random() < 0.05:
        img = gaussian_blur(img, 3)
    if rng.random() < 0.1:
        img = gaussian_noise(img, rng, (10.0, 50.0))
    if rng.random() < 0.5:  # colour jitter: one of three
        which = int(rng.integers(0, 3))
        if which == 0:
            img = brightness_contrast(img, rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2))
        elif which == 1:
            img = fancy_pca(img, rng, 0.1)
        else:
            img = hue_saturation_value(img, rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-20, 20))
    return img, binarize_train_mask(mask), box


def augment_mitl(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, box=None):
    """The MITL (Mesorch) training augmentation. Returns ``(img, mask, box)``, same sizes as given."""
    img, mask, box = rescale(img, mask, box, 1.0 + rng.uniform(-0.2, 0.2))
    img, mask = imdl_tampering(img, mask, rng)  # copy-move and inpainting, p 0.1 each: they write 255 into the mask
    if rng.random() < 0.5:
        img, mask, box = flip(img, mask, box, 1)
    if rng.random() < 0.5:
        img, mask, box = flip(img, mask, box, 0)
    img = brightness_contrast(img, rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1))
    if rng.random() < 0.2:
        img = jpeg_opencv(img, int(rng.integers(70, 101)))
    if rng.random() < 0.5:
        img, mask, box = rot90(img, mask, box, int(rng.integers(1, 4)))
    if rng.random() < 0.2:
        img = gaussian_blur(img, int(rng.choice([3, 5, 7])))
    return img, binarize_train_mask(mask), box


RECIPES = {"lfdl": augment_lfdl, "mitl": augment_mitl}


def augment(model_name: str, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, box=None):
    """Dispatch to the model's recipe."""
    try:
        fn = RECIPES[model_name]
    except KeyError:
        raise ValueError(f"no augmentation recipe for model {model_name!r} (known: {', '.join(RECIPES)})") from None
    return fn(img, mask, rng, box)
