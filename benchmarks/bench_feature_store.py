"""How to store training samples for random access at DDL-I scale: read vs decode cost per sample, memory.

On one synthetic feature shard (the exact `morphfuse features` format, :mod:`synth_shards`), per sample (rgb +
mask) at 299 and 512, one thread:

- ``pread``: what training does (:class:`morphfuse.shards.NpzRows`): one positioned read per member, warm (page
  cache) and cold (the shard's pages dropped with ``posix_fadvise DONTNEED`` before the pass: a disk read);
- ``memmap``: ``np.memmap`` of the same members, rows copied out, warm and cold;
- ``np.load`` of the whole shard divided by its rows (what training did before: every row in RAM);
- decode cost of the compressed encodings a streaming format (WebDataset, LitData, MosaicML Streaming, HF
  datasets) would hold per sample: PNG (lossless, cv2, level 1 and the default 3) and JPEG q95 (lossy: it rewrites
  the very traces a forgery detector learns, so not an option for training data; for reference), with their
  sizes;
- memory: RSS and USS (psutil) growth after touching every row through ``memmap`` vs ``pread``: a mapping keeps
  what it touched resident in the process; reads leave it in the kernel's page cache.

    nice -n 10 .venv/bin/python benchmarks/bench_feature_store.py --work /tmp/me/store
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_shards import write_shards  # noqa: E402

from morphfuse.shards import NpzRows  # noqa: E402


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def per_row_us(fn, idx) -> float:
    t = time.perf_counter()
    for i in idx:
        fn(int(i))
    return (time.perf_counter() - t) / len(idx) * 1e6


def mem() -> tuple[float, float]:
    info = psutil.Process().memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=200, help="random rows per timing")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    for kind, size, rows in (("lfdl", 299, 1024), ("mitl", 512, 512)):
        path = write_shards(args.work / f"{kind}{size}", kind, size, rows, 1)[0]
        store = NpzRows(path)
        n = len(store.members["rgb"])
        idx = np.random.default_rng(0).choice(n, min(args.samples, n), replace=False)
        out = {}
        print(f"\n{kind} {size}: {path.stat().st_size / n / 1e3:.1f} kB per row on disk ({n} rows, "
              f"rgb {store.members['rgb'].row_bytes} + mask {store.members['mask'].row_bytes} bytes)")

        def pread(i):
            return store.row("rgb", i), store.row("mask", i)

        rgb_m, mask_m = store.members["rgb"], store.members["mask"]
        mm_rgb = np.memmap(path, rgb_m.dtype, "r", rgb_m.offset, rgb_m.shape)
        mm_mask = np.memmap(path, mask_m.dtype, "r", mask_m.offset, mask_m.shape)

        def mmap(i):
            return np.array(mm_rgb[i]), np.array(mm_mask[i])

        for name, fn in (("pread", pread), ("memmap", mmap)):
            drop(path)
            out[f"{name} cold (disk)"] = per_row_us(fn, idx)
            per_row_us(fn, idx)
            out[f"{name} warm (page cache)"] = per_row_us(fn, idx)
        drop(path)
        t = time.perf_counter()
        with np.load(path) as z:
            _ = z["rgb"], z["mask"]
        out["np.load whole shard, per row (cold)"] = (time.perf_counter() - t) / n * 1e6
        del _
        sample = [pread(int(i)) for i in idx[:50]]
        for name, ext, params in (("PNG level 1", ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]),
                                  ("PNG level 3", ".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]),
                                  ("JPEG q95 (lossy)", ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])):
            enc = [(cv2.imencode(ext, r, params)[1], cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1])
                   for r, m in sample]
            times = []
            for _ in range(3):
                t = time.perf_counter()
                for a, b in enc:
                    cv2.imdecode(a, cv2.IMREAD_UNCHANGED)
                    cv2.imdecode(b, cv2.IMREAD_UNCHANGED)
                times.append((time.perf_counter() - t) / len(enc) * 1e6)
            kb = statistics.mean(len(a) + len(b) for a, b in enc) / 1e3
            out[f"decode {name} ({kb:.0f} kB/sample)"] = min(times)
        for k, v in out.items():
            print(f"  {k:48} {v:9.1f} µs/sample")
        # memory: touch every row
        for name, fn in (("memmap", mmap), ("pread", pread)):
            drop(path)
            r0, u0 = mem()
            for i in range(n):
                fn(i)
            r1, u1 = mem()
            print(f"  {name:8} after reading all {n} rows: RSS +{r1 - r0:7.1f} MiB, USS +{u1 - u0:7.1f} MiB "
                  f"(shard {path.stat().st_size / 2**20:.0f} MiB)")
        mm_rgb = mm_mask = None  # close the maps before the next file
        if not args.keep:
            shutil.rmtree(args.work / f"{kind}{size}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
