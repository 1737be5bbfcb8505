"""Reading and writing images and masks, with clear errors and atomic writes.

Every reader raises :class:`BadImageError` naming the file and what is wrong with it, never a bare library
exception, so a stage can record the file in its error ledger and go on with the next one.

Conventions (SYSTEM.md):
- images are returned as ``H×W×3 uint8`` RGB arrays, EXIF orientation applied (as image viewers show them);
- ground-truth masks: single-channel, ``> 127`` is manipulated;
- probability masks: ``v = round(255·p)`` stored as single-channel uint8 PNG, read back as ``v / 255``.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Pillow's default guard against decompression bombs (~89 Mpx); anything above is refused, not decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
EXIF_ORIENTATION = 274  # the EXIF tag that says how to turn the stored pixels for display


class BadImageError(ValueError):
    """An input file that cannot be used. ``str(err)`` is a one-line reason that names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def walk_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file below ``folder`` in sorted order, hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and is_image_file(f))
    return found


def _open(path: str | os.PathLike) -> Image.Image:
    p = Path(path)
    if not p.exists():
        raise BadImageError(p, "file does not exist")
    if p.stat().st_size == 0:
        raise BadImageError(p, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(p)
            w, h = img.size
            if MAX_PIXELS and w * h > MAX_PIXELS:
                raise BadImageError(p, f"image is {w}x{h} = {w * h} pixels, above the decompression-bomb limit of {MAX_PIXELS}")
            img.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(p, f"refused: above the decompression-bomb limit of {MAX_PIXELS} pixels ({e})") from None
    except UnidentifiedImageError:
        raise BadImageError(p, "not an image file (Pillow cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise BadImageError(p, f"image file is truncated ({msg})") from None
        raise BadImageError(p, f"corrupt or unreadable image ({msg})") from None
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        # 16-bit (or 32-bit "I" mode) images: scale the full range of the type down to 8 bits.
        maxval = 65535 if arr.max(initial=0) > 255 or arr.dtype == np.uint16 else 255
        return np.clip(np.round(arr.astype(np.float64) * (255.0 / maxval)), 0, 255).astype(np.uint8)
    arr = arr.astype(np.float64)
    if arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` as viewers show the image (EXIF orientation 5–8 swaps them), from the header only.

    Raises :class:`BadImageError` naming the file when it cannot be opened.
    """
    p = Path(path)
    if not p.exists():
        raise BadImageError(p, "file does not exist")
    try:
        with Image.open(p) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            except Exception:  # a broken EXIF block: the stored orientation
                orientation = 1
    except Exception as e:  # any Pillow failure means the file is unusable
        raise BadImageError(p, f"not a readable image ({str(e) or type(e).__name__})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any supported image as ``H×W×3 uint8`` RGB.

    Grayscale, 16-bit, palette, RGBA (alpha dropped), CMYK and EXIF-rotated inputs are
    converted; corrupt, truncated, empty, non-image and oversized files raise :class:`BadImageError`.
    """
    img = _open(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block is not a reason to lose the pixels
        pass
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = _to_uint8(np.asarray(img))
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "RGBA" or mode == "LA" or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")  # drop alpha: forensic pixels are the colour channels
    elif mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImageError(path, f"unexpected pixel layout {arr.shape} after conversion to RGB")
    return np.ascontiguousarray(arr)


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel image (a mask) as ``H×W uint8``; colour masks are reduced to their max channel."""
    img = _open(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    return np.ascontiguousarray(_to_uint8(arr))


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a boolean ``H×W`` array (``> 127`` is manipulated).

    With ``expected_hw`` the size is checked and a mismatch raises :class:`BadImageError`.
    """
    arr = read_gray(path)
    if expected_hw is not None and tuple(arr.shape[:2]) != tuple(expected_hw):
        raise BadImageError(path, f"mask is {arr.shape[1]}x{arr.shape[0]} but its image is {expected_hw[1]}x{expected_hw[0]}")
    return arr > 127


def read_prob_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a stored probability mask: ``float32`` in [0, 1], ``v / 255``."""
    return read_gray(path).astype(np.float32) / 255.0


def prob_to_uint8(prob: np.ndarray) -> np.ndarray:
    """Encode probabilities as ``v = round(255·p)``."""
    return np.clip(np.rint(np.asarray(prob, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def binarize(values_uint8: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binarise a stored probability mask: ``v / 255 >= threshold`` (v ≥ 128 at 0.5)."""
    return values_uint8.astype(np.float64) / 255.0 >= threshold


# --------------------------------------------------------------------------------------------- atomic writes
def atomic_path(path: str | os.PathLike):
    """Context manager yielding a temporary path beside ``path``; on success it is renamed onto ``path``."""
    return _AtomicPath(Path(path))


class _AtomicPath:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp" + self.path.suffix, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def write_png(path: str | os.PathLike, arr: np.ndarray, params: list[int] | None = None) -> None:
    """Write a uint8 array (H×W or H×W×3 RGB) as PNG, atomically.

    Default: zlib level 1 with the UP row filter: probability masks are written and re-read many times per run,
    and this measured faster to encode and to decode than Pillow's level 1 (benchmarks/bench_fuse_eval.py).
    ``params`` are OpenCV ``IMWRITE_PNG_*`` settings for other content (fusion's binary masks).
    """
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8 or bool, got {arr.dtype} for {path}")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, _PNG_PARAMS if params is None else params)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_bytes_atomic(path, buf.tobytes())


_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def write_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """Write an RGB uint8 image atomically; the format follows the extension (JPEG quality ``quality``)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
           ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}")
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    if fmt == "PNG":
        kwargs = {"compress_level": 1}
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(tmp, format=fmt, **kwargs)


def write_prob_mask(path: str | os.PathLike, prob: np.ndarray) -> None:
    """Store a probability map as a single-channel uint8 PNG, ``round(255·p)``."""
    write_png(path, prob_to_uint8(prob))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_parquet(path: str | os.PathLike, df) -> None:
    """Write a pandas DataFrame to Parquet atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(path: str | os.PathLike, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
