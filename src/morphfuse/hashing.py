"""Hashes of our own source code, used as Snakemake ``params`` so that editing a stage's code reruns that stage.

Snakemake notices changes to a rule's ``shell:`` text and ``params:``, not to the package a command imports
(CLUSTER.md, Reruns). Each rule therefore carries ``code=code_hash(<modules>)`` of exactly the modules it runs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def code_hash(*relpaths: str) -> str:
    """SHA-256 (first 16 hex digits) over the given package files or folders (relative to ``morphfuse/``)."""
    h = hashlib.sha256()
    for rel in sorted(relpaths):
        p = PACKAGE_ROOT / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"code_hash: {f} does not exist")
            h.update(str(f.relative_to(PACKAGE_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
