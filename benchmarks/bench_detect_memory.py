"""Peak memory of `morphfuse detect` on large images: batching by pixels vs. by image count (issue 10 item 4).

Builds a model bundle (random weights, the demo config at --size px), writes large JPEG copies of a demo photo
(upscaled), then runs `morphfuse detect` in a fresh process per case under `/usr/bin/time -f %M` (peak RSS) and
prints one Markdown table row per case. ``--code DIR`` runs another checkout's ``src`` (e.g. the code before the
change, from ``git archive``), so both are measured on the same machine in one run.

  python benchmarks/bench_detect_memory.py --work /tmp/bench_detect --side 9400 --count 1 \
      --code-before /tmp/base/src
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "data" / "faces" / "london_512" / "neutral_front" / "001_03.jpg"


def make_bundle(work: Path, size: int) -> Path:
    from morphfuse.cli import main
    from random_models import write_random_models

    out = work / "bundle"
    if (out / "bundle.json").is_file():
        return out
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["lfdl"]["size"] = cfg["mitl"]["size"] = size
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_random_models(cfg_path, work)
    assert main(["export", "--lfdl", str(work / "lfdl" / "model.pt"), "--mitl", str(work / "mitl" / "model.pt"),
                 "--config", str(cfg_path), "--out", str(out), "--no-check"]) == 0
    return out


def make_images(folder: Path, side: int, count: int, fmt: str = "jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"big_{side}_{k}.{fmt}" for k in range(count)]
    if all(p.exists() for p in paths):
        return paths
    img = Image.open(PHOTO).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    for k, p in enumerate(paths):
        arr = np.asarray(img).copy()
        arr[k % side, :, 0] ^= 1  # distinct files
        Image.fromarray(arr).save(p, **({"quality": 90} if fmt == "jpg" else {"compress_level": 1}))
    return paths


def run_case(src: Path, inputs: list[Path], bundle: Path, out: Path, extra: list[str]) -> tuple[int, float, int]:
    """(peak RSS in kB, wall seconds, exit status) of one detect run in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="2")
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "morphfuse", "detect", *map(str, inputs), "--models",
           str(bundle), "--out", str(out), "--device", "cpu", "--no-progress", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    peak = int(r.stderr.strip().splitlines()[-1])
    if r.returncode not in (0, 1):
        print(r.stderr[-3000:], file=sys.stderr)
    return peak, wall, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_detect"))
    ap.add_argument("--size", type=int, default=64, help="model input size of the bundle (memory: constant)")
    ap.add_argument("--side", type=int, nargs="+", default=[9400], help="image side(s), px")
    ap.add_argument("--count", type=int, nargs="+", default=[1], help="images per case (same length as --side)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--format", choices=["jpg", "png"], default="jpg", help="file format of the large images")
    ap.add_argument("--code-before", type=Path, default=None, help="a src/ folder of the code before the change")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(args.work, args.size)
    codes = [("before", args.code_before)] if args.code_before else []
    codes.append(("after", REPO / "src"))
    print("| code | images | batch | peak RSS (MB) | wall (s) | exit |")
    print("|---|---|---|---|---|---|")
    for side, count in zip(args.side, args.count):
        images = make_images(args.work / "in", side, count, args.format)
        for label, src in codes:
            peak, wall, rc = run_case(src, images, bundle, args.work / f"out_{label}",
                                      ["--batch-size", str(args.batch_size)])
            print(
                f"| {label} | {count} × {side}×{side} {args.format.upper()} ({side * side / 1e6:.1f} Mpx each) | "
                f"--batch-size "
                f"{args.batch_size} | {peak / 1024:.0f} | {wall:.1f} | {rc} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
