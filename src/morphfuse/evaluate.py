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
3. A baseline instead of a prediction set (either mode; ``--baseline`` replaces --pred-masks and --scores):
     morphfuse evaluate --manifest SHARD.parquet --baseline face --crops CROPS.parquet --out-counts FILE.parquet
   ``face``: the predicted mask of an image is the union of its face crops (``morphfuse crops``: the boxes LFDL
   sees, whole-image crops included), ``all``: the whole image; the score of every image is 0.5. These are what
   a detector that knows only where the faces are scores: the prior the ablation rows are read against. With
   --crops (required for ``face``, optional for ``all``), an image without a crop row is an error, as it has no
   model prediction either: the baselines are then evaluated on the images the models saw.

Inputs: scores CSV with columns image_id,score (score in [0, 1]; a file or a pipe); predicted masks
``<image_id>.png`` holding probabilities ``v = round(255·p)`` or binary 0/255, binarised ``v / 255 >= --threshold``
(maps that hold only 0 and 1 are probabilities below 1/255 by that contract: noted once in the ledger); ground
truth read by ``imageio.read_mask``, one reader for every encoding (0/255, 0/1 (noted once in the ledger),
palette, 16-bit, colour), never silently empty. A prediction of another size than its image is resized with
nearest neighbour (counted as ``n_resized``).

Per-image rows (both modes): image_id, label, score, group, method, source, split, variant, width, height,
TP, FP, FN, TN (pixels, every image, reals included: their ground truth is empty), f1, iou (per image, under the
--iou/--empty convention), threshold, resized, ok, error.

Errors (missing score or predicted mask, a fake without a ground-truth mask, a mask of another size than its
image, an unreadable file, an image_id clash, the same bytes in real/ and fake/ (sizes compared first, only files
of equal size hashed)) are listed at the end, written to the ledger and make the exit status 1
(``--allow-errors``: 0). An image with an error is left out of EVERY metric (so detection and localization are
computed on the same images); all the others are evaluated. ``note:`` lines do not change the exit status.

