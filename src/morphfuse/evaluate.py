"""Detection and localization metrics of one prediction set against the ground truth (METRICS.md).

Two modes, one image in memory at a time:

1. A split folder in DDL-I layout (``--dataset DIR`` with ``real/``, ``fake/`` and ``masks/`` or ``mask/``; a fake's
   mask has the fake's file stem, any image extension; image_id = file stem, unique across real/ and fake/):
     morphfuse evaluate --dataset DIR --pred-masks DIR --scores CSV --out DIR
   writes OUT/per_image.parquet, OUT/metrics.json, OUT/metrics.md and OUT/ledger.csv.
   Groups (identities, for the tables' bootstrap) are unknown in this layout: each image is its own group.
2. One manifest shard, for the workflow:
     morphfuse evaluate --manifest SHARD.parquet --pred-masks DIR --scores CSV --out-counts FILE.parquet
                        [--variant NAME] [--split test] [--ledger CSV]
   writes the per-image rows only; `morphfuse tables` reduces them (and may apply other conventions).

Inputs: scores CSV with columns image_id,score (score in [0, 1]); predicted masks ``<image_id>.png`` holding
probabilities ``v = round(255·p)`` or binary 0/255, binarised ``v / 255 >= --threshold``; ground truth ``> 127``.
A prediction of another size than its image is resized with nearest neighbour (counted as ``n_resized``).

Per-image rows (both modes): image_id, label, score, group, method, source, split, variant, width, height,
TP, FP, FN, TN (pixels, every image, reals included: their ground truth is empty), f1, iou (per image, under the
--iou/--empty convention), threshold, resized, ok, error.

Errors (missing score or predicted mask, a fake without a ground-truth mask, a mask of another size than its
image, an unreadable file, an image_id clash) are listed at the end, written to the ledger and make the exit
status 1 (``--allow-errors``: 0). An image with an error is left out of EVERY metric (so detection and
localization are computed on the same images); all the others are evaluated.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .fusion import read_gt, read_u8, threshold_to_uint8
from .imageio import BadImageError, header_size, walk_images, write_parquet, write_text_atomic
from .ledger import Ledger
from .metrics import AVERAGING, EMPTY, IMAGES, IOU, Convention, f1_from_counts, iou_from_counts, summarize
from .metrics import resize_nearest

log = logging.getLogger(__name__)
STAGE = "evaluate"
MANIFEST_COLUMNS = ("image_id", "root", "path", "label", "mask_path", "group")
ROW_COLUMNS = ["image_id", "label", "score", "group", "method", "source", "split", "variant", "width", "height",
               "TP", "FP", "FN", "TN", "f1", "iou", "threshold", "resized", "ok", "error"]


@dataclass
class Item:
    """One image to evaluate. ``hw`` may be None (read from the image header); ``gt_path`` None for a real."""

    image_id: str
    label: int
    image_path: Path | None
    gt_path: Path | None
    hw: tuple[int, int] | None = None
    group: str = ""
    method: str = ""
    source: str = ""
    split: str = ""
    error: str | None = None  # an error found while listing (e.g. a fake without a mask)


# ------------------------------------------------------------------------------------------------- helpers
def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image as displayed, from its header only (:func:`imageio.header_size`)."""
    w, h = header_size(path)
    return h, w


def read_scores(path: Path) -> dict[str, float | str]:
    """``image_id -> score`` from a CSV with columns image_id,score; an unusable score maps to its reason (str)."""
    if not Path(path).is_file():
        raise UserError(f"--scores {path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--scores {path}: not a readable CSV ({e})") from None
    missing = [c for c in ("image_id", "score") if c not in df.columns]
    if missing:
        raise UserError(f"--scores {path}: missing column(s) {', '.join(missing)}; expected image_id,score "
                        f"(found: {', '.join(map(str, df.columns))})")
    values = pd.to_numeric(df["score"], errors="coerce").to_numpy(np.float64)
    out: dict[str, float | str] = {}
    for image_id, v, raw in zip(df["image_id"].astype(str), values, df["score"]):
        prev = out.get(image_id)
        if not np.isfinite(v):
            reason = f"score {raw!r} in {path} is not a number"
        elif not 0.0 <= v <= 1.0:
            reason = f"score {v} in {path} is outside [0, 1]"
        else:
            reason = None
        if prev is None:
            out[image_id] = reason or float(v)
        elif isinstance(prev, float) and reason is None and prev == v:
            continue  # a repeated identical row is harmless
        else:
            out[image_id] = f"several rows for this image in {path} (scores {prev!r} and {raw!r})"
    return out


