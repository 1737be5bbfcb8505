"""The other job of the robustness sweep per (perturbation x shard): fuse and evaluate every variant of one shard's
perturbed predictions (``morphfuse robust-predict``) against the clean shard's ground truth.

  morphfuse robust-evaluate --manifest manifest/shards/test_00000.parquet --config config.yaml \\
      --lfdl R/predict/lfdl/test_00000 --mitl R/predict/mitl/test_00000 --crops R/crops/test_00000.parquet \\
      --fused R/fuse --counts R/evaluate --ledgers R/ledger          (R: results/<run>/robustness/jpeg_70)

Chains ``fuse`` and ``evaluate`` for each variant, and ``evaluate --baseline`` for each of evaluate.baselines (on the
perturbed images' crops), with the arguments the main DAG's rules give them, into the main DAG's layout:
FUSED/<variant>/<shard>/masks/ and COUNTS/<variant>/<shard>.parquet (the main ``tables`` stage reduces them).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .. import evaluate
from . import fuse
from .chain import EVALUATE_KEYS as KEYS, chained_run, run_chained as _stage

log = logging.getLogger(__name__)


def _robust_evaluate(args: argparse.Namespace) -> int:
    from ..config import load_stage_config

    cfg = load_stage_config(args.config)
    fu, ev = cfg["fusion"], cfg["evaluate"]
    shard = Path(args.manifest).stem
    convention = ["--averaging", ev["averaging"], "--images", ev["images"], "--iou", ev["iou"], "--empty",
                  ev["empty"], "--threshold", ev["threshold"]]
    pred = {"lfdl": Path(args.lfdl), "mitl": Path(args.mitl)}
    # evaluate.thresholds: val: the mask threshold fitted on the clean val split, as the main fuse rule takes it
    threshold = ["--thresholds", args.thresholds] if args.thresholds else ["--threshold", fu["threshold"]]
    fused, counts, ledgers = Path(args.fused), Path(args.counts), Path(args.ledgers)
    for v in fu["variants"]:  # the main DAG's layout: fuse/{variant}/{shard}/masks, evaluate/{variant}/{shard}.parquet
        masks = fused / v / shard / "masks"
        _stage("fuse", fuse, ["--lfdl-masks", pred["lfdl"] / "masks", "--mitl-masks", pred["mitl"] / "masks",
                                "--out", masks, "--variant", v, "--kernel", fu["kernel"], *threshold,
                                "--ledger", ledgers / f"fuse_{v}_{shard}.csv", "--allow-errors", "--overwrite"])
        scores = pred[evaluate.detection_scores_of(v)] / "scores.csv"
        _stage("evaluate", evaluate, ["--manifest", args.manifest, "--pred-masks", masks, "--scores", scores,
                                      "--out-counts", counts / v / f"{shard}.parquet", "--variant", v, "--split",
                                      ev["split"], "--ledger", ledgers / f"evaluate_{v}_{shard}.csv",
                                      "--allow-errors", "--overwrite", *convention])
    for b in ev["baselines"]:  # as the main DAG's evaluate_baseline: the crops of the perturbed images
        _stage("evaluate", evaluate, ["--manifest", args.manifest, "--baseline", b.removeprefix("baseline_"),
                                      "--crops", args.crops, "--out-counts", counts / b / f"{shard}.parquet",
                                      "--variant", b, "--split", ev["split"], "--ledger",
                                      ledgers / f"evaluate_{b}_{shard}.csv", "--allow-errors", "--overwrite",
                                      *convention])
    log.info("robust evaluate: %d variant(s) of %s -> %s", len(fu["variants"]), shard, counts)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="the clean manifest shard (ground truth)")
    p.add_argument("--lfdl", required=True, help="the shard's LFDL predictions folder (robust-predict --out-lfdl)")
    p.add_argument("--mitl", required=True, help="the shard's MITL predictions folder")
    p.add_argument("--crops", required=True, help="the perturbed shard's crops (robust-predict --crops-out): the "
                   "baselines' face masks")
    p.add_argument("--thresholds", default=None, metavar="JSON",
                   help="fuse with the mask threshold of this `morphfuse thresholds` file (evaluate.thresholds: val)")
    p.add_argument("--config", required=True,
                   help=f"config.yaml or the rule's inline JSON slice ({', '.join(KEYS)})")
    p.add_argument("--fused", required=True, help="root of the fused masks: FUSED/<variant>/<shard>/masks/")
    p.add_argument("--counts", required=True, help="root of the counts: COUNTS/<variant>/<shard>.parquet")
    p.add_argument("--ledgers", required=True, help="folder of the fuse and evaluate ledgers of this shard")


def run(args: argparse.Namespace) -> int:
    return chained_run(_robust_evaluate, args)
