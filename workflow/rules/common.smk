# Shared setup: config validation (defaults filled from the schema), paths, shard lists, the config slice and the
# code hash that every rule passes its stage. Nothing here writes a file, so a dry run changes nothing on disk.
import json
import os
import sys
from pathlib import Path

import pandas as pd

from morphfuse.config import config_json, resolve_path, validate_config
from morphfuse.errors import UserError
from morphfuse.faces.backends import weight_dir as face_weight_dir
from morphfuse.hashing import stage_code
from morphfuse.sources import folders_fingerprint
from morphfuse.stages.manifest import forge_shard_count

# One strict schema (src/morphfuse/config.schema.yaml, linked as workflow/schemas/): unknown keys, wrong types and
# bad values stop the run here, naming the key. Defaults are filled in place, in this process and in every cluster
# job (each job re-reads the same config files and validates them the same way), so every rule sees effective values.
try:
    validate_config(config, "config")
except UserError as e:
    raise WorkflowError(str(e)) from None

# Pretrained weights the config names must be on this machine (nothing is downloaded at run time): a run without
# them stops here, at planning, naming each one and how to get it (`scratch` trains from scratch on purpose).
from morphfuse.models.pretrained import missing_weights, weight_paths

_MISSING_WEIGHTS = missing_weights(config)
if _MISSING_WEIGHTS:
    raise WorkflowError("\n  ".join(["pretrained weights not found offline:", *_MISSING_WEIGHTS]))

RUN = Path(config["results_dir"]) / config["run_name"]
SHARD_SIZE = int(config["shard_size"])
EVAL_SPLIT = config["evaluate"]["split"]
# The same interpreter runs every job (also inside SLURM jobs), so the venv's package is always the one used;
# with `--sdm conda` each job runs in envs/morphfuse.yaml instead.
from snakemake.settings.types import DeploymentMethod

USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
# In the conda env, the package comes from this workflow's own source tree (the env holds third-party packages only).
SRC = str(Path(workflow.basedir) / "src")
_MORPHFUSE = (
    f"PYTHONPATH=${{PYTHONPATH:+$PYTHONPATH:}}{SRC} python -m morphfuse"
    if USE_CONDA
    else f"{sys.executable} -m morphfuse"
)
# Every rule's command calls `morphfuse <stage>`, as a user would type it: a shell function, defined in front of
# every shell command, that runs this package with this interpreter (with --sdm conda: the env's python and this
# source tree). Also in cluster jobs, which parse this file again.
shell.prefix(f'set -euo pipefail; morphfuse() {{{{ {_MORPHFUSE} "$@"; }}}}; ')  # braces: formatted twice
CONDA_ENV = "../../envs/morphfuse.yaml"


def R(*parts):
    """A path under this run's results folder."""
    return str(RUN.joinpath(*parts))


def config_slice(*keys):
    """The config keys a rule's stage reads (dotted paths, `{wildcard}`s allowed), as the JSON its command gets
    with `--config` (a params function: Snakemake would take the JSON's braces for wildcards).

    A param, so that changing one of these keys reruns exactly the rules that declare it; the stage sees only
    these keys (reading another is an error naming it), so nothing reaches a stage undeclared."""
    return lambda wildcards: config_json(config, [k.format(**dict(wildcards.items())) for k in keys])


def code(command):
    """The hash of every package module `morphfuse <command>` can import (import graph, comments excluded)."""
    return stage_code(command)


def local_files(*paths):
    """Local files or folders a stage reads that the config names (weights, models): rule inputs, so that
    replacing one reruns what uses it. Unset (null) entries are left out."""
    return [str(resolve_path(p)) for p in paths if p]


wildcard_constraints:
    shard=r"(train|val|test|unlabeled)_\d{5}",
    fshard=r"\d{5}",
    method=r"[a-z_]+",
    variant=r"[a-z_]+",
    model=r"lfdl|mitl",


def forge_shard_ids(wildcards=None):
    idx = checkpoints.index.get().output.idx
    n = forge_shard_count(pd.read_parquet(idx, columns=["label"]), SHARD_SIZE)
    return [f"{k:05d}" for k in range(n)]


_SHARD_TABLES = {}


def _shard_table(path):
    key = (path, os.path.getmtime(path))
    if key not in _SHARD_TABLES:
        _SHARD_TABLES[key] = pd.read_csv(path, dtype=str)
    return _SHARD_TABLES[key]


def shard_ids(splits=None):
    table = _shard_table(checkpoints.manifest.get().output.shards)
    if splits is not None:
        table = table[table["split"].isin(splits)]
    return sorted(table["shard"])


def eval_shards():
    return shard_ids([EVAL_SPLIT])


def train_shards():
    return shard_ids(["train", "val"])


# ---------------------------------------------------------------- input functions of the rules (in rule order)
def forge_files(wildcards):
    """Local models a generator loads (diffusion pipelines, face-alignment weights): replacing one reruns it."""
    block = config["forge"][wildcards.method]
    return local_files(
        block.get("model_dir"),
        face_weight_dir(config["faces"]),
    )


def forged_rows(wildcards):
    return [R("forge", m, k, "rows.parquet") for m in config["forge"]["methods"] for k in forge_shard_ids()]


def all_ledgers(wildcards):
    """Every ledger of the main DAG (the tables count them)."""
    shards = shard_ids()
    out = [R("ledger/index/index.csv")]
    out += [R("ledger/forge", f"{m}_{k}.csv") for m in config["forge"]["methods"] for k in forge_shard_ids()]
    out += [R("ledger", st, f"{s}.csv") for st in ("faces", "crops", "features_lfdl", "features_mitl") for s in shards]
    out += [
        R("ledger", st, f"{v}_{s}.csv")
        for st in ("fuse", "evaluate")
        for v in config["fusion"]["variants"]
        for s in eval_shards()
    ]
    return out


def RB(*parts):
    """A path of the robustness sweep: results/<run>/robustness/{perturb}/..."""
    return R("robustness", "{perturb}", *parts)


def bulk_list_file(wildcards):
    return str(Path(checkpoints.bulk_list.get().output.lists) / f"{wildcards.bshard}.txt")


def bulk_shard_dirs(wildcards):
    lists = Path(checkpoints.bulk_list.get().output.lists)
    return [R("bulk/shards", p.stem) for p in sorted(lists.glob("*.txt"))]


# evaluate.thresholds: val: the fusion threshold (and the tables' and the bundle's score threshold) come from the
# file fit_thresholds fits on the val split's predictions; fixed: the config's fusion.threshold and 0.5.
VAL_THRESHOLDS = config["evaluate"]["thresholds"] == "val"
THRESHOLDS = [R("thresholds/thresholds.json")] if VAL_THRESHOLDS else []


def thresholds_arg(fixed=""):
    """A params function: `--thresholds FILE` when they are fitted on val, else ``fixed``."""
    return lambda wc, input: f"--thresholds {input.thresholds[0]}" if input.thresholds else fixed


def val_shards():
    """The val split's shards (fit_thresholds); an error when there is none."""
    shards = shard_ids(["val"])
    if not shards:
        raise WorkflowError(
            "evaluate.thresholds: val needs a val split, and the manifest has none "
            "(split.fractions.val is 0?); set evaluate.thresholds: fixed"
        )
    return shards