def evaluate_item(item: Item, pred_path: Path, score: float | str | None, threshold: float,
                  iou: str, empty: str) -> tuple[dict, list[tuple[str, str]]]:
    """Count one image. Returns its row and its errors ``[(path, reason), ...]`` (row['ok'] False if any)."""
    row = {"image_id": item.image_id, "label": int(item.label),
           "score": score if isinstance(score, float) else math.nan,
           "group": item.group or item.image_id, "method": item.method, "source": item.source,
           "split": item.split, "width": pd.NA, "height": pd.NA, "TP": pd.NA, "FP": pd.NA, "FN": pd.NA,
           "TN": pd.NA, "f1": math.nan, "iou": math.nan, "threshold": threshold, "resized": False}
    errors: list[tuple[str, str]] = []
    if item.error:
        errors.append((str(item.gt_path or item.image_path), item.error))
    if score is None:
        errors.append((str(item.image_path), "no score for this image in the scores CSV"))
    elif isinstance(score, str):
        errors.append((str(item.image_path), score))
    if not pred_path.is_file():
        errors.append((str(pred_path), "no predicted mask for this image"))
    if errors:
        return row, errors
    try:
        gt = None
        if item.label == 1:
            if item.gt_path is None:
                return row, [(str(item.image_path), "fake image without a ground-truth mask")]
            gt = read_gt(item.gt_path)
            hw = item.hw if item.hw is not None else image_size(item.image_path)
            if tuple(gt.shape) != tuple(hw):
                return row, [(str(item.gt_path), f"ground-truth mask is {gt.shape[1]}x{gt.shape[0]} but its image "
                                                 f"is {hw[1]}x{hw[0]}")]
        else:
            hw = item.hw if item.hw is not None else image_size(item.image_path)
        pred_u8 = read_u8(pred_path)
    except BadImageError as e:
        return row, [(e.path, e.reason)]
    c = threshold_to_uint8(threshold)
    if pred_u8.shape != tuple(hw):
        row["resized"] = True
        pred_u8 = resize_nearest(pred_u8, hw)
    pred = pred_u8 >= c if c < 256 else np.zeros(pred_u8.shape, bool)
    n_pred = int(np.count_nonzero(pred))
    if gt is None:
        tp, fn = 0, 0
    else:
        n_gt = int(np.count_nonzero(gt))
        tp = int(np.count_nonzero(np.logical_and(pred, gt)))
        fn = n_gt - tp
    fp = n_pred - tp
    tn = int(hw[0]) * int(hw[1]) - tp - fp - fn
    row.update({"height": int(hw[0]), "width": int(hw[1]), "TP": tp, "FP": fp, "FN": fn, "TN": tn,
                "f1": float(f1_from_counts(tp, fp, fn, empty=empty)),
                "iou": float(iou_from_counts(tp, fp, fn, tn, iou=iou, empty=empty))})
    return row, []


