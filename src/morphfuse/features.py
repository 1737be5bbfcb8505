"""LFDL face crops (+ SRM residuals) and MITL whole images (+ DCT bands) for one manifest shard.

Outputs (docs/ARCHITECTURE.md, "Feature shards"), each an uncompressed ``.npz`` written atomically, loadable with
``np.load(path, allow_pickle=False)`` (strings are numpy unicode arrays):

- ``--out-lfdl``: one entry per crop of the crops parquet: the crop box of the original image resized to S×S,
  its mask resized the same way, the SSPSL reference rectangle mapped into S×S pixels, and in ``precompute``
  mode ``srm`` (N×3×S×S float16) = ``srm.srm_residuals`` of the LFDL input ``(rgb/255 − 0.5) / 0.5``;
- ``--out-mitl``: one entry per image: the whole image and its mask resized to M×M, and in ``precompute`` mode
  ``dct_high`` / ``dct_low`` (N×3×M×M float16) = ``dct.dct_bands`` of the ImageNet-normalised input.

Crop boxes are pixel-edge boxes: a crop is ``image[y0:y1, x0:x1]`` (x1, y1 exclusive), clipped to the image.
Beyond the contract, LFDL entries carry ``crop_kind`` (face | no_face | face_too_large) and MITL entries
``has_mask``; a 0-d JSON string ``meta`` (kind, mode, size, low_band, n, format) is read by
:func:`feature_shard_meta` and left out by :func:`load_feature_shard`.

Memory: one source image is decoded at a time and each output row goes straight to disk (:class:`ShardWriter`:
per-member temporary files beside the output, assembled into the npz in 16 MB chunks; SRM / DCT computed per
``--batch-size`` rows), so a shard of 4096 images needs the same memory as one of 64 (BENCHMARKS.md); the disk
needs the shard's size twice while it is assembled.

The same helpers (:func:`lfdl_inputs_from_rgb`, :func:`mitl_inputs_from_rgb`) turn stored uint8 pixels into model
inputs on the fly, so both modes give the same numbers up to float16 rounding.

Resizing: ``cv2.INTER_AREA`` along an axis that shrinks (it averages the source pixels, so no aliasing adds false
high-frequency content to the SRM/DCT inputs), ``cv2.INTER_LINEAR`` along one that is enlarged (a crop that
shrinks along one axis and grows along the other takes one step of each). Masks take the same geometric map with
``cv2.INTER_NEAREST_EXACT`` (pixel-centre aligned like the two above; plain ``INTER_NEAREST`` is shifted by half a
source pixel), so they stay 0/255.

Bad inputs never stop the run: an unreadable image, a fake whose mask file is missing, unreadable or of another
size than its image, an image whose size differs from the manifest's width/height, or an empty crop box becomes
one ledger line and is skipped. A fake with NO mask (empty ``mask_path``) is kept with ``has_mask = False``:
LFDL supervises it with SSPSL pseudo labels (LFDL.md) and prediction needs every image; it is counted in the log.
Reals have an all-zero mask and ``has_mask = True``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

if TYPE_CHECKING:  # pandas is imported where it is used: not on `morphfuse detect`'s path
    import pandas as pd

from . import dct, srm
from .errors import UserError
from .inputs import read_parquet_arg
from .imageio import BadImageError, atomic_path, read_image, read_mask
from .ledger import Ledger
from .normalize import IMAGENET_MEAN, IMAGENET_STD, lfdl_input, mitl_input  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MODES = ("precompute", "on_the_fly")
FORMAT_VERSION = 1
# The networks' input normalisation: the very functions the models apply (morphfuse.normalize).
lfdl_normalize, mitl_normalize = lfdl_input, mitl_input

MANIFEST_COLUMNS = ("image_id", "root", "path", "label", "mask_path", "split")
CROP_COLUMNS = ("image_id", "face_idx", "x0", "y0", "x1", "y1")
REF_COLUMNS = ("ref_x0", "ref_y0", "ref_x1", "ref_y1")


# ------------------------------------------------------------------------------------------------ geometry
def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an ``H×W[×C]`` uint8 image to ``size×size``: INTER_AREA where it shrinks, INTER_LINEAR where it grows."""
    h, w = img.shape[:2]
    img = np.ascontiguousarray(img)
    if (h, w) == (size, size):
        return img.copy()
    if h >= size and w >= size:
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if h <= size and w <= size:
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    step = cv2.resize(img, (min(w, size), min(h, size)), interpolation=cv2.INTER_AREA)  # shrink the long axis
    return cv2.resize(step, (size, size), interpolation=cv2.INTER_LINEAR)               # grow the short one


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a boolean (or 0/255) ``H×W`` mask to ``size×size`` uint8 0/255 with centre-aligned nearest neighbour."""
    m = np.ascontiguousarray(np.asarray(mask).astype(bool).astype(np.uint8) * 255)
    if m.shape == (size, size):
        return m
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)


def box_to_crop_coords(ref: tuple[float, float, float, float], box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Map a rectangle ``ref`` (original px) into the ``size×size`` resized crop of ``box`` = (x0, y0, x1, y1).

    Pixel-edge coordinates (the crop covers [x0, x1) × [y0, y1)); clipped to [0, size]. NaN×4 when ``ref`` is
    unknown (any NaN) or falls outside the crop.
    """
    r = np.asarray(ref, dtype=np.float64)
    nan = np.full(4, np.nan, dtype=np.float32)
    if not np.all(np.isfinite(r)):
        return nan
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = size / (x1 - x0), size / (y1 - y0)
    out = np.array([(r[0] - x0) * sx, (r[1] - y0) * sy, (r[2] - x0) * sx, (r[3] - y0) * sy])
    out = np.clip(out, 0.0, float(size))
    if out[2] <= out[0] or out[3] <= out[1]:
        return nan
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------- model inputs
def rgb_to_float(rgb, device: str | torch.device | None = None) -> torch.Tensor:
    """Stored pixels → ``(B, 3, H, W)`` float32 in [0, 1].

    Accepts uint8 ``(B, H, W, 3)`` / ``(H, W, 3)`` (numpy or torch; divided by 255, as the training data does), or
    a float tensor ``(B, 3, H, W)`` already in [0, 1] (returned as is, e.g. after augmentation).
    """
    if isinstance(rgb, np.ndarray):
        arr = np.ascontiguousarray(rgb)
        rgb = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    t = rgb
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor of pixels, got {type(rgb).__name__}")
    if t.dtype == torch.uint8:
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"uint8 pixels must be (B, H, W, 3) or (H, W, 3), got {tuple(t.shape)}")
        t = t.to(device) if device is not None else t
        return t.permute(0, 3, 1, 2).float() / 255.0
    if t.is_floating_point():
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"float pixels must be (B, 3, H, W) in [0, 1], got {tuple(t.shape)}")
        return t.to(device) if device is not None else t
    raise TypeError(f"pixels must be uint8 or float, got {t.dtype}")


