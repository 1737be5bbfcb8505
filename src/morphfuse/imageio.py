"""Reading and writing images and masks, with clear errors and atomic writes; walking folders of images.

Every reader raises :class:`BadImageError` naming the file and what is wrong with it, never a bare library
exception, so a stage can record the file in its error ledger and go on with the next one. Every writer raises
:class:`~morphfuse.errors.OutputError` (one line: the path and the cause, e.g. no space left) and leaves no
partial file behind.

Conventions (SYSTEM.md):
- images are returned as ``H×W×3 uint8`` RGB arrays, EXIF orientation applied (as image viewers show them);
- ground-truth (binary) masks are read by :func:`read_mask`, one reader for every encoding (see there): 0/255
  (``> 127`` is manipulated), 0/1, palette, 1-bit, 16-bit, colour; a mask that would read as empty although its
  file holds non-zero values is refused, never silently empty;
- probability masks: ``v = round(255·p)`` stored as single-channel uint8 PNG, read back as ``v / 255``. There, 0
  and 1 are legal (low) probabilities: a map holding only 0 and 1 is read as such, and noted (:class:`EncodingNotes`).
- images too small or too thin to analyse (:func:`unusable_size`: short side under :data:`MIN_SIDE` px, aspect
  ratio beyond :data:`MAX_ASPECT`) are refused by the stages that give verdicts, with that reason;
- images over :data:`MAX_PIXELS` pixels are refused before decoding (a guard against decompression bombs).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import stat as _stat
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import OutputError, UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# The one pixel limit (Pillow's default guard, ~89.5 Mpx): an image above it is refused, never decoded.
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# An image whose short side is under MIN_SIDE px, or whose long side is more than MAX_ASPECT times its short
# side, is too small or too thin to analyse: the models resize every face crop and the whole image to a square.
MIN_SIDE = 32
MAX_ASPECT = 10.0
EXIF_ORIENTATION = 274  # the EXIF tag that says how to turn the stored pixels for display
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class BadImageError(ValueError):
    """An input file that cannot be used. ``str(err)`` is a one-line reason that names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def unusable_size(width: int, height: int, min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT) -> str | None:
    """Why an image of ``width × height`` cannot be analysed (too thin, too small), or None when it can."""
    short, long_ = min(width, height), max(width, height)
    if short < 1:
        return f"image is {width}x{height}: it has no pixels"
    if long_ / short > max_aspect:
        return (f"too thin to analyse: {width}x{height}, an aspect ratio of {long_ / short:.0f}:1 (the limit is "
                f"{max_aspect:g}:1)")
    if short < min_side:
        return f"too small to analyse: {width}x{height} (the short side must be at least {min_side} px)"
    return None


