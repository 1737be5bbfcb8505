"""Throughput of MDMF fusion + evaluation on 1024×1024 masks, single thread (goal: >= 100 images/s per core).

    python benchmarks/bench_fuse_eval.py [--n 60] [--size 1024] [--repeat 3] [--variant mdmf]

Synthetic but realistic inputs: two probability maps per image (smooth blobs, mostly 0, as a segmentation
network gives; written like `morphfuse predict` writes them: Pillow PNG, compress_level 1) and a 0/255 ground
truth. Timed, each on the same files, best of --repeat runs, as images per CPU-second of this process (what
"per core" means; robust to other jobs on a shared machine) and per wall-second:

  baseline   a plain OpenCV loop: read 2 probability PNGs + GT, threshold through float32, dilate/erode, OR,
             count with .sum(), cv2.imwrite the fused mask;
  one_pass   the same work with morphfuse's functions (imageio.read_prob_u8, fusion._fuse_u8, imageio.read_mask,
             imageio.write_mask_png — atomic write — and the counting of evaluate_item);
  workflow   what the workflow runs: `fuse` (stages.fuse.fuse_pair: read 2, fuse, write) then `evaluate`
             (evaluate.evaluate_item: read the fused mask + GT, count, per-image F1/IoU), i.e. one read more.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from morphfuse import fusion, imageio
from morphfuse.stages import fuse as fuse_stage
from morphfuse.evaluate import Item, evaluate_item
from morphfuse.imageio import write_png


def make_inputs(root: Path, n: int, size: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        gt = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(1, 4)):
            c = tuple(int(x) for x in rng.integers(size // 6, 5 * size // 6, 2))
            ax = tuple(int(x) for x in rng.integers(size // 20, size // 5, 2))
            cv2.ellipse(gt, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        probs = []
        for jitter in (size // 60, size // 30):
            m = np.roll(gt, tuple(int(x) for x in rng.integers(-jitter, jitter + 1, 2)), axis=(0, 1))
            p = cv2.GaussianBlur(m, (0, 0), size / 100)
            noise = (rng.random((size, size)) < 0.002).astype(np.uint8) * rng.integers(100, 256)
            probs.append(np.maximum(p, noise.astype(np.uint8)))
        iid = f"img{i:05d}"
        write_png(root / "lfdl" / f"{iid}.png", probs[0])
        write_png(root / "mitl" / f"{iid}.png", probs[1])
        write_png(root / "gt" / f"{iid}.png", gt)
        ids.append(iid)
    return ids


def baseline(root: Path, ids, out: Path, kernel: int) -> int:
    k = np.ones((kernel, kernel), np.uint8)
    total = 0
    for iid in ids:
        a = cv2.imread(str(root / "lfdl" / f"{iid}.png"), cv2.IMREAD_GRAYSCALE)
        b = cv2.imread(str(root / "mitl" / f"{iid}.png"), cv2.IMREAD_GRAYSCALE)
        g = cv2.imread(str(root / "gt" / f"{iid}.png"), cv2.IMREAD_GRAYSCALE) > 127
        ma = (a.astype(np.float32) / 255.0 >= 0.5).astype(np.uint8)
        mb = (b.astype(np.float32) / 255.0 >= 0.5).astype(np.uint8)
        fused = cv2.bitwise_or(cv2.dilate(ma, k), cv2.erode(mb, k)) > 0
        tp = int((fused & g).sum())
        fp = int((fused & ~g).sum())
        fn = int((~fused & g).sum())
        total += tp + fp + fn
        cv2.imwrite(str(out / f"{iid}.png"), fused.astype(np.uint8) * 255)
    return total


def one_pass(root: Path, ids, out: Path, kernel: int, variant: str) -> int:
    c = imageio.threshold_to_uint8(0.5)
    total = 0
    for iid in ids:
        a = imageio.read_prob_u8(root / "lfdl" / f"{iid}.png")
        b = imageio.read_prob_u8(root / "mitl" / f"{iid}.png")
        gt = imageio.read_mask(root / "gt" / f"{iid}.png")
        fused_u8 = fusion._fuse_u8(a, b, variant, kernel, 0.5)
        imageio.write_mask_png(out / f"{iid}.png", fused_u8)
        pred = fused_u8 >= c
        tp = int(np.count_nonzero(pred & gt))
        total += tp + (int(np.count_nonzero(pred)) - tp) + (int(np.count_nonzero(gt)) - tp)
    return total


def workflow(root: Path, ids, out: Path, kernel: int, variant: str) -> int:
    for iid in ids:
        fuse_stage.fuse_pair(root / "lfdl" / f"{iid}.png", root / "mitl" / f"{iid}.png", out / f"{iid}.png", variant,
                         kernel, 0.5)
    total = 0
    for iid in ids:
        item = Item(image_id=iid, label=1, image_path=None, gt_path=root / "gt" / f"{iid}.png", hw=None)
        item.hw = (SIZE, SIZE)
        row, errors = evaluate_item(item, out / f"{iid}.png", 0.9, 0.5, "foreground", "skip")
        assert not errors, errors
        total += row["TP"] + row["FP"] + row["FN"]
    return total


SIZE = 1024


def timed(fn, repeat: int, n: int, out: Path):
    best_cpu = best_wall = float("inf")
    result = None
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn(out)
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return n / best_cpu, n / best_wall, result


def main() -> None:
    global SIZE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--variant", default="mdmf", choices=fusion.VARIANTS)
    args = ap.parse_args()
    SIZE = args.size
    cv2.setNumThreads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_fuse_eval."))
    try:
        ids = make_inputs(tmp, args.n, args.size)
        out = tmp / "out"
        print(f"{args.n} images {args.size}x{args.size}, variant {args.variant}, kernel {args.kernel}, "
              f"cv2 threads {cv2.getNumThreads()}, best of {args.repeat}")
        print(f"{'path':<10} {'img/CPU-s':>10} {'img/wall-s':>11}")
        res = {}
        for name, fn in (("baseline", lambda o: baseline(tmp, ids, o, args.kernel)),
                         ("one_pass", lambda o: one_pass(tmp, ids, o, args.kernel, args.variant)),
                         ("workflow", lambda o: workflow(tmp, ids, o, args.kernel, args.variant))):
            cpu, wall, res[name] = timed(fn, args.repeat, args.n, out)
            print(f"{name:<10} {cpu:10.1f} {wall:11.1f}")
        if args.variant == "mdmf":
            assert res["baseline"] == res["one_pass"] == res["workflow"], res  # same counts: same fusion
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
