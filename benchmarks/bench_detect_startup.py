"""Start-up of `morphfuse detect` (issue 13 item 8): wall time of one image in a fresh process, and what it imports.

Builds a model bundle with random weights at the demo config's sizes (LFDL 128 px, MITL 96 px; the time spent in
the networks does not depend on the weights), then runs ``morphfuse detect PHOTO --models BUNDLE --out OUT`` in a
fresh process ``--repeat`` times per code version and prints a Markdown table: the median wall time, the time to
``import morphfuse.detect`` alone, the CPU seconds (user + system: less sensitive than wall time to other
jobs on a shared machine) (``python -X importtime``'s cumulative microseconds) and how many modules the
process loaded, with the heavy packages among them. ``--code-before DIR`` runs another checkout's ``src`` (e.g.
the code before the change, from ``git archive``) in the same run, so both are measured under the same load.

  python benchmarks/bench_detect_startup.py --work /tmp/bench_startup --code-before /tmp/base/src
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
PHOTO = REPO.parent / "shared" / "data" / "faces" / "london_512" / "neutral_front" / "001_03.jpg"
HEAVY = ("torch", "cv2", "PIL", "pandas", "pyarrow", "matplotlib", "scipy", "sklearn", "timm", "transformers",
         "diffusers", "snakemake", "dlib", "tqdm", "jsonschema", "yaml", "safetensors", "huggingface_hub")

PROBE = """
import json, runpy, sys
sys.argv = ["morphfuse"] + sys.argv[1:]
try:
    runpy.run_module("morphfuse", run_name="__main__")
except SystemExit:
    pass
finally:
    tops = sorted({m.split(".")[0] for m in sys.modules})
    print("MODULES " + json.dumps({"n": len(sys.modules), "top": tops}), file=sys.stderr)
"""


def make_models(work: Path) -> Path:
    """The two model files at the demo config's model sizes (random weights) and the config."""
    from random_models import write_random_models

    cfg_path = work / "config.yaml"
    if (work / "mitl" / "model.pt").is_file():
        return cfg_path
    shutil.copy(REPO / "config.yaml", cfg_path)
    write_random_models(cfg_path, work)
    return cfg_path


def make_bundle(work: Path, src: Path, label: str) -> Path:
    """The bundle as ``src``'s ``morphfuse export`` writes it (each code version reads its own format)."""
    cfg_path = make_models(work)
    out = work / f"bundle_{label}"
    if not (out / "bundle.json").is_file():
        subprocess.run([sys.executable, "-m", "morphfuse", "export", "--lfdl", str(work / "lfdl" / "model.pt"),
                        "--mitl", str(work / "mitl" / "model.pt"), "--config", str(cfg_path), "--out", str(out),
                        "--no-check"], check=True, env=env_for(src))
    return out


def env_for(src: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="2", PYTHONDONTWRITEBYTECODE="1")


def one_run(src: Path, bundle: Path, out: Path) -> tuple[float, float, int, dict]:
    """Wall and CPU seconds (user + system of the child) of one detect, its exit status and its modules."""
    import resource

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", PROBE, "detect", str(PHOTO), "--models", str(bundle), "--out", str(out),
           "--device", "cpu", "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_for(src))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    mods = {}
    for line in r.stderr.splitlines():
        if line.startswith("MODULES "):
            mods = json.loads(line[8:])
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
    return wall, cpu, r.returncode, mods


def import_time(src: Path) -> float:
    """Seconds of ``import morphfuse.detect`` (cumulative, from -X importtime)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import morphfuse.detect"], capture_output=True,
                       text=True, env=env_for(src))
    for line in reversed(r.stderr.splitlines()):
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "morphfuse.detect":
            return int(parts[1]) / 1e6
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_startup"))
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per code version (median reported)")
    ap.add_argument("--code-before", type=Path, default=None, help="a src/ folder of the code before the change")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    codes = [("before", args.code_before)] if args.code_before else []
    codes.append(("after", REPO / "src"))
    bundles = {label: make_bundle(args.work, src, label) for label, src in codes}
    print("| code | detect, 1 image: median wall (s) [runs] | median CPU (s) | import morphfuse.detect (s) | "
          "modules loaded | heavy packages loaded |")
    print("|---|---|---|---|---|---|")
    res: dict = {label: ([], [], {}) for label, _ in codes}
    for k in range(args.repeat):  # interleaved: both code versions see the same load
        for label, src in codes:
            wall, cpu, rc, mods = one_run(src, bundles[label], args.work / f"out_{label}")
            if rc:
                raise SystemExit(f"{label}: detect exited {rc}")
            res[label][0].append(wall)
            res[label][1].append(cpu)
            res[label][2].update(mods)
    for label, src in codes:
        walls, cpus, mods = res[label]
        heavy = [m for m in HEAVY if m in mods.get("top", [])]
        print(f"| {label} | {statistics.median(walls):.2f} [{', '.join(f'{w:.2f}' for w in walls)}] | "
              f"{statistics.median(cpus):.2f} | {import_time(src):.2f} | {mods.get('n')} | {', '.join(heavy)} |",
              flush=True)


if __name__ == "__main__":
    main()
