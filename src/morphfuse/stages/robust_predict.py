"""One job of the robustness sweep per (perturbation x shard): the whole prediction side of the DAG on perturbed
images, with the trained models of the main run.

  morphfuse robust-predict --manifest manifest/shards/test_00000.parquet --perturb jpeg:70 --config config.yaml \\
      --lfdl-model models/lfdl/model.pt --mitl-model models/mitl/model.pt --work /tmp/w \\
      --out-lfdl R/predict/lfdl/test_00000 --out-mitl R/predict/mitl/test_00000 \\
      --crops-out R/crops/test_00000.parquet --ledger R/ledger/test_00000.csv
  (R: results/<run>/robustness/jpeg_70)

Chains ``perturb`` -> ``faces`` -> ``crops`` -> ``features`` (LFDL and MITL) -> ``predict`` (both models), the very
stages of the main DAG with the arguments its rules give them, so a perturbed image goes through exactly what a
clean one does (with ``--perturb none`` the predictions equal the main run's; a test checks it). The intermediate
files (perturbed images, faces, crops, feature shards) live in --work, removed at the end; a killed job starts
over. Outputs: the two predictions folders (scores.csv, masks/) as ``morphfuse predict`` writes them, the crops
(--crops-out: the baselines' face masks), and every stage's ledger lines merged into --ledger. One job for the
whole chain (not one per stage) keeps `snakemake -n` of a DDL-I-sized sweep fast (BENCHMARKS.md); the evaluation
side is another job (``robust-evaluate``), so a fusion parameter reruns only that.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from .. import features, predict
from ..faces import cli as faces_cli, crops
from ..ledger import Ledger, read_ledgers
from . import perturb as perturb_stage
from .chain import PREDICT_KEYS as KEYS, chained_run, run_chained as _stage, stage_config_json

log = logging.getLogger(__name__)


def _robust_predict(args: argparse.Namespace) -> int:
    from ..config import load_stage_config

    cfg = load_stage_config(args.config)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shard, led = work / "shard.parquet", work / "ledger"
    mode = ["--mode", cfg["features"]["mode"]]
    _stage("perturb", perturb_stage, ["--manifest", args.manifest, "--perturb", args.perturb, "--seed", cfg["seed"],
                                      "--images", work / "images", "--out", shard, "--ledger", led / "perturb.csv"])
    _stage("faces", faces_cli, ["--manifest", shard, "--out", work / "faces.parquet", "--no-progress",
                                "--config", stage_config_json(cfg, ["faces"]), "--ledger", led / "faces.csv"])
    _stage("crops", crops, ["--manifest", shard, "--faces", work / "faces.parquet", "--out", work / "crops.parquet",
                            "--config", stage_config_json(cfg, ["crops"]), "--faces-ledger", led / "faces.csv",
                            "--ledger", led / "crops.csv"])
    _stage("features", features, ["--manifest", shard, "--crops", work / "crops.parquet", "--out-lfdl",
                                  work / "lfdl.npz", "--lfdl-size", cfg["lfdl"]["size"], *mode,
                                  "--ledger", led / "features_lfdl.csv"])
    _stage("features", features, ["--manifest", shard, "--out-mitl", work / "mitl.npz", "--mitl-size",
                                  cfg["mitl"]["size"], *mode, "--low-band", cfg["mitl"]["low_band"],
                                  "--ledger", led / "features_mitl.csv"])
    score = cfg["mitl"]["score"]
    outs = {"lfdl": Path(args.out_lfdl), "mitl": Path(args.out_mitl)}
    for model, extra in (("lfdl", []), ("mitl", ["--score-rule", score["rule"], "--score-percent", score["percent"]])):
        shutil.rmtree(outs[model], ignore_errors=True)  # a job rerun from scratch: no earlier run's files
        _stage("predict", predict, [model, "--model", getattr(args, f"{model}_model"), "--features",
                                    work / f"{model}.npz", "--manifest", shard, "--out", outs[model], *extra,
                                    "--no-progress"])
    ledgers = sorted(led.glob("*.csv")) + [p / "ledger.csv" for p in outs.values() if (p / "ledger.csv").exists()]
    merged = Ledger("robustness")
    merged.rows = read_ledgers(ledgers).to_dict("records")
    merged.write(args.ledger)
    Path(args.crops_out).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(work / "crops.parquet", args.crops_out)  # the baselines' face crops (robust-evaluate)
    shutil.rmtree(work)
    log.info("robust predict %s: %s -> %s, %s (%d ledger line(s))", args.perturb, args.manifest, args.out_lfdl,
             args.out_mitl, len(merged))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="the clean manifest shard (Parquet)")
    p.add_argument("--perturb", required=True, metavar="KIND:LEVEL", help="e.g. jpeg:70 (morphfuse perturb)")
    p.add_argument("--config", required=True,
                   help=f"config.yaml or the rule's inline JSON slice ({', '.join(KEYS)})")
    p.add_argument("--lfdl-model", required=True, help="trained LFDL model.pt")
    p.add_argument("--mitl-model", required=True, help="trained MITL model.pt")
    p.add_argument("--out-lfdl", required=True, help="LFDL predictions folder (scores.csv, masks/), as predict writes")
    p.add_argument("--out-mitl", required=True, help="MITL predictions folder (scores.csv, masks/)")
    p.add_argument("--work", required=True, help="scratch folder (perturbed images, faces, crops, features), removed")
    p.add_argument("--crops-out", required=True, help="where to keep the perturbed images' crops (Parquet)")
    p.add_argument("--ledger", required=True, help="every stage's ledger lines, merged (CSV)")


def run(args: argparse.Namespace) -> int:
    return chained_run(_robust_predict, args)
