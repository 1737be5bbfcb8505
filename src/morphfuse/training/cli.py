"""Train LFDL or MITL on feature shards (rows of split ``train``; ``val`` rows give a loss and AUC per epoch).

Resumable: ``--resume auto`` (default) continues from OUT/checkpoints/last.pt when it exists. Several processes
(GPUs) through torchrun, e.g. ``torchrun --standalone --nproc_per_node=2 -m morphfuse.cli train lfdl ...``.
Writes OUT/model.pt (the last model), OUT/model_best.pt (the epoch best on ``train.best_metric`` over the val rows,
its ``selected`` entry says which; without val rows the last model), OUT/metrics.csv, OUT/checkpoints/last.pt and
OUT/tb/ (TensorBoard).

Examples:
  morphfuse train lfdl --config config.yaml --features results/demo/features/lfdl --out results/demo/models/lfdl
  morphfuse train mitl --config config.yaml --features features/mitl/train_00000.npz features/mitl/train_00001.npz \
      --out models/mitl --set train.epochs=1
"""
from __future__ import annotations

import argparse
import logging
import os

import yaml

from ..errors import UserError
from ..models.recipes import RECIPES

log = logging.getLogger("morphfuse.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=list(RECIPES), help="which network to train")
    p.add_argument("--config", required=True,
                   help="config.yaml (its lfdl:/mitl: block and .train recipe; validated, defaults filled), or the "
                        "inline JSON slice the workflow's rule passes")
    p.add_argument("--features", nargs="+", required=True, metavar="NPZ",
                   help="feature shards (.npz files, or folders of them) of this model")
    p.add_argument("--out", required=True,
                   help="output folder (model.pt, model_best.pt, metrics.csv, checkpoints/, tb/)")
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue from OUT/checkpoints/last.pt if present (default); never: start over")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps in all (a checkpoint is written; resume to finish)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. lfdl.train.epochs=1 (or train.epochs=1: relative to the "
                        "model's block); repeatable")
    # A test hook (build the network with MODULE:CALLABLE(name, size, options) instead of
    # morphfuse.models.build_model), kept out of the user's --help.
    p.add_argument("--model-factory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def parse_value(text: str):
    """YAML scalars (1, true, null, [a, b]) plus the floats YAML 1.1 misses (1e-4)."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def parse_overrides(items: list[str], model_name: str, top_level_keys) -> dict:
    """``["train.epochs=1", "seed=3"]`` → nested dict; a key not naming a top-level block is taken relative to
    the model's block (``train.epochs`` → ``lfdl.train.epochs``)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        parts = key.split(".")
        if parts[0] not in top_level_keys and parts[0] not in RECIPES:
            parts = [model_name] + parts
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {p} is set both as a value and as a block")
        node[parts[-1]] = parse_value(value)
    return out


def run(args: argparse.Namespace) -> int:
    from . import engine
    from .checkpoint import resolve_factory

    from ..config import load_stage_config, schema

    overrides = parse_overrides(args.overrides, args.model, set(schema()["properties"]))
    cfg = load_stage_config(args.config, overrides)
    factory = resolve_factory(args.model_factory)
    res = engine.train(args.model, cfg, args.features, args.out, resume=args.resume, max_steps=args.max_steps,
                       factory=factory, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        state = "finished" if res.finished else "stopped early"
        log.info("%s %s at step %d/%d: %s", args.model, state, res.step, res.total_steps, res.model_path)
    return 0
