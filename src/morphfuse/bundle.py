"""A model bundle: the portable folder ``morphfuse export`` writes and ``morphfuse detect`` reads (write, load,
verify). One owner of the format; :mod:`morphfuse.export` assembles a bundle from a run, :mod:`morphfuse.model_card`
writes its card.

  bundle.json    format version, morphfuse version, git commit, the two models (file, name, size, options,
                 training steps, parameters), fusion (default variant, kernel, threshold), face backend and its
                 options, crop rules, score rules, and the SHA-256 and size of every other file
  lfdl.safetensors  the LFDL weights (the state dict of model.pt) in the safetensors format: tensors only, no
                 pickle, so loading a bundle runs no code from it; the network's name, size, options and training
                 summary are in bundle.json (``models.lfdl``); never optimizer state
  mitl.safetensors  the same for MITL
  config.yaml    the effective (validated) config
  MODEL_CARD.md  what the models are, the training data, the metrics, intended use and limitations, attribution
  metrics/       ablation.md (+ ablation.csv), when the export was given the run's tables

:func:`load_bundle` checks every file's size and SHA-256 against bundle.json first and names the file that is
missing or altered; every path bundle.json names must stay inside the folder. Bundles of earlier versions, whose
models are ``lfdl.pt`` / ``mitl.pt`` records, still load (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import __version__
from .errors import UserError
from .imageio import sha256_file

BUNDLE_FORMAT = "morphfuse-bundle"
BUNDLE_VERSION = 1
MODEL_NAMES = ("lfdl", "mitl")
DEFAULT_VARIANT = "mdmf"
FAKE_THRESHOLD = 0.5  # image score >= this: reported as fake


# ------------------------------------------------------------------------------------------------- files
def file_table(root: Path) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "bytes"}}`` of every file under ``root`` except bundle.json."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "bundle.json":
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def looks_like_bundle(folder: Path) -> bool:
    """An earlier bundle (replaced by export): its bundle.json, or its model card and config when bundle.json
    was removed (Snakemake removes a rule's output file, bundle.json, before rerunning export)."""
    return (folder / "bundle.json").is_file() or ((folder / "MODEL_CARD.md").is_file()
                                                   and (folder / "config.yaml").is_file())


# ----------------------------------------------------------------------------------------------- weights
WEIGHTS_FORMAT = "morphfuse-weights"


def save_weights(state_dict: dict, path: Path, model_name: str, size: int) -> None:
    """A state dict as a safetensors file (atomically), its model's name and size in the file's metadata."""
    from safetensors.torch import save_file

    from .imageio import atomic_path

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": WEIGHTS_FORMAT, "model_name": model_name,
                                                "size": str(int(size))})


