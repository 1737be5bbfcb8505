"""Workflow-level check: training memory is flat in the data size (issue "Train at DDL-I scale", must-show 1).

For each image count (default 1,000 and 6,000) it writes a synthetic DDL-I-layout dataset (``train/`` and
``valid/`` with ``real/``, ``fake/`` and ``masks/``; 256 px crops of the demo photos, a third real), configures
the workflow with ``features.mode: on_the_fly``, ``mitl.size: 256``, ``mitl.train.max_steps: 2`` and
``mitl.train.num_workers`` (``--workers``, default 0), builds everything up to ``models/mitl/model.pt``, then
times only ``snakemake --forcerun train_mitl`` under ``/usr/bin/time -f %M`` (peak RSS in KB of the largest
process of that call) and, while it runs, samples the summed USS of the training process tree with psutil
(every page counted once, workers included). Prints one line per size and the growth.

    nice -n 10 .venv/bin/python benchmarks/check_train_memory_workflow.py --work /tmp/me/wf
    nice -n 10 .venv/bin/python benchmarks/check_train_memory_workflow.py --work /tmp/me/wf --workers 2
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from synth_shards import photos  # noqa: E402


def write_dataset(root: Path, n: int, side: int = 256, seed: int = 0) -> None:
    if (root / "done").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    pics = photos()
    rng = np.random.default_rng(seed)
    for i in range(n):
        part = "valid" if i % 10 == 9 else "train"
        fake = rng.random() >= 1 / 3
        p = pics[int(rng.integers(len(pics)))]
        h, w = p.shape[:2]
        s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img = cv2.resize(p[y:y + s, x:x + s], (side, side), interpolation=cv2.INTER_AREA)
        d = root / part / ("fake" if fake else "real")
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i:06d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        if fake:
            m = np.zeros((side, side), np.uint8)
            a, b = sorted(rng.integers(0, side, 2)), sorted(rng.integers(0, side, 2))
            m[a[0]:a[1] + 1, b[0]:b[1] + 1] = 255
            (root / part / "masks").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / part / "masks" / f"{i:06d}.png"), m)
    (root / "done").write_text("ok")


def tree_uss(pid: int) -> float:
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            if "train" in " ".join(p.cmdline()) and "morphfuse" in " ".join(p.cmdline()):
                total += p.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def run(work: Path, n: int, workers: int, python: str) -> dict:
    data = work / f"data_{n}"
    write_dataset(data, n)
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg.update(run_name=f"mem{n}", results_dir=str(work / "results"), shard_size=1000)
    cfg["sources"] = [{"name": "syn", "kind": "ddl", "root": str(data)}]
    cfg["forge"]["methods"] = []
    cfg["features"]["mode"] = "on_the_fly"
    cfg["evaluate"]["split"] = "val"
    cfg["mitl"]["size"] = 256
    cfg["mitl"]["train"].update(max_steps=2, num_workers=workers)
    cfg_path = work / f"config_{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    target = str(Path(cfg["results_dir"]) / cfg["run_name"] / "models" / "mitl" / "model.pt")
    base = [python, "-m", "snakemake", target, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
            "--configfile", str(cfg_path), "--cores", "2", "--quiet"]
    p = subprocess.run(base, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    peak = {"uss": 0.0}
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(work / f"time_{n}.txt")] + base +
                            ["--forcerun", "train_mitl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample():
        while proc.poll() is None:
            peak["uss"] = max(peak["uss"], tree_uss(proc.pid))
            time.sleep(0.1)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    out, err = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(err[-3000:])
    rss_kb = int((work / f"time_{n}.txt").read_text().split()[-1])
    rows = sum(1 for _ in (data / "train").rglob("*.jpg"))
    return {"images": n, "train_images": rows, "peak_rss_mb": rss_kb / 1024, "peak_tree_uss_mb": peak["uss"],
            "wall_s": time.perf_counter() - t}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--images", type=int, nargs="+", default=[1000, 6000])
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    res = [run(args.work, n, args.workers, args.python) for n in args.images]
    for r in res:
        print(f"{r['images']:6d} images ({r['train_images']} train): snakemake --forcerun train_mitl peak RSS "
              f"{r['peak_rss_mb']:.0f} MB (/usr/bin/time %M), training tree USS peak {r['peak_tree_uss_mb']:.0f} MB, "
              f"{r['wall_s']:.0f} s (num_workers {args.workers})")
    d_rss = res[-1]["peak_rss_mb"] - res[0]["peak_rss_mb"]
    d_uss = res[-1]["peak_tree_uss_mb"] - res[0]["peak_tree_uss_mb"]
    print(f"growth {res[0]['images']} -> {res[-1]['images']} images: RSS {d_rss:+.0f} MB, tree USS {d_uss:+.0f} MB "
          f"(limit +150 MB): {'OK' if d_rss <= 150 and d_uss <= 150 else 'FAIL'}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if d_rss <= 150 else 1


if __name__ == "__main__":
    sys.exit(main())