# ---------------------------------------------------------------------------------------------- walking
@dataclass
class Walk:
    """What :func:`walk_tree` found: the files (each once), the folders entered (each once), the problems
    ``(path, reason)`` (loops, dangling links, unreadable folders, second paths to one file) and the folders left
    out by ``skip_dir`` ``(path, reason)``."""

    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _link_problem(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symbolic link loop: the link leads back to itself and cannot be resolved"
    if e.errno == errno.ENOENT and os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"dangling symbolic link: its target {target} does not exist"
    return f"cannot be read ({e.strerror or e})"


def _list_entry(e: os.DirEntry, walk: Walk, seen_files: dict, want, files: bool, hidden_dirs: bool,
                hidden_files: bool) -> Path | None:
    """One entry of a folder being walked: a file is listed in ``walk`` (or a problem line says why not); a folder
    to walk is returned."""
    p = Path(e.path)
    try:
        is_dir = e.is_dir()
    except OSError:
        is_dir = False
    hidden = e.name.startswith(".")
    if is_dir:
        return p if not hidden or hidden_dirs else None
    if hidden and not hidden_files:
        return None
    link = e.is_symlink()
    if not files or (want is not None and not want(e.name)):
        if link and not os.path.exists(p):  # a dangling link may have been a folder: say so
            try:
                os.stat(p)
            except OSError as err:
                walk.problems.append((p, _link_problem(p, err)))
        return None
    try:
        fst = e.stat()
    except OSError as err:
        walk.problems.append((p, _link_problem(p, err)))
        return None
    if not _stat.S_ISREG(fst.st_mode):
        walk.problems.append((p, "not a regular file (a pipe, socket or device): left out"))
        return None
    key = (fst.st_dev, fst.st_ino)
    if key in seen_files:
        walk.problems.append((p, f"the same file as {seen_files[key]} (a second path to it, by a link): "
                                 "listed once"))
        return None
    seen_files[key] = p
    walk.files.append(p)
    return None


def _new_subdirs(subdirs: list[Path], ancestors: frozenset, seen_dirs: dict, walk: Walk, skip_dir) -> list:
    """The subfolders to walk, each with its ancestors' keys: a folder already entered (a loop, or a second path)
    and a folder ``skip_dir`` leaves out are recorded instead."""
    pushed = []
    for p in subdirs:
        try:
            dst = os.stat(p)
        except OSError as err:
            walk.problems.append((p, _link_problem(p, err)))
            continue
        key = (dst.st_dev, dst.st_ino)
        if key in seen_dirs:
            first = seen_dirs[key]
            if key in ancestors:
                reason = f"symbolic link loop: this folder leads back to {first}, which contains it; not followed"
            else:
                reason = f"the same folder as {first}, already walked: not walked twice"
            walk.problems.append((p, reason))
            continue
        if skip_dir is not None:
            why = skip_dir(p)
            if why:
                walk.skipped.append((p, why))
                continue
        seen_dirs[key] = p
        pushed.append((p, ancestors | {key}))
    return pushed


def walk_tree(root: str | os.PathLike, want: Callable[[str], bool] | None = None, *, hidden_dirs: bool = False,
              hidden_files: bool = False, files: bool = True,
              skip_dir: Callable[[Path], str | None] | None = None) -> Walk:
    """Every file below ``root`` in sorted order (a folder's files, then each subfolder in turn, as ``os.walk``).

    Symbolic links are followed, but every folder is entered once (by device and inode), so a link back up the
    tree is a problem line ("symbolic link loop"), not an endless walk, and a second path to a folder is walked
    once; every file is listed once (a second path to it, by a link, is a problem line). Dangling links and
    links that loop are problem lines too. ``want(name)`` selects files; hidden names (leading ``.``) are left
    out unless asked for; ``files=False`` lists folders only (cheap: no file is looked at). ``skip_dir(path)``
    returns a reason to leave a folder out (recorded in ``skipped``) or None.
    """
    root = Path(root)
    walk = Walk()
    try:
        st = os.stat(root)
    except OSError as e:
        walk.problems.append((root, _link_problem(root, e)))
        return walk
    seen_dirs: dict[tuple[int, int], Path] = {(st.st_dev, st.st_ino): root}
    seen_files: dict[tuple[int, int], Path] = {}
    stack: list[tuple[Path, frozenset]] = [(root, frozenset({(st.st_dev, st.st_ino)}))]
    while stack:
        d, ancestors = stack.pop()
        walk.dirs.append(d)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            walk.problems.append((d, f"cannot list this folder ({e.strerror or e})"))
            continue
        subdirs = [p for e in entries if (p := _list_entry(e, walk, seen_files, want, files, hidden_dirs,
                                                               hidden_files)) is not None]
        pushed = _new_subdirs(subdirs, ancestors, seen_dirs, walk, skip_dir)
        stack.extend(reversed(pushed))
    return walk


def walk_images(folder: str | os.PathLike, problems: list | None = None,
                skip_dir: Callable[[Path], str | None] | None = None) -> list[Path]:
    """Every image file below ``folder`` in sorted order, hidden files and folders skipped (see :func:`walk_tree`:
    links followed, each folder and file once). Problems (loops, dangling links) are appended to ``problems`` as
    ``(path, reason)``, or logged as warnings when it is None."""
    w = walk_tree(folder, is_image_file, skip_dir=skip_dir)
    if problems is None:
        for p, why in w.problems:
            log.warning("%s: %s", p, why)
    else:
        problems.extend(w.problems)
    for p, why in w.skipped:
        log.info("%s: left out (%s)", p, why)
    return w.files


def identical_files(paths: list[Path]) -> list[list[int]]:
    """Groups (indices into ``paths``, two or more each) of files with identical bytes.

    Sizes are compared first and only files that share a size are hashed (SHA-256), so a dataset of distinct
    images costs one ``stat`` per file. Unreadable files are left out.
    """
    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(paths):
        try:
            by_size.setdefault(os.stat(p).st_size, []).append(i)
        except OSError:
            continue
    groups = []
    for size, idx in by_size.items():
        if len(idx) < 2:
            continue
        by_hash: dict[str, list[int]] = {}
        for i in idx:
            try:
                by_hash.setdefault(sha256_file(paths[i]), []).append(i)
            except OSError:
                continue
        groups.extend(g for g in by_hash.values() if len(g) > 1)
    return sorted(groups)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- opening
_OPEN_LOCK = threading.Lock()


def _open_header(p: Path) -> Image.Image:
    """``Image.open`` with Pillow's own bomb check off: our one limit (:data:`MAX_PIXELS`) is checked on the size.
    Only the header is read here."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(p)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _check_file(p: Path) -> None:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise BadImageError(p, f"dangling symbolic link: its target {os.readlink(p)} does not exist") from None
        raise BadImageError(p, "file does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadImageError(p, "symbolic link loop: the link leads back to itself") from None
        raise BadImageError(p, f"cannot be read ({e.strerror or e})") from None
    if _stat.S_ISDIR(st.st_mode):
        raise BadImageError(p, "is a folder, not an image file")
    if not _stat.S_ISREG(st.st_mode):
        raise BadImageError(p, "not a regular file (a pipe, socket or device): give the image as a file")
    if st.st_size == 0:
        raise BadImageError(p, "file is empty (0 bytes)")


def _too_many_pixels(p: Path, w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise BadImageError(p, f"image is {w}x{h} = {w * h} pixels, over the limit of {MAX_PIXELS} pixels "
                               "(refused without decoding: the decompression-bomb guard)")


def _is_tiff(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _unknown_format(p: Path) -> BadImageError:
    return BadImageError(p, "not an image file: unknown format (none of JPEG, PNG, WebP, BMP, TIFF)")


def _open(path: str | os.PathLike) -> Image.Image:
    """Open and decode an image with Pillow (TIFF sample formats Pillow lacks through tifffile)."""
    p = Path(path)
    _check_file(p)
    try:
        img = _open_header(p)
    except UnidentifiedImageError:
        if _is_tiff(p):
            return _open_tiff(p)
        raise _unknown_format(p) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(p, f"corrupt or unreadable image ({str(e) or type(e).__name__})") from None
    w, h = img.size
    _too_many_pixels(p, w, h)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise BadImageError(p, f"image file is truncated ({msg})") from None
        raise BadImageError(p, f"corrupt or unreadable image ({msg})") from None
    return img


# TIFF files Pillow does not read (float, 4-channel float, ...): tifffile decodes them; their samples must map to
# 8 bits without guessing: unsigned integers by their full range, floats only when they lie in [0, 1].
_SAMPLE_FORMATS = {1: "unsigned integer", 2: "signed integer", 3: "floating point", 4: "undefined",
                   5: "complex integer", 6: "complex floating point"}


def _tiff_page(p: Path):
    import tifffile

    try:
        tif = tifffile.TiffFile(p)
    except Exception as e:  # noqa: BLE001 - any parser failure means the file is unusable
        raise BadImageError(p, f"corrupt or unreadable TIFF ({str(e) or type(e).__name__})") from None
    if not tif.pages:
        tif.close()
        raise BadImageError(p, "TIFF file without any image")
    return tif, tif.pages[0]


def _tiff_layout(p: Path, page) -> tuple[int, int, int]:
    """(width, height, orientation) of a TIFF page; BadImageError for layouts that are not one 2-D image."""
    sf = int(getattr(page, "sampleformat", 1))
    bits = int(getattr(page, "bitspersample", 8))
    spp = int(getattr(page, "samplesperpixel", 1))
    kind = _SAMPLE_FORMATS.get(sf, f"code {sf}")
    if sf not in (1, 3) or (sf == 1 and bits not in (8, 16)) or (sf == 3 and bits not in (16, 32, 64)):
        raise BadImageError(p, f"unsupported TIFF sample format: {bits}-bit {kind} samples ({spp} per pixel); "
                               "morphfuse reads 8/16-bit unsigned integers and 16/32/64-bit floats in [0, 1]")
    if spp not in (1, 2, 3, 4):
        raise BadImageError(p, f"unsupported TIFF layout: {spp} samples per pixel (expected 1 to 4: grey, "
                               "grey + alpha, RGB, RGB + alpha)")
    w, h = int(page.imagewidth), int(page.imagelength)
    orient = 1
    tag = page.tags.get(EXIF_ORIENTATION)
    if tag is not None:
        try:
            orient = int(tag.value)
        except (TypeError, ValueError):
            orient = 1
    return w, h, orient


def _open_tiff(p: Path) -> Image.Image:
    tif, page = _tiff_page(p)
    with tif:
        w, h, orient = _tiff_layout(p, page)
        _too_many_pixels(p, w, h)
        try:
            arr = page.asarray()
        except Exception as e:  # noqa: BLE001 - e.g. a compression that needs the imagecodecs package
            raise BadImageError(p, f"TIFF pixels cannot be decoded ({str(e) or type(e).__name__})") from None
    if arr.ndim == 3 and arr.shape[0] in (2, 3, 4) and arr.shape[1:] == (h, w):  # planar: samples first
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[:2] != (h, w):
        raise BadImageError(p, f"unsupported TIFF layout: pixel array of shape {arr.shape} for a {w}x{h} image")
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float64)
        if not np.isfinite(a).all():
            raise BadImageError(p, "TIFF with float samples that are not finite (NaN or infinity)")
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise BadImageError(p, f"unsupported TIFF sample values: floats from {lo:g} to {hi:g}; floats must lie in "
                                   "[0, 1] to map to 8 bits without guessing their range")
        u8 = np.rint(a * 255.0).astype(np.uint8)
    elif arr.dtype == np.uint16:
        u8 = np.rint(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    else:
        u8 = arr.astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[1 if u8.ndim == 2 else u8.shape[2]]
    img = Image.fromarray(u8 if u8.ndim == 3 else u8, mode=None)
    if img.mode != mode:
        img = img.convert(mode)
    if orient in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orient])
    return img


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block is not a reason to lose the pixels
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

    Raises :class:`BadImageError` naming the file and what is wrong: missing, empty, unknown format, over the
    pixel limit, an unsupported TIFF sample format, corrupt header.
    """
    p = Path(path)
    _check_file(p)
    try:
        with _open_header(p) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            except Exception:  # a broken EXIF block: the stored orientation
                orientation = 1
    except UnidentifiedImageError:
        if not _is_tiff(p):
            raise _unknown_format(p) from None
        tif, page = _tiff_page(p)
        with tif:
            w, h, orientation = _tiff_layout(p, page)
    except Exception as e:  # any other Pillow failure means the file is unusable
        raise BadImageError(p, f"corrupt or unreadable image header ({str(e) or type(e).__name__})") from None
    _too_many_pixels(p, w, h)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any supported image as ``H×W×3 uint8`` RGB.

    Grayscale, 16-bit, palette, RGBA (alpha dropped), CMYK, float TIFF (samples in [0, 1]) and EXIF-rotated
    inputs are converted; corrupt, truncated, empty, non-image and oversized files raise :class:`BadImageError`.
    """
    img = _exif_transpose(_open(path))
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


def _pillow_values(path: str | os.PathLike) -> np.ndarray:
    """The stored values of an image through Pillow: palette images through their palette (RGBA), EXIF applied."""
    img = _exif_transpose(_open(path))
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    return np.asarray(img)


def _png_size(p: str) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if the file does not start like a PNG."""
    try:
        with open(p, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _cv2_values(path: str | os.PathLike) -> np.ndarray | None:
    """A PNG's stored values by OpenCV (fast; palette expanded to colour; channel order BGR(A), which the
    channel maximum and the alpha check do not mind), or None to go through Pillow (and its reasons)."""
    p = os.fspath(path)
    if not p.lower().endswith(".png"):
        return None
    size = _png_size(p)
    if size is None or size[0] * size[1] > MAX_PIXELS:
        return None  # Pillow says what is wrong
    arr = cv2.imread(p, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype not in (np.uint8, np.uint16) or arr.ndim not in (2, 3):
        return None
    return arr


def _single_channel(arr: np.ndarray, path, check_alpha: bool = True) -> np.ndarray:
    """Colour reduced to its maximum channel; alpha dropped (checked: a mask is never stored as transparency)."""
    if arr.ndim == 2:
        return arr
    c = arr.shape[2]
    colour = arr[..., :3] if c >= 3 else arr[..., :1]
    values = colour.max(axis=2) if colour.shape[2] > 1 else colour[..., 0]
    if c in (2, 4) and check_alpha:
        alpha = arr[..., c - 1]
        if not values.any() and alpha.min() != alpha.max():
            raise BadImageError(path, "the colour channels are all 0 but the alpha channel is not: morphfuse reads "
                                      "a mask from its grey or colour values, not from its transparency")
    return values


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel image (a probability mask) as ``H×W uint8``: palette images through their palette,
    colour reduced to its max channel, 16-bit scaled to 8 bits. No 0/1 rule: that is for binary masks only."""
    arr = _cv2_values(path)
    if arr is None:
        arr = _pillow_values(path)
    return np.ascontiguousarray(_to_uint8(_single_channel(arr, path, check_alpha=False)))


class EncodingNotes:
    """Counts files read in an unusual but unambiguous encoding, so a stage notes them once in its ledger.

    ``what`` names the files (e.g. "ground-truth mask"); ``meaning`` says how they were read.
    """

    def __init__(self, what: str, meaning: str):
        self.what, self.meaning = what, meaning
        self.count = 0
        self.example: str | None = None

    def add(self, path) -> None:
        self.count += 1
        if self.example is None:
            self.example = str(path)

    def message(self) -> str:
        return f"{self.count} {self.what}(s) hold only the values 0 and 1: {self.meaning} (e.g. {self.example})"

    def write(self, ledger) -> None:
        """One ``note:`` line in ``ledger`` (none when nothing was seen)."""
        if self.count:
            ledger.note("", self.example, self.message())
            log.info("note: %s", self.message())


def MaskNotes(what: str = "ground-truth mask") -> EncodingNotes:  # noqa: N802 - a constructor
    """Notes for binary masks stored as 0/1 (read as binary, 1 = manipulated)."""
    return EncodingNotes(what, "read as binary masks, 1 = manipulated")


def ProbNotes(what: str = "probability map") -> EncodingNotes:  # noqa: N802 - a constructor
    """Notes for probability maps holding only 0 and 1: legal (p <= 1/255), but most likely a binary mask."""
    return EncodingNotes(what, "read as probabilities by the contract v = round(255 p), so p <= 1/255 and no "
                               "pixel reaches the threshold; if these are binary masks, store them as 0/255")


def check_prob_encoding(values_u8: np.ndarray, path, notes: EncodingNotes | None) -> None:
    """Record a stored probability map that holds only 0 and 1 (with at least one 1) in ``notes``."""
    if notes is not None and values_u8.size and int(values_u8.max()) == 1:
        notes.add(path)


def mask_values(path: str | os.PathLike) -> np.ndarray:
    """The stored values of a binary mask as one channel (uint8, uint16, float or bool), before binarising:
    palette images through their palette, colour reduced to its max channel (alpha checked, then dropped)."""
    arr = _cv2_values(path)
    if arr is None:
        arr = _pillow_values(path)
    return _single_channel(arr, path)


def binarize_mask(values: np.ndarray, path, notes: EncodingNotes | None = None) -> np.ndarray:
    """Binarise a mask's stored values (:func:`mask_values`), one rule for every encoding:

    - 1-bit: as stored;
    - values all in {0, 1} (8- or 16-bit): 1 = manipulated (counted in ``notes``, for one ledger line);
    - 8-bit: ``> 127``; 16-bit: scaled to 8 bits, ``> 127`` (``> 32767``); float: ``> 0.5`` when at most 1, else
      ``> 127``;
    - a mask whose file holds non-zero values but nothing above the threshold is refused (``BadImageError``):
      never read as a silent all-empty mask. An all-zero mask is empty.
    """
    if values.dtype == bool:
        return values
    if np.issubdtype(values.dtype, np.floating):
        v = values.astype(np.float64)
        if not np.isfinite(v).all():
            raise BadImageError(path, "mask holds values that are not finite (NaN or infinity)")
        vmax = float(v.max(initial=0.0))
        out = v > 0.5 if vmax <= 1.0 else v > 127
    else:
        vmin, vmax = int(values.min(initial=0)), int(values.max(initial=0))
        if vmin < 0:
            raise BadImageError(path, f"mask holds negative values (down to {vmin})")
        if vmax == 0:
            return np.zeros(values.shape, bool)
        if vmax == 1:
            if notes is not None:
                notes.add(path)
            return values == 1
        hi16 = values.dtype == np.uint16 or vmax > 255
        out = values > (32767 if hi16 else 127)
    if vmax > 0 and not out.any():
        scale = "32767 (of 65535)" if values.dtype == np.uint16 or vmax > 255 else "127 (of 255)"
        raise BadImageError(path, f"mask holds non-zero values (max {vmax:g}) but none above {scale}: not a 0/255 "
                                  "(or 0/1) mask; store 255 (or 1) for manipulated pixels")
    return out


def nonbinary_fraction(values: np.ndarray) -> float:
    """Share of a mask's pixels that are neither of its two binary codes (0 and 1, 0 and 255, 0 and 65535)."""
    if values.dtype == bool or values.size == 0:
        return 0.0
    vmax = float(values.max())
    hi = 1 if vmax <= 1 else 65535 if values.dtype == np.uint16 else 255
    return float(np.count_nonzero((values != 0) & (values != hi))) / values.size


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None,
              notes: EncodingNotes | None = None) -> np.ndarray:
    """Read a binary (ground-truth) mask as a boolean ``H×W`` array: the one reader for every encoding, see
    :func:`binarize_mask` (0/255, 0/1, palette, 1-bit, 16-bit, colour: the max channel; alpha is not the mask).

    With ``expected_hw`` the size is checked and a mismatch raises :class:`BadImageError`. ``notes``
    (:func:`MaskNotes`) counts 0/1 masks for one ledger line.
    """
    values = mask_values(path)
    if expected_hw is not None and tuple(values.shape[:2]) != tuple(expected_hw):
        raise BadImageError(path, f"mask is {values.shape[1]}x{values.shape[0]} but its image is "
                                  f"{expected_hw[1]}x{expected_hw[0]}")
    return binarize_mask(values, path, notes)


def read_prob_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a stored probability mask: ``float32`` in [0, 1], ``v / 255``."""
    return read_gray(path).astype(np.float32) / 255.0


def prob_to_uint8(prob: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Encode probabilities as ``v = round(255·p)`` (computed in float64, ``chunk`` values at a time, so a
    full-size map needs no full-size float64 temporaries)."""
    prob = np.asarray(prob)
    out = np.empty(prob.shape, np.uint8)
    flat_in, flat_out = prob.reshape(-1), out.reshape(-1)
    for i in range(0, flat_in.size, chunk):
        part = np.rint(flat_in[i:i + chunk].astype(np.float64) * 255.0)
        flat_out[i:i + chunk] = np.clip(part, 0, 255, out=part)
    return out


def check_threshold(threshold) -> float:
    """Validate a probability threshold in [0, 1]."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not (0.0 <= t <= 1.0) or math.isnan(t):
        raise ValueError(f"threshold must be in [0, 1] (a probability, not a pixel value), got {threshold!r}")
    return t


def threshold_to_uint8(threshold: float) -> int:
    """The smallest stored value ``v`` (0..256) with ``v / 255 >= threshold``; 256 means no value reaches it.

    Computed with the very expression ``v / 255.0 >= t`` on every v, so that ``u8 >= threshold_to_uint8(t)``
    equals ``u8 / 255 >= t`` bit for bit (128 at t = 0.5), without converting the image to floats.
    """
    t = check_threshold(threshold)
    passing = np.flatnonzero(np.arange(256, dtype=np.float64) / 255.0 >= t)
    return int(passing[0]) if passing.size else 256


def binarize_prob_u8(values: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A stored probability map (uint8 ``H×W``, ``v = round(255·p)``) thresholded as ``v / 255 >= threshold``,
    as a uint8 0/255 mask (the form OpenCV morphology and PNG writing want)."""
    if values.dtype != np.uint8 or values.ndim != 2:
        raise ValueError(f"expected a single-channel uint8 mask (H×W), got {values.dtype} {values.shape}")
    c = threshold_to_uint8(threshold)
    if c == 0:
        return np.full(values.shape, 255, np.uint8)
    if c == 256:
        return np.zeros(values.shape, np.uint8)
    return cv2.threshold(values, c - 1, 255, cv2.THRESH_BINARY)[1]


def binarize_prob(values: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """:func:`binarize_prob_u8` as a bool array: ``v / 255 >= threshold`` (v ≥ 128 at 0.5). Binary masks (ground
    truth) are read by :func:`read_mask` instead, whose rule differs (0/1 masks, 16-bit, ``> 127``)."""
    return binarize_prob_u8(values, threshold) != 0


def read_prob_u8(path: str | os.PathLike) -> np.ndarray:
    """A stored probability map's values (uint8 ``H×W``), fast through OpenCV; anything unusual goes through
    :func:`read_gray`, which converts 16-bit/colour files and raises :class:`BadImageError` with a reason."""
    arr = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if arr is not None and arr.dtype == np.uint8 and arr.ndim == 2:
        return arr
    return read_gray(path)


# PNG parameters for binary masks: zlib level 1, no row filter, default strategy. Measured on 1024×1024 fused
# masks (one core): encode 2.5 ms + decode 1.2 ms. Level 1 alone keeps libpng's adaptive filtering (7 ms to
# encode); OpenCV's default (SUB filter + RLE) encodes in 2.4 ms but decodes in 4.2 ms, and every fused mask is
# read again by `evaluate`.
MASK_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
                   cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_DEFAULT]


def write_mask_png(path: str | os.PathLike, mask_u8: np.ndarray) -> None:
    """Write a 0/255 uint8 mask as PNG atomically, with the settings that suit binary masks."""
    write_png(path, mask_u8, params=MASK_PNG_PARAMS)


def image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` (numpy's order) of an image as displayed, from its header only (:func:`header_size`,
    which gives ``(width, height)``); ``BadImageError`` if it cannot be opened."""
    w, h = header_size(path)
    return h, w


def list_masks(folder: Path) -> dict[str, Path]:
    """``image_id -> path`` for the ``<image_id>.png`` files of a folder (hidden/temporary files ignored)."""
    out = {}
    other = 0
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if not e.name.lower().endswith(".png"):
                other += 1
            elif e.is_file():
                out[e.name[:-4]] = Path(e.path)
    if other:
        log.warning("%s: %d entries that are not <image_id>.png files were ignored", folder, other)
    return out


# --------------------------------------------------------------------------------------------- atomic writes
def atomic_path(path: str | os.PathLike):
    """Context manager yielding a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any failure the temporary file is removed; an OS error about the destination (no space, read-only,
    permission) becomes an :class:`~morphfuse.errors.OutputError` naming ``path``.
    """
    return _AtomicPath(Path(path))


def current_umask() -> int:
    """The process's umask (read by setting and restoring it): the mode a plain ``open`` would give new files."""
    u = os.umask(0)
    os.umask(u)
    return u


class _AtomicPath:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp" + self.path.suffix,
                                       dir=self.path.parent)
        except OSError as e:
            raise OutputError(self.path, e) from None
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
                os.chmod(self.tmp, 0o666 & ~current_umask())
                os.replace(self.tmp, self.path)
            except OSError as e:
                self.tmp.unlink(missing_ok=True)
                raise OutputError(self.path, e) from None
            return False
        self.tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(self.path, exc) from None
        return False


def write_png(path: str | os.PathLike, arr: np.ndarray, params: list[int] | None = None, bgr: bool = False) -> None:
    """Write a uint8 array (H×W or H×W×3 RGB; ``bgr=True``: already in OpenCV's BGR order) as PNG, atomically.

    Default: zlib level 1 with the UP row filter: probability masks are written and re-read many times per run,
    and this measured faster to encode and to decode than Pillow's level 1 (benchmarks/bench_fuse_eval.py).
    ``params`` are OpenCV ``IMWRITE_PNG_*`` settings for other content (fusion's binary masks).
    """
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8 or bool, got {arr.dtype} for {path}")
    if arr.ndim == 3 and not bgr:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, _PNG_PARAMS if params is None else params)
    if not ok:
        raise OutputError(path, "PNG encoding failed")
    write_bytes_atomic(path, buf)


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


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_bytes_atomic(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_parquet(path: str | os.PathLike, df) -> None:
    """Write a pandas DataFrame to Parquet atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(path: str | os.PathLike, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


class AppendLog:
    """A text file that grows by whole lines, each written with one ``write`` on an ``O_APPEND`` descriptor.

    A killed process leaves only complete lines (a line is never half written: a short write, e.g. on a full
    disk, is cut back with ``ftruncate`` before :class:`~morphfuse.errors.OutputError` is raised). ``header`` is
    written when the file is new or empty. :meth:`append` also flushes to the kernel (nothing is buffered in
    the process), so SIGTERM or kill -9 lose nothing that was appended; ``fsync`` on :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, header: str | None = None):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(self.path, e) from None
        if header is not None and os.fstat(self.fd).st_size == 0:
            self.append(header)

    def append(self, line: str) -> None:
        data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
        start = os.fstat(self.fd).st_size
        try:
            n = os.write(self.fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            try:
                os.ftruncate(self.fd, start)  # never leave half a line
            except OSError:
                pass
            raise OutputError(self.path, e) from None

    def close(self) -> None:
        if self.fd is None:
            return
        try:
            os.fsync(self.fd)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def csv_line(values) -> str:
    """One CSV line (RFC 4180 quoting, as pandas writes it) for :class:`AppendLog`."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def read_complete_lines(path: str | os.PathLike) -> str:
    """A file's text up to its last newline (a line cut by a crash is dropped); '' when it does not exist."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    end = data.rfind(b"\n")
    return data[: end + 1].decode("utf-8", errors="replace") if end >= 0 else ""
