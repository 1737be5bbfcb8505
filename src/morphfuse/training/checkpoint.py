"""Checkpoints and final model files: plain dicts of tensors and primitives, loadable with ``weights_only=True``.

Training checkpoint (``OUT/checkpoints/last.pt``)::

    {"format": "morphfuse-checkpoint", "version": 1, "model_name", "size", "options", "config_hash",
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
     "step", "epoch", "batch_in_epoch",             # optimizer steps done; epoch; micro-batches done in it
     "world_size", "data": {"n", "fingerprint", "seed"},
     "order": {"epoch", "indices": int32 (world, m)},   # every rank's sample order of the current epoch
     "rng": [per rank: {"torch": ByteTensor, "cuda": ByteTensor | None, "numpy": {...}, "python": [...]}],
     "torch_version"}

Final model (``OUT/model.pt``)::

    {"format": "morphfuse-model", "version": 1, "model_name", "size", "options", "config_hash",
     "state_dict", "train": {settings}, "step", "epoch", "finished", "torch_version"}

Writes are atomic (temporary file + rename): a job killed while saving leaves the previous file intact.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..imageio import atomic_path

CHECKPOINT_FORMAT = "morphfuse-checkpoint"
MODEL_FORMAT = "morphfuse-model"
VERSION = 1


# -------------------------------------------------------------------------------------------- RNG states
def capture_rng(device: torch.device | None = None) -> dict:
    """The global RNG states (torch CPU, CUDA of ``device``, numpy legacy, python) as tensors and lists."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }


