"""Synthetic feature shards in the exact format of `morphfuse features` (on_the_fly), for the scale benchmarks.

Pixels are random square crops of the demo photos (so that codecs and augmentations see photographs, not
noise), or, where the photos are absent (a GPU machine gets the working tree only), of procedurally drawn
pictures (:func:`synthetic_photos`: smooth colour fields, shapes and grain); a third of the rows real (empty mask),
the rest fake with a rectangular mask; split ``train`` except every ``val_every``-th row. Written with
:class:`morphfuse.features.ShardWriter`, so memory stays flat whatever ``n``.

    python benchmarks/synth_shards.py --kind lfdl --size 299 --rows 4096 --shards 8 --out /tmp/me/f299
    python benchmarks/synth_shards.py --kind mitl --size 512 --rows 256 --out /tmp/me/f512 --synthetic
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


def synthetic_photos(n: int = 16, side: int = 640, seed: int = 0) -> list[np.ndarray]:
    """``n`` side×side RGB uint8 pictures with photo-like statistics (no files needed): a smooth colour field
    (8×8 random colours, bicubic upsampling), a few filled ellipses and lines (edges), blurred a little, plus
    Gaussian grain, so that JPEG, blur and colour augmentations cost what they cost on photographs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (side, side), interpolation=cv2.INTER_CUBIC)
        for _ in range(int(rng.integers(4, 10))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            centre = tuple(int(c) for c in rng.integers(0, side, 2))
            axes = tuple(int(a) for a in rng.integers(side // 20, side // 4, 2))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
        for _ in range(int(rng.integers(2, 6))):
            a, b = (tuple(int(c) for c in rng.integers(0, side, 2)) for _ in range(2))
            cv2.line(img, a, b, tuple(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(1, 6)), cv2.LINE_AA)
        img = cv2.GaussianBlur(img, (5, 5), 0)
        grain = rng.normal(0.0, 4.0, img.shape)
        out.append(np.clip(img + grain, 0, 255).astype(np.uint8))
    return out


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


def write_shards(out: Path, kind: str, size: int, rows: int, shards: int, seed: int = 0,
                 pics: list[np.ndarray] | None = None) -> list[Path]:
    """``shards`` shards of ``rows`` rows under ``out`` (existing ones kept); pixels from ``pics`` (default: the
    demo photos)."""
    out.mkdir(parents=True, exist_ok=True)
    pics = photos() if pics is None else pics
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
    ap.add_argument("--synthetic", action="store_true", help="procedural pictures instead of the demo photos")
    args = ap.parse_args()
    pics = synthetic_photos() if args.synthetic else None
    for p in write_shards(args.out, args.kind, args.size, args.rows, args.shards, pics=pics):
        print(p, p.stat().st_size)


if __name__ == "__main__":
    main()
