"""Reruns you can trust (issue 9), on the shared tiny end-to-end run.

- A training parameter changed: the workflow retrains LFDL for real (new weights, metrics from step 1), leaves
  MITL byte-identical, and finishes (report included). Run on a COPY of the e2e folder, so that the other tests
  still see the original run.
- Code hashes from the import graph cover every package module each rule's process actually loaded (recorded at
  exit by the processes of the e2e run); a statement edit reruns the importing rules, a comment edit nothing.
- A config key reaches a stage only through its rule: `faces.upsample` reruns faces AND forge.
- A dry run with another config file leaves every file of the run as it was (names and mtimes).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO
from e2e_run import snakemake
from test_workflow import planned_jobs

from morphfuse.hashing import stage_closure

pytestmark = pytest.mark.slow


def _config(e2e, tmp_path: Path, edit) -> Path:
    cfg = yaml.safe_load((e2e.work / "config.yaml").read_text())
    edit(cfg)
    p = tmp_path / "changed.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_training_parameter_retrains_for_real(e2e, tmp_path):
    copy = e2e.copy(tmp_path / "work")
    work, run = copy.work, copy.dir
    before_lfdl = _weights(run / "models/lfdl/model.pt")
    before_mitl = (run / "models/mitl/model.pt").read_bytes()
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["lfdl"]["train"]["lr"] = cfg["lfdl"]["train"]["lr"] * 3
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))

    r = snakemake(work)  # the real thing, not a dry run
    assert "train_lfdl" in r.stderr and "train_mitl" not in r.stderr

    after = _weights(run / "models/lfdl/model.pt")
    assert after.keys() == before_lfdl.keys()
    assert any(not torch.equal(after[k], before_lfdl[k]) for k in after), "LFDL weights did not change"
    assert (run / "models/mitl/model.pt").read_bytes() == before_mitl
    metrics = pd.read_csv(run / "models/lfdl/metrics.csv")
    train = metrics[metrics["phase"] == "train"]
    assert len(train) and int(train["step"].iloc[0]) == 1
    assert float(train["lr"].iloc[0]) == pytest.approx(cfg["lfdl"]["train"]["lr"])
    log = (run / "logs/train_lfdl.log").read_text()
    assert "of another run (train.lr differs)" in log and "from scratch" in log
    assert (run / "report/training_curves.png").stat().st_size > 0
    assert planned_jobs(work) == {}


def _command(argv: list[str]) -> str:
    return next(a for a in argv if not a.startswith("-"))


def test_code_hashes_cover_every_module_each_stage_loaded(e2e):
    records = [json.loads(p.read_text()) for p in sorted((e2e.work / "loaded_modules").glob("*.json"))]
    commands = {_command(r["argv"]) for r in records}
    assert {"config", "index", "forge", "manifest", "faces", "crops", "features", "train", "predict", "fuse",
            "evaluate", "tables", "report", "export"} <= commands, commands
    for rec in records:
        cmd = _command(rec["argv"])
        loaded = set(rec["modules"])
        assert "morphfuse.cli" in loaded
        missing = loaded - stage_closure(cmd)
        assert not missing, f"`morphfuse {cmd}` loaded {sorted(missing)}, which its rule's code hash misses"


def _package_copy(tmp_path: Path, module: str, edit) -> dict:
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "morphfuse", src / "morphfuse")
    path = src / "morphfuse" / module
    path.write_text(edit(path.read_text()))
    return dict(os.environ, PYTHONPATH=str(src))


def test_a_statement_edit_reruns_the_rules_that_import_it(e2e, tmp_path):
    env = _package_copy(tmp_path, "normalize.py", lambda s: s + "\n_EDITED = 1\n")
    jobs = set(planned_jobs(e2e.work, env=env))
    # normalize.py is imported by the models and by the feature stage (and by nothing upstream of them).
    assert {"features_lfdl", "features_mitl", "train_lfdl", "train_mitl", "predict_lfdl", "predict_mitl"} <= jobs
    assert not jobs & {"index", "forge", "manifest", "faces", "crops", "effective_config"}, jobs


def test_a_comment_or_docstring_edit_reruns_nothing(e2e, tmp_path):
    def edit(text: str) -> str:
        return text.replace('"""', '"""Edited docstring. ', 1) + "\n# a comment\n"

    env = _package_copy(tmp_path, "normalize.py", edit)
    assert planned_jobs(e2e.work, env=env) == {}


def test_face_options_rerun_faces_and_the_forgeries_made_from_faces(e2e, tmp_path):
    cfg = _config(e2e, tmp_path, lambda c: c["faces"].update(upsample=1))
    jobs = set(planned_jobs(e2e.work, cfg))
    assert {"faces", "forge", "manifest"} <= jobs, jobs
    assert "index" not in jobs


def test_a_dry_run_with_another_config_changes_nothing_on_disk(e2e, tmp_path):
    def snapshot() -> dict[str, int]:
        return {str(p.relative_to(e2e.work)): p.stat().st_mtime_ns for p in (e2e.work / "results").rglob("*")}

    before = snapshot()
    other = _config(e2e, tmp_path, lambda c: (c.update(run_name="other"), c["fusion"].update(kernel=7)))
    snakemake(e2e.work, "-n", config=other)
    snakemake(e2e.work, "-n")
    assert snapshot() == before


def test_a_data_folder_copied_anew_reruns_nothing_and_a_new_image_reindexes(e2e, tmp_path):
    """The source folders as a restored backup or a fresh ``cp -r`` leaves them: same names, every folder and file
    with a new modification time. The workflow runs (for real) and does nothing; a new image re-indexes.

    The copy's config points at the original run's source folders, so their times are changed in place and put
    back exactly afterwards."""
    copy = e2e.copy(tmp_path / "work")
    sources = [Path(s["root"]) for s in e2e.cfg["sources"] if Path(s["root"]).is_relative_to(e2e.work)]
    assert sources
    paths = [p for root in sources for p in (root, *root.rglob("*"))]
    times = {p: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in paths}
    try:
        for p in paths:
            os.utime(p)  # now: newer than every output of the run
        r = snakemake(copy.work)
        assert "Nothing to be done" in r.stdout + r.stderr, r.stderr[-3000:]
        new = sources[0] / "another.png"
        shutil.copy(next(p for p in paths if p.suffix == ".png"), new)
        try:
            assert "index" in planned_jobs(copy.work)
        finally:
            new.unlink()
    finally:
        for p, (atime, mtime) in times.items():
            os.utime(p, ns=(atime, mtime))
    assert planned_jobs(copy.work) == {}
