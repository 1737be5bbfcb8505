"""Bulk inference helpers for the workflow's ``bulk`` target (workflow/rules/bulk.smk): a model bundle applied to
a folder of millions of images, one ``morphfuse detect`` job per shard of the file list.

  morphfuse bulk list --root DIR --shard-size 4096 --out LISTS_DIR
      walks DIR once (:func:`morphfuse.imageio.walk_images`, the walk ``morphfuse detect DIR`` does) and writes
      ``LISTS_DIR/{k:05d}.txt`` (paths relative to DIR, one a line, in walk order) and ``LISTS_DIR/shards.csv``
      (shard, images). Each shard is then ``morphfuse detect --input-list LISTS_DIR/k.txt --input-root DIR``, so
      every image gets the name ``morphfuse detect DIR`` gives it (its path relative to DIR), whatever its shard.
  morphfuse bulk merge --shards DIR... --out DIR
      concatenates the shards' ``scores.csv`` and ``ledger.csv`` (the per-image masks, probability maps and
      overlays stay in the shard folders: a folder of millions of files helps nobody).

Resumable: a shard is one Snakemake job, so a rerun redoes only the shards that did not finish (and SLURM
``--retries`` redoes a failed one); the list is written once (a checkpoint) and only rewritten when the folder's
walk is forced.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..imageio import IMAGE_EXTENSIONS, walk_images, write_csv, write_text_atomic

log = logging.getLogger(__name__)


def write_lists(root: Path, shard_size: int, out: Path) -> int:
    if not root.is_dir():
        raise UserError(f"bulk.input {root}: not a folder")
    if shard_size < 1:
        raise UserError(f"bulk.shard_size {shard_size}: must be ≥ 1")
    out.mkdir(parents=True, exist_ok=True)
    rows, chunk, k = [], [], 0

    def flush():
        nonlocal chunk, k
        write_text_atomic(out / f"{k:05d}.txt", "".join(f"{r}\n" for r in chunk))
        rows.append({"shard": f"{k:05d}", "images": len(chunk)})
        chunk, k = [], k + 1

    for f in walk_images(root):
        rel = f.relative_to(root).as_posix()
        if "\n" in rel:
            log.warning("skipped a file whose name holds a line break: %r", rel)
            continue
        chunk.append(rel)
        if len(chunk) == shard_size:
            flush()
    if chunk:
        flush()
    if not rows:
        raise UserError(f"bulk.input {root}: no image files found in it (looked for {' '.join(IMAGE_EXTENSIONS)})")
    write_csv(out / "shards.csv", pd.DataFrame(rows, columns=["shard", "images"]))
    return sum(r["images"] for r in rows)


def merge(shards: list[Path], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    frames, ledgers = [], []
    for d in shards:
        s = d / "scores.csv"
        if not s.exists():
            raise UserError(f"{d}: no scores.csv (did the shard's detect job finish?)")
        df = pd.read_csv(s, dtype={"image": str}, keep_default_na=False)
        df.insert(0, "shard", d.name)
        frames.append(df)
        if (d / "ledger.csv").exists() and (d / "ledger.csv").stat().st_size:
            led = pd.read_csv(d / "ledger.csv", dtype=str, keep_default_na=False)
            led.insert(0, "shard", d.name)
            ledgers.append(led)
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["shard", "image"])
    dup = scores["image"].duplicated() if len(scores) else pd.Series([], dtype=bool)
    if dup.any():
        raise UserError(f"image name {scores.loc[dup, 'image'].iloc[0]!r} is in several shards; the lists overlap")
    write_csv(out / "scores.csv", scores)
    write_csv(out / "ledger.csv", pd.concat(ledgers, ignore_index=True) if ledgers else
              pd.DataFrame(columns=["shard", "stage", "image_id", "path", "reason"]))
    return len(scores)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bulk_cmd", required=True)
    a = sub.add_parser("list", help="shard the image files of a folder into list files")
    a.add_argument("--root", required=True, type=Path, help="the folder of images (walked recursively)")
    a.add_argument("--shard-size", type=int, default=4096, help="images per list file (default 4096)")
    a.add_argument("--out", required=True, type=Path,
                   help="folder for the list files 00000.txt, 00001.txt, ... and shards.csv")
    b = sub.add_parser("merge", help="concatenate the shards' scores.csv and ledger.csv")
    b.add_argument("--shards", nargs="+", required=True, type=Path,
                   help="the shards' detect output folders (each with scores.csv and ledger.csv)")
    b.add_argument("--out", required=True, type=Path, help="folder for the merged scores.csv and ledger.csv")


def run(args: argparse.Namespace) -> int:
    if args.bulk_cmd == "list":
        n = write_lists(args.root, args.shard_size, args.out)
        log.info("bulk: %d image(s) of %s in lists under %s", n, args.root, args.out)
    else:
        n = merge(args.shards, args.out)
        log.info("bulk: %d image row(s) merged into %s", n, args.out / "scores.csv")
    return 0
