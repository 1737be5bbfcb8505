"""The whole DAG on a tiny config, run ONCE per test session and inspected by the tests below.

Also: bad inputs are recorded and the run goes on; partial reruns touch only what a change affects.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import LONDON_512, REPO
from e2e_run import ODD_CONVERTIBLE, ODD_UNUSABLE, snakemake

pytestmark = pytest.mark.slow


def planned_jobs(work: Path, config: Path | None = None, env: dict | None = None) -> dict[str, int]:
    """{rule: count} of what a dry run would execute now."""
    r = snakemake(work, "-n", "--quiet", "rules", config=config, env=env)
    counts, in_table = {}, False
    for line in r.stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table and len(parts) == 2 and parts[1].isdigit():
            if parts[0] == "total":
                break
            counts[parts[0]] = int(parts[1])
    return counts


# ------------------------------------------------------------------------------------------------- the run
def test_every_stage_wrote_its_outputs(e2e):
    d = e2e.dir
    manifest = pd.read_parquet(d / "manifest/manifest.parquet")
    shards = pd.read_csv(d / "manifest/shards.csv")
    for s in shards["shard"]:
        for f in (f"faces/{s}.parquet", f"crops/{s}.parquet", f"features/lfdl/{s}.npz", f"features/mitl/{s}.npz"):
            assert (d / f).exists(), f
    for m in ("lfdl", "mitl"):
        assert (d / "models" / m / "model.pt").exists()
        assert len(pd.read_csv(d / "models" / m / "metrics.csv")) >= 1
    test = manifest[manifest["split"] == "test"]
    assert len(test) and set(test["label"]) == {0, 1}
    for v in e2e.cfg["fusion"]["variants"]:
        rows = pd.concat([pd.read_parquet(p) for p in (d / "evaluate" / v).glob("*.parquet")])
        assert set(rows["image_id"]) <= set(test["image_id"])
    assert (d / "figures" / "roc.png").exists() and (d / "figures" / "pr.png").exists()


def test_ablation_table_has_the_papers_rows_with_intervals(e2e):
    table = pd.read_csv(e2e.dir / "tables" / "ablation.csv")
    variants = list(table.iloc[:, 0])
    assert variants == ["lfdl", "mitl", "lfdl_score_mitl_mask", "naive_or", "mdmf", "closing_or", "baseline_face",
                        "baseline_all"]
    md = (e2e.dir / "tables" / "ablation.md").read_text()
    assert "per_image" in md and "fake_only" in md
    # the baselines: whole image = every pixel predicted; face crops = fewer, and AUC 0.5 (constant score)
    t = table.set_index("variant")
    assert t.loc["baseline_all", "FN"] == 0 and t.loc["baseline_all", "TN"] == 0
    assert t.loc["baseline_face", "TP"] + t.loc["baseline_face", "FP"] < t.loc["baseline_all", "FP"] + \
        t.loc["baseline_all", "TP"]
    assert t.loc["baseline_face", "auc"] == pytest.approx(0.5) and t.loc["baseline_all", "auc"] == pytest.approx(0.5)
    # the images=all twin (reals' predicted pixels are false positives) and the paired differences
    t_all = pd.read_csv(e2e.dir / "tables" / "ablation_all.csv").set_index("variant")
    assert list(t_all.index) == variants and (t_all["FP"] >= t["FP"]).all()
    assert t_all.loc["baseline_all", "FP"] > t.loc["baseline_all", "FP"]
    diffs = pd.read_csv(e2e.dir / "tables" / "ablation_diffs.csv")
    assert {("mdmf", "naive_or"), ("naive_or", "lfdl"), ("mdmf", "lfdl"), ("lfdl", "baseline_face")} <= \
        set(zip(diffs["a"], diffs["b"]))
    assert set(diffs["images"]) == {"fake_only", "all"} and diffs["lo"].notna().all()
    assert "Paired differences" in md and "images=all" in md
    cols = " ".join(table.columns).lower()
    for c in ("auc", "f1", "iou", "final"):
        assert c in cols


def test_no_person_in_two_splits_and_forgeries_follow_their_sources(e2e):
    m = pd.read_parquet(e2e.dir / "manifest/manifest.parquet")
    assert (m.groupby("group")["split"].nunique() == 1).all()
    split_of = dict(zip(m["image_id"], m["split"]))
    fakes = m[m["label"] == 1]
    assert len(fakes) and {"sbi", "random_combination"} <= set(fakes["method"])
    for ids, split in zip(fakes["source_ids"], fakes["split"]):
        assert all(split_of[i] == split for i in ids.split("|") if i)


def test_bad_inputs_are_recorded_and_the_run_goes_on(e2e):
    ledgers = pd.concat([pd.read_csv(p) for p in (e2e.dir / "ledger").rglob("*.csv") if p.stat().st_size],
                        ignore_index=True)
    assert ledgers["reason"].str.len().gt(0).all() and not ledgers["reason"].str.contains("\n").any()
    recorded = set(ledgers["image_id"])
    assert {f"odd__{k}" for k in ODD_UNUSABLE} <= recorded, recorded
    assert {"ext__extswap__nomask", "ext__extswap__badmask"} <= recorded
    reasons = ledgers.set_index("image_id")["reason"]
    assert "no mask" in " ".join(reasons[["ext__extswap__nomask"]])
    assert "but its fake is" in " ".join(reasons[["ext__extswap__badmask"]])
    assert "decompression-bomb" in " ".join(reasons[["odd__bomb"]])
    # Usable after conversion: grey, 16-bit, RGBA, CMYK and EXIF-rotated photos get crops and features.
    crops = pd.concat(pd.read_parquet(p) for p in (e2e.dir / "crops").glob("*.parquet"))
    assert {f"odd__{k}" for k in ODD_CONVERTIBLE} <= set(crops["image_id"])
    assert "ext__extswap__ok" in set(crops["image_id"])
    # The counts reach the final tables.
    errors = (e2e.dir / "tables" / "errors.md").read_text()
    for stage in ("index", "faces"):
        assert f"| {stage} |" in errors


# Fusion and everything after it: evaluation, tables, the report's inputs and the model bundle (its model card
# carries the table). Nothing upstream.
DOWNSTREAM_OF_FUSION = {"fuse", "evaluate", "tables", "report", "export", "all",
                        # the robustness sweep's fusion + evaluation jobs, its tables and its reducer
                        "robust_evaluate", "tables_robust", "robustness"}


def _variant_config(e2e, tmp_path, edit) -> Path:
    cfg = yaml.safe_load((e2e.work / "config.yaml").read_text())
    edit(cfg)
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_nothing_to_do_after_a_complete_run(e2e):
    assert planned_jobs(e2e.work) == {}


# A config change also rewrites the effective config, which the report and the bundle record.
CONFIG_CHANGED = {"effective_config"}


def test_a_fusion_parameter_reruns_fusion_and_evaluation_only(e2e, tmp_path):
    cfg = _variant_config(e2e, tmp_path, lambda c: c["fusion"].update(kernel=3))
    assert set(planned_jobs(e2e.work, cfg)) == DOWNSTREAM_OF_FUSION | CONFIG_CHANGED


def test_an_lfdl_training_parameter_leaves_mitl_alone(e2e, tmp_path):
    cfg = _variant_config(e2e, tmp_path, lambda c: c["lfdl"]["train"].update(lr=1e-4))
    assert set(planned_jobs(e2e.work, cfg)) == ({"train_lfdl", "predict_lfdl", "robust_predict"}
                                                | DOWNSTREAM_OF_FUSION | CONFIG_CHANGED)


def test_val_thresholds_are_fitted_on_val_predictions_and_rerun_fusion(e2e, tmp_path):
    cfg = _variant_config(e2e, tmp_path, lambda c: c["evaluate"].update(thresholds="val"))
    jobs = planned_jobs(e2e.work, cfg)
    n_val = (pd.read_csv(e2e.dir / "manifest/shards.csv")["split"] == "val").sum()
    assert n_val >= 1 and jobs["fit_thresholds"] == 1
    assert jobs["predict_lfdl"] == n_val and jobs["predict_mitl"] == n_val  # the val shards, never predicted before
    assert {"fuse", "evaluate", "tables", "export", "robust_evaluate", "tables_robust"} <= set(jobs)
    assert not {"train_lfdl", "train_mitl", "evaluate_baseline"} & set(jobs)  # the baselines use no threshold


def test_the_best_checkpoint_reruns_prediction_not_training(e2e, tmp_path):
    for m in ("lfdl", "mitl"):
        assert (e2e.dir / "models" / m / "model_best.pt").stat().st_size > 0
    cfg = _variant_config(e2e, tmp_path, lambda c: c.setdefault("export", {}).update(checkpoint="best"))
    jobs = planned_jobs(e2e.work, cfg)
    assert {"predict_lfdl", "predict_mitl", "robust_predict", "export"} <= set(jobs)
    assert not {"train_lfdl", "train_mitl", "faces", "features_lfdl"} & set(jobs)


def test_editing_the_fusion_code_reruns_fusion_and_evaluation_only(e2e, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "morphfuse", src / "morphfuse")
    with open(src / "morphfuse" / "fusion.py", "a") as f:
        f.write("\n_EDITED = True  # a statement: a comment alone reruns nothing (test_reruns.py)\n")
    env = dict(os.environ, PYTHONPATH=str(src))
    # what imports the MDMF functions (fuse, the sweep's fuse + evaluate, export) and what reads the fused masks;
    # not the baselines' evaluation, which neither reads fused masks nor imports fusion.py
    assert set(planned_jobs(e2e.work, env=env)) == DOWNSTREAM_OF_FUSION


def test_a_new_image_in_a_source_folder_is_indexed(e2e):
    folder = e2e.work / "odd"
    before = os.stat(folder)
    extra = folder / "new_photo.jpg"
    shutil.copy(sorted(LONDON_512.glob("neutral_front/*.jpg"))[-1], extra)
    try:
        jobs = planned_jobs(e2e.work)
    finally:
        extra.unlink()
        os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))  # as the other tests expect it
    assert "index" in jobs
    assert planned_jobs(e2e.work) == {}