def evaluate_items(items, pred_dir: Path, scores: dict[str, float | str], threshold: float, iou: str, empty: str,
                   ledger: Ledger, variant: str = "") -> pd.DataFrame:
    rows = []
    t0 = time.perf_counter()
    for item in items:
        row, errors = evaluate_item(item, pred_dir / f"{item.image_id}.png", scores.get(item.image_id),
                                    threshold, iou, empty)
        for path, reason in errors:
            ledger.add(item.image_id, path, reason)
        row["variant"] = variant
        row["ok"] = not errors
        row["error"] = "; ".join(r for _, r in errors)
        rows.append(row)
    dt = time.perf_counter() - t0
    log.info("evaluated %d images in %.1f s (%.1f images/s)", len(rows), dt, len(rows) / dt if dt > 0 else math.nan)
    return rows_frame(rows)


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    for c in ("TP", "FP", "FN", "TN", "width", "height"):
        df[c] = pd.array(df[c].tolist(), dtype="Int64") if len(df) else pd.array([], dtype="Int64")
    df["label"] = df["label"].astype(np.int64)
    df["score"] = df["score"].astype(np.float64)
    for c in ("f1", "iou", "threshold"):
        df[c] = df[c].astype(np.float64)
    df["ok"] = df["ok"].astype(bool)
    df["resized"] = df["resized"].astype(bool)
    for c in ("image_id", "group", "method", "source", "split", "variant", "error"):
        df[c] = df[c].astype(str)
    return df


def summarize_frame(df: pd.DataFrame, convention: Convention, score_threshold: float = 0.5) -> dict:
    """Metrics of the ``ok`` rows of a per-image frame, plus how many rows had errors."""
    ok = df[df["ok"]] if "ok" in df.columns else df
    out = summarize(ok["label"].to_numpy(np.int64), ok["score"].to_numpy(np.float64),
                    *(ok[c].to_numpy(np.int64) for c in ("TP", "FP", "FN", "TN")), convention, score_threshold)
    out["n_errors"] = int(len(df) - len(ok))
    out["n_resized"] = int(ok["resized"].sum()) if "resized" in ok.columns else 0
    return out


# ---------------------------------------------------------------------------------------- DDL-I split folder
def dataset_items(root: Path) -> list[Item]:
    """The images of a DDL-I split folder; a listing problem (clash, missing mask) is the item's ``error``."""
    real_dir, fake_dir = root / "real", root / "fake"
    if not real_dir.is_dir() and not fake_dir.is_dir():
        raise UserError(f"--dataset {root}: expected a split folder in DDL-I layout with real/ and/or fake/ "
                        f"(and masks/ or mask/ for the fakes); found neither real/ nor fake/")
    mask_dirs = [d for d in (root / "masks", root / "mask") if d.is_dir()]
    masks: dict[str, list[Path]] = {}
    for d in mask_dirs:
        for p in walk_images(d):
            masks.setdefault(p.stem, []).append(p)
    listed: dict[str, list[tuple[int, Path]]] = {}
    for label, d in ((0, real_dir), (1, fake_dir)):
        if d.is_dir():
            for p in walk_images(d):
                listed.setdefault(p.stem, []).append((label, p))
    if listed and any(lab == 1 for v in listed.values() for lab, _ in v) and not mask_dirs:
        log.warning("%s has fake images but neither masks/ nor mask/: every fake will be listed as an error", root)
    items = []
    for image_id in sorted(listed):
        entries = listed[image_id]
        if len(entries) > 1:  # every image of the clash is listed (as a row with ok=False) and left out
            paths = ", ".join(str(p) for _, p in entries)
            for label, p in entries:
                items.append(Item(image_id=image_id, label=label, image_path=p, gt_path=None, group=image_id,
                                  error=f"image_id clash: {len(entries)} images have the file stem {image_id!r} "
                                        f"({paths}); make the stems unique across real/ and fake/"))
            continue
        label, p = entries[0]
        item = Item(image_id=image_id, label=label, image_path=p, gt_path=None, group=image_id,
                    method="real" if label == 0 else "fake", source=root.name, split=root.name)
        if label == 1:
            m = masks.get(image_id, [])
            if len(m) == 1:
                item.gt_path = m[0]
            elif not m:
                item.error = (f"fake image without a ground-truth mask (no {image_id}.* in "
                              f"{' or '.join(str(d) for d in mask_dirs) or root / 'masks'})")
            else:
                item.error = f"several ground-truth masks for this image: {', '.join(map(str, m))}"
        items.append(item)
    return items


