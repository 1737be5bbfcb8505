"""Validate a config and write the effective config: every key with its value, schema defaults filled in.

Errors name the key, the value and what is allowed (unknown keys at any depth, wrong types, bad values).

Examples:
  morphfuse config --config config.yaml                  # validate; print the effective config
  morphfuse config --config configs/paper.yaml --out effective.yaml
"""
from __future__ import annotations

import argparse
import sys

import yaml

from ..config import StageConfig, load_stage_config, validate_config
from ..imageio import write_text_atomic


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="config.yaml, or a whole config as inline JSON")
    p.add_argument("--out", default=None, help="YAML file to write (default: print to stdout)")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(args.config)
    if isinstance(cfg, StageConfig):  # inline JSON (the workflow's rule passes the whole effective config)
        cfg = validate_config(cfg.plain(), "--config")
    text = yaml.safe_dump(dict(cfg), sort_keys=True)
    if args.out:
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    return 0