def load_weights(path: Path, model_name: str) -> dict:
    """The state dict of a bundle's safetensors file (tensors only: nothing is unpickled); ``UserError`` when
    it is not readable or belongs to another model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise UserError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:160]}); re-export "
                        "the bundle") from None
    if info.get("format") != WEIGHTS_FORMAT or info.get("model_name") != model_name:
        raise UserError(f"{path}: holds the weights of {info.get('model_name')!r}, not of the {model_name} model; "
                        "re-export the bundle")
    return state


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Bundle:
    """A verified bundle: its folder, bundle.json (``meta``), config, and ``digest`` (SHA-256 of bundle.json,
    which lists every file's hash: equal digests, equal bundles)."""

    path: Path
    meta: dict
    config: dict
    digest: str = ""

    def model_file(self, name: str) -> Path:
        return self.path / self.meta["models"][name]["file"]

    def record(self, name: str) -> dict:
        """The model record of ``name`` (``model_name``, ``size``, ``options``, ``state_dict``): from its
        safetensors file and bundle.json, or from a ``.pt`` record (earlier bundles; weights_only loading)."""
        path = self.model_file(name)
        entry = self.meta["models"][name]
        if path.suffix == ".safetensors":
            return {"model_name": entry.get("model_name", name), "size": int(entry["size"]),
                    "options": entry.get("options") or {}, "state_dict": load_weights(path, name)}
        from .training.checkpoint import load_model_file

        return load_model_file(path, name)

    def load_model(self, name: str, device="cpu"):
        """Build the network of ``name`` and load its weights (never unpickling code), in eval mode on
        ``device``."""
        from .training.checkpoint import build_for_inference

        return build_for_inference(self.record(name), self.model_file(name)).to(device).eval()


_STR = {"type": "string", "minLength": 1}
_NUM = {"type": "number"}
BUNDLE_SCHEMA = {
    "type": "object",
    "required": ["format", "format_version", "models", "files", "fusion", "faces", "crops", "score_rules", "config"],
    "properties": {
        "format": {"type": "string"},
        "format_version": {"type": "integer"},
        "models": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["file", "size"],
            "properties": {"file": _STR, "size": {"type": "integer", "minimum": 1}, "options": {"type": "object"}}}},
        "files": {"type": "object", "minProperties": 1, "additionalProperties": {
            "type": "object", "required": ["sha256", "bytes"],
            "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                           "bytes": {"type": "integer", "minimum": 0}}}},
        "fusion": {"type": "object", "required": ["kernel", "threshold"],
                   "properties": {"variant": _STR, "kernel": {"type": "integer", "minimum": 1},
                                  "threshold": {"type": "number", "minimum": 0, "maximum": 1}}},
        "faces": {"type": "object", "required": ["backend"],
                  "properties": {"backend": _STR, "options": {"type": "object"}}},
        "crops": {"type": "object", "required": ["margin", "max_face_area_fraction"],
                  "properties": {"margin": _NUM, "max_face_area_fraction": _NUM, "expand": _NUM,
                                 "rule": {"enum": ["release", "margin"]}}},
        "score_rules": {"type": "object", "required": ["mitl"],
                        "properties": {"mitl": {"type": "object", "required": ["rule", "percent"],
                                                "properties": {"rule": _STR, "percent": _NUM}},
                                       "fake_threshold": _NUM}},
        "config": {"type": "object", "properties": {"file": _STR, "hash": {"type": ["string", "null"]}}},
    },
}


def _check_bundle_meta(meta, bj: Path) -> None:
    """Field types of bundle.json (one line naming the first bad field)."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(BUNDLE_SCHEMA).iter_errors(meta),
                    key=lambda e: [str(x) for x in e.absolute_path])
    if errors:
        e = errors[0]
        where = ".".join(str(x) for x in e.absolute_path) or "(top level)"
        value = "" if e.validator == "required" else f" = {json.dumps(e.instance)[:60]}"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise UserError(f"{bj}: {where}{value}: {e.message[:160]}{more}; re-export the bundle")


def _inside(root: Path, rel: str, what: str, bj: Path) -> Path:
    """``root / rel`` when it stays inside the bundle folder (after following links), else UserError."""
    p = Path(rel)
    resolved = (root / p).resolve()
    if p.is_absolute() or not resolved.is_relative_to(root.resolve()):
        raise UserError(f"{bj}: {what} = {rel!r} is outside the bundle folder {root}: every file of a bundle must "
                        "be inside it; re-export the bundle")
    return root / p


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle folder; with ``verify``, check every listed file's size and SHA-256 (``UserError`` naming the
    file when one is missing or altered). Field types are checked, and every path bundle.json names must stay
    inside the bundle folder."""
    root = Path(path)
    if root.is_file() and root.name == "bundle.json":
        root = root.parent
    if not root.is_dir():
        raise UserError(f"--models {root}: not a folder (give the folder written by `morphfuse export`)")
    bj = root / "bundle.json"
    if not bj.is_file():
        raise UserError(f"{bj}: missing: {root} is not a morphfuse model bundle (run `morphfuse export`)")
    try:
        raw = bj.read_bytes()
        meta = json.loads(raw)
    except (OSError, ValueError) as e:
        raise UserError(f"{bj}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{bj}: not a morphfuse bundle description (no 'format': '{BUNDLE_FORMAT}')")
    if meta.get("format_version") != BUNDLE_VERSION:
        raise UserError(f"{bj}: bundle format version {meta.get('format_version')} is not supported by morphfuse "
                        f"{__version__} (expected {BUNDLE_VERSION})")
    for key in ("models", "files", "fusion", "faces", "crops", "score_rules", "config"):
        if key not in meta:
            raise UserError(f"{bj}: lacks '{key}'")
    _check_bundle_meta(meta, bj)
    files = meta["files"]
    for name in MODEL_NAMES:
        if name not in meta["models"]:
            raise UserError(f"{bj}: lacks the {name} model")
        _inside(root, meta["models"][name]["file"], f"models.{name}.file", bj)
        if meta["models"][name]["file"] not in files:
            raise UserError(f"{bj}: the {name} model file {meta['models'][name]['file']} has no hash")
    _inside(root, meta["config"].get("file", "config.yaml"), "config.file", bj)
    for rel in files:
        _inside(root, rel, f"files[{rel!r}]", bj)
    if verify:
        for rel, info in files.items():
            p = root / rel
            if not p.is_file():
                raise UserError(f"{p}: missing from the bundle (bundle.json lists it); re-export or copy the whole "
                                "folder")
            if p.stat().st_size != info.get("bytes"):
                raise UserError(f"{p}: {p.stat().st_size} bytes but bundle.json says {info.get('bytes')}: the file "
                                "was altered or truncated; re-export or copy the bundle again")
            if sha256_file(p) != info.get("sha256"):
                raise UserError(f"{p}: SHA-256 does not match bundle.json: the file was altered or corrupted; "
                                "re-export or copy the bundle again")
    cfg_file = root / meta["config"].get("file", "config.yaml")
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{cfg_file}: cannot read the bundle's config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_file}: the bundle's config is not a mapping of settings")
    return Bundle(root, meta, cfg, hashlib.sha256(raw).hexdigest())