# -------------------------------------------------------------------------------------------- manifest shard
def manifest_items(path: Path, split: str) -> list[Item]:
    if not path.is_file():
        raise UserError(f"--manifest {path}: file not found")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--manifest {path}: not a readable Parquet file ({e})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"--manifest {path}: missing column(s) {', '.join(missing)} (see docs/CONTRACTS.md)")
    if split != "all" and "split" in df.columns:
        df = df[df["split"].astype(str) == split]
    items = []
    for r in df.itertuples(index=False):
        rd = r._asdict()
        root = Path(str(rd["root"]))
        w, h = rd.get("width"), rd.get("height")
        hw = (int(h), int(w)) if _valid_size(w) and _valid_size(h) else None
        label = int(rd["label"])
        mask_path = str(rd.get("mask_path") or "")
        item = Item(image_id=str(rd["image_id"]), label=label, image_path=root / str(rd["path"]),
                    gt_path=(root / mask_path) if mask_path else None, hw=hw, group=str(rd.get("group") or ""),
                    method=str(rd.get("method", "") or ""), source=str(rd.get("source", "") or ""),
                    split=str(rd.get("split", "") or ""))
        if label == 1 and not mask_path:
            item.error = "fake image without a ground-truth mask (empty mask_path in the manifest)"
        items.append(item)
    return items