def lfdl_inputs_from_rgb(rgb, device: str | torch.device | None = None,
                         with_srm: bool = True) -> dict[str, torch.Tensor]:
    """Model-ready LFDL batch tensors from stored pixels: ``rgb`` (B,3,S,S) in [0,1] and, with ``with_srm``,
    ``srm`` (B,3,S,S) = SRM residuals of the normalised input. ``rgb`` as in :func:`rgb_to_float`; float32 for
    uint8 pixels, else the dtype given."""
    x = rgb_to_float(rgb, device)
    out = {"rgb": x}
    if with_srm:
        out["srm"] = srm.srm_residuals(lfdl_normalize(x))
    return out


def mitl_inputs_from_rgb(rgb, low_band: str = "l_shape", device: str | torch.device | None = None,
                         with_dct: bool = True) -> dict[str, torch.Tensor]:
    """Model-ready MITL batch tensors: ``rgb`` (B,3,M,M) in [0,1] and, with ``with_dct``, ``dct_high`` and
    ``dct_low`` (B,3,M,M) in [0,1] = ``dct.dct_bands`` of the ImageNet-normalised input (dtypes as
    :func:`lfdl_inputs_from_rgb`)."""
    x = rgb_to_float(rgb, device)
    out = {"rgb": x}
    if with_dct:
        out["dct_high"], out["dct_low"] = dct.dct_bands(mitl_normalize(x), low_band)
    return out


