"""The workflow's bulk target: a model bundle applied to a folder in shards gives exactly what `morphfuse detect
FOLDER` gives (names, scores, masks); a lost shard is redone alone."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, london

pytest.importorskip("timm")


def test_bulk_list_and_merge(tmp_path):
    from morphfuse.stages.bulk import merge, write_lists

    root = tmp_path / "in"
    for rel in ("a.jpg", "sub/b.png", "sub/deeper/c.jpg", ".hidden/d.jpg", "notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert write_lists(root, 2, tmp_path / "lists") == 3
    lines = [(tmp_path / "lists" / f"{k:05d}.txt").read_text().splitlines() for k in range(2)]
    assert sorted(lines[0] + lines[1]) == ["a.jpg", "sub/b.png", "sub/deeper/c.jpg"] and len(lines[0]) == 2
    assert pd.read_csv(tmp_path / "lists" / "shards.csv")["images"].tolist() == [2, 1]
    for k, names in enumerate((["a", "sub__b"], ["sub__deeper__c"])):
        d = tmp_path / "shards" / f"{k:05d}"
        d.mkdir(parents=True)
        pd.DataFrame({"image": names, "score": 0.5}).to_csv(d / "scores.csv", index=False)
    assert merge(sorted((tmp_path / "shards").iterdir()), tmp_path / "out") == 3
    assert pd.read_csv(tmp_path / "out" / "scores.csv", dtype=str)["shard"].tolist() == ["00000", "00000", "00001"]


@pytest.mark.slow
def test_bulk_target_equals_detect_on_the_folder(bundle, tmp_path):  # noqa: F811
    from morphfuse.cli import main

    root = tmp_path / "queue"
    photos = london(3)
    for k, rel in enumerate(("x/one.jpg", "x/y/two.jpg", "three.jpg")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[k], root / rel)
    (root / "broken.jpg").write_bytes(b"not an image")
    assert main(["detect", str(root), "--models", str(bundle), "--out", str(tmp_path / "direct"), "--device", "cpu",
                 "--no-progress"]) == 1  # the broken file
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg.update(results_dir=str(tmp_path / "results"), run_name="b")
    cfg["bulk"] = {"input": str(root), "models": str(bundle), "shard_size": 2, "device": "cpu"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "bulk", "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "--configfile", str(tmp_path / "c.yaml"), "--cores", "2", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    bulk = tmp_path / "results" / "b" / "bulk"
    direct = pd.read_csv(tmp_path / "direct" / "scores.csv").sort_values("image").reset_index(drop=True)
    merged = pd.read_csv(bulk / "scores.csv")
    assert sorted((bulk / "shards").iterdir()) == [bulk / "shards" / "00000", bulk / "shards" / "00001"]
    got = merged.drop(columns=["shard", "path"]).sort_values("image").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, direct.drop(columns=["path"]))
    assert list(pd.read_csv(bulk / "ledger.csv")["image_id"]) == ["broken"]
    for name in direct["image"]:
        shard = merged.set_index("image").loc[name, "shard"]
        a = (bulk / "shards" / f"{shard:05d}" / "masks" / f"{name}.png").read_bytes()
        assert a == (tmp_path / "direct" / "masks" / f"{name}.png").read_bytes()
    # a run that died after shard 00000: only the missing shard (and the merge) are run again
    shutil.rmtree(bulk / "shards" / "00001")
    (bulk / "scores.csv").unlink()
    dry = subprocess.run(cmd[:-1] + ["-n"], capture_output=True, text=True, timeout=300)
    assert "bulk_detect" in dry.stdout and dry.stdout.count("wildcards: bshard=") == 1, dry.stdout[-2000:]
    assert "bshard=00001" in dry.stdout