def _valid_size(v) -> bool:
    try:
        return v is not None and not pd.isna(v) and int(v) > 0
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------- reports
def _fmt(v, nd=4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def metrics_markdown(m: dict, title: str) -> str:
    c = m["convention"]
    lines = [f"# {title}", "",
             f"Convention: averaging={c['averaging']}, images={c['images']}, iou={c['iou']}, empty={c['empty']}, "
             f"mask threshold={c['threshold']:g}, score threshold={m['score_threshold']:g}.", "",
             "| AUC | F1 | IoU | Final | AP | EER | ACC |", "|---|---|---|---|---|---|---|",
             "| " + " | ".join(_fmt(m[k]) for k in ("auc", "f1", "iou", "final", "ap", "eer", "accuracy")) + " |", ""]
    for k in ("auc_reason", "localization_reason", "final_reason"):
        if m.get(k):
            lines.append(f"- {k.replace('_', ' ')}: {m[k]}")
    pc, dc = m["counts"], m["detection_counts"]
    lines += [f"- images: {m['n_images']} evaluated ({m['n_real']} real, {m['n_fake']} fake), "
              f"{m['n_errors']} left out for errors (see the ledger)",
              f"- pixel metrics on {m['n_pixel_images']} images ({m['n_skipped_empty']} skipped as empty/empty); "
              f"pixels TP={pc['TP']} FP={pc['FP']} FN={pc['FN']} TN={pc['TN']}",
              f"- detection at score >= {m['score_threshold']:g}: TP={dc['TP']} FP={dc['FP']} FN={dc['FN']} "
              f"TN={dc['TN']}",
              f"- predictions resized to their image (nearest neighbour): {m['n_resized']}", ""]
    return "\n".join(lines)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(o) else float(o)
    raise TypeError(type(o).__name__)


def _clean(o):
    """JSON-ready: NaN and pandas NA become null, recursively."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if o is pd.NA or (isinstance(o, (float, np.floating)) and math.isnan(o)):
        return None
    return o


# ----------------------------------------------------------------------------------------------------- CLI
def add_convention_arguments(p: argparse.ArgumentParser, with_threshold: bool = True) -> None:
    from .config import default

    ev = default("evaluate")
    g = p.add_argument_group("metric conventions (METRICS.md; defaults are the reported ones, the config schema's)")
    g.add_argument("--averaging", choices=AVERAGING, default=ev["averaging"],
                   help="per_image: F1/IoU per image then the mean; pooled: from the summed counts")
    g.add_argument("--images", choices=IMAGES, default=ev["images"],
                   help="images in the pixel metrics: fakes only, or all (reals have an empty ground truth)")
    g.add_argument("--iou", choices=IOU, default=ev["iou"],
                   help="foreground IoU, or the mean of the foreground and background IoUs")
    g.add_argument("--empty", choices=EMPTY, default=ev["empty"],
                   help="value of a 0/0 term (empty ground truth and empty prediction): skip the image, 1 or 0")
    if with_threshold:
        g.add_argument("--threshold", type=float, default=ev["threshold"],
                       help=f"binarise predicted masks v/255 >= threshold (default {ev['threshold']}: v >= 128)")
    g.add_argument("--score-threshold", type=float, default=0.5,
                   help="detection accuracy counts score >= this as fake (default 0.5)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .config import default

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", type=Path, metavar="DIR",
                     help="a split folder in DDL-I layout (real/, fake/, masks/ or mask/)")
    src.add_argument("--manifest", type=Path, metavar="SHARD.parquet", help="a manifest shard (workflow mode)")
    p.add_argument("--pred-masks", required=True, type=Path, metavar="DIR", help="predicted masks <image_id>.png")
    p.add_argument("--scores", required=True, type=Path, metavar="CSV", help="image scores: image_id,score")
    p.add_argument("--out", type=Path, metavar="DIR", help="(--dataset) output folder")
    p.add_argument("--out-counts", type=Path, metavar="FILE.parquet", help="(--manifest) per-image rows")
    p.add_argument("--variant", default="", help="name recorded in the rows (e.g. mdmf), read by `morphfuse tables`")
    p.add_argument("--split", default=default("evaluate.split"),
                   help="(--manifest) only rows of this split; 'all' for every row (default: the config schema's)")
    p.add_argument("--ledger", type=Path, metavar="CSV", help="(--manifest) write the errors as a ledger CSV")
    p.add_argument("--allow-errors", action="store_true",
                   help="exit 0 even when some images had errors (they are still listed and in the ledger)")
    add_convention_arguments(p)


def convention_from_args(args) -> Convention:
    try:
        return Convention(averaging=args.averaging, images=args.images, iou=args.iou, empty=args.empty,
                          threshold=float(getattr(args, "threshold", 0.5)))
    except ValueError as e:
        raise UserError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    conv = convention_from_args(args)
    if not args.pred_masks.is_dir():
        raise UserError(f"--pred-masks {args.pred_masks}: not a folder")
    ledger = Ledger(STAGE)
    if args.dataset is not None:
        if args.out is None:
            raise UserError("--dataset needs --out DIR")
        items = dataset_items(args.dataset)
    else:
        if args.out_counts is None:
            raise UserError("--manifest needs --out-counts FILE.parquet")
        items = manifest_items(args.manifest, args.split)
    scores = read_scores(args.scores)
    known = {it.image_id for it in items}
    n_extra = sum(1 for k in scores if k not in known)
    if n_extra and args.dataset is not None:
        log.warning("%d score rows name images that are not in %s (ignored)", n_extra, args.dataset)
    df = evaluate_items(items, args.pred_masks, scores, conv.threshold, conv.iou, conv.empty, ledger, args.variant)
    if args.dataset is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_parquet(args.out / "per_image.parquet", df)
        ledger.write(args.out / "ledger.csv")
        m = summarize_frame(df, conv, args.score_threshold)
        m["variant"] = args.variant
        m["n_ledger_rows"] = len(ledger)
        m["inputs"] = {"dataset": str(args.dataset), "pred_masks": str(args.pred_masks), "scores": str(args.scores)}
        write_text_atomic(args.out / "metrics.json", json.dumps(_clean(m), indent=2, default=_json_default) + "\n")
        title = f"Evaluation of {args.variant or args.pred_masks} on {args.dataset}"
        write_text_atomic(args.out / "metrics.md", metrics_markdown(m, title))
        log.info("AUC %s  F1 %s  IoU %s  Final %s (%d images, %d errors)", _fmt(m["auc"]), _fmt(m["f1"]),
                 _fmt(m["iou"]), _fmt(m["final"]), m["n_images"], m["n_errors"])
    else:
        write_parquet(args.out_counts, df)
        if args.ledger is not None:
            ledger.write(args.ledger)
    if len(ledger):
        print(f"morphfuse evaluate: {len(ledger)} problem(s); the images concerned are left out of the metrics:",
              file=sys.stderr)
        for r in ledger.rows:
            print(f"  {r['image_id']}: {r['path']}: {r['reason']}", file=sys.stderr)
        return 0 if args.allow_errors else 1
    return 0
