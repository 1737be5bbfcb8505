"""The robustness sweep on the shared tiny end-to-end run (its config sweeps jpeg:50): the perturbed test images
go through the whole prediction side again, the robustness table holds every variant under every perturbation,
and adding a level reruns only that level's jobs (plus the reducer and the run's records)."""
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
        return pd.concat(pd.read_csv(p) for p in sorted(glob.glob(str(root / "*" / "scores.csv")))).set_index("image_id")

    a, b = scores(d / "predict/lfdl"), scores(d / "robustness/jpeg_50/predict/lfdl")
    common = a.index.intersection(b.index)
    assert len(common) >= 0.9 * len(a) and (a.loc[common, "score"] != b.loc[common, "score"]).any()
    assert (d / "figures/robustness.png").stat().st_size > 0
    md = (d / "tables/robustness/robustness.md").read_text()
    assert "| variant | none | jpeg_50 |" in md


def test_adding_a_level_runs_only_that_levels_jobs(e2e, tmp_path):
    cfg = yaml.safe_load((e2e.work / "config.yaml").read_text())
    cfg["evaluate"]["robustness"]["blur"] = [2]
    p = tmp_path / "more.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = snakemake(e2e.work, "-n", config=p).stdout
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", out)
    other, levels = set(), set()
    for block in blocks:
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
    assert "robustness" in other
