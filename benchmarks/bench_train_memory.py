"""Peak memory of one training process against the number of training rows (streamed data: it must not grow).

Synthetic feature shards in the exact `morphfuse features` format (:mod:`synth_shards`, 1,024 rows each, 90 %
train). To spare the disk (~1 MB per 512 row), ``--distinct`` shards are written and larger row counts list them
again under other names (symlinks): the process indexes and may read every listed row exactly as with distinct
files (the index holds one entry per row; only the page cache sees the sharing). Each run is ``morphfuse train``
with the real network at the given size, ``--max-steps 2`` (batch ``--batch``, ``num_workers`` ``--workers``),
under ``/usr/bin/time -v`` (peak RSS) while psutil samples the summed USS of its process tree (workers
included). ``--compare-src`` runs another checkout's package (e.g. before streaming) on the row counts up to
``--compare-max-rows``, in the same session.

    nice -n 10 .venv/bin/python benchmarks/bench_train_memory.py --work /tmp/me/tm --kind lfdl --size 299 \\
        --rows 1024 4096 16384 32768
    nice -n 10 .venv/bin/python benchmarks/bench_train_memory.py --work /tmp/me/tm --kind mitl --size 512 \\
        --rows 1024 4096 16384
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from synth_shards import write_shards  # noqa: E402


def tree_uss_mb(pid: int) -> float:
    total = 0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            if p.name() != "time":
                total += p.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def train_once(args, shards: list[Path], out: Path, src: str, older: bool = False) -> tuple[float, float, float]:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    if older:  # a checkout from before train.balance / max_steps (its schema refuses unknown keys)
        for m in ("lfdl", "mitl"):
            for k in ("balance", "max_steps"):
                cfg[m]["train"].pop(k, None)
    cfg[args.kind]["size"] = args.size
    cfg[args.kind]["train"].update(epochs=1, batch_size=args.batch, num_workers=args.workers, tensorboard=False,
                                   checkpoint_every=1000)
    cfg_path = out.parent / f"{out.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "morphfuse", "train", args.kind, "--config", str(cfg_path),
           "--features", *map(str, shards), "--out", str(out), "--max-steps", "2", "--resume", "never",
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS=str(args.threads), MORPHFUSE_DEVICE="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_uss_mb(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    _, err = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(err[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024
    return rss, peak[0], time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--kind", choices=["lfdl", "mitl"], required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--rows", type=int, nargs="+", required=True, help="row counts (multiples of 1024)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct shard files written")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare-src", default=None, help="another checkout's src/ (e.g. before streaming)")
    ap.add_argument("--compare-max-rows", type=int, default=4096)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    data = args.work / f"{args.kind}{args.size}"
    base = write_shards(data, args.kind, args.size, 1024, args.distinct)
    print(f"{args.kind} {args.size}: {base[0].stat().st_size / 1024 / 1e6:.3f} MB per row on disk; batch {args.batch}, "
          f"num_workers {args.workers}, {args.threads} thread(s), 2 optimizer steps")
    print(f"{'code':10} {'rows':>7} {'peak RSS MB':>12} {'peak tree USS MB':>17} {'wall s':>7}")
    runs = [("this", str(REPO / "src"))] + ([("compare", args.compare_src)] if args.compare_src else [])
    for n in args.rows:
        k = n // 1024
        shards = []
        for j in range(k):
            p = base[j % len(base)]
            if j >= len(base):
                link = data / f"link_{j:05d}.npz"
                if not link.exists():
                    link.symlink_to(p.name)
                p = link
            shards.append(p)
        for name, src in runs:
            if name == "compare" and n > args.compare_max_rows:
                continue
            rss, uss, wall = train_once(args, shards, args.work / "out" / f"{name}_{n}", src, name == "compare")
            print(f"{name:10} {n:7d} {rss:12.0f} {uss:17.0f} {wall:7.0f}", flush=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
