"""Load and validate ``config.yaml`` before any compute is spent.

Validation uses ``workflow/schemas/config.schema.yaml`` (JSON Schema); an error names the key, the value and what
was expected, e.g. ``config.yaml: fusion.kernel = 4: must be odd (not a multiple of 2)``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


def _schema() -> dict:
    if not SCHEMA_PATH.exists():  # installed without the repository: skip schema, keep runtime checks
        return {}
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _explain(err) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "not" and "multipleOf" in json.dumps(err.validator_value):
        why = f"must be odd (not a multiple of {err.validator_value['multipleOf']})"
    elif err.validator == "enum":
        why = f"must be one of {', '.join(map(str, err.validator_value))}"
    elif err.validator == "required":
        why = err.message
    elif err.validator == "additionalProperties":
        why = err.message
    else:
        why = err.message
    value = "" if err.validator in ("required", "additionalProperties") else f" = {err.instance!r}"
    return f"{where}{value}: {why}"


def validate_config(cfg: dict, source: str = "config") -> dict:
    """Validate ``cfg`` against the schema; raise :class:`UserError` listing every problem."""
    schema = _schema()
    problems: list[str] = []
    if schema:
        import jsonschema

        validator = jsonschema.Draft202012Validator(schema)
        problems = [_explain(e) for e in sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))]
    fr = cfg.get("split", {}).get("fractions", {})
    if fr and abs(sum(float(v) for v in fr.values()) - 1.0) > 1e-6:
        problems.append(f"split.fractions = {fr}: must sum to 1")
    if problems:
        raise UserError(f"{source} is invalid:\n  " + "\n  ".join(problems))
    return cfg


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Read a YAML config, apply ``overrides`` (nested dict), validate, and return it."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: config file does not exist")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({e})") from None
    if overrides:
        cfg = deep_update(cfg, overrides)
    return validate_config(cfg, str(p))


def deep_update(base: dict, other: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def config_hash(cfg: Any) -> str:
    """A stable SHA-256 of a config (or any JSON-able part of it)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """Config paths are relative to the working directory (Snakemake's workdir: the repository root) or absolute."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (Path(base or os.getcwd()) / p).resolve()
