"""The two networks behind one builder: ``build_model(name, size, options)``.

Model modules are imported lazily, so importing ``morphfuse.models`` costs nothing and a missing optional dependency
of one model (transformers for MITL) does not affect the other.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import UserError

# name → (module, class); each class follows the protocol of docs/CONTRACTS.md: Class(size, **options)
MODELS: dict[str, tuple[str, str]] = {
    "lfdl": ("morphfuse.models.lfdl", "LFDL"),
    "mitl": ("morphfuse.models.mitl", "MITL"),
}
# keys of a config model block that belong to the workflow, not to the network
# Keys of a model's config block that configure the workflow, not the network (the one list of them).
NON_MODEL_KEYS = frozenset({"size", "train", "gpus", "threads", "paper"})


def model_module(name: str):
    """The module that defines model ``name`` (imported on first use)."""
    if name not in MODELS:
        raise UserError(f"model {name!r} is unknown; expected one of {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name][0])


def build_model(name: str, size: int, options: dict[str, Any] | None = None):
    """Build model ``name`` for ``size``×``size`` inputs from a config block (``size``, ``train``, ``gpus`` and
    ``paper`` are dropped; the ``size`` argument wins). Returns an ``nn.Module`` with forward / loss / predict_proba.
    """
    cls = getattr(model_module(name), MODELS[name][1])
    opts = {k: v for k, v in (options or {}).items() if k not in NON_MODEL_KEYS}
    return cls(int(size), **opts)


__all__ = ["MODELS", "NON_MODEL_KEYS", "build_model", "model_module"]
