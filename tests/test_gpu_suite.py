"""The prepared GPU check (benchmarks/gpu_suite.py) in its --smoke mode: the same code paths on the CPU at tiny
sizes, so the script that a GPU session runs once, unattended, does not rot between GPU sessions.

One subprocess runs the suite with --profile and then reports which modules the process had imported; the test
checks the JSON (the five headline numbers positive and finite, every configuration measured, the profile
written) and that nothing the GPU machine lacks was imported (dlib, diffusers, snakemake, matplotlib).
"""
from __future__ import annotations

import getpass
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADLINE = ("lfdl_train_img_s", "mitl_train_img_s", "lfdl_infer_img_s", "mitl_infer_img_s", "loader_img_s_per_core")
FORBIDDEN = {"dlib", "diffusers", "snakemake", "matplotlib"}

RUNNER = """
import json, runpy, sys
out, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["benchmarks/gpu_suite.py"] + argv
code = 0
try:
    runpy.run_path("benchmarks/gpu_suite.py", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
with open(out, "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def test_gpu_suite_smoke_runs_every_path_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MORPHFUSE_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           # the suite's data go under tmp_path; torch.compile's kernel cache stays where it always is
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR") or
           os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")}
    modules = tmp_path / "modules.json"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(modules), "--smoke", "--profile", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    imported = {m.split(".")[0] for m in json.loads(modules.read_text())}
    assert "morphfuse" in imported and "torch" in imported  # the list is the suite's process's
    assert not imported & FORBIDDEN, imported & FORBIDDEN

    res = json.loads((out / "gpu_suite.json").read_text())
    for key in HEADLINE:
        v = res[key]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (key, v)
    assert res["mode"] == "smoke" and res["forbidden_imported"] == [] and not res["errors"], res["errors"]
    # every configuration ran: eager training + inference per model, and the one compiled piece (LFDL)
    assert set(res["train"]["lfdl"]) == set(res["infer"]["lfdl"]) == {"fp32", "bf16_cl", "bf16_cl_compile"}
    assert set(res["train"]["mitl"]) == set(res["infer"]["mitl"]) == {"bf16_cl"}
    for kind in ("lfdl", "mitl"):
        for r in list(res["train"][kind].values()) + list(res["infer"][kind].values()):
            assert r["img_s"] > 0 and math.isfinite(r["img_s"]), r
        for r in res["train"][kind].values():
            assert r["loss_finite"] and r["images"] == r["steps"] * r["batch"] and 0 <= r["data_wait_share"] < 1, r
        assert res["loader"][kind]["img_s_per_core"] > 0 and len(res["loader"][kind]["rounds"]) == 2
    compiled = res["train"]["lfdl"]["bf16_cl_compile"]
    assert compiled["compile"] == "one module compiled in place: cmce.0"
    assert res["train"]["lfdl"]["bf16_cl"]["channels_last"] and res["train"]["lfdl"]["bf16_cl"]["mixup"] == 0.5
    # the profile of one step: its table on disk and the top entries (CPU time on the CPU)
    prof = res["train"]["mitl"]["bf16_cl"]["profile"]
    assert prof["top"] and prof["top"][0]["self_cpu_ms"] > 0 and (out / prof["table"]).stat().st_size > 500
    md = (out / "gpu_suite.md").read_text()
    assert "| lfdl | 40 | 2 | bf16_cl |" in md and "## Against the goals" in md and "720" in md
    assert res["work"].startswith(str(tmp_path)) and not Path(res["work"]).exists()  # its temp data removed
    print(f"gpu_suite --smoke: {wall:.1f} s wall, {res['cpu_s']} s CPU (suite's own clock {res['elapsed_s']} s)")
    assert res["elapsed_s"] < 300  # < 90 s on an idle 2-core machine (BENCHMARKS.md); generous for loaded ones
