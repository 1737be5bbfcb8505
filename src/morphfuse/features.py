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

import cv2
import numpy as np
import pandas as pd
import torch

from . import dct, srm
from .errors import UserError
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


def feature_shard_meta(path: str | os.PathLike) -> dict:
    """The shard's metadata: kind (lfdl|mitl), mode, size, low_band (mitl), n, format."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"])) if "meta" in z.files else {}


# ------------------------------------------------------------------------------------------------ the stage
def _check_columns(df: pd.DataFrame, required, what: str, path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path}: {what} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")


def _read_parquet(path, what: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: {what} does not exist")
    try:
        return pd.read_parquet(p)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{p}: cannot read the {what} as Parquet ({type(e).__name__}: {e})") from None


def _is_empty(v) -> bool:
    if v is None or (not isinstance(v, str) and bool(pd.isna(v))):
        return True
    return str(v).strip() == ""


def _image_path(row) -> Path:
    root = "" if _is_empty(row.get("root")) else str(row["root"])
    return Path(root) / str(row["path"])


def _float_or_nan(v) -> float:
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
        mask = read_mask(mask_path, expected_hw=(h, w))
    except BadImageError as e:
        ledger.add(row["image_id"], mask_path, f"mask: {e.reason}")
        return None
    return rgb, mask, True


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield i, min(n, i + size)


def build_features(manifest: pd.DataFrame, crops: pd.DataFrame | None, *, lfdl_size: int | None,
                   mitl_size: int | None, mode: str, low_band: str, ledger: Ledger, batch_size: int = 16,
                   device: str = "cpu") -> tuple[dict | None, dict | None]:
    """The arrays of the LFDL shard (if ``lfdl_size``) and the MITL shard (if ``mitl_size``)."""
    want_lfdl, want_mitl = lfdl_size is not None, mitl_size is not None
    by_image: dict[str, pd.DataFrame] = {}
    if want_lfdl:
        crops = crops.sort_values(["image_id", "face_idx"], kind="stable")
        by_image = {str(k): g for k, g in crops.groupby("image_id", sort=False)}
        unknown = sorted(set(by_image) - set(manifest["image_id"].astype(str)))
        if unknown:
            raise UserError(f"the crops name {len(unknown)} image(s) not in the manifest shard "
                            f"(first: {unknown[0]!r}); are --crops and --manifest of the same shard?")
    n_crops = sum(len(g) for g in by_image.values())
    S, M = lfdl_size or 0, mitl_size or 0
    L = {"image_id": [], "face_idx": [], "crop_box": [], "label": [], "has_mask": [], "ref_box": [], "split": [],
         "orig_hw": [], "crop_kind": []}
    L_rgb = np.zeros((n_crops, S, S, 3), np.uint8)
    L_mask = np.zeros((n_crops, S, S), np.uint8)
    T = {"image_id": [], "label": [], "has_mask": [], "split": [], "orig_hw": []}
    T_rgb = np.zeros((len(manifest) if want_mitl else 0, M, M, 3), np.uint8)
    T_mask = np.zeros_like(T_rgb[..., 0])
    no_mask_fakes = 0
    for row in manifest.to_dict("records"):
        iid = str(row["image_id"])
        sample = _load_sample(row, ledger)
        if sample is None:
            continue
        rgb, mask, has_mask = sample
        h, w = rgb.shape[:2]
        no_mask_fakes += int(int(row["label"]) == 1 and not has_mask)
        if want_mitl:
            k = len(T["image_id"])
            T_rgb[k] = resize_image(rgb, M)
            T_mask[k] = resize_mask(mask, M)
            for key, val in (("image_id", iid), ("label", int(row["label"])), ("has_mask", has_mask),
                             ("split", row["split"]), ("orig_hw", (h, w))):
                T[key].append(val)
        if not want_lfdl:
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
            k = len(L["image_id"])
            L_rgb[k] = resize_image(rgb[y0:y1, x0:x1], S)
            L_mask[k] = resize_mask(mask[y0:y1, x0:x1], S)
            ref = tuple(_float_or_nan(c.get(r)) for r in REF_COLUMNS)
            for key, val in (("image_id", iid), ("face_idx", int(c["face_idx"])), ("crop_box", (x0, y0, x1, y1)),
                             ("label", int(row["label"])), ("has_mask", has_mask),
                             ("ref_box", box_to_crop_coords(ref, (x0, y0, x1, y1), S)), ("split", row["split"]),
                             ("orig_hw", (h, w)), ("crop_kind", c.get("kind", ""))):
                L[key].append(val)
    if no_mask_fakes:
        log.info("%d fake image(s) without a ground-truth mask kept with has_mask=False", no_mask_fakes)

    lfdl = mitl = None
    if want_lfdl:
        n = len(L["image_id"])
        lfdl = {
            "image_id": _str_array(L["image_id"]),
            "face_idx": np.asarray(L["face_idx"], np.int64),
            "crop_box": np.asarray(L["crop_box"], np.int64).reshape(n, 4),
            "rgb": L_rgb[:n],
            "mask": L_mask[:n],
            "has_mask": np.asarray(L["has_mask"], bool),
            "label": np.asarray(L["label"], np.int64),
            "ref_box": np.asarray(L["ref_box"], np.float32).reshape(n, 4),
            "split": _str_array(L["split"]),
            "orig_hw": np.asarray(L["orig_hw"], np.int64).reshape(n, 2),
            "crop_kind": _str_array(L["crop_kind"]),
        }
        if mode == "precompute":
            out = np.zeros((n, 3, S, S), np.float16)
            with torch.inference_mode():
                for i, j in _chunks(n, batch_size):
                    out[i:j] = lfdl_inputs_from_rgb(lfdl["rgb"][i:j], device)["srm"].cpu().numpy().astype(np.float16)
            lfdl["srm"] = out
    if want_mitl:
        n = len(T["image_id"])
        mitl = {
            "image_id": _str_array(T["image_id"]),
            "rgb": T_rgb[:n],
            "mask": T_mask[:n],
            "has_mask": np.asarray(T["has_mask"], bool),
            "label": np.asarray(T["label"], np.int64),
            "split": _str_array(T["split"]),
            "orig_hw": np.asarray(T["orig_hw"], np.int64).reshape(n, 2),
        }
        if mode == "precompute":
            hi = np.zeros((n, 3, M, M), np.float16)
            lo = np.zeros((n, 3, M, M), np.float16)
            with torch.inference_mode():
                for i, j in _chunks(n, batch_size):
                    d = mitl_inputs_from_rgb(mitl["rgb"][i:j], low_band, device)
                    hi[i:j] = d["dct_high"].cpu().numpy().astype(np.float16)
                    lo[i:j] = d["dct_low"].cpu().numpy().astype(np.float16)
            mitl["dct_high"], mitl["dct_low"] = hi, lo
    return lfdl, mitl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest shard (Parquet)")
    parser.add_argument("--crops", help="crops parquet of the same shard (needed with --out-lfdl)")
    parser.add_argument("--out-lfdl", help="LFDL feature shard to write (.npz): face crops [+ SRM]")
    parser.add_argument("--out-mitl", help="MITL feature shard to write (.npz): whole images [+ DCT bands]")
    from .config import default

    parser.add_argument("--lfdl-size", type=int, default=default("lfdl.size"), help="face crop side S (default: %(default)s)")
    parser.add_argument("--mitl-size", type=int, default=default("mitl.size"), help="whole-image side M (default: %(default)s)")
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
    manifest = _read_parquet(args.manifest, "manifest shard")
    _check_columns(manifest, MANIFEST_COLUMNS, "manifest shard", args.manifest)
    if manifest["image_id"].duplicated().any():
        dup = manifest.loc[manifest["image_id"].duplicated(), "image_id"].iloc[0]
        raise UserError(f"{args.manifest}: image_id {dup!r} appears more than once")
    crops = None
    if args.out_lfdl:
        crops = _read_parquet(args.crops, "crops parquet")
        _check_columns(crops, CROP_COLUMNS, "crops parquet", args.crops)
    ledger = Ledger("features")
    lfdl, mitl = build_features(
        manifest, crops, lfdl_size=args.lfdl_size if args.out_lfdl else None,
        mitl_size=args.mitl_size if args.out_mitl else None, mode=args.mode, low_band=args.low_band,
        ledger=ledger, batch_size=args.batch_size, device=args.device)
    meta = {"format": FORMAT_VERSION, "mode": args.mode}
    if lfdl is not None:
        write_feature_shard(args.out_lfdl, lfdl, {**meta, "kind": "lfdl", "size": args.lfdl_size,
                                                   "n": len(lfdl["image_id"]), "normalisation": "(rgb-0.5)/0.5"})
        log.info("LFDL: %d crop(s) of %d image(s) -> %s", len(lfdl["image_id"]), len(manifest), args.out_lfdl)
    if mitl is not None:
        write_feature_shard(args.out_mitl, mitl, {**meta, "kind": "mitl", "size": args.mitl_size,
                                                   "low_band": args.low_band, "n": len(mitl["image_id"]),
                                                   "normalisation": "imagenet"})
        log.info("MITL: %d of %d image(s) -> %s", len(mitl["image_id"]), len(manifest), args.out_mitl)
    ledger.write(args.ledger)
    if len(ledger):
        log.warning("%d input(s) could not be used; see %s", len(ledger), args.ledger)
    return 0