``--out`` (dataset mode) belongs to one evaluation (dataset, predictions, scores, variant, conventions; recorded in
``--out/.morphfuse-run.json``): another evaluation's outputs there are refused (exit 2) unless ``--overwrite``; the
same command rewrites them. Its four files are written together: all of them are replaced or none (a full disk:
exit 3, one line, the old files intact).
"""
from __future__ import annotations

import argparse
import dataclasses
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
from .inputs import read_parquet_arg, read_text_arg
from .imageio import BadImageError, EncodingNotes, MaskNotes, ProbNotes, check_prob_encoding, identical_files, \
    image_hw, read_mask, read_prob_u8, threshold_to_uint8, walk_images, write_parquet
from .ledger import Ledger
from .textfmt import fmt_metric, json_default, json_ready, md_table
from .outdir import commit_files
from .metrics import AVERAGING, EMPTY, IMAGES, IOU, Convention, f1_from_counts, iou_from_counts, summarize
from .metrics import resize_nearest

log = logging.getLogger(__name__)
STAGE = "evaluate"
MANIFEST_COLUMNS = ("image_id", "root", "path", "label", "mask_path", "group")
BASELINES = ("face", "all")
BASELINE_SCORE = 0.5
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
def detection_scores_of(variant: str) -> str:
    """Whose image scores a fusion variant is evaluated with: LFDL's (the paper: detection comes from LFDL), except
    the ``mitl`` row, which scores images from its own mask."""
    return "mitl" if variant == "mitl" else "lfdl"


def read_scores(path: Path) -> dict[str, float | str]:
    """``image_id -> score`` from a CSV with columns image_id,score; an unusable score maps to its reason (str)."""
    import io

    text = read_text_arg(path, "--scores")
    try:
        df = pd.read_csv(io.StringIO(text), dtype={"image_id": str}, keep_default_na=False)
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
                  iou: str, empty: str, gt_notes: EncodingNotes | None = None,
                  pred_notes: EncodingNotes | None = None, baseline=None) -> tuple[dict, list[tuple[str, str]]]:
    """Count one image. Returns its row and its errors ``[(path, reason), ...]`` (row['ok'] False if any).
    ``gt_notes`` / ``pred_notes`` count ground truths stored as 0/1 and predictions holding only 0 and 1.
    ``baseline`` (a :class:`Baseline`) replaces the predicted mask file: its mask for the image is evaluated."""
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
    if baseline is None and not pred_path.is_file():
        errors.append((str(pred_path), "no predicted mask for this image"))
    elif baseline is not None and baseline.missing(item.image_id):
        errors.append((str(baseline.crops_path), "no face crop for this image (the crops stage left it out: see "
                                                 "its ledger)"))
    if errors:
        return row, errors
    try:
        gt = None
        if item.label == 1:
            if item.gt_path is None:
                return row, [(str(item.image_path), "fake image without a ground-truth mask")]
            gt = read_mask(item.gt_path, notes=gt_notes)
            hw = item.hw if item.hw is not None else image_hw(item.image_path)
            if tuple(gt.shape) != tuple(hw):
                return row, [(str(item.gt_path), f"ground-truth mask is {gt.shape[1]}x{gt.shape[0]} but its image "
                                                 f"is {hw[1]}x{hw[0]}")]
        else:
            hw = item.hw if item.hw is not None else image_hw(item.image_path)
        if baseline is None:
            pred_u8 = read_prob_u8(pred_path)
            check_prob_encoding(pred_u8, pred_path, pred_notes)
        else:
            pred_u8 = baseline.mask(item.image_id, (int(hw[0]), int(hw[1])))
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


class Baseline:
    """The predicted masks of a baseline (``--baseline``): ``face`` paints the image's face crops (boxes in original
    pixels, half-open, clipped to the image), ``all`` the whole image. Every image's score is :data:`BASELINE_SCORE`."""

    def __init__(self, kind: str, crops_path: Path | None = None):
        if kind not in BASELINES:
            raise UserError(f"--baseline {kind!r}: expected one of {', '.join(BASELINES)}")
        self.kind, self.crops_path = kind, crops_path
        self.boxes: dict[str, list[tuple[int, int, int, int]]] | None = None
        if kind == "face" and crops_path is None:
            raise UserError("--baseline face needs --crops CROPS.parquet (the `morphfuse crops` output)")
        if crops_path is not None:
            df = read_parquet_arg(crops_path, "--crops", ("image_id", "x0", "y0", "x1", "y1"))
            self.boxes = {}
            for r in df.itertuples(index=False):
                self.boxes.setdefault(str(r.image_id), []).append((int(r.x0), int(r.y0), int(r.x1), int(r.y1)))

    def missing(self, image_id: str) -> bool:
        return self.boxes is not None and image_id not in self.boxes

    def mask(self, image_id: str, hw: tuple[int, int]) -> np.ndarray:
        """The 0/255 mask of the image (``hw`` = its height, width)."""
        if self.kind == "all":
            return np.full(hw, 255, np.uint8)
        m = np.zeros(hw, np.uint8)
        for x0, y0, x1, y1 in self.boxes[image_id]:
            m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 255
        return m


