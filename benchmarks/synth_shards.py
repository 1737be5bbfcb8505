"""Synthetic feature shards in the exact format of `morphfuse features` (on_the_fly), for the scale benchmarks.

Pixels are random square crops of the demo photos (so that codecs and augmentations see photographs, not
noise), a third of the rows real (empty mask), the rest fake with a rectangular mask; split ``train`` except every
``val_every``-th row. Written with :class:`morphfuse.features.ShardWriter`, so memory stays flat whatever ``n``.

    python benchmarks/synth_shards.py --kind lfdl --size 299 --rows 4096 --shards 8 --out /tmp/me/f299
"""
from __future__ import annotations

import argparse
import glob
from pathlib import Path

import cv2
import numpy as np

from morphfuse.features import LFDL_COLUMNS, MITL_COLUMNS, FORMAT_VERSION, ShardWriter, _str_array

PHOTOS = "/work/shared/data/faces/london_512"


def photos(limit: int = 64) -> list[np.ndarray]:
    files = sorted(glob.glob(f"{PHOTOS}/**/*.jpg", recursive=True))[:limit]
    if not files:
        raise SystemExit(f"no photos under {PHOTOS}")
    return [cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB) for f in files]


def write_shard(path: Path, kind: str, size: int, n: int, seed: int, pics: list[np.ndarray], val_every: int = 10,
                start: int = 0) -> None:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) >= 1 / 3).astype(np.int64)
    split = np.where(np.arange(n) % val_every == val_every - 1, "val", "train")
    with ShardWriter(path) as w:
        w.declare("rgb", np.uint8, (size, size, 3))
        w.declare("mask", np.uint8, (size, size))
        for i in range(n):
            p = pics[int(rng.integers(len(pics)))]
            h, wd = p.shape[:2]
            side = int(rng.integers(min(h, wd) // 2, min(h, wd) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, wd - side + 1))
            img = cv2.resize(p[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
            mask = np.zeros((size, size), np.uint8)
            if label[i]:
                a, b = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
                mask[a[0]:a[1] + 1, b[0]:b[1] + 1] = 255
            w.append("rgb", img[None])
            w.append("mask", mask[None])
        ids = _str_array([f"s{seed:04d}_{start + i:07d}" for i in range(n)])
        cols = LFDL_COLUMNS if kind == "lfdl" else MITL_COLUMNS
        small = {"image_id": ids, "label": label, "split": _str_array(split), "has_mask": np.ones(n, bool),
                 "orig_hw": np.tile([size, size], (n, 1)).astype(np.int64)}
        order = ["image_id"]
        if kind == "lfdl":
            small.update(face_idx=np.zeros(n, np.int64), crop_box=np.tile([0, 0, size, size], (n, 1)).astype(np.int64),
                         ref_box=np.tile(np.float32([size / 3, size / 3, 2 * size / 3, 2 * size / 3]), (n, 1)),
                         crop_kind=_str_array(["face"] * n))
            order += ["face_idx", "crop_box"]
        order += ["rgb", "mask"] + [k for k in cols if k not in order]
        meta = {"format": FORMAT_VERSION, "mode": "on_the_fly", "kind": kind, "size": size, "n": n}
        w.close(small, meta, order)


def write_shards(out: Path, kind: str, size: int, rows: int, shards: int, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pics = photos()
    paths = []
    for k in range(shards):
        p = out / f"train_{k:05d}.npz"
        if not p.exists():
            write_shard(p, kind, size, rows, seed + k, pics, start=k * rows)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["lfdl", "mitl"], required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--rows", type=int, default=4096, help="rows per shard")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for p in write_shards(args.out, args.kind, args.size, args.rows, args.shards):
        print(p, p.stat().st_size)


if __name__ == "__main__":
    main()
