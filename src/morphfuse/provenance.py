"""Provenance of a run: what produced the results, on what, and when (``provenance.json``).

:func:`write_provenance` records
- ``config`` (the effective config) and ``config_hash`` (:func:`morphfuse.config.config_hash`);
- ``morphfuse_version``, and ``git`` (``commit``, ``dirty``: uncommitted changes to tracked or untracked files,
  ``repo``) of the repository the package runs from, or ``null`` when it is not a git checkout or git is missing;
- ``packages``: versions of the key packages (``null`` when not installed; ``package_distributions`` names the
  distribution found where several provide the package, e.g. ``opencv-python-headless``, ``dlib-bin``) and
  ``python``;
- ``seeds``: as given, or else every seed the config sets (``seed``, ``split.seed``, ``<model>.train.seed``);
- ``machine``: platform, CPU count, memory (bytes), GPU names (``torch.cuda``; empty without CUDA);
- ``started`` / ``ended`` (ISO 8601 UTC, or ``null``) and ``duration_s``; ``command`` (this process's argv).
The file is written atomically (temporary file + rename).

CLI (``morphfuse provenance``): ``--config CFG --out FILE [--started-from FILE]``: the start time is the
modification time of ``--started-from`` (e.g. the first output of the run), the end time is now.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import config_hash, load_stage_config
from .errors import UserError
from .imageio import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when run from one (git_info copes otherwise)

FORMAT = "morphfuse-provenance"
FORMAT_VERSION = 1

# package key -> distributions that provide it, first found wins
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "transformers": ("transformers",),
    "diffusers": ("diffusers",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"),
    "numpy": ("numpy",),
    "pandas": ("pandas",),
    "scikit-learn": ("scikit-learn",),
    "snakemake": ("snakemake",),
    "dlib": ("dlib", "dlib-bin"),
    "facenet-pytorch": ("facenet-pytorch",),
    "face-alignment": ("face-alignment", "face_alignment"),
}

FIELDS = ("format", "format_version", "config", "config_hash", "morphfuse_version", "git", "packages",
          "package_distributions", "python", "seeds", "machine", "started", "ended", "duration_s", "command")


def iso_utc(t: float | None) -> str | None:
    """A POSIX time as ISO 8601 UTC (``2025-06-01T12:00:00.123456+00:00``); None stays None."""
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(float(t), tz=_dt.timezone.utc).isoformat()


def git_info(repo: str | os.PathLike | None = None, timeout: float = 10.0) -> dict | None:
    """``{"commit", "dirty", "repo"}`` of the git checkout at ``repo`` (default: the package's repository), or
    None when it is not one (installed package, no git binary, git error)."""
    repo = Path(repo) if repo is not None else REPO_ROOT

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout,
                              check=True).stdout

    try:
        top = git("rev-parse", "--show-toplevel").strip()
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty, "repo": top}


def package_versions() -> tuple[dict[str, str | None], dict[str, str | None]]:
    """``(versions, distributions)``: version and distribution name per key of :data:`PACKAGES` (None if absent)."""
    versions: dict[str, str | None] = {}
    dists: dict[str, str | None] = {}
    for key, names in PACKAGES.items():
        versions[key] = dists[key] = None
        for name in names:
            try:
                versions[key] = md.version(name)
            except md.PackageNotFoundError:
                continue
            dists[key] = name
            break
    return versions, dists


def _memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken driver must not stop a provenance record
        return []


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {"platform": platform.platform(), "machine": platform.machine(), "node": platform.node(),
            "cpu_count": os.cpu_count(), "cpu_count_usable": usable, "memory_bytes": _memory_bytes(),
            "gpus": _gpus()}


def config_seeds(cfg: dict) -> dict[str, Any]:
    """Every seed the config sets: ``seed``, ``split.seed``, ``lfdl.train.seed``, ``mitl.train.seed`` (the last
    two default to ``seed``, as in the training engine)."""
    seeds: dict[str, Any] = {}
    if "seed" in cfg:
        seeds["seed"] = cfg["seed"]
    split = cfg.get("split") or {}
    if isinstance(split, dict) and "seed" in split:
        seeds["split.seed"] = split["seed"]
    for model in ("lfdl", "mitl"):
        train = (cfg.get(model) or {}).get("train") if isinstance(cfg.get(model), dict) else None
        if isinstance(train, dict):
            own = train.get("seed")
            seeds[f"{model}.train.seed"] = own if own is not None else cfg.get("seed", 0)
    return seeds


def provenance(config: dict, started: float | None = None, ended: float | None = None,
               seeds: dict | None = None) -> dict:
    """The provenance record (see the module docstring) as a JSON-able dict."""
    versions, dists = package_versions()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "config_hash": config_hash(config),
        "morphfuse_version": __version__,
        "git": git_info(),
        "packages": versions,
        "package_distributions": dists,
        "python": platform.python_version(),
        "seeds": dict(seeds) if seeds is not None else config_seeds(config),
        "machine": machine_info(),
        "started": iso_utc(started),
        "ended": iso_utc(ended),
        "duration_s": (float(ended) - float(started)) if started is not None and ended is not None else None,
        "command": shlex.join([os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
                               *sys.argv[1:]]),
    }


def write_provenance(path: str | os.PathLike, config: dict, started: float | None = None,
                     ended: float | None = None, seeds: dict | None = None) -> dict:
    """Write ``provenance.json`` atomically; returns the record."""
    rec = provenance(config, started, ended, seeds)
    write_text_atomic(path, json.dumps(rec, indent=2, sort_keys=False, default=str) + "\n")
    return rec


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run's config.yaml (validated; stored in full with its hash)")
    p.add_argument("--out", required=True, help="provenance JSON to write (atomically)")
    p.add_argument("--started-from", default=None, metavar="FILE",
                   help="take the start time from this file's modification time (e.g. the run's first output); "
                        "without it the start time is null. The end time is now.")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(args.config)
    started = None
    if args.started_from:
        p = Path(args.started_from)
        if not p.exists():
            raise UserError(f"--started-from {p}: file does not exist")
        started = p.stat().st_mtime
    rec = write_provenance(args.out, cfg, started=started, ended=time.time())
    git = rec["git"]
    print(f"provenance: config {rec['config_hash']}, morphfuse {rec['morphfuse_version']}, git "
          f"{(git['commit'][:12] + (' (dirty)' if git['dirty'] else '')) if git else 'n/a'} -> {args.out}",
          file=sys.stderr)
    return 0