def evaluate_items(items, pred_dir: Path | None, scores: dict[str, float | str], threshold: float, iou: str,
                   empty: str, ledger: Ledger, variant: str = "", baseline: Baseline | None = None) -> pd.DataFrame:
    """Rows of every item; with ``baseline``, its masks and the constant score replace ``pred_dir`` and ``scores``."""
    rows = []
    t0 = time.perf_counter()
    gt_notes, pred_notes = MaskNotes("ground-truth mask"), ProbNotes("predicted mask")
    for item in items:
        pred_path = Path(pred_dir or ".") / f"{item.image_id}.png"
        score = BASELINE_SCORE if baseline is not None else scores.get(item.image_id)
        row, errors = evaluate_item(item, pred_path, score, threshold, iou, empty, gt_notes, pred_notes, baseline)
        for path, reason in errors:
            ledger.add(item.image_id, path, reason)
        row["variant"] = variant
        row["ok"] = not errors
        row["error"] = "; ".join(r for _, r in errors)
        rows.append(row)
    gt_notes.write(ledger)
    pred_notes.write(ledger)
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
def dataset_items(root: Path, problems: list | None = None) -> list[Item]:
    """The images of a DDL-I split folder; a listing problem (clash, missing mask) is the item's ``error``.
    Problems of the walk (link loops, dangling links) are appended to ``problems`` as ``(path, reason)``."""
    real_dir, fake_dir = root / "real", root / "fake"
    if not real_dir.is_dir() and not fake_dir.is_dir():
        raise UserError(f"--dataset {root}: expected a split folder in DDL-I layout with real/ and/or fake/ "
                        f"(and masks/ or mask/ for the fakes); found neither real/ nor fake/")
    mask_dirs = [d for d in (root / "masks", root / "mask") if d.is_dir()]
    masks: dict[str, list[Path]] = {}
    for d in mask_dirs:
        for p in walk_images(d, problems):
            masks.setdefault(p.stem, []).append(p)
    listed: dict[str, list[tuple[int, Path]]] = {}
    for label, d in ((0, real_dir), (1, fake_dir)):
        if d.is_dir():
            for p in walk_images(d, problems):
                listed.setdefault(p.stem, []).append((label, p))
    if listed and any(lab == 1 for v in listed.values() for lab, _ in v) and not mask_dirs:
        log.warning("%s has fake images but neither masks/ nor mask/: every fake will be listed as an error", root)
    # The same bytes in real/ and fake/: one label is wrong, so neither copy is evaluated.
    singles = [(image_id, v[0]) for image_id, v in sorted(listed.items()) if len(v) == 1]
    identical: dict[str, str] = {}
    for group in identical_files([p for _, (_, p) in singles]):
        labels = {singles[i][1][0] for i in group}
        if labels == {0, 1}:
            for i in group:
                lab = singles[i][1][0]
                other = next(singles[j][1][1] for j in group if singles[j][1][0] != lab)
                identical[singles[i][0]] = (f"byte-identical to {other} in {'fake' if lab == 0 else 'real'}/: an "
                                            "image cannot be real and fake; both copies left out")
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
        if image_id in identical:
            item.error = identical[image_id]
        elif label == 1:
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
    df = read_parquet_arg(path, "--manifest", MANIFEST_COLUMNS)
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
def metrics_markdown(m: dict, title: str) -> str:
    c = m["convention"]
    lines = [f"# {title}", "",
             f"Convention: averaging={c['averaging']}, images={c['images']}, iou={c['iou']}, empty={c['empty']}, "
             f"mask threshold={c['threshold']:g}, score threshold={m['score_threshold']:g}.", "",
             *md_table(["AUC", "F1", "IoU", "Final", "AP", "EER", "ACC"],
                       [[fmt_metric(m[k]) for k in ("auc", "f1", "iou", "final", "ap", "eer", "accuracy")]]), ""]
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


