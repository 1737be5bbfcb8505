"""The workflow on a REAL one-node SLURM cluster (Debian's slurm-wlm + munge, started and stopped here).

A shallow target (LFDL training and everything it needs) with short status intervals: every job must be a SLURM
job (scontrol's own records), GPU rules must ask SLURM for GPUs, and LFDL with `gpus: 2` must train as 2 DDP
processes under torchrun inside ONE SLURM job (stand-in GPUs; gloo on the CPU).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import LONDON_512, REPO
from slurm_cluster import LocalSlurm, slurm_available

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    c = LocalSlurm(tmp_path_factory.mktemp("slurm"), gpus=2).start()
    try:
        yield c
    finally:
        c.stop()


def slurm_config(work: Path) -> dict:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg.update(run_name="slurm", results_dir=str(work / "results"), shard_size=100)
    cfg["sources"] = [{"name": "london", "kind": "folder", "root": str(LONDON_512),
                       "include": ["neutral_front/00[1-8]_03.jpg"],
                       "identity": {"rule": "regex", "pattern": r"(\d{3})_\d{2}\.[A-Za-z]+$"}}]
    cfg["split"] = {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 0}
    cfg["forge"]["methods"] = ["sbi"]
    cfg["lfdl"].update(size=64, gpus=2)
    cfg["lfdl"]["train"].update(epochs=1, batch_size=2, checkpoint_every=1000)
    return cfg


def test_workflow_runs_as_slurm_jobs_and_gpu_rules_request_gpus(cluster, tmp_path):
    work = tmp_path
    cfg = slurm_config(work)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    target = str(Path(cfg["results_dir"]) / "slurm" / "models" / "lfdl" / "model.pt")
    cmd = [sys.executable, "-m", "snakemake", target, "--snakefile", str(REPO / "Snakefile"),
           "--workflow-profile", str(REPO / "profiles" / "slurm"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--jobs", "4",
           "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
           "--latency-wait", "5", "--retries", "0",
           # this node has 2 CPUs and ~19 GB: the profile's GPU-node sizes would never be scheduled
           "--set-resources", "train_lfdl:mem_mb=3000", "train_lfdl:cpus_per_gpu=1"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=900)
    finally:
        cluster.cancel_all()  # snakemake ignores SIGTERM while a job is pending: never leave jobs behind
    logs = "\n".join(p.read_text()[-1500:] for p in (work / "results").rglob("*.log"))
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n{logs}\n{cluster.logs()}"
    assert Path(target).exists()

    jobs = cluster.jobs()
    comments = [j.get("Comment", "") for j in jobs]
    ran = {"index", "forge", "manifest", "faces", "crops", "features_lfdl", "train_lfdl"}
    seen = {rule for rule in ran if any(f"rule_{rule}" in c for c in comments)}
    assert seen == ran, f"rules without a SLURM job: {ran - seen}; comments: {comments}"
    # Snakemake's own count of finished jobs equals SLURM's count of completed jobs: nothing ran locally.
    finished = r.stderr.count("Finished jobid")
    assert finished == sum(j.get("JobState") == "COMPLETED" for j in jobs), (finished, jobs)

    train = [j for j in jobs if "rule_train_lfdl" in j.get("Comment", "")]
    assert len(train) == 1 and "gpu:2" in train[0].get("TresPerJob", ""), train
    others = [j for j in jobs if "rule_train_lfdl" not in j.get("Comment", "")]
    assert not any("gpu" in j.get("TresPerJob", "") for j in others)

    # Two DDP processes inside that one job (torchrun, gloo on the CPU: the stand-in GPUs are not CUDA devices).
    log = (Path(cfg["results_dir"]) / "slurm" / "logs" / "train_lfdl.log").read_text()
    assert "2 process(es)" in log, log[-2000:]
    metrics = pd.read_csv(Path(cfg["results_dir"]) / "slurm" / "models" / "lfdl" / "metrics.csv")
    assert len(metrics) >= 1

    # Schema defaults reach cluster jobs: keys config.yaml does not set arrive in the job with their defaults
    # (each job re-reads the config files and validates them itself).
    assert "dropout" not in cfg["lfdl"] and "lfga_scaled" not in cfg["lfdl"]
    rec = torch.load(target, map_location="cpu", weights_only=True)
    assert rec["options"]["dropout"] == 0.5 and rec["options"]["lfga_scaled"] is False, rec["options"]
