"""`morphfuse faces` + `morphfuse crops` with the dlib backend on 512-px photos: images/s per core.

Runs the stages' own loops (``faces.cli.detect_shard``: decode + detect + 68 landmarks; ``faces.crops.crop_shard``:
crop boxes + SSPSL rectangles) on the London Set at 512 px (neutral and smiling, plus the lisa/zoom photos whose
faces are smaller), single-threaded (dlib's HOG is single-threaded; OpenCV is pinned to one thread). For each
setting — dlib ``upsample`` 0 or 1, HOG on colour or on grey — the table gives:

- images/s per core = images / CPU seconds of this process (robust to other jobs on the machine), the median and
  the best of the rounds; wall-clock images/s of the best round, with the load average (on a shared machine the
  wall clock measures the neighbours);
- how many photos got exactly one face, and the mean / max distance between the 68-point eye centres and the
  hand-placed pupils of the London Set (.tem), in % of the inter-pupil distance (quality does not drop with speed).

Settings run interleaved, round after round, so their ratios are comparable. Goal: ≥ 10 images/s per core.

    python benchmarks/bench_faces.py [--rounds 3] [--limit 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
SETTINGS = [(0, False), (0, True), (1, False), (1, True)]   # (upsample, gray)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def manifest(limit: int) -> pd.DataFrame:
    root = DATA / "london_512"
    paths = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.jpg"))
    if limit:
        paths = paths[:: max(1, len(paths) // limit)][:limit]
    from PIL import Image

    sizes = [Image.open(root / p).size for p in paths]
    return pd.DataFrame({"image_id": [p.replace("/", "__") for p in paths], "root": str(root), "path": paths,
                         "width": [w for w, _ in sizes], "height": [h for _, h in sizes]})


def pupil_errors(rows: list[dict]) -> np.ndarray:
    """|eye centre − pupil| / inter-pupil distance for neutral_front photos with one face and a .tem file."""
    out = []
    for r in rows:
        stem = r["image_id"].split("__")[-1].removesuffix(".jpg")
        tem = DATA / "london_full" / f"{stem}.tem"
        if not r["image_id"].startswith("neutral_front") or r["face_idx"] != 0 or not tem.is_file():
            continue
        truth = np.loadtxt(tem, skiprows=1, max_rows=2) * 512 / 1350
        lm = np.asarray(r["landmarks"], np.float32).reshape(-1, 2)
        eyes = np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])
        out.append(np.linalg.norm(eyes - truth, axis=1).max() / np.linalg.norm(truth[1] - truth[0]))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="use this many photos (0: all)")
    args = ap.parse_args()

    import cv2

    cv2.setNumThreads(1)
    from morphfuse.faces.backends import get_backend
    from morphfuse.faces.cli import detect_shard
    from morphfuse.faces.crops import crop_shard
    from morphfuse.ledger import Ledger

    m = manifest(args.limit)
    n = len(m)
    backends = {s: get_backend("dlib", upsample=s[0], gray=s[1]) for s in SETTINGS}
    detect_shard(m.head(2), backends[SETTINGS[0]], Ledger("faces"), progress=False)   # warm the file cache
    cpu = {s: [] for s in SETTINGS}
    wall = {s: [] for s in SETTINGS}
    found = {}
    for _ in range(args.rounds):
        for s in SETTINGS:
            c0, w0 = cpu_seconds(), time.perf_counter()
            rows, counts = detect_shard(m, backends[s], Ledger("faces"), progress=False)
            faces = pd.DataFrame(rows)
            crop_shard(m, faces, 1.3, 0.7, "nose", 5.0, Ledger("crops"))
            cpu[s].append(cpu_seconds() - c0)
            wall[s].append(time.perf_counter() - w0)
            per_image = faces.groupby("image_id").size() if len(faces) else pd.Series(dtype=int)
            found[s] = (int((per_image == 1).sum()), counts["no_face"], pupil_errors(rows))

    load = os.getloadavg()
    print(f"# faces + crops, dlib backend, {n} photos, long side 512 (London Set + lisa/zoom), 1 thread, "
          f"{args.rounds} rounds")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    print("| upsample | HOG on | img/s per core (median) | img/s per core (best) | wall img/s (best) "
          "| one face | no face | eye error mean / max (% IPD) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in SETTINGS:
        one, none, err = found[s]
        print(f"| {s[0]} | {'grey' if s[1] else 'colour'} | {n / np.median(cpu[s]):.1f} | {n / min(cpu[s]):.1f} "
              f"| {n / min(wall[s]):.1f} | {one}/{n} | {none} | {100 * err.mean():.1f} / {100 * err.max():.1f} |")


if __name__ == "__main__":
    main()