# ----------------------------------------------------------------------------------------------------- CLI
def convention_arguments(ev: dict) -> str:
    """The command-line form of the config's metric convention (``evaluate:`` block), as the evaluate and tables
    rules pass it: the options :func:`add_convention_arguments` defines.

    >>> convention_arguments({"averaging": "per_image", "images": "fake_only", "iou": "foreground", "empty": "skip",
    ...                       "threshold": 0.5})
    '--averaging per_image --images fake_only --iou foreground --empty skip --threshold 0.5'
    """
    return (f"--averaging {ev['averaging']} --images {ev['images']} --iou {ev['iou']} --empty {ev['empty']}"
            f" --threshold {ev['threshold']}")


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
    p.add_argument("--pred-masks", type=Path, metavar="DIR", help="predicted masks <image_id>.png")
    p.add_argument("--scores", type=Path, metavar="CSV", help="image scores: image_id,score")
    p.add_argument("--baseline", choices=BASELINES,
                   help="evaluate a baseline instead of --pred-masks/--scores: face = the image's face crops "
                        "(needs --crops), all = the whole image; score 0.5 for every image")
    p.add_argument("--crops", type=Path, metavar="CROPS.parquet",
                   help="(--baseline) the face crops of the images (`morphfuse crops` output): the face baseline's "
                        "mask; an image without a crop row is an error (it has no model prediction either)")
    p.add_argument("--out", type=Path, metavar="DIR", help="(--dataset) output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="(--dataset) --out holds another evaluation's outputs: replace them (without it such an "
                        "--out is refused)")
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
    baseline = None
    if args.baseline is not None:
        if args.pred_masks is not None or args.scores is not None:
            raise UserError("--baseline replaces --pred-masks and --scores: give either, not both")
        baseline = Baseline(args.baseline, args.crops)
    elif args.pred_masks is None or args.scores is None:
        raise UserError("give --pred-masks DIR and --scores CSV (or --baseline face|all)")
    elif not args.pred_masks.is_dir():
        raise UserError(f"--pred-masks {args.pred_masks}: not a folder")
    ledger = Ledger(STAGE)
    if args.dataset is not None:
        if args.out is None:
            raise UserError("--dataset needs --out DIR")
        walk_problems: list = []
        items = dataset_items(args.dataset, walk_problems)
        for path, reason in walk_problems:
            ledger.add(Path(path).stem, path, reason)
    else:
        if args.out_counts is None:
            raise UserError("--manifest needs --out-counts FILE.parquet")
        items = manifest_items(args.manifest, args.split)
    scores = read_scores(args.scores) if baseline is None else {}
    known = {it.image_id for it in items}
    n_extra = sum(1 for k in scores if k not in known)
    if n_extra and args.dataset is not None:
        log.warning("%d score rows name images that are not in %s (ignored)", n_extra, args.dataset)
    if args.dataset is not None:
        from .outdir import RunFolder

        settings = {"dataset": os.path.abspath(args.dataset),
                    "pred_masks": os.path.abspath(args.pred_masks) if baseline is None else None,
                    "scores": os.path.abspath(args.scores) if baseline is None else None,
                    "baseline": args.baseline, "crops": os.path.abspath(args.crops) if args.crops else None,
                    "variant": args.variant,
                    "convention": dataclasses.asdict(conv),
                    "score_threshold": args.score_threshold}
        with RunFolder(args.out, STAGE, _jsonable(settings), OUT_FILES, overwrite=args.overwrite):
            df = evaluate_items(items, args.pred_masks, scores, conv.threshold, conv.iou, conv.empty, ledger,
                                args.variant, baseline)
            m = summarize_frame(df, conv, args.score_threshold)
            m["variant"] = args.variant
            m["n_ledger_rows"] = len(ledger)
            m["inputs"] = {"dataset": str(args.dataset), "pred_masks": str(args.pred_masks),
                           "scores": str(args.scores), "baseline": args.baseline}
            title = (f"Evaluation of {args.variant or args.pred_masks or 'baseline ' + str(args.baseline)} on "
                     f"{args.dataset}")
            metrics_json = json.dumps(json_ready(m), indent=2, default=json_default) + "\n"
            commit_files([
                (args.out / "per_image.parquet", lambda tmp: df.to_parquet(tmp, index=False)),
                (args.out / "ledger.csv", lambda tmp: ledger.frame().to_csv(tmp, index=False)),
                (args.out / "metrics.json", lambda tmp: Path(tmp).write_text(metrics_json)),
                (args.out / "metrics.md", lambda tmp: Path(tmp).write_text(metrics_markdown(m, title))),
            ])
        log.info("AUC %s  F1 %s  IoU %s  Final %s (%d images, %d errors)", fmt_metric(m["auc"]), fmt_metric(m["f1"]),
                 fmt_metric(m["iou"]), fmt_metric(m["final"]), m["n_images"], m["n_errors"])
    else:
        df = evaluate_items(items, args.pred_masks, scores, conv.threshold, conv.iou, conv.empty, ledger, args.variant,
                            baseline)
        write_parquet(args.out_counts, df)
        if args.ledger is not None:
            ledger.write(args.ledger)
    notes = [r for r in ledger.rows if r["reason"].startswith(("note:", "warning:"))]
    for r in notes:
        print(f"morphfuse evaluate: {r['reason']}", file=sys.stderr)
    if ledger.n_errors:
        print(f"morphfuse evaluate: {ledger.n_errors} problem(s); the images concerned are left out of the metrics:",
              file=sys.stderr)
        for r in ledger.rows:
            if r not in notes:
                print(f"  {r['image_id']}: {r['path']}: {r['reason']}", file=sys.stderr)
        return 0 if args.allow_errors else 1
    return 0


OUT_FILES = ["per_image.parquet", "ledger.csv", "metrics.json", "metrics.md"]


def _jsonable(o):
    return json.loads(json.dumps(o, default=str))
