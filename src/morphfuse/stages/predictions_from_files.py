"""Take predictions from files instead of the models: folders of probability masks plus a scores CSV.

Lets a user fuse and score ANY method's outputs against any dataset. For each image of the manifest shard the
mask is looked up as ``<masks>/<image_id>.png`` or, failing that, by the stem of the image's file name; masks not
at the image's original size are resized (bilinear on probabilities) so that fusion sees both branches at the
original size. Missing masks or scores go in the shard's ledger, never silently dropped.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import pandas as pd

from ..errors import UserError
from ..imageio import BadImageError, read_gray, write_csv, write_png
from ..ledger import Ledger

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--manifest", required=True, help="manifest shard Parquet")
    p.add_argument("--masks", required=True, help="folder of single-channel probability PNGs (v = round(255 p))")
    p.add_argument("--scores", required=True, help="CSV with columns image_id,score (image_id or file stem)")
    p.add_argument("--out", required=True, help="writes OUT/scores.csv, OUT/masks/<image_id>.png, OUT/ledger.csv")


def run(args) -> int:
    shard = pd.read_parquet(args.manifest)
    masks_dir = Path(args.masks)
    if not masks_dir.is_dir():
        raise UserError(f"{masks_dir}: predictions.files mask folder does not exist")
    scores_path = Path(args.scores)
    if not scores_path.exists():
        raise UserError(f"{scores_path}: predictions.files scores CSV does not exist")
    scores = pd.read_csv(scores_path, dtype={"image_id": str})
    if not {"image_id", "score"} <= set(scores.columns):
        raise UserError(f"{scores_path}: needs the columns image_id,score (has {', '.join(scores.columns)})")
    score_of = dict(zip(scores["image_id"], scores["score"].astype(float)))
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    ledger = Ledger("predictions_from_files")
    rows = []
    for r in shard.itertuples(index=False):
        stem = Path(r.path).stem
        key = r.image_id if r.image_id in score_of else stem
        if key not in score_of:
            ledger.add(r.image_id, scores_path, f"no score for {r.image_id!r} (nor for its file stem {stem!r})")
            continue
        mpath = masks_dir / f"{r.image_id}.png"
        if not mpath.exists():
            mpath = masks_dir / f"{stem}.png"
        try:
            v = read_gray(mpath)
        except BadImageError as e:
            ledger.add(r.image_id, mpath, e.reason)
            continue
        if v.shape != (r.height, r.width):
            v = cv2.resize(v, (int(r.width), int(r.height)), interpolation=cv2.INTER_LINEAR)
        write_png(out / "masks" / f"{r.image_id}.png", v)
        rows.append({"image_id": r.image_id, "score": score_of[key]})
    write_csv(out / "scores.csv", pd.DataFrame(rows, columns=["image_id", "score"]))
    ledger.write(out / "ledger.csv")
    log.info("%d predictions taken from files, %d missing", len(rows), len(ledger))
    return 0
