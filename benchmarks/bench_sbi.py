"""SBI throughput at 512 px on ONE core: the SBI step alone (landmarks precomputed) and with face detection.

    .venv/bin/python benchmarks/bench_sbi.py [--images 16] [--rounds 3] [--folder neutral_front]

Single thread: OpenCV and BLAS are limited to one thread before numpy/cv2 are imported. Decoding is not timed
(once per image); the PNG encode the forge CLI does per forgery is timed separately. Times are the thread's CPU
time (time.thread_time), so a busy shared machine does not inflate them; wall times are printed beside.
Goal (issue): >= 5 images/s per core for the SBI step.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

cv2.setNumThreads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "faces" / "london_512").resolve()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="SBI draws per image (different seeds)")
    ap.add_argument("--folder", default="neutral_front")
    args = ap.parse_args(argv)

    from morphfuse.faces.backends import get_backend
    from morphfuse.forge.common import rng_for
    from morphfuse.forge.sbi import SBIGenerator
    from morphfuse.imageio import read_image

    paths = sorted((DATA / args.folder).glob("*.jpg"))[: args.images]
    imgs = [read_image(p) for p in paths]
    backend = get_backend("dlib")
    gen = SBIGenerator({"forehead": True})

    clock = time.thread_time   # CPU seconds of this thread: per-core cost, robust to a busy shared machine
    w0, t = time.perf_counter(), clock()
    faces = [backend.detect(rgb) for rgb in imgs]
    t_detect, w_detect = (clock() - t) / len(imgs), (time.perf_counter() - w0) / len(imgs)

    n, t_sbi, t_png, w_sbi = 0, 0.0, 0.0, 0.0
    for r in range(args.rounds):
        for p, rgb, f in zip(paths, imgs, faces):
            target = {"image_id": p.name, "group": p.stem[:3], "split": "train"}
            w0, t = time.perf_counter(), clock()
            res = gen(target, rgb, f, rng_for(r, "sbi", p.name), {})
            t_sbi += clock() - t
            w_sbi += time.perf_counter() - w0
            t = clock()
            for arr in (res.fake_rgb, res.mask.astype(np.uint8) * 255):
                Image.fromarray(arr).save(io.BytesIO(), format="PNG", compress_level=1)
            t_png += clock() - t
            n += 1
    sbi, png, w_sbi = t_sbi / n, t_png / n, w_sbi / n
    h, w = imgs[0].shape[:2]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load:.1f}; "
          f"python {sys.version.split()[0]}, opencv {cv2.__version__}, 1 thread; {len(imgs)} images {w}x{h}, "
          f"{n} SBI draws. CPU time of the thread (wall time in brackets).")
    print("| step | CPU ms/image (wall) | images/s per core |")
    print("|---|---|---|")
    print(f"| SBI, landmarks precomputed | {sbi * 1e3:.1f} ({w_sbi * 1e3:.1f}) | {1 / sbi:.1f} |")
    print(f"| PNG encode (fake + mask, compress 1) | {png * 1e3:.1f} | {1 / png:.1f} |")
    print(
        f"| dlib detection + 68 landmarks (upsample 1) | {t_detect * 1e3:.1f} ({w_detect * 1e3:.1f}) | "
        f"{1 / t_detect:.1f} |"
    )
    print(f"| SBI incl. detection | {(sbi + t_detect) * 1e3:.1f} | {1 / (sbi + t_detect):.1f} |")
    print(
        f"| SBI incl. detection and PNG encode | {(sbi + t_detect + png) * 1e3:.1f} | "
        f"{1 / (sbi + t_detect + png):.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
