"""Perturb the images of one manifest shard for the robustness sweep (``morphfuse perturb``).

Each readable image is perturbed (``morphfuse.perturb``: jpeg:Q, downscale:F, blur:S, noise:S) and written as a
lossless PNG to ``--images`` (so the perturbed pixels are exactly what the stages after it read); the output shard
is the input shard with ``path`` pointing at the perturbed file (absolute) and everything else, masks included,
unchanged: every perturbation keeps the image's size and geometry, so the ground truth stays valid. Unreadable
images get a ledger line and keep no row (as in every stage). Noise is seeded by (``--seed``, perturbation, image
id): a rerun writes the same bytes.

Example:
  morphfuse perturb --manifest manifest/shards/test_00000.parquet --perturb jpeg:70 --seed 0 \\
      --images robustness/jpeg_70/images/test_00000 --out robustness/jpeg_70/manifest/test_00000.parquet \\
      --ledger ledger/robustness/jpeg_70/perturb/test_00000.csv
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..imageio import BadImageError, read_image, write_image, write_parquet
from ..ledger import Ledger
from ..perturb import image_seed, parse

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="manifest shard (Parquet)")
    p.add_argument("--perturb", required=True, metavar="KIND:LEVEL",
                   help="jpeg:QUALITY, downscale:FACTOR, blur:SIGMA, noise:SIGMA (0-255 scale) or none")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (noise is seeded per image from it)")
    p.add_argument("--images", required=True, help="folder for the perturbed images (<image_id>.png)")
    p.add_argument("--out", required=True, help="the perturbed manifest shard to write (Parquet)")
    p.add_argument("--ledger", required=True, help="CSV of the images that could not be perturbed")


def perturb_shard(manifest: pd.DataFrame, spec: str, seed: int, images: Path, ledger: Ledger) -> pd.DataFrame:
    p = parse(spec)
    images.mkdir(parents=True, exist_ok=True)
    keep, paths = [], []
    for i, row in enumerate(manifest.to_dict("records")):
        src = Path(str(row["root"] or "")) / str(row["path"])
        try:
            rgb = read_image(src)
        except BadImageError as e:
            ledger.add(row["image_id"], src, e.reason)
            continue
        out = images / f"{row['image_id']}.png"
        write_image(out, p(rgb, image_seed(seed, p, str(row["image_id"]))))
        keep.append(i)
        paths.append(str(out.resolve()))
    df = manifest.iloc[keep].copy()
    df["path"] = paths  # absolute: root / path is the perturbed file; mask_path stays relative to root
    return df.reset_index(drop=True)


def run(args: argparse.Namespace) -> int:
    src = Path(args.manifest)
    if not src.is_file():
        raise UserError(f"{src}: manifest shard does not exist")
    manifest = pd.read_parquet(src)
    missing = [c for c in ("image_id", "root", "path") if c not in manifest.columns]
    if missing:
        raise UserError(f"{src}: manifest shard lacks column(s) {', '.join(missing)}")
    ledger = Ledger("perturb")
    df = perturb_shard(manifest, args.perturb, args.seed, Path(args.images), ledger)
    write_parquet(args.out, df)
    ledger.write(args.ledger)
    log.info("perturb %s: %d of %d images -> %s (%d in the ledger)", args.perturb, len(df), len(manifest),
             args.images, len(ledger))
    return 0
