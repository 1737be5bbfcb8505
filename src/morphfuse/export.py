"""``morphfuse export``: bundle a run's trained LFDL and MITL models, their config and a model card into one
portable folder (the format: :mod:`morphfuse.bundle`; the card: :mod:`morphfuse.model_card`).

  morphfuse export --lfdl results/demo/models/lfdl/model.pt --mitl results/demo/models/mitl/model.pt \\
      --config config.yaml --out results/demo/bundle [--tables results/demo/tables] \\
      [--manifest results/demo/manifest/manifest.parquet]

Copy the folder (or ``tar czf bundle.tgz -C results/demo bundle``) to move it. A training checkpoint given instead
of a model is reduced to its weights. Only files export writes are in the folder: no workflow bookkeeping (the
workflow's export rule names ``bundle/bundle.json`` as its output, not the folder, so Snakemake puts no timestamp
file in it). The bundle is assembled in a temporary folder beside ``--out`` and renamed into place, so a killed
export never leaves half a bundle; an existing bundle at ``--out`` is replaced, any other existing non-empty folder
is refused.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from . import __version__
from .attribution import source_attributions
from .bundle import BUNDLE_FORMAT, BUNDLE_VERSION, DEFAULT_VARIANT, FAKE_THRESHOLD, file_table, looks_like_bundle, \
    save_weights
from .config import config_hash, load_stage_config
from .errors import UserError
from .imageio import current_umask, sha256_file
from .model_card import manifest_summary, model_card

log = logging.getLogger(__name__)

LFDL_SCORE_RULE = "release: mean of the face scores >= 0.5 if any, else the mean of all face scores"


# ------------------------------------------------------------------------------------------ config → bundle
def face_settings(cfg: dict) -> dict:
    """The face backend and its options, as the workflow's faces and forge stages build them from the config's
    ``faces:`` block (:func:`morphfuse.faces.backends.options_from_config`)."""
    from .faces.backends import options_from_config

    name, opts = options_from_config(cfg["faces"])
    return {"backend": name, "options": opts}


def crop_settings(cfg: dict) -> dict:
    c = cfg["crops"]
    return {"rule": str(c["rule"]), "expand": float(c["expand"]), "margin": float(c["margin"]),
            "max_face_area_fraction": float(c["max_face_area_fraction"])}


def score_rules(cfg: dict) -> dict:
    s = cfg["mitl"]["score"]
    return {"image_score": "lfdl", "lfdl": LFDL_SCORE_RULE,
            "mitl": {"rule": str(s["rule"]), "percent": float(s["percent"]),
                     "computed_on": "stored values v/255 of the full-size mask"},
            "fake_threshold": FAKE_THRESHOLD}


def fusion_settings(cfg: dict) -> dict:
    from .fusion import VARIANTS

    f = cfg["fusion"]
    return {"variant": DEFAULT_VARIANT, "variants": list(VARIANTS), "kernel": int(f["kernel"]),
            "threshold": float(f["threshold"])}


def _model_entry(name: str, src: Path, dest: Path, cfg: dict, check: bool) -> dict:
    """Write one model's weights into the bundle (safetensors); return its bundle.json entry."""
    from .training import checkpoint as ckpt
    from .training import engine

    # load_model_file gives a model record (weights, options, training summary) also for a training checkpoint,
    # whose optimizer, scheduler and RNG states are left out: the bundle only ever holds the weights.
    rec = ckpt.load_model_file(src, name)
    if not rec.get("finished", True):
        log.warning("%s: this %s model stopped before the end of its training (step %s)", src, name, rec.get("step"))
    save_weights(rec["state_dict"], dest, rec["model_name"], rec["size"])
    n_params = None
    if check:
        model = ckpt.build_from_record(rec, src)
        n_params = int(sum(p.numel() for p in model.parameters()))
        del model
    matches = None
    try:
        settings = engine.Settings.from_config(name, cfg)
        matches = rec.get("config_hash") == engine.config_digest(name, cfg, settings)
    except (UserError, KeyError, TypeError):
        pass
    if matches is False:
        log.warning("%s: this %s model was trained with another %s block than the one in --config; bundle.json "
                    "records config_matches: false", src, name, name)
    return {
        "file": dest.name, "model_name": rec["model_name"], "size": int(rec["size"]),
        "options": rec.get("options") or {}, "config_hash": rec.get("config_hash"), "config_matches": matches,
        "train": rec.get("train"), "step": rec.get("step"), "epoch": rec.get("epoch"),
        "finished": bool(rec.get("finished", False)), "torch_version": rec.get("torch_version"),
        "n_parameters": n_params, "source": str(Path(src).resolve()),
        "selected": rec.get("selected"),  # model_best.pt: the val epoch it was chosen from (None: the last model)
    }


