"""Time of the source-folder fingerprint the index rule's params carry (``sources.folders_fingerprint``), which
every ``snakemake`` invocation computes at parse time: a curve over tree sizes.

Builds trees of empty files (``--files-per-folder`` per folder, 10 folders per parent, as a generator's output
is laid out), then times ``folders_fingerprint`` in a fresh process per (size, code version), ``--repeat``
times, the median kept (the first walk of a fresh tree fills the kernel's dentry cache; each repeat is warm,
as a second ``snakemake`` call is). ``--code-before DIR`` times another checkout's ``src`` in the same run
(e.g. ``git archive f63dd01 src | tar -x -C /tmp/base``), so both are compared under the same load.

  python benchmarks/bench_folders_fingerprint.py --work /tmp/bench_fp --sizes 100000 300000 1000000 \\
      --code-before /tmp/base/src
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import sys, time; from morphfuse.sources import folders_fingerprint as f; t = time.perf_counter(); "
         "f([sys.argv[1]]); print(time.perf_counter() - t)")


def make_tree(root: Path, n_files: int, per_folder: int) -> int:
    """``n_files`` empty ``.png`` files below ``root``; returns the number of folders. Kept between runs."""
    done = root / ".complete"
    if not done.exists():
        for k in range(0, n_files, per_folder):
            d = root / f"part{k // (per_folder * 10):04d}" / f"f{k // per_folder:06d}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(min(per_folder, n_files - k)):
                (d / f"{k + j:08d}.png").touch()
        done.touch()
    return sum(1 for _ in root.rglob("*") if _.is_dir()) + 1


def time_fingerprint(src: Path, root: Path, repeat: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(src))
    runs = [float(subprocess.run([sys.executable, "-c", PROBE, str(root)], env=env, check=True, text=True,
                                 capture_output=True).stdout) for _ in range(repeat)]
    return statistics.median(runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the trees are built (kept for reruns)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000], help="files per tree")
    ap.add_argument("--files-per-folder", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--code-before", type=Path, help="another checkout's src folder, timed in the same run")
    a = ap.parse_args(argv)
    header = "| files | folders | this code | "
    print(header + ("before | before / this |" if a.code_before else ""))
    print("|---|---|---|" + ("---|---|" if a.code_before else ""))
    for n in a.sizes:
        root = a.work / f"tree_{n}"
        folders = make_tree(root, n, a.files_per_folder)
        now = time_fingerprint(REPO / "src", root, a.repeat)
        row = f"| {n:,} | {folders:,} | {now:.2f} s |"
        if a.code_before:
            before = time_fingerprint(a.code_before, root, a.repeat)
            row += f" {before:.2f} s | {before / now:.1f}× |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
