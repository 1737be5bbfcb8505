"""Detect faces and landmarks in one manifest shard (``morphfuse faces``).

Reads every image of the shard (``root/path``), runs one face backend on it and writes the faces parquet: one row
per face, ``image_id, face_idx, x0, y0, x1, y1, score, landmarks, n_landmarks, backend`` (ARCHITECTURE.md).
Images without a face have no row. An image that cannot be read, or whose decoded size differs from the
manifest's width/height, gets one line in the ledger and no row (``morphfuse crops --faces-ledger`` then skips it
instead of taking it for an image without a face).

Example:
  morphfuse faces --manifest manifest/shards/train_00000.parquet --out faces/train_00000.parquet \\
      --ledger ledger/faces/train_00000.csv --config config.yaml
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..inputs import read_parquet_arg
from ..imageio import BadImageError, atomic_path, read_image
from ..ledger import Ledger
from .backends import BACKENDS, FA_DETECTORS, backend_from_config, get_backend

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("image_id", "root", "path")
FACES_COLUMNS = ["image_id", "face_idx", "x0", "y0", "x1", "y1", "score", "landmarks", "n_landmarks", "backend"]


def faces_schema():
    import pyarrow as pa

    return pa.schema([("image_id", pa.string()), ("face_idx", pa.int64()),
                      ("x0", pa.float64()), ("y0", pa.float64()), ("x1", pa.float64()), ("y1", pa.float64()),
                      ("score", pa.float64()), ("landmarks", pa.list_(pa.float32())),
                      ("n_landmarks", pa.int64()), ("backend", pa.string())])


def write_faces(path, rows: list[dict]) -> None:
    """Write faces rows (dicts with FACES_COLUMNS) atomically, with a fixed schema even when there are none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = faces_schema()
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_faces(path) -> pd.DataFrame:
    """Read a faces parquet; ``landmarks`` come back as float32 arrays (empty when there are none)."""
    df = pd.read_parquet(path)
    missing = [c for c in FACES_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: not a faces parquet (missing columns {', '.join(missing)})")
    df["landmarks"] = [np.asarray(v if v is not None else [], dtype=np.float32) for v in df["landmarks"]]
    return df


def read_manifest(path, required=MANIFEST_COLUMNS) -> pd.DataFrame:
    p = Path(path)
    df = read_parquet_arg(p, "--manifest", required)
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise UserError(f"manifest shard {p} repeats image_id {dup.iloc[0]!r} ({len(dup)} duplicates): "
                        "image ids must be unique")
    return df.reset_index(drop=True)


def face_rows(image_id: str, faces, backend: str) -> list[dict]:
    rows = []
    for i, f in enumerate(faces):
        lm = np.zeros((0, 2), np.float32) if f.landmarks is None else np.asarray(f.landmarks, np.float32)
        x0, y0, x1, y1 = (float(c) for c in f.box)
        rows.append({"image_id": str(image_id), "face_idx": i, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                     "score": float(f.score), "landmarks": lm.ravel().tolist(), "n_landmarks": int(len(lm)),
                     "backend": backend})
    return rows


def backend_options_from_args(args) -> dict:
    """The options of ``args.backend`` from the command line (only the ones that backend takes)."""
    name = args.backend
    if name == "dlib":
        return {"upsample": args.upsample, "min_score": args.min_score, "gray": args.gray}
    if name == "mtcnn":
        return {"min_score": args.min_score, "device": args.device}
    if name == "opencv":
        return {"min_score": args.min_score}
    return {"torch_home": args.torch_home, "device": args.device, "detector": args.fa_detector,
            "min_score": args.min_score, "upsample": args.upsample}


def backend_name(args) -> str:
    if args.config:
        from ..config import load_stage_config

        return load_stage_config(args.config)["faces"]["backend"]
    return args.backend


def detect_shard(manifest: pd.DataFrame, backend, ledger: Ledger, progress: bool = True,
                 desc: str = "faces") -> tuple[list[dict], dict]:
    """Run ``backend`` over a manifest frame; returns the faces rows and counts (images, faces, no_face, bad)."""
    from tqdm import tqdm

    rows: list[dict] = []
    counts = {"images": 0, "faces": 0, "no_face": 0, "bad": 0}
    has_size = "width" in manifest.columns and "height" in manifest.columns
    interactive = sys.stderr.isatty()
    records = manifest.to_dict("records")
    for rec in tqdm(records, total=len(records), desc=desc, unit="img", file=sys.stderr, disable=not progress,
                    mininterval=0.5 if interactive else 30.0, dynamic_ncols=interactive):
        counts["images"] += 1
        path = Path(rec["root"]) / rec["path"]
        try:
            rgb = read_image(path)
        except BadImageError as e:
            ledger.add(rec["image_id"], path, e.reason)
            counts["bad"] += 1
            continue
        if has_size and pd.notna(rec["width"]) and pd.notna(rec["height"]):
            h, w = rgb.shape[:2]
            if (int(rec["width"]), int(rec["height"])) != (w, h):
                ledger.add(rec["image_id"], path, f"decoded image is {w}x{h} but the manifest says "
                           f"{int(rec['width'])}x{int(rec['height'])}; re-run the index stage")
                counts["bad"] += 1
                continue
        faces = backend.detect(rgb)
        counts["faces"] += len(faces)
        counts["no_face"] += not faces
        rows.extend(face_rows(rec["image_id"], faces, backend.name))
    return rows, counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest shard parquet (image_id, root, path, ...)")
    parser.add_argument("--out", required=True, help="faces parquet to write")
    parser.add_argument("--ledger", required=True, help="CSV of images that could not be used (written always)")
    parser.add_argument("--config", default=None,
                        help="config.yaml, or the inline JSON slice the workflow's rule passes: its faces: block "
                             "chooses the backend and its options (the flags below are for runs without it)")
    parser.add_argument("--backend", default="dlib", choices=BACKENDS, help="face backend (default: dlib)")
    parser.add_argument("--upsample", type=int, default=1,
                        help="dlib HOG upsampling steps: 0 finds faces from ~70 px, 1 from ~40 px at ~3.5x the cost "
                             "(dlib, and face_alignment with --fa-detector dlib)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="keep faces scoring above this, on the backend's own scale (default: the detector's "
                             "own threshold only)")
    parser.add_argument("--gray", action="store_true", help="dlib: run the HOG detector on grey (about 1.35x faster)")
    parser.add_argument("--device", default="cpu", help="torch device for mtcnn and face_alignment (default: cpu)")
    parser.add_argument("--torch-home", default=None,
                        help="face_alignment: directory whose hub/checkpoints/ holds the FAN (and S3FD) weights "
                             "(default: $TORCH_HOME, else ~/.cache/torch); nothing is downloaded")
    parser.add_argument("--fa-detector", default="sfd", choices=FA_DETECTORS,
                        help="face_alignment: face detector, sfd (its own S3FD) or one of our backends' boxes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for mtcnn and face_alignment (default: torch's own; give the "
                             "job's core count when several jobs share a machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.manifest)
    if args.upsample < 0:
        raise UserError(f"--upsample must be >= 0, got {args.upsample}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        if backend_name(args) in ("mtcnn", "face_alignment"):
            import torch

            torch.set_num_threads(args.threads)
    if args.config:
        from ..config import load_stage_config

        backend = backend_from_config(load_stage_config(args.config)["faces"])
    else:
        backend = get_backend(args.backend, **backend_options_from_args(args))
    ledger = Ledger("faces")
    rows, counts = detect_shard(manifest, backend, ledger, progress=not args.no_progress,
                                desc=f"faces {Path(args.manifest).stem}")
    write_faces(args.out, rows)
    ledger.write(args.ledger)
    log.info("faces: %d images, %d faces, %d without a face, %d unusable (ledger %s) -> %s", counts["images"],
             counts["faces"], counts["no_face"], counts["bad"], args.ledger, args.out)
    return 0