# ------------------------------------------------------------------------------------------------- export
def export_bundle(lfdl: str | os.PathLike, mitl: str | os.PathLike, config: str | os.PathLike,
                  out: str | os.PathLike, tables: str | os.PathLike | None = None,
                  manifest: str | os.PathLike | None = None, check: bool = True,
                  thresholds: str | os.PathLike | None = None) -> dict:
    """Write the bundle folder ``out`` (see the module docstring); returns bundle.json's content."""
    from .provenance import git_info

    cfg = load_stage_config(config)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not looks_like_bundle(out))):
        raise UserError(f"--out {out}: exists and is not a morphfuse bundle; choose another folder or remove it")
    ablation_md = ablation_csv = None
    if tables is not None:
        t = Path(tables)
        if not (t / "ablation.md").is_file():
            raise UserError(f"--tables {t}: no ablation.md in it (give the run's tables/ folder)")
        ablation_md = t / "ablation.md"
        ablation_csv = t / "ablation.csv" if (t / "ablation.csv").is_file() else None
    data = manifest_summary(manifest) if manifest is not None else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        models = {name: _model_entry(name, Path(src), tmp / f"{name}.safetensors", cfg, check)
                  for name, src in (("lfdl", lfdl), ("mitl", mitl))}
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        if ablation_md is not None:
            (tmp / "metrics").mkdir()
            shutil.copyfile(ablation_md, tmp / "metrics" / "ablation.md")
            if ablation_csv is not None:
                shutil.copyfile(ablation_csv, tmp / "metrics" / "ablation.csv")
        meta = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "morphfuse_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git": git_info(),
            "models": models,
            "fusion": fusion_settings(cfg), "faces": face_settings(cfg), "crops": crop_settings(cfg),
            "score_rules": score_rules(cfg),
            "config": {"file": "config.yaml", "hash": config_hash(cfg)},
            "training_data": data, "attribution": source_attributions(cfg) or None,
            "files": file_table(tmp),
        }
        from .thresholds import bundle_thresholds

        bundle_thresholds(meta, thresholds)  # meta["thresholds"]; fitted on val: fusion and score thresholds too
        card = tmp / "MODEL_CARD.md"
        card.write_text(model_card(meta, cfg, data, ablation_md.read_text() if ablation_md else None))
        meta["files"]["MODEL_CARD.md"] = {"sha256": sha256_file(card), "bytes": card.stat().st_size}
        meta["files"] = dict(sorted(meta["files"].items()))
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~current_umask())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lfdl", required=True, metavar="MODEL.pt", help="trained LFDL model (models/lfdl/model.pt)")
    p.add_argument("--mitl", required=True, metavar="MODEL.pt", help="trained MITL model (models/mitl/model.pt)")
    p.add_argument("--config", required=True, help="the config.yaml the models were trained with")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle folder to write (replaced if it is "
                   "already a bundle)")
    p.add_argument("--tables", default=None, metavar="DIR",
                   help="the run's tables/ folder: its ablation.md goes into the bundle and the model card")
    p.add_argument("--manifest", default=None, metavar="manifest.parquet",
                   help="the run's manifest: counts per split and method go into the model card")
    p.add_argument("--thresholds", default=None, metavar="JSON",
                   help="thresholds fitted on val (`morphfuse thresholds`): the bundle's mask and score thresholds "
                        "(detect uses them); without it, the config's")
    p.add_argument("--no-check", action="store_true",
                   help="do not rebuild the networks to check that the weights load (faster)")


def run(args: argparse.Namespace) -> int:
    meta = export_bundle(args.lfdl, args.mitl, args.config, args.out, tables=args.tables, manifest=args.manifest,
                         check=not args.no_check, thresholds=args.thresholds)
    total = sum(v["bytes"] for v in meta["files"].values())
    log.info("bundle: %d files, %.1f MB -> %s (MODEL_CARD.md, bundle.json)", len(meta["files"]), total / 1e6,
             args.out)
    return 0
