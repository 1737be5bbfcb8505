"""Planning-time checks of the workflow: `snakemake -n` of the paper's settings without their weights stops
before any job, naming each missing weight and how to get it (nothing is downloaded)."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

from conftest import LONDON_512, REPO


def test_the_paper_overlay_without_weights_stops_at_planning_naming_them(tmp_path):
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    base["sources"][0]["root"] = str(LONDON_512)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(base))
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hf"), HF_HOME=str(tmp_path / "hf"),
               TORCH_HOME=str(tmp_path / "torch"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"),
                        "--directory", str(tmp_path), "--cores", "1", "--configfile", str(tmp_path / "config.yaml"),
                        str(REPO / "configs" / "paper.yaml")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "pretrained weights not found offline" in err
    for key in ("lfdl.pretrained", "mitl.pretrained.convnext", "mitl.pretrained.segformer"):
        assert f"{key} = " in err, err[-3000:]
    assert "morphfuse weights download" in err and "scratch" in err
    assert not (tmp_path / "results").exists()  # planning wrote nothing
