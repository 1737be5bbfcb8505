"""The configuration: one strict schema with every default, validation before any compute, per-stage slices.

- ``config.schema.yaml`` (shipped inside the package, so an installed ``morphfuse`` validates too; the workflow's
  ``workflow/schemas/config.schema.yaml`` is a link to it) is the only place that holds defaults. Unknown keys at
  any depth, wrong types (``'no'`` for a boolean) and out-of-range values are errors that name the key, the value
  and what is allowed, e.g. ``fusion.kernal: unknown key (allowed: kernel, threshold, variants)``.
- :func:`validate_config` fills every default, nested ones included (a missing block is created from its
  ``default: {}`` and then filled), so code reads ``cfg["fusion"]["kernel"]``, never ``.get(key, default)``.
- The workflow hands each stage only the keys its rule declares (the rules' ``config_slice(...)``, i.e.
  :func:`config_json`), inline as JSON, so a stage
  cannot depend on a key whose change would not rerun it; :func:`load_stage_config` reads that (or a whole config
  file, validated, when a stage is run by hand).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    """The configuration schema (JSON Schema 2020-12, as YAML)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


# ------------------------------------------------------------------------------------------- validation
def _validator_class():
    """Draft 2020-12 that also fills ``default`` values, deep-copied (never shared between configs)."""
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sub):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if isinstance(prop, dict) and "default" in prop and name not in instance:
                    instance[name] = copy.deepcopy(prop["default"])
        yield from validate_properties(validator, properties, instance, sub)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})


_TYPE_WORDS = {"boolean": "a boolean (true or false)", "integer": "an integer", "number": "a number",
               "string": "a string", "array": "a list", "object": "a mapping", "null": "null"}


def _explain(err) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    v = err.validator
    if v == "additionalProperties":
        allowed = sorted((err.schema.get("properties") or {}).keys())
        extra = sorted(set(err.instance) - set(allowed))
        prefix = f"{where}." if err.absolute_path else ""
        return "; ".join(f"{prefix}{k}: unknown key (allowed: {', '.join(allowed)})" for k in extra)
    if v == "required":
        return f"{where}: {err.message}"
    if v == "type":
        types = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        why = "must be " + " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    elif v == "enum":
        why = "must be one of " + ", ".join("null" if x is None else str(x) for x in err.validator_value)
    elif v == "not" and "multipleOf" in json.dumps(err.validator_value):
        why = f"must be odd (not a multiple of {err.validator_value['multipleOf']})"
    elif v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        why = f"must be {word} {err.validator_value}"
    else:
        why = err.message
    return f"{where} = {err.instance!r}: {why}"


def validate_config(cfg: dict, source: str = "config") -> dict:
    """Validate ``cfg`` against the schema IN PLACE, filling every default; raise :class:`UserError` listing every
    problem (key, value, what is allowed). Returns ``cfg``."""
    if not isinstance(cfg, dict):
        raise UserError(f"{source} is invalid: expected a mapping of keys, got {type(cfg).__name__}")
    validator = _validator_class()(schema())
    problems = [
        _explain(e) for e in sorted(validator.iter_errors(cfg), key=lambda e: [str(p) for p in e.absolute_path])
    ]
    fr = (cfg.get("split") or {}).get("fractions") if isinstance(cfg.get("split"), dict) else None
    if isinstance(fr, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fr.values()) \
            and abs(sum(fr.values()) - 1.0) > 1e-6:
        problems.append(f"split.fractions = {fr}: must sum to 1")
    if isinstance(cfg.get("sources"), list) and all(isinstance(s, dict) and "name" in s for s in cfg["sources"]):
        names = [s["name"] for s in cfg["sources"]]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"sources: name {dup[0]!r} is used by more than one source")
    if problems:
        raise UserError(f"{source} is invalid:\n  " + "\n  ".join(problems))
    return cfg


def defaults() -> dict:
    """Every default of the schema (``sources`` aside): what an almost empty config becomes."""
    cfg: dict = {"sources": [{"name": "x", "kind": "folder", "root": "."}]}
    validate_config(cfg)
    del cfg["sources"]
    return cfg


def default(dotted: str) -> Any:
    """The schema default of one key, e.g. ``default("fusion.kernel") == 5`` (CLI options use it)."""
    node: Any = defaults()
    for part in dotted.split("."):
        node = node[part]
    return copy.deepcopy(node)


# ---------------------------------------------------------------------------------------------- reading
def read_yaml_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file does not exist")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: not valid YAML ({first})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot be read as a YAML config ({getattr(e, 'strerror', None) or e})") from None
    return {} if cfg is None else cfg


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Read a YAML config, apply ``overrides`` (nested dict), validate (defaults filled) and return it."""
    cfg = read_yaml_config(path)
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a config is a mapping of settings (key: value), not a {type(cfg).__name__}")
    if overrides:
        cfg = deep_update(cfg, overrides)
    return validate_config(cfg, str(path))


class StageConfig(dict):
    """The config keys a rule handed its stage. A key the rule did not declare is a clear error, not a silent
    default: add it to the rule's ``config_slice(...)`` (that is what makes changing it rerun the stage)."""

    def __init__(self, data: dict, where: str = ""):
        super().__init__({k: StageConfig(v, f"{where}{k}.") if isinstance(v, dict) else v for k, v in data.items()})
        self._where = where

    def __missing__(self, key):
        raise UserError(f"config key {self._where}{key} was not passed to this stage by its rule; add "
                        f"'{self._where}{key}' to the rule's config_slice(...) in workflow/rules/")

    def get(self, key, default=None):  # noqa: D401 - dict API
        if key not in self:
            self.__missing__(key)
        return super().get(key)

    def plain(self) -> dict:
        return {k: v.plain() if isinstance(v, StageConfig) else copy.deepcopy(v) for k, v in self.items()}


def load_stage_config(value: str, overrides: dict | None = None) -> dict:
    """A stage's ``--config``: inline JSON (what a rule passes: its declared, already validated slice) or the path
    of a whole YAML config (a stage run by hand; validated, defaults filled)."""
    text = str(value).strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--config: inline JSON is not valid ({e})") from None
        if overrides:
            data = deep_update(data, overrides)
        return StageConfig(data)
    return load_config(text, overrides)


# ------------------------------------------------------------------------------------------------ slices
def config_subset(cfg: dict, keys: Iterable[str]) -> dict:
    """The sub-config holding only ``keys`` (dotted paths, e.g. ``"forge.sbi"``), with their effective values."""
    out: dict = {}
    for dotted in keys:
        parts = dotted.split(".")
        src: Any = cfg
        for p in parts:
            if not isinstance(src, dict) or p not in src:
                raise UserError(f"config_subset: config has no key {dotted!r}")
            src = src[p]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = copy.deepcopy(src)
    return out


def config_json(cfg: dict, keys: Iterable[str]) -> str:
    """:func:`config_subset` as compact, key-sorted JSON: the form a rule passes (stable, so an unchanged slice
    never reruns a job)."""
    return json.dumps(config_subset(cfg, keys), sort_keys=True, separators=(",", ":"), default=str)


# ------------------------------------------------------------------------------------------------ helpers
def deep_update(base: dict, other: dict) -> dict:
    out = copy.deepcopy(dict(base))
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
