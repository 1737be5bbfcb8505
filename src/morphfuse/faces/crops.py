"""Adaptive face crops for one shard (``morphfuse crops``; LFDL.md, "Adaptive face crop").

Two rules (``--rule`` / ``crops.rule``), both keeping boxes in original pixels:

- ``release`` (default; the IJCAI release's ``norm_crop_mask``): the box of the face's 5 landmarks (eye centres,
  nose tip, mouth corners; from 68 points: :func:`landmarks.five_points`), ``w`` wide and ``h`` high, widened by
  ``expand``·h (1.5·h) on the left and on the right and by ``expand``·w on the top and on the bottom, clipped to the
  image. The whole-image test is applied to that EXPANDED, clipped box, as released. A face without landmarks
  (the ``opencv`` backend) falls back to the ``margin`` rule, and the log counts it.
- ``margin``: the detector's box enlarged by ``margin`` (1.3) around its centre, width and height each (no
  squaring; the features stage resizes the crop to S×S); the whole-image test on the unexpanded box (the box's
  area inside the image).

Then: edges rounded outwards to whole pixels and clipped to the image. The whole image is used instead when no face
was found (``kind = no_face``) or when the tested box covers more than ``max_face_area_fraction`` (0.7) of the
image's area (``face_too_large``). Whole-image crops have ``face_idx = -1``; an image gets at most one (the release
writes one whole-image copy per such face), and other faces of the same image keep their own crops. Boxes are ints
in original pixels, half-open: the crop is ``img[y0:y1, x0:x1]``.

Each crop also gets the SSPSL reference rectangle (``ref_x0..ref_y1``, original pixels, clipped to the image):
the box of ``--reference-region`` (nose | mouth | eyes | face) from the face's landmarks, ``--reference-pad``
pixels wider on every side. Faces without landmarks (the ``opencv`` backend) get the nose estimated from their
box (``landmarks.nose_box_from_face_box``) when the region is the nose, else NaN. A ``face_too_large`` crop takes
the rectangle of the face that made it; ``no_face`` crops have NaN.

Example:
  morphfuse crops --manifest manifest/shards/train_00000.parquet --faces faces/train_00000.parquet \\
      --faces-ledger ledger/faces/train_00000.csv --out crops/train_00000.parquet \\
      --ledger ledger/crops/train_00000.csv
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:  # pandas is imported where it is used: not on `morphfuse detect`'s path
    import pandas as pd

from ..errors import UserError
from ..imageio import atomic_path
from ..ledger import Ledger, read_ledgers
from .landmarks import REGIONS, five_points, nose_box_from_face_box, region_box

log = logging.getLogger(__name__)

CROPS_COLUMNS = ["image_id", "face_idx", "x0", "y0", "x1", "y1", "kind", "ref_x0", "ref_y0", "ref_x1", "ref_y1"]
KINDS = ("face", "no_face", "face_too_large")
RULES = ("release", "margin")


class Crop(NamedTuple):
    face_idx: int   # index of the face in the faces parquet; -1 = whole image
    x0: int
    y0: int
    x1: int
    y1: int
    kind: str       # face | no_face | face_too_large
    source_face: int  # the face the crop comes from (-1 for no_face): its landmarks give the reference rectangle


def _box_of(face) -> tuple[float, float, float, float]:
    box = getattr(face, "box", face)
    x0, y0, x1, y1 = (float(c) for c in box)
    return x0, y0, x1, y1


def release_box(landmarks, expand: float = 1.5) -> tuple[float, float, float, float] | None:
    """The IJCAI release's crop box before clipping: the 5-landmark box (w × h) widened by ``expand``·h left and
    right and by ``expand``·w above and below. None without landmarks."""
    pts = five_points(landmarks)
    if pts is None:
        return None
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    w, h = x1 - x0, y1 - y0
    return (float(x0 - expand * h), float(y0 - expand * w), float(x1 + expand * h), float(y1 + expand * w))


def crop_boxes(faces: Sequence, width: int, height: int, margin: float = 1.3, max_frac: float = 0.7,
               rule: str = "release", expand: float = 1.5, landmarks: Sequence | None = None) -> list[Crop]:
    """Crop boxes of one image from its faces (``Face`` objects or ``(x0, y0, x1, y1)`` boxes, in face_idx order).

    ``landmarks`` (one entry per face, None where unknown) defaults to the faces' own ``landmarks``. See the module
    docstring for the rules. A face box that does not overlap the image at all is treated as not found (real
    detectors never return one). :func:`uses_fallback` tells which faces take the margin rule.
    """
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if not 0 < max_frac <= 1:
        raise ValueError(f"max_frac must be in (0, 1], got {max_frac}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if not expand >= 0:
        raise ValueError(f"expand must be >= 0, got {expand}")
    if landmarks is None:
        landmarks = [getattr(f, "landmarks", None) for f in faces]
    whole = (0, 0, width, height)
    crops: list[Crop] = []
    have_whole = False
    for i, face in enumerate(faces):
        x0, y0, x1, y1 = _box_of(face)
        if min(x1, width) - max(x0, 0.0) <= 0 or min(y1, height) - max(y0, 0.0) <= 0:
            continue
        box = release_box(landmarks[i], expand) if rule == "release" else None
        if box is None:  # the margin rule (or the fallback of a face without landmarks)
            tested = (x0, y0, x1, y1)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            hw, hh = margin * (x1 - x0) / 2, margin * (y1 - y0) / 2
            box = (cx - hw, cy - hh, cx + hw, cy + hh)
        else:
            tested = box  # the release tests the expanded box
        inside_w = min(tested[2], width) - max(tested[0], 0.0)
        inside_h = min(tested[3], height) - max(tested[1], 0.0)
        if inside_w > 0 and inside_h > 0 and inside_w * inside_h > max_frac * width * height:
            if not have_whole:
                crops.append(Crop(-1, *whole, "face_too_large", i))
                have_whole = True
            continue
        bx0, by0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        bx1, by1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
        if bx1 <= bx0 or by1 <= by0:  # a zero-size face box
            continue
        crops.append(Crop(i, bx0, by0, bx1, by1, "face", i))
    if not crops:
        crops.append(Crop(-1, *whole, "no_face", -1))
    return crops


def uses_fallback(rule: str, landmarks) -> bool:
    """Whether a face falls back to the margin rule under ``rule`` (release rule, no usable landmarks)."""
    return rule == "release" and five_points(landmarks) is None


def reference_box(landmarks, box, region: str, pad: float, width: int, height: int):
    """SSPSL reference rectangle in original pixels, clipped to the image; ``None`` when there is none."""
    lm = None if landmarks is None or len(landmarks) == 0 else np.asarray(landmarks, np.float64).reshape(-1, 2)
    if lm is not None:
        ref = region_box(lm, region, pad)
    elif region == "nose" and box is not None:
        bx0, by0, bx1, by1 = nose_box_from_face_box(box)
        ref = (bx0 - pad, by0 - pad, bx1 + pad, by1 + pad)
    else:
        return None
    x0, y0 = max(0.0, ref[0]), max(0.0, ref[1])
    x1, y1 = min(float(width), ref[2]), min(float(height), ref[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def crops_schema():
    import pyarrow as pa

    ints = [(c, pa.int64()) for c in ("face_idx", "x0", "y0", "x1", "y1")]
    refs = [(c, pa.float64()) for c in ("ref_x0", "ref_y0", "ref_x1", "ref_y1")]
    return pa.schema([("image_id", pa.string()), *ints, ("kind", pa.string()), *refs])


def write_crops(path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = crops_schema()
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def crop_shard(manifest: pd.DataFrame, faces: pd.DataFrame, margin: float, max_frac: float, region: str,
               pad: float, ledger: Ledger, skip: dict[str, str] | None = None, rule: str = "release",
               expand: float = 1.5, counts: dict | None = None) -> list[dict]:
    """Crop rows for every image of ``manifest`` (images in ``skip``, id → reason, get a ledger line instead).
    ``counts["fallback"]`` (if given) is increased by the faces that fell back to the margin rule."""
    import pandas as pd
    skip = skip or {}
    by_image = {k: g.sort_values("face_idx") for k, g in faces.groupby("image_id", sort=False)}
    rows: list[dict] = []
    nan4 = (math.nan,) * 4
    for rec in manifest.to_dict("records"):
        image_id = str(rec["image_id"])
        path = Path(str(rec.get("root", ""))) / str(rec.get("path", ""))
        if image_id in skip:
            ledger.add(image_id, path, f"no crop: the faces stage could not use this image ({skip[image_id]})")
            continue
        w, h = rec["width"], rec["height"]
        if pd.isna(w) or pd.isna(h) or int(w) <= 0 or int(h) <= 0:
            ledger.add(image_id, path, f"no crop: the manifest gives no valid image size ({w}x{h})")
            continue
        w, h = int(w), int(h)
        g = by_image.get(image_id)
        boxes, lms = [], []
        if g is not None:
            boxes = list(zip(g["x0"], g["y0"], g["x1"], g["y1"]))
            lms = list(g["landmarks"])
        if counts is not None:
            counts["fallback"] = counts.get("fallback", 0) + sum(uses_fallback(rule, lm) for lm in lms)
        for c in crop_boxes(boxes, w, h, margin, max_frac, rule=rule, expand=expand, landmarks=lms):
            ref = None
            if c.source_face >= 0:
                ref = reference_box(lms[c.source_face], boxes[c.source_face], region, pad, w, h)
            rx0, ry0, rx1, ry1 = ref if ref is not None else nan4
            rows.append({"image_id": image_id, "face_idx": c.face_idx, "x0": c.x0, "y0": c.y0, "x1": c.x1,
                         "y1": c.y1, "kind": c.kind, "ref_x0": rx0, "ref_y0": ry0, "ref_x1": rx1, "ref_y1": ry1})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest shard parquet (image_id, width, height, ...)")
    parser.add_argument("--faces", required=True, help="faces parquet of the same shard (morphfuse faces)")
    parser.add_argument("--out", required=True, help="crops parquet to write")
    parser.add_argument("--faces-ledger", default=None,
                        help="the faces stage's ledger of this shard: its images get no crop (and a ledger line) "
                             "instead of a whole-image crop")
    parser.add_argument("--ledger", default=None, help="CSV of images that got no crop")
    from ..config import default

    c = default("crops")
    parser.add_argument("--config", default=None,
                        help="config.yaml, or the inline JSON slice the workflow's rule passes: its crops: block "
                             "sets every option below (the flags are for runs without it)")
    parser.add_argument("--rule", choices=RULES, default=c["rule"],
                        help="release (default): the 5-landmark box widened by --expand x its height left and right "
                             "and x its width above and below, the area test on that box; margin: the detector box "
                             "x --margin, the area test on the detector box")
    parser.add_argument("--expand", type=float, default=c["expand"],
                        help="the release rule's factor (default %(default)s)")
    parser.add_argument("--margin", type=float, default=c["margin"],
                        help="the margin rule's face box enlargement factor (default %(default)s)")
    parser.add_argument("--max-face-area-fraction", type=float, default=c["max_face_area_fraction"],
                        help="use the whole image when a face box covers more than this fraction of it (0.7)")
    parser.add_argument("--reference-region", default=c["reference_region"], choices=REGIONS,
                        help="SSPSL reference region (default nose)")
    parser.add_argument("--reference-pad", type=float, default=float(c["reference_pad"]),
                        help="pixels (original image) added around the reference region (default 5)")


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    from .cli import read_faces, read_manifest

    if args.config:
        from ..config import load_stage_config

        c = load_stage_config(args.config)["crops"]
        args.rule, args.expand, args.margin = c["rule"], float(c["expand"]), float(c["margin"])
        args.max_face_area_fraction = float(c["max_face_area_fraction"])
        args.reference_region, args.reference_pad = c["reference_region"], float(c["reference_pad"])
    if not args.margin > 0:
        raise UserError(f"--margin must be > 0, got {args.margin}")
    if not 0 < args.max_face_area_fraction <= 1:
        raise UserError(f"--max-face-area-fraction must be in (0, 1], got {args.max_face_area_fraction}")
    if not args.expand >= 0:
        raise UserError(f"--expand must be >= 0, got {args.expand}")
    if args.reference_pad < 0:
        raise UserError(f"--reference-pad must be >= 0, got {args.reference_pad}")
    manifest = read_manifest(args.manifest, required=("image_id", "width", "height"))
    if not Path(args.faces).is_file():
        raise UserError(f"faces parquet {args.faces} does not exist (run morphfuse faces first)")
    faces = read_faces(args.faces)
    stray = sorted(set(faces["image_id"]) - set(manifest["image_id"].astype(str)))
    if stray:
        raise UserError(f"{args.faces} has faces of {len(stray)} image(s) not in {args.manifest} (e.g. {stray[0]!r}): "
                        "are they the same shard?")
    skip: dict[str, str] = {}
    if args.faces_ledger:
        if not Path(args.faces_ledger).is_file():
            raise UserError(f"faces ledger {args.faces_ledger} does not exist")
        for r in read_ledgers([args.faces_ledger]).to_dict("records"):
            skip.setdefault(str(r["image_id"]), r["reason"])
    ledger = Ledger("crops")
    counts: dict = {}
    rows = crop_shard(manifest, faces, args.margin, args.max_face_area_fraction, args.reference_region,
                      args.reference_pad, ledger, skip, rule=args.rule, expand=args.expand, counts=counts)
    if counts.get("fallback"):
        log.info("crops: %d face(s) without landmarks took the margin rule (x%g) instead of the release rule",
                 counts["fallback"], args.margin)
    write_crops(args.out, rows)
    if args.ledger:
        ledger.write(args.ledger)
    kinds = pd.Series([r["kind"] for r in rows], dtype=object).value_counts().to_dict()
    log.info("crops: %d images -> %d crops (%s), %d without a crop -> %s", len(manifest), len(rows),
             ", ".join(f"{k} {kinds.get(k, 0)}" for k in KINDS), len(ledger), args.out)
    return 0
