"""The networks of the registry behind one builder: ``build_model(name, size, options)``; each one's training and
prediction recipe: ``recipe(name)`` (models/recipes.py).

Model modules are imported lazily, so importing ``morphfuse.models`` costs nothing and a missing optional dependency
of one model (transformers for MITL) does not affect the other.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import UserError
from .recipes import NOT_READ_BY_TRAINING, RECIPES, WORKFLOW_KEYS, Recipe, recipe

# name → (module, class) of each network of the registry (its recipe: models/recipes.py); each class follows the
# protocol of docs/CONTRACTS.md: Class(size, **options)
MODELS: dict[str, tuple[str, str]] = {
    "lfdl": ("morphfuse.models.lfdl", "LFDL"),
    "mitl": ("morphfuse.models.mitl", "MITL"),
}


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
    opts = {k: v for k, v in (options or {}).items() if k not in WORKFLOW_KEYS}
    return cls(int(size), **opts)


__all__ = ["MODELS", "NOT_READ_BY_TRAINING", "RECIPES", "WORKFLOW_KEYS", "Recipe", "build_model", "model_module",
           "recipe"]
