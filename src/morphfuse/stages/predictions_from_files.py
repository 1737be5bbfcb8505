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
from ..imageio import BadImageError, ProbNotes, check_prob_encoding, read_gray, write_csv, write_png
from ..inputs import read_csv_arg, read_parquet_arg
from ..ledger import Ledger

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--manifest", required=True, help="manifest shard Parquet")
    p.add_argument("--masks", required=True, help="folder of single-channel probability PNGs (v = round(255 p))")
    p.add_argument("--scores", required=True, help="CSV with columns image_id,score (image_id or file stem)")
    p.add_argument("--out", required=True, help="writes OUT/scores.csv, OUT/masks/<image_id>.png, OUT/ledger.csv")


def run(args) -> int:
    shard = read_parquet_arg(args.manifest, "--manifest", ["image_id", "path", "width", "height"])
    masks_dir = Path(args.masks)
    if not masks_dir.is_dir():
        raise UserError(f"{masks_dir}: predictions.files mask folder does not exist")
    scores_path = Path(args.scores)
    scores = read_csv_arg(scores_path, "--scores", ["image_id", "score"], dtype={"image_id": str})
    values = pd.to_numeric(scores["score"], errors="coerce")
    if values.isna().any():
        bad = scores["score"][values.isna()].iloc[0]
        raise UserError(f"--scores {scores_path}: score {bad!r} is not a number")
    score_of = dict(zip(scores["image_id"], values.astype(float)))
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    ledger = Ledger("predictions_from_files")
    notes = ProbNotes()  # maps holding only 0 and 1: legal probabilities, noted once
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
        check_prob_encoding(v, mpath, notes)
        if v.shape != (r.height, r.width):
            v = cv2.resize(v, (int(r.width), int(r.height)), interpolation=cv2.INTER_LINEAR)
        write_png(out / "masks" / f"{r.image_id}.png", v)
        rows.append({"image_id": r.image_id, "score": score_of[key]})
    write_csv(out / "scores.csv", pd.DataFrame(rows, columns=["image_id", "score"]))
    notes.write(ledger)
    ledger.write(out / "ledger.csv")
    log.info("%d predictions taken from files, %d missing", len(rows), len(ledger))
    return 0
