"""The robustness sweep on the shared tiny end-to-end run (its config sweeps jpeg:50): the perturbed test images
go through the whole prediction side again, the robustness table holds every variant under every perturbation,
and adding a level reruns only that level's jobs (a real run on a copy; the rest is untouched)."""
from __future__ import annotations

import re

import pandas as pd
import pytest
import yaml

from e2e_run import snakemake

pytestmark = pytest.mark.slow


def test_the_sweep_ran_the_pipeline_on_perturbed_images(e2e):
    d = e2e.dir
    table = pd.read_csv(d / "tables/robustness/robustness.csv")
    variants = set(pd.read_csv(d / "tables/ablation.csv")["variant"])
    assert set(table["perturbation"]) == {"none", "jpeg_50"}
    assert set(table["variant"]) == variants
    assert len(table) == 2 * len(variants)
    clean = pd.read_csv(d / "tables/ablation.csv").set_index("variant")
    none = table[table.perturbation == "none"].set_index("variant")
    assert (none["final"] - clean["final"]).abs().max() < 1e-12  # the clean column is the main table
    # the perturbed images were really predicted again: LFDL's scores moved
    import glob

    def scores(root):
        return pd.concat(pd.read_csv(p) for p in sorted(glob.glob(str(root / "*" / "scores.csv")))).set_index(
            "image_id"
        )

    a, b = scores(d / "predict/lfdl"), scores(d / "robustness/jpeg_50/predict/lfdl")
    common = a.index.intersection(b.index)
    assert len(common) >= 0.9 * len(a) and (a.loc[common, "score"] != b.loc[common, "score"]).any()
    assert (d / "figures/robustness.png").stat().st_size > 0
    md = (d / "tables/robustness/robustness.md").read_text()
    assert "| variant | none | jpeg_50 |" in md


def test_adding_a_level_runs_only_that_levels_jobs(e2e, tmp_path):
    """A real rerun, not a dry run: with ``blur: [2]`` added to the sweep, the jobs that run are that level's (plus
    the reducer and the records of the run's config), every other output keeps its file and mtime, and the table
    gains the level with the other columns unchanged."""
    copy = e2e.copy(tmp_path / "work")
    work, run = copy.work, copy.dir
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["evaluate"]["robustness"]["blur"] = [2]
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    table_before = pd.read_csv(run / "tables/robustness/robustness.csv")

    r = snakemake(work)  # the real thing
    log = r.stdout + r.stderr
    other, levels = set(), set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", log):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not m:
            continue
        w = re.search(r"wildcards: (.*)", block)
        pert = re.search(r"perturb=([\w.]+)", w.group(1)) if w else None
        if pert:
            levels.add(pert.group(1))
        else:
            other.add(m.group(1))
    assert levels == {"blur_2"}, levels
    # besides that level: the reducer, and the records of the run's config (effective config, report, bundle)
    assert other <= {"robustness", "all", "effective_config", "report", "export"}, other
    assert "robustness" in other and (run / "robustness/blur_2").is_dir()
    # Independently of Snakemake's log: what the main DAG and the other level made is untouched.
    kept = ("index", "forge", "manifest", "faces", "crops", "features", "models", "predict", "fuse", "evaluate",
            "robustness/jpeg_50", "tables/ablation")
    changed = [p.relative_to(run).as_posix() for p, t in before.items()
               if p.relative_to(run).as_posix().startswith(kept) and (not p.exists() or p.stat().st_mtime_ns != t)]
    assert not changed, changed[:10]
    table = pd.read_csv(run / "tables/robustness/robustness.csv")
    assert set(table["perturbation"]) == {"none", "jpeg_50", "blur_2"}
    old = table[table["perturbation"] != "blur_2"].sort_values(["perturbation", "variant"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(old, table_before.sort_values(["perturbation", "variant"]).reset_index(drop=True))
    header = next(line for line in (run / "tables/robustness/robustness.md").read_text().splitlines()
                  if line.startswith("| variant |"))
    # levels in config order (safe_dump sorted the keys: blur before jpeg)
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ["none", "blur_2", "jpeg_50"]


def test_the_chained_prediction_side_is_the_main_dags(e2e, tmp_path):
    """`robust-predict --perturb none` runs perturb, faces, crops, features and both models in one process: its
    predictions must equal the main DAG's (same scores, same masks) — the sweep differs only by the perturbation."""
    import os
    import subprocess
    import sys

    import numpy as np

    from morphfuse.imageio import read_gray

    d = e2e.dir
    shard = sorted((d / "predict/lfdl").glob("test_*"))[0].name
    out = tmp_path / "none"
    r = subprocess.run([sys.executable, "-m", "morphfuse", "robust-predict", "--manifest",
                        str(d / "manifest/shards" / f"{shard}.parquet"), "--perturb", "none",
                        "--config", str(d / "config.effective.yaml"), "--lfdl-model", str(d / "models/lfdl/model.pt"),
                        "--mitl-model", str(d / "models/mitl/model.pt"), "--work", str(tmp_path / "work"),
                        "--out-lfdl", str(out / "lfdl"), "--out-mitl", str(out / "mitl"),
                        "--crops-out", str(out / "crops.parquet"),
                        "--ledger", str(out / "ledger.csv")], cwd=e2e.work, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread, as the rules run it
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "work").exists()  # the scratch folder is removed
    for model in ("lfdl", "mitl"):
        main = pd.read_csv(d / "predict" / model / shard / "scores.csv").set_index("image_id").sort_index()
        chained = pd.read_csv(out / model / "scores.csv").set_index("image_id").sort_index()
        assert list(chained.index) == list(main.index)
        np.testing.assert_allclose(chained["score"], main["score"], rtol=0, atol=1e-6)
        masks = sorted(p.name for p in (d / "predict" / model / shard / "masks").glob("*.png"))
        assert masks and masks == sorted(p.name for p in (out / model / "masks").glob("*.png"))
        for name in masks:
            assert np.array_equal(read_gray(d / "predict" / model / shard / "masks" / name),
                                  read_gray(out / model / "masks" / name)), (model, name)
