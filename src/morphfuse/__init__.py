"""morphfuse: LFDL + MITL fused by MDMF for face-forgery detection and localization.

The Python API (imported on first use, so ``import morphfuse`` stays cheap)::

    det = morphfuse.Detector.from_bundle("results/demo/bundle")   # a bundle written by `morphfuse export`
    r = det("photo.jpg")                                           # or an H×W×3 uint8 RGB numpy array
    print(r.score, r.fake, r.mask.shape, r.prob_lfdl.max(), r.faces)

See :class:`morphfuse.detect.Detector` and :class:`morphfuse.detect.Detection`.
"""
from __future__ import annotations

__version__ = "0.2.0"  # = pyproject.toml (tests/test_packaging.py)
__all__ = ["Detector", "Detection", "load_bundle", "__version__"]

_LAZY = {"Detector": "morphfuse.detect", "Detection": "morphfuse.detect", "load_bundle": "morphfuse.bundle"}


def __getattr__(name: str):
    """PEP 562: the API's names are imported from their modules when first used."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'morphfuse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
