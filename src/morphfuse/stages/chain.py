"""Run main-DAG stages one after another in one process, with the arguments their rules give them (the robustness
sweep's jobs: :mod:`morphfuse.stages.robust_predict`, :mod:`morphfuse.stages.robust_evaluate`).

A chaining command imports the stage modules it runs (it does not look them up by name), so the code hash of its
rules, taken from its import graph, covers every stage the job runs and nothing else.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# The config keys of each job (its rule passes exactly these; light here so the Snakefile can import them).
EVALUATE_KEYS = ("fusion.variants", "fusion.kernel", "fusion.threshold", "evaluate.split", "evaluate.averaging",
                 "evaluate.images", "evaluate.iou", "evaluate.empty", "evaluate.threshold", "evaluate.baselines")
PREDICT_KEYS = ("seed", "faces", "crops", "features.mode", "lfdl.size", "mitl.size", "mitl.low_band", "mitl.score")


class StageFailed(Exception):
    """A chained stage ended with a usage, write or interruption status; the job ends with the same status."""

    def __init__(self, rc: int):
        super().__init__(rc)
        self.rc = rc


def run_chained(name: str, module, argv: list) -> int:
    """``morphfuse <name> ARGV`` in this process; 0, or 1 (some inputs skipped, in the ledger), go on."""
    from ..cli import run_stage

    rc = run_stage(name, module, [str(a) for a in argv])
    if rc not in (0, 1):
        log.debug("`morphfuse %s ...` ended with exit status %d", name, rc)  # its own message said why
        raise StageFailed(rc)
    return rc


def stage_config_json(cfg, keys) -> str:
    """The inline JSON config of the given keys, as a rule's ``config_slice`` passes it."""
    from ..config import config_json

    return config_json(cfg.plain() if hasattr(cfg, "plain") else cfg, keys)


def chained_run(fn, args) -> int:
    """Run a chaining command; a failed stage's status is the command's."""
    try:
        return fn(args)
    except StageFailed as e:
        return e.rc