def restore_rng(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------------------------- saving
def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def model_record(model_name: str, size: int, options: dict, config_hash: str, state_dict: dict, **extra) -> dict:
    return {"format": MODEL_FORMAT, "version": VERSION, "model_name": model_name, "size": int(size),
            "options": options, "config_hash": config_hash, "state_dict": state_dict,
            "torch_version": str(torch.__version__), **extra}


# ------------------------------------------------------------------------------------------------ loading
def _load(path: Path, what: str) -> dict:
    if not path.exists():
        raise UserError(f"{path}: {what} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: {what} is empty (0 bytes), probably a job killed while writing it; delete it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds (UnpicklingError, RuntimeError, struct.error, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in str(e).lower() and "unsupported global" in str(e).lower():
            raise UserError(f"{path}: {what} holds objects other than tensors and plain containers, refused by "
                            f"weights_only loading ({first})") from None
        raise UserError(f"{path}: {what} is corrupt or truncated and cannot be read ({first}); delete it "
                        f"(training: or run with --resume never)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {what} is not a morphfuse file (a {type(obj).__name__}, not a dict)")
    return obj


def _check_identity(path: Path, obj: dict, what: str, model_name: str | None, size: int | None,
                    options: dict | None) -> None:
    got_name, got_size = obj.get("model_name"), obj.get("size")
    if model_name is not None and got_name != model_name:
        raise UserError(f"{path}: {what} is for model '{got_name}' but this run uses '{model_name}'; point it at the "
                        f"{model_name} output folder or delete the file")
    if size is not None and got_size != size:
        raise UserError(f"{path}: {what} is for {got_name} at size {got_size} but this run uses size {size}; "
                        f"delete it (or run with --resume never) to train at the new size")
    if options is not None and obj.get("options") != options:
        got = obj.get("options") or {}
        diff = sorted(k for k in set(got) | set(options) if got.get(k) != options.get(k))
        raise UserError(f"{path}: {what} was made with other {got_name} model options ({', '.join(diff)} differ); "
                        f"delete it (or run with --resume never) to train with the new options")


def load_checkpoint(path: str | os.PathLike, model_name: str | None = None, size: int | None = None,
                    options: dict | None = None) -> dict:
    """Read a training checkpoint and check that it belongs to this model, size and options."""
    path = Path(path)
    obj = _load(path, "checkpoint")
    if obj.get("format") != CHECKPOINT_FORMAT:
        hint = " (it is a final model file, not a training checkpoint)" if obj.get("format") == MODEL_FORMAT else ""
        raise UserError(f"{path}: not a morphfuse training checkpoint{hint}")
    if obj.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint format version {obj.get('version')} is not supported (expected {VERSION})")
    for k in ("model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng"):
        if k not in obj:
            raise UserError(f"{path}: checkpoint lacks '{k}' (incomplete or from another tool); delete it")
    _check_identity(path, obj, "checkpoint", model_name, size, options)
    return obj


def load_model_file(path: str | os.PathLike, model_name: str | None = None) -> dict:
    """Read a final ``model.pt`` (or, for convenience, a training checkpoint) as a model record:
    ``model_name``, ``size``, ``options``, ``config_hash``, ``state_dict``."""
    path = Path(path)
    obj = _load(path, "model file")
    fmt = obj.get("format")
    if fmt == CHECKPOINT_FORMAT:
        obj = model_record(obj["model_name"], obj["size"], obj.get("options", {}), obj.get("config_hash", ""),
                           obj["model"], step=obj.get("step"), epoch=obj.get("epoch"), finished=False)
    elif fmt != MODEL_FORMAT:
        raise UserError(f"{path}: not a morphfuse model file (no 'format': '{MODEL_FORMAT}' entry)")
    for k in ("model_name", "size", "state_dict"):
        if k not in obj:
            raise UserError(f"{path}: model file lacks '{k}'")
    _check_identity(path, obj, "model file", model_name, None, None)
    return obj


def build_from_record(record: dict, path: str | os.PathLike = "", factory=None) -> torch.nn.Module:
    """Build the network of a model record and load its weights (strictly)."""
    if factory is None:
        from ..models import build_model as factory
    model = factory(record["model_name"], int(record["size"]), without_pretrained(record.get("options") or {}))
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit the {record['model_name']} network built from its own options "
                        f"({first}); was it written by another morphfuse version?") from None
    return model


def _meta_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the tensors of ``model`` still on the meta device (parameters, buffers, tensor attributes)."""
    out = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    for mod_name, mod in model.named_modules():
        out += [f"{mod_name}.{k}" for k, v in vars(mod).items() if isinstance(v, torch.Tensor) and v.is_meta]
    return out


def build_for_inference(record: dict, path: str | os.PathLike = "", factory=None) -> torch.nn.Module:
    """:func:`build_from_record` without the random initialisation that the file's weights replace anyway: the
    network is built on the meta device and takes the record's tensors (``load_state_dict(assign=True)``). A
    network whose construction needs real tensors, or that keeps a tensor the state dict does not hold, is built
    the ordinary way instead (same result, slower start)."""
    if factory is None:
        from ..models import build_model as factory
    try:
        with torch.device("meta"):
            model = factory(record["model_name"], int(record["size"]),
                            without_pretrained(record.get("options") or {}))
        model.load_state_dict(record["state_dict"], strict=True, assign=True)
        if not _meta_tensors(model):
            return model
    except Exception:  # noqa: BLE001 - any failure: the ordinary build says what is wrong, if anything
        pass
    return build_from_record(record, path, factory)


def without_pretrained(options: dict) -> dict:
    """Options for rebuilding a trained network: its weights come from the file, so pretrained backbones are not
    loaded again (their files need not exist where the model is used)."""
    o = dict(options)
    if "pretrained" in o:
        o["pretrained"] = {k: None for k in o["pretrained"]} if isinstance(o["pretrained"], dict) else None
    if "pretrained_hub" in o:
        o["pretrained_hub"] = False
    return o


def resolve_factory(spec: str | None):
    """``"module:callable"`` → the callable (``(name, size, options) -> nn.Module``); None → build_model."""
    if not spec:
        from ..models import build_model
        return build_model
    import importlib

    mod, _, attr = spec.partition(":")
    if not attr:
        raise UserError(f"--model-factory {spec!r}: expected MODULE:CALLABLE")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--model-factory {spec!r}: cannot import it ({e})") from None


def primitive(obj: Any) -> Any:
    """Config values as plain containers (tuples → lists), so that they survive weights_only loading."""
    if isinstance(obj, dict):
        return {str(k): primitive(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [primitive(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