# ------------------------------------------------------------------------------------------------ shard files
def _str_array(values) -> np.ndarray:
    values = [str(v) for v in values]
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def write_feature_shard(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write an uncompressed npz atomically; ``meta`` goes in as a JSON string under the key ``meta``."""
    payload = dict(arrays)
    payload["meta"] = np.array(json.dumps(meta, sort_keys=True))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)


COPY_CHUNK = 16 << 20  # bytes copied at a time when a shard is assembled


class ShardWriter:
    """Write a feature shard row by row in bounded memory; the file is exactly what :func:`write_feature_shard`
    (``np.savez``) writes for the same arrays.

    The large per-row members (``rgb``, ``mask``, ``srm``, ``dct_*``: declared with :meth:`declare`) are
    appended to raw temporary files beside the output (plain writes, so they live in the page cache, not in
    this process); :meth:`close` assembles the uncompressed npz member by member, copying ``COPY_CHUNK`` bytes at
    a time, and renames it into place. Small members (ids, labels, boxes) are given to :meth:`close` as arrays.
    Peak memory is a chunk plus what the caller holds, whatever the number of rows; the disk needs the shard's
    size twice while assembling. Use as a context manager: temporaries are removed on every exit.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        import tempfile

        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.parts-", dir=self.path.parent))
        self.specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.counts: dict[str, int] = {}
        self.files: dict = {}

    def declare(self, name: str, dtype, row_shape) -> None:
        self.specs[name] = (np.dtype(dtype), tuple(int(v) for v in row_shape))
        self.counts[name] = 0
        self.files[name] = open(self.tmp_dir / f"{name}.raw", "wb")

    def append(self, name: str, rows: np.ndarray) -> None:
        """Append rows (``(k, *row_shape)``) to a declared member."""
        dtype, shape = self.specs[name]
        rows = np.ascontiguousarray(rows, dtype=dtype)
        if rows.shape[1:] != shape:
            raise ValueError(f"{name}: rows of shape {rows.shape[1:]}, declared {shape}")
        self.files[name].write(memoryview(rows).cast("B"))
        self.counts[name] += rows.shape[0]

    def close(self, small: dict[str, np.ndarray], meta: dict, order=None) -> None:
        """Write the npz: the declared members and ``small`` in ``order`` (default: declared, then small)."""
        for f in self.files.values():
            f.close()
        names = list(order) if order is not None else list(self.specs) + [k for k in small if k not in self.specs]
        with atomic_path(self.path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in names + ["meta"]:
                with zf.open(name + ".npy", "w", force_zip64=True) as fp:
                    if name == "meta":
                        np.lib.format.write_array(fp, np.array(json.dumps(meta, sort_keys=True)), allow_pickle=False)
                    elif name in self.specs:
                        dtype, shape = self.specs[name]
                        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                  "shape": (self.counts[name],) + shape}
                        np.lib.format.write_array_header_1_0(fp, header)
                        with open(self.tmp_dir / f"{name}.raw", "rb") as raw:
                            while chunk := raw.read(COPY_CHUNK):
                                fp.write(chunk)
                    else:
                        np.lib.format.write_array(fp, np.asarray(small[name]), allow_pickle=False)

    def cleanup(self) -> None:
        import shutil

        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> bool:
        self.cleanup()
        return False


def load_feature_shard(path: str | os.PathLike, keys=None) -> dict[str, np.ndarray]:
    """Read a feature shard: its per-entry arrays by name (all with the same leading length N), without pickles.

    ``keys`` limits what is read (e.g. skip ``srm`` when computing it on the fly). The JSON ``meta`` entry is not
    included: see :func:`feature_shard_meta`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: feature shard does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [k for k in z.files if k != "meta"]
            if keys is not None:
                missing = [k for k in keys if k not in names]
                if missing:
                    raise UserError(f"{path}: feature shard has no {', '.join(missing)} (it has {', '.join(names)})")
                names = list(keys)
            arrays = {k: z[k] for k in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable feature shard ({type(e).__name__}: {e})") from None
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"{path}: arrays of different lengths {lengths}; the shard is damaged, "
                        "rerun `morphfuse features`")
    return arrays


LAZY_MEMBERS = ("rgb", "mask", "srm", "dct_high", "dct_low")


def open_feature_shard(path: str | os.PathLike, lazy=LAZY_MEMBERS) -> dict:
    """Like :func:`load_feature_shard`, but the per-row pixel members (``lazy``) are
    :class:`morphfuse.shards.RowsView` objects that read only the rows asked for (``arrays["rgb"][rows]``), so a
    stage holds a batch, not the shard. The small members (ids, labels, boxes) are read whole."""
    from .shards import NpzRows, RowsView

    store = NpzRows(path)
    arrays = {k: (RowsView(store, k) if k in lazy else store.read(k)) for k in store.members if k != "meta"}
    lengths = {k: len(v) for k, v in arrays.items() if getattr(v, "ndim", 1)}
    if len(set(lengths.values())) > 1:
        raise UserError(f"{path}: arrays of different lengths {lengths}; the shard is damaged, "
                        "rerun `morphfuse features`")
    return arrays


def feature_shard_meta(path: str | os.PathLike) -> dict:
    """The shard's metadata: kind (lfdl|mitl), mode, size, low_band (mitl), n, format."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"])) if "meta" in z.files else {}


# ------------------------------------------------------------------------------------------------ the stage
def _check_columns(df: pd.DataFrame, required, what: str, path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path}: {what} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")


def _is_empty(v) -> bool:
    import pandas as pd
    if v is None or (not isinstance(v, str) and bool(pd.isna(v))):
        return True
    return str(v).strip() == ""


def _image_path(row) -> Path:
    root = "" if _is_empty(row.get("root")) else str(row["root"])
    return Path(root) / str(row["path"])


def _float_or_nan(v) -> float:
    import pandas as pd
    try:
        return math.nan if v is None or pd.isna(v) else float(v)
    except (TypeError, ValueError):
        return math.nan


def _load_sample(row, ledger: Ledger) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """Image, boolean mask and has_mask of one manifest row, or None after a ledger line."""
    img_path = _image_path(row)
    try:
        rgb = read_image(img_path)
    except BadImageError as e:
        ledger.add(row["image_id"], img_path, e.reason)
        return None
    h, w = rgb.shape[:2]
    mw, mh = row.get("width"), row.get("height")
    if not _is_empty(mw) and not _is_empty(mh) and int(mw) > 0 and int(mh) > 0 and (int(mh), int(mw)) != (h, w):
        ledger.add(row["image_id"], img_path, f"image is {w}x{h} but the manifest says {int(mw)}x{int(mh)} "
                   "(file changed since indexing, or EXIF orientation handled differently); rerun the index")
        return None
    label = int(row["label"])
    if label != 1:
        return rgb, np.zeros((h, w), bool), label == 0
    if _is_empty(row.get("mask_path")):
        return rgb, np.zeros((h, w), bool), False
    mask_path = Path("" if _is_empty(row.get("root")) else str(row["root"])) / str(row["mask_path"])
    try:
        mask = read_mask(mask_path, expected_hw=(h, w), notes=ledger.mask_notes)  # 0/1 masks: one ledger note
    except BadImageError as e:
        ledger.add(row["image_id"], mask_path, f"mask: {e.reason}")
        return None
    return rgb, mask, True


class _Output:
    """One feature shard being written: pixels and masks streamed to disk, SRM/DCT computed per batch."""

    def __init__(self, kind: str, path, size: int, mode: str, low_band: str, batch_size: int, device):
        self.kind, self.size, self.mode, self.low_band = kind, size, mode, low_band
        self.batch_size, self.device = batch_size, device
        self.w = ShardWriter(path)
        self.w.declare("rgb", np.uint8, (size, size, 3))
        self.w.declare("mask", np.uint8, (size, size))
        self.derived = () if mode != "precompute" else (("srm",) if kind == "lfdl" else ("dct_high", "dct_low"))
        for k in self.derived:
            self.w.declare(k, np.float16, (3, size, size))
        self.small: dict[str, list] = {}
        self.pending: list[np.ndarray] = []
        self.n = 0

    def add(self, rgb: np.ndarray, mask: np.ndarray, **values) -> None:
        self.w.append("rgb", rgb[None])
        self.w.append("mask", mask[None])
        for k, v in values.items():
            self.small.setdefault(k, []).append(v)
        self.n += 1
        if self.derived:
            self.pending.append(rgb)
            if len(self.pending) >= self.batch_size:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        batch = np.stack(self.pending)
        self.pending = []
        with torch.inference_mode():
            if self.kind == "lfdl":
                d = {"srm": lfdl_inputs_from_rgb(batch, self.device)["srm"]}
            else:
                d = mitl_inputs_from_rgb(batch, self.low_band, self.device)
            for k in self.derived:
                self.w.append(k, d[k].cpu().numpy().astype(np.float16))

    def finish(self, columns: dict, meta: dict) -> int:
        """``columns``: small member name -> (dtype or 'str', row shape) in file order (rgb, mask inserted)."""
        self._flush()
        n = self.n
        small = {}
        for k, (dtype, shape) in columns.items():
            vals = self.small.get(k, [])
            small[k] = _str_array(vals) if dtype == "str" else np.asarray(vals, dtype).reshape((n,) + shape)
        order = []
        for k in columns:
            order.append(k)
            if k == ("crop_box" if self.kind == "lfdl" else "image_id"):
                order += ["rgb", "mask"]
        self.w.close(small, {**meta, "n": n}, order + list(self.derived))
        return n


LFDL_COLUMNS = {"image_id": ("str", ()), "face_idx": (np.int64, ()), "crop_box": (np.int64, (4,)),
                "has_mask": (bool, ()), "label": (np.int64, ()), "ref_box": (np.float32, (4,)),
                "split": ("str", ()), "orig_hw": (np.int64, (2,)), "crop_kind": ("str", ())}
MITL_COLUMNS = {"image_id": ("str", ()), "has_mask": (bool, ()), "label": (np.int64, ()), "split": ("str", ()),
                "orig_hw": (np.int64, (2,))}


def write_features(manifest: pd.DataFrame, crops: pd.DataFrame | None, *, out_lfdl=None, out_mitl=None,
                   lfdl_size: int = 299, mitl_size: int = 512, mode: str, low_band: str, ledger: Ledger,
                   batch_size: int = 16, device: str = "cpu") -> dict[str, int]:
    """Write the LFDL shard (if ``out_lfdl``) and the MITL shard (if ``out_mitl``) of one manifest shard.

    One image is decoded at a time; its crops / resized image go straight to the shards' temporary member files
    (:class:`ShardWriter`) and SRM / DCT are computed per ``batch_size`` rows, so memory does not grow with the
    shard. Returns the number of rows written per kind.
    """
    want_lfdl, want_mitl = out_lfdl is not None, out_mitl is not None
    by_image: dict[str, pd.DataFrame] = {}
    if want_lfdl:
        crops = crops.sort_values(["image_id", "face_idx"], kind="stable")
        by_image = {str(k): g for k, g in crops.groupby("image_id", sort=False)}
        unknown = sorted(set(by_image) - set(manifest["image_id"].astype(str)))
        if unknown:
            raise UserError(f"the crops name {len(unknown)} image(s) not in the manifest shard "
                            f"(first: {unknown[0]!r}); are --crops and --manifest of the same shard?")
    S, M = lfdl_size, mitl_size
    outs: list[_Output] = []
    try:
        L = _Output("lfdl", out_lfdl, S, mode, low_band, batch_size, device) if want_lfdl else None
        outs += [L] if L else []
        T = _Output("mitl", out_mitl, M, mode, low_band, batch_size, device) if want_mitl else None
        outs += [T] if T else []
        no_mask_fakes = 0
        for row in manifest.to_dict("records"):
            iid = str(row["image_id"])
            sample = _load_sample(row, ledger)
            if sample is None:
                continue
            rgb, mask, has_mask = sample
            h, w = rgb.shape[:2]
            no_mask_fakes += int(int(row["label"]) == 1 and not has_mask)
            if T is not None:
                T.add(resize_image(rgb, M), resize_mask(mask, M), image_id=iid, label=int(row["label"]),
                      has_mask=has_mask, split=row["split"], orig_hw=(h, w))
            if L is None:
                continue
            group = by_image.get(iid)
            if group is None:
                ledger.add(iid, _image_path(row), "lfdl: no crop row for this image in the crops parquet "
                           "(see the crops ledger)")
                continue
            for c in group.to_dict("records"):
                raw = [_float_or_nan(c[k]) for k in ("x0", "y0", "x1", "y1")]
                box = [0, 0, 0, 0] if any(math.isnan(v) for v in raw) else [int(v) for v in raw]
                x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
                if x1 <= x0 or y1 <= y0:
                    ledger.add(iid, _image_path(row), f"lfdl: crop face_idx {c['face_idx']} box "
                               f"({c['x0']}, {c['y0']}, {c['x1']}, {c['y1']}) is empty inside the {w}x{h} image")
                    continue
                ref = tuple(_float_or_nan(c.get(r)) for r in REF_COLUMNS)
                L.add(resize_image(rgb[y0:y1, x0:x1], S), resize_mask(mask[y0:y1, x0:x1], S), image_id=iid,
                      face_idx=int(c["face_idx"]), crop_box=(x0, y0, x1, y1), has_mask=has_mask,
                      label=int(row["label"]), ref_box=box_to_crop_coords(ref, (x0, y0, x1, y1), S),
                      split=row["split"], orig_hw=(h, w), crop_kind=c.get("kind", ""))
            del rgb, mask, sample
        if no_mask_fakes:
            log.info("%d fake image(s) without a ground-truth mask kept with has_mask=False", no_mask_fakes)
        meta = {"format": FORMAT_VERSION, "mode": mode}
        done = {}
        if L is not None:
            done["lfdl"] = L.finish(LFDL_COLUMNS, {**meta, "kind": "lfdl", "size": S, "normalisation": "(rgb-0.5)/0.5"})
        if T is not None:
            done["mitl"] = T.finish(MITL_COLUMNS, {**meta, "kind": "mitl", "size": M, "low_band": low_band,
                                                   "normalisation": "imagenet"})
        return done
    finally:
        for o in outs:
            o.w.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest shard (Parquet)")
    parser.add_argument("--crops", help="crops parquet of the same shard (needed with --out-lfdl)")
    parser.add_argument("--out-lfdl", help="LFDL feature shard to write (.npz): face crops [+ SRM]")
    parser.add_argument("--out-mitl", help="MITL feature shard to write (.npz): whole images [+ DCT bands]")
    from .config import default

    parser.add_argument(
        "--lfdl-size", type=int, default=default("lfdl.size"), help="face crop side S (default: %(default)s)"
    )
    parser.add_argument(
        "--mitl-size", type=int, default=default("mitl.size"), help="whole-image side M (default: %(default)s)"
    )
    parser.add_argument("--mode", choices=MODES, default=default("features.mode"),
                        help="precompute: also store SRM / DCT bands as float16; on_the_fly: pixels only")
    parser.add_argument("--low-band", choices=dct.LOW_BANDS, default=default("mitl.low_band"),
                        help="MITL low band: l_shape (as released) or square (the paper's words)")
    parser.add_argument("--ledger", required=True, help="CSV of the inputs that could not be used (one line each)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per SRM/DCT batch in precompute mode")
    parser.add_argument("--device", default="cpu", help="torch device for SRM/DCT in precompute mode (default: cpu)")


def run(args: argparse.Namespace) -> int:
    if not args.out_lfdl and not args.out_mitl:
        raise UserError("nothing to do: give --out-lfdl and/or --out-mitl")
    if args.out_lfdl and not args.crops:
        raise UserError("--out-lfdl needs --crops (the crops parquet of the same shard)")
    for name in ("lfdl_size", "mitl_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {args.device!r} is not usable here ({e})") from None
    manifest = read_parquet_arg(args.manifest, "--manifest")
    _check_columns(manifest, MANIFEST_COLUMNS, "manifest shard", args.manifest)
    if manifest["image_id"].duplicated().any():
        dup = manifest.loc[manifest["image_id"].duplicated(), "image_id"].iloc[0]
        raise UserError(f"{args.manifest}: image_id {dup!r} appears more than once")
    crops = None
    if args.out_lfdl:
        crops = read_parquet_arg(args.crops, "--crops")
        _check_columns(crops, CROP_COLUMNS, "crops parquet", args.crops)
    ledger = Ledger("features")
    done = write_features(manifest, crops, out_lfdl=args.out_lfdl, out_mitl=args.out_mitl,
                          lfdl_size=args.lfdl_size, mitl_size=args.mitl_size, mode=args.mode,
                          low_band=args.low_band, ledger=ledger, batch_size=args.batch_size, device=args.device)
    if "lfdl" in done:
        log.info("LFDL: %d crop(s) of %d image(s) -> %s", done["lfdl"], len(manifest), args.out_lfdl)
    if "mitl" in done:
        log.info("MITL: %d of %d image(s) -> %s", done["mitl"], len(manifest), args.out_mitl)
    ledger.write(args.ledger)
    if len(ledger):
        log.warning("%d input(s) could not be used; see %s", len(ledger), args.ledger)
    return 0
