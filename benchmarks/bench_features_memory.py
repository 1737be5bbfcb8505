"""Peak memory of `morphfuse features` for one manifest shard, against the shard's size (it streams: flat).

Writes ``--images`` synthetic 512×512 JPEG photos (crops of the demo photos; a third real, the fakes with a PNG
mask), a manifest shard and a crops parquet (one face box per image), then runs ``morphfuse features`` for LFDL
(299 px crops) and MITL (512 px images), in ``on_the_fly`` and ``precompute`` mode, under ``/usr/bin/time -v``:
peak RSS, wall time and the shard's size on disk. ``--compare-src`` runs another checkout's package (e.g. before
streaming) on at most ``--compare-max`` images (it holds the whole shard in memory: 18 GB for a 4096-image MITL
shard in precompute mode). Outputs are deleted after each run (a 4096-image MITL precompute shard is ~16 GB, and
twice that while it is assembled).

    nice -n 10 .venv/bin/python benchmarks/bench_features_memory.py --work /tmp/me/fm --images 1024 4096
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from synth_shards import photos  # noqa: E402


def write_inputs(root: Path, n: int, side: int = 512) -> tuple[Path, Path]:
    man, crops = root / f"manifest_{n}.parquet", root / f"crops_{n}.parquet"
    if man.exists():
        return man, crops
    pics = photos()
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(exist_ok=True)
    rows, boxes = [], []
    for i in range(n):
        p = pics[i % len(pics)]
        h, w = p.shape[:2]
        s = int(rng.integers(min(h, w) * 3 // 4, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img = cv2.resize(p[y:y + s, x:x + s], (side, side), interpolation=cv2.INTER_AREA)
        name = f"img/{i:06d}.jpg"
        if not (root / name).exists():
            cv2.imwrite(str(root / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        label = int(i % 3 != 0)
        mask = ""
        if label:
            mask = f"mask/{i:06d}.png"
            if not (root / mask).exists():
                m = np.zeros((side, side), np.uint8)
                m[side // 4: side // 2, side // 3: 2 * side // 3] = 255
                cv2.imwrite(str(root / mask), m)
        rows.append({"image_id": f"im{i:06d}", "root": str(root), "path": name, "label": label, "mask_path": mask,
                     "split": "train", "width": side, "height": side})
        boxes.append({"image_id": f"im{i:06d}", "face_idx": 0, "x0": 96, "y0": 64, "x1": 416, "y1": 448,
                      "kind": "face", "ref_x0": 200.0, "ref_y0": 220.0, "ref_x1": 310.0, "ref_y1": 300.0})
    pd.DataFrame(rows).to_parquet(man, index=False)
    pd.DataFrame(boxes).to_parquet(crops, index=False)
    return man, crops


def run(src: str, kind: str, mode: str, man: Path, crops: Path, out: Path) -> tuple[float, float, float]:
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["--manifest", str(man), "--mode", mode, "--ledger", str(out.with_suffix(".csv"))]
    args += (["--crops", str(crops), "--out-lfdl", str(out), "--lfdl-size", "299"] if kind == "lfdl"
             else ["--out-mitl", str(out), "--mitl-size", "512"])
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "morphfuse", "features", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    size = out.stat().st_size / 1e6
    out.unlink()
    return rss, wall, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--images", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--modes", nargs="+", default=["on_the_fly", "precompute"])
    ap.add_argument("--kinds", nargs="+", default=["lfdl", "mitl"])
    ap.add_argument("--compare-src", default=None)
    ap.add_argument("--compare-max", type=int, default=1024)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    print(f"{'code':8} {'kind':5} {'mode':11} {'images':>6} {'peak RSS MB':>12} {'wall s':>7} {'shard MB':>9} "
          f"{'kB/row':>8}")
    for n in args.images:
        man, crops = write_inputs(args.work / "inputs", n)
        for kind in args.kinds:
            for mode in args.modes:
                for name, src in [("this", str(REPO / "src"))] + ([("compare", args.compare_src)]
                                                                   if args.compare_src else []):
                    if name == "compare" and n > args.compare_max:
                        continue
                    rss, wall, mb = run(src, kind, mode, man, crops, args.work / "out" / f"{name}_{kind}_{n}.npz")
                    print(f"{name:8} {kind:5} {mode:11} {n:6d} {rss:12.0f} {wall:7.0f} {mb:9.0f} {mb / n * 1e3:8.1f}",
                          flush=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
