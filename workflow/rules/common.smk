# Shared setup: config validation, paths, shard lists and code hashes (so editing a stage's code reruns it).
import os
import sys
from pathlib import Path

import pandas as pd
import yaml

from morphfuse.config import config_hash, resolve_path, validate_config
from morphfuse.errors import UserError
from morphfuse.hashing import code_hash
from morphfuse.sources import folders_fingerprint
from morphfuse.stages.manifest import forge_shard_count

try:
    validate_config(config, "config")
except UserError as e:
    raise WorkflowError(str(e)) from None

RUN = Path(config["results_dir"]) / config["run_name"]
SHARD_SIZE = int(config["shard_size"])
EVAL_SPLIT = config["evaluate"].get("split", "test")
# The same interpreter runs every job (also inside SLURM jobs), so the venv's package is always the one used;
# with `--sdm conda` each job runs in envs/morphfuse.yaml instead, which installs this package too.
from snakemake.settings.types import DeploymentMethod

USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
MF = "python -m morphfuse" if USE_CONDA else f"{sys.executable} -m morphfuse"
CONDA_ENV = "../../envs/morphfuse.yaml"


def R(*parts):
    """A path under this run's results folder."""
    return str(RUN.joinpath(*parts))


def _write_effective_config():
    """The merged config (config.yaml + --config/--configfile) as one file the stage commands read.

    Rewritten only when it changes; rules do not take it as an input (their `params` carry the parts they use),
    so an unrelated edit reruns nothing.
    """
    path = Path(R("config.effective.yaml"))
    text = yaml.safe_dump(dict(config), sort_keys=True)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


CONFIG = _write_effective_config()


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
