# Shared setup: config validation (defaults filled from the schema), paths, shard lists, the config slice and the
# code hash each rule passes its stage. Nothing here writes a file: a dry run changes nothing on disk.
import json
import os
import sys
from pathlib import Path

import pandas as pd

from morphfuse.config import config_json, resolve_path, validate_config
from morphfuse.errors import UserError
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

RUN = Path(config["results_dir"]) / config["run_name"]
SHARD_SIZE = int(config["shard_size"])
EVAL_SPLIT = config["evaluate"]["split"]
# The same interpreter runs every job (also inside SLURM jobs), so the venv's package is always the one used;
# with `--sdm conda` each job runs in envs/morphfuse.yaml instead.
from snakemake.settings.types import DeploymentMethod

USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
# In the conda env, the package comes from this workflow's own source tree (the env holds third-party packages only).
SRC = str(Path(workflow.basedir) / "src")
MF = (f"PYTHONPATH=${{PYTHONPATH:+$PYTHONPATH:}}{SRC} python -m morphfuse" if USE_CONDA
      else f"{sys.executable} -m morphfuse")
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


# The effective config (config.yaml + --configfile/--config + schema defaults), written by a rule of its own, read
# by the report and the bundle; it is rewritten only when the config changes (its param), never at parse time.
rule effective_config:
    output:
        R("config.effective.yaml"),
    params:
        config=config_slice(*sorted(config)),
        code=code("config"),
    localrule: True
    log:
        R("logs/effective_config.log"),
    shell:
        "{MF} config --config {params.config:q} --out {output} > {log} 2>&1"
