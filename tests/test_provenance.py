"""provenance.json: every field present, the config hash stable, times in ISO 8601 UTC, atomic CLI."""
from __future__ import annotations

import datetime as dt
import json
import os
import time


from conftest import REPO
from morphfuse.config import config_hash, load_config
from morphfuse.provenance import FIELDS, PACKAGES, config_seeds, git_info, write_provenance


def test_every_field_and_stable_hash(tmp_path):
    cfg = load_config(REPO / "config.yaml")
    t0 = 1_700_000_000.0
    rec = write_provenance(tmp_path / "p.json", cfg, started=t0, ended=t0 + 90.5, seeds={"seed": 7})
    data = json.loads((tmp_path / "p.json").read_text())
    assert data == json.loads(json.dumps(rec))
    assert set(FIELDS) <= set(data)
    assert data["config"] == cfg
    assert data["config_hash"] == config_hash(cfg)
    # Stable: the same config (in another key order, read again) gives the same hash; a change gives another.
    reordered = dict(reversed(list(load_config(REPO / "config.yaml").items())))
    assert config_hash(reordered) == data["config_hash"]
    assert config_hash({**cfg, "seed": 1}) != data["config_hash"]
    assert data["started"] == "2023-11-14T22:13:20+00:00"
    assert dt.datetime.fromisoformat(data["ended"]) - dt.datetime.fromisoformat(data["started"]) == \
        dt.timedelta(seconds=90.5)
    assert data["duration_s"] == 90.5
    assert data["seeds"] == {"seed": 7}
    assert set(data["packages"]) == set(PACKAGES)
    for key in ("torch", "numpy", "pandas", "scikit-learn", "snakemake", "opencv", "timm"):
        assert data["packages"][key], key
    m = data["machine"]
    assert m["cpu_count"] >= 1 and m["memory_bytes"] > 0 and isinstance(m["gpus"], list) and m["platform"]
    assert data["morphfuse_version"] and data["python"] and data["command"]
    g = data["git"]
    assert g is None or (len(g["commit"]) == 40 and isinstance(g["dirty"], bool))


def test_defaults_and_git_failure_tolerated(tmp_path):
    cfg = load_config(REPO / "config.yaml")
    data = write_provenance(tmp_path / "p.json", cfg, None, None, None)
    assert data["started"] is None and data["ended"] is None and data["duration_s"] is None
    assert data["seeds"] == {"seed": 0, "split.seed": 0, "lfdl.train.seed": 0, "mitl.train.seed": 0}
    assert config_seeds({"seed": 3, "lfdl": {"train": {"seed": 5}}}) == {"seed": 3, "lfdl.train.seed": 5}
    assert git_info(tmp_path) is None  # not a git checkout: no error, no record


def test_cli(tmp_path, capsys):
    from morphfuse.provenance import add_arguments, run
    import argparse

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text((REPO / "config.yaml").read_text())
    first = tmp_path / "first_output"
    first.write_text("x")
    os.utime(first, (1_700_000_000, 1_700_000_000))
    p = argparse.ArgumentParser()
    add_arguments(p)
    before = time.time()
    assert run(p.parse_args(["--config", str(cfg_path), "--out", str(tmp_path / "prov" / "provenance.json"),
                             "--started-from", str(first)])) == 0
    data = json.loads((tmp_path / "prov" / "provenance.json").read_text())
    assert data["started"] == "2023-11-14T22:13:20+00:00"
    assert dt.datetime.fromisoformat(data["ended"]).timestamp() >= before - 1
    assert data["config"] == load_config(cfg_path)  # the effective config: the file with every default filled
    assert not [f for f in os.listdir(tmp_path / "prov") if f != "provenance.json"]  # no temporary left over
