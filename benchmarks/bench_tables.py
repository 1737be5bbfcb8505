"""`morphfuse tables` at DDL-I scale: time and peak memory over synthetic per-image counts.

Writes ``--images`` synthetic images × 5 evaluated variants (lfdl, mitl, naive_or, mdmf, closing_or; the
sixth, lfdl_score_mitl_mask, is derived by `tables`) as `morphfuse evaluate` writes them
(``evaluate/{variant}/{shard}.parquet``, ``--shard-size`` images per shard, every column of
``morphfuse.evaluate.ROW_COLUMNS``), then runs ``morphfuse tables`` on them under ``/usr/bin/time -v`` and prints
its wall time and peak RSS. 0.1 % of the rows are errors (ok = False), 4 images per identity (group).

    nice -n 10 .venv/bin/python benchmarks/bench_tables.py --images 1500000 --work /tmp/me/tables
    .venv/bin/python benchmarks/bench_tables.py --images 20000 --work /tmp/me/t --bootstrap 50   # quick
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

import numpy as np
import pandas as pd

VARIANTS = ("lfdl", "mitl", "naive_or", "mdmf", "closing_or")
METHODS = ("sbi", "random_combination", "sd_inpaint", "diffusion_inversion")


def write_counts(root: Path, n_images: int, shard_size: int, seed: int = 0) -> int:
    from morphfuse.evaluate import ROW_COLUMNS

    rng = np.random.default_rng(seed)
    n_shards = 0
    for s, start in enumerate(range(0, n_images, shard_size)):
        n = min(shard_size, n_images - start)
        idx = np.arange(start, start + n)
        label = (rng.random(n) < 2 / 3).astype(np.int64)
        method = np.where(label == 1, np.array(METHODS)[rng.integers(0, len(METHODS), n)], "real")
        gt = np.where(label == 1, rng.integers(500, 40000, n), 0)
        hw = 512 * 512
        base = {"image_id": [f"img{i:08d}" for i in idx], "label": label, "group": [f"id{i // 4:07d}" for i in idx],
                "method": method, "source": np.where(idx % 3 == 0, "ddl_a", "ddl_b"), "split": "test",
                "width": 512, "height": 512}
        for k, v in enumerate(VARIANTS):
            score = np.clip(rng.normal(0.3 + 0.4 * label, 0.2 + 0.02 * k), 0, 1)
            hit = (gt * rng.uniform(0.2, 1.0, n)).astype(np.int64)
            fp = rng.integers(0, 3000, n)
            tp, fn = hit, gt - hit
            tn = hw - tp - fp - fn
            ok = rng.random(n) >= 0.001
            df = pd.DataFrame({**base, "score": score, "variant": v, "TP": tp, "FP": fp, "FN": fn, "TN": tn})
            df["f1"] = np.where(gt + fp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
            df["iou"] = np.where(gt + fp > 0, tp / np.maximum(tp + fp + fn, 1), np.nan)
            df["threshold"], df["resized"], df["ok"], df["error"] = 0.5, False, ok, ""
            for c in ("TP", "FP", "FN", "TN"):
                df[c] = df[c].astype("Int64")
                df.loc[~ok, c] = pd.NA
            df.loc[~ok, "score"] = np.nan
            df.loc[~ok, "error"] = "no predicted mask for this image"
            out = root / v / f"test_{s:05d}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            df[ROW_COLUMNS].to_parquet(out, index=False)
        n_shards += 1
    return n_shards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_500_000)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (deleted at the end unless --keep)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic counts (reuse them with --reuse)")
    ap.add_argument("--reuse", action="store_true", help="counts already written in --work")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs `morphfuse tables`")
    args = ap.parse_args()
    counts = args.work / "evaluate"
    if not args.reuse:
        shutil.rmtree(counts, ignore_errors=True)
        t = time.perf_counter()
        k = write_counts(counts, args.images, args.shard_size)
        print(f"wrote {args.images} images x {len(VARIANTS)} variants in {k} shards: {time.perf_counter() - t:.0f} s, "
              f"{sum(f.stat().st_size for f in counts.rglob('*.parquet')) / 2**20:.0f} MiB on disk")
    out = args.work / "tables"
    cmd = ["/usr/bin/time", "-v", args.python, "-m", "morphfuse", "tables", "--counts", str(counts), "--out", str(out),
           "--bootstrap", str(args.bootstrap)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t
    if p.returncode != 0:
        print(p.stderr[-3000:])
        return 1
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("User", "System"))
    print(f"tables: {args.images} images x 6 variants, bootstrap {args.bootstrap}: wall {wall:.1f} s, CPU {cpu:.1f} s, "
          f"peak RSS {peak / 2**20:.2f} GiB ({peak / 1024:.0f} MiB)")
    if not args.keep:
        shutil.rmtree(counts, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
