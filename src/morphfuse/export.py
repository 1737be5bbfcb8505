"""Bundle the trained LFDL and MITL models, their config and a model card into one portable folder.

  morphfuse export --lfdl results/demo/models/lfdl/model.pt --mitl results/demo/models/mitl/model.pt \\
      --config config.yaml --out results/demo/bundle [--tables results/demo/tables] \\
      [--manifest results/demo/manifest/manifest.parquet]

The bundle is a plain folder (copy it, or ``tar czf bundle.tgz -C results/demo bundle``, to move it):

  bundle.json    format version, morphfuse version, git commit, the two models (file, name, size, options,
                 training steps, parameters), fusion (default variant, kernel, threshold), face backend and its
                 options, crop rules, score rules, and the SHA-256 and size of every other file
  lfdl.safetensors  the LFDL weights (the state dict of model.pt) in the safetensors format: tensors only, no
                 pickle, so loading a bundle runs no code from it; the network's name, size, options and training
                 summary are in bundle.json (``models.lfdl``); never optimizer state (a training checkpoint
                 given instead is reduced to its weights)
  mitl.safetensors  the same for MITL
  config.yaml    the effective (validated) config
  MODEL_CARD.md  what the models are, the training data, the metrics, intended use and limitations, attribution
  metrics/       ablation.md (+ ablation.csv) copied from --tables, when given

``morphfuse detect --models BUNDLE`` (and ``morphfuse.Detector.from_bundle``) loads it with :func:`load_bundle`,
which checks every file's size and SHA-256 against bundle.json first and names the file that is missing or
altered. Bundles of earlier versions, whose models are ``lfdl.pt`` / ``mitl.pt`` records, still load (with
``torch.load(weights_only=True)``). Only files export writes are in the folder: no workflow bookkeeping (the
workflow's export rule names ``bundle/bundle.json`` as its output, not the folder, so Snakemake puts no
timestamp file in it). The bundle is assembled in a
temporary folder beside ``--out`` and renamed into place, so a killed export never leaves half a bundle; an
existing bundle at ``--out`` is replaced, any other existing non-empty folder is refused.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import config_hash, load_stage_config
from .errors import UserError

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "morphfuse-bundle"
BUNDLE_VERSION = 1
MODEL_NAMES = ("lfdl", "mitl")
DEFAULT_VARIANT = "mdmf"
FAKE_THRESHOLD = 0.5  # image score >= this: reported as fake

PAPER = ("Shuai et al. (2025). Morphology-optimized Multi-Scale Fusion: Combining Local Artifacts and Mesoscopic "
         "Semantics for Deepfake Detection and Localization. 3rd place, image track of the IJCAI 2025 Deepfake "
         "Detection and Localization challenge (DDL-I).")
LONDON_ATTRIBUTION = (
    "Demo photos: DeBruine, L., & Jones, B. (2017). Face Research Lab London Set (Version 5). figshare. "
    "https://doi.org/10.6084/m9.figshare.5047666.v5 - licensed CC BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/). The photos were downscaled (Lanczos), re-encoded and altered "
    "into forgeries to train these models. The `lisa/` and `zoom/` series are CC0.")
LFDL_SCORE_RULE = "release: mean of the face scores >= 0.5 if any, else the mean of all face scores"


# ------------------------------------------------------------------------------------------------ hashing
from .imageio import sha256_file  # noqa: E402,F401  (one owner: imageio; re-exported for bundle checks)


def file_table(root: Path) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "bytes"}}`` of every file under ``root`` except bundle.json."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "bundle.json":
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


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


def uses_london_set(cfg: dict) -> bool:
    """Whether a configured source is the Face Research Lab London Set (the demo photos)."""
    from .config import resolve_path

    for src in cfg.get("sources") or []:
        text = f"{src.get('name', '')} {src.get('root', '')}".lower()
        if "london" in text:
            return True
        try:
            root = resolve_path(src.get("root", ""))
            if (root / "neutral_front").is_dir() or (root / "smiling_front").is_dir():
                return True
        except (OSError, ValueError):
            continue
    return False


# ------------------------------------------------------------------------------------------------- models
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


# ------------------------------------------------------------------------------------------ training data
def manifest_summary(path: str | os.PathLike) -> dict:
    """Counts of the manifest: images per split × method, sources, identities per split, and whether the split is
    identity-disjoint (no ``group`` in two splits)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--manifest {p}: file does not exist")
    try:
        df = pd.read_parquet(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"--manifest {p}: not a readable Parquet manifest ({type(e).__name__}: {e})") from None
    missing = [c for c in ("split", "method", "label") if c not in df.columns]
    if missing:
        raise UserError(f"--manifest {p}: lacks column(s) {', '.join(missing)}")
    counts = pd.crosstab(df["method"].astype(str), df["split"].astype(str))
    out: dict[str, Any] = {
        "images": int(len(df)),
        "real": int((df["label"] == 0).sum()), "fake": int((df["label"] == 1).sum()),
        "by_method_split": {m: {s: int(v) for s, v in row.items()} for m, row in counts.iterrows()},
        "by_split": {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()},
        "sources": sorted(df["source"].astype(str).unique().tolist()) if "source" in df.columns else [],
    }
    if "group" in df.columns:
        real = df[df["label"] == 0] if (df["label"] == 0).any() else df
        groups = {str(s): set(g["group"].astype(str)) for s, g in real.groupby("split")}
        out["identities_by_split"] = {s: len(g) for s, g in sorted(groups.items())}
        splits = sorted(groups)
        shared = set()
        for i, a in enumerate(splits):
            for b in splits[i + 1:]:
                shared |= groups[a] & groups[b]
        out["identity_disjoint"] = not shared
        out["identities_in_two_splits"] = len(shared)
    return out


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- model card
def model_card(meta: dict, cfg: dict, data: dict | None, ablation_md: str | None, london: bool) -> str:
    lf, mt = meta["models"]["lfdl"], meta["models"]["mitl"]
    fu, fa, cr, sc = meta["fusion"], meta["faces"], meta["crops"], meta["score_rules"]
    paper_sizes = {"lfdl": 299, "mitl": 512}
    small = [m for m in MODEL_NAMES if meta["models"][m]["size"] < paper_sizes[m]]

    def train_line(e: dict) -> str:
        t = e.get("train") or {}
        parts = [f"size {e['size']}", f"{e.get('step')} optimizer steps", f"{e.get('epoch')} epoch(s) done"]
        if t:
            parts.append(f"batch {t.get('batch_size')}, lr {t.get('lr')}, {t.get('epochs')} epoch(s) planned")
        if e.get("n_parameters"):
            parts.append(f"{e['n_parameters'] / 1e6:.2f} M parameters")
        parts.append("training finished" if e.get("finished") else "**training did not finish**")
        return "; ".join(parts)

    L = ["# Model card: morphfuse LFDL + MITL (fused by MDMF)", "",
         f"Bundle format {meta['format_version']}, morphfuse {meta['morphfuse_version']}, created "
         f"{meta['created']}" + (f", git {meta['git']['commit'][:12]}{' (dirty tree)' if meta['git']['dirty'] else ''}"
                                 if meta.get("git") else "") + f", config hash `{meta['config']['hash']}`.", "",
         "## What the models are", "",
         f"A reimplementation of {PAPER}", "",
         f"- **LFDL** (local facial forgery detection and localization): a two-stream (RGB + SRM residual) Xception "
         f"network applied to each detected face crop; it gives a face score and a patch-level mask. "
         f"{train_line(lf)}.",
         f"- **MITL** (Mesorch, whole image): DCT high/low bands, ConvNeXt-Tiny + SegFormer (MiT-B3) encoders, eight "
         f"per-scale masks with adaptive weighting; it gives a full-image mask. {train_line(mt)}.",
         f"- **MDMF** (morphology-driven mask fusion): both masks binarised at p >= {fu['threshold']}, then "
         f"`dilate(M_LFDL) ∪ erode(M_MITL)` with a {fu['kernel']}×{fu['kernel']} square (default variant "
         f"`{fu['variant']}`; also {', '.join(v for v in fu['variants'] if v != fu['variant'])}).",
         f"- Image score: the LFDL score ({sc['lfdl']}); an image is called fake when its score >= "
         f"{sc['fake_threshold']}. MITL's own score ({sc['mitl']['rule']}, {sc['mitl']['percent']} %) is reported "
         "beside it." + (" Both thresholds were fitted on the val split (`bundle.json`: `thresholds`)."
                         if meta.get("thresholds", {}).get("source") == "val" else ""),
         f"- Faces: `{fa['backend']}` backend ({', '.join(f'{k}={v}' for k, v in fa['options'].items())}); crops: "
         + (f"the 5-landmark box widened by {cr.get('expand', 1.5)}× its height left/right and its width above/"
            f"below (the release's rule; faces without landmarks: the detector box ×{cr['margin']})"
            if cr.get("rule", "margin") == "release" else f"the detector box ×{cr['margin']}")
         + f", the whole image when no face is found or a face box covers more than {cr['max_face_area_fraction']}"
         " of it.", "",
         "## Training data", ""]
    sources = cfg.get("sources") or []
    if sources:
        L += ["Sources (config): " + "; ".join(f"`{s.get('name')}` ({s.get('kind')}, {s.get('root')})"
                                             for s in sources) + ".",
              "Forgery methods: " + ", ".join(f"`{m}`" for m in (cfg.get("forge") or {}).get("methods", [])) + ".", ""]
    L.append("The split is identity-disjoint: it is decided on the identities of the real images, and every "
             "forgery takes the split of the people it was made from, so no person is in two splits.")
    if data:
        L += ["", f"From the manifest: {data['images']} images ({data['real']} real, {data['fake']} fake)."]
        splits = sorted({s for row in data["by_method_split"].values() for s in row})
        rows = [[m] + [row.get(s, 0) for s in splits] + [sum(row.values())]
                for m, row in sorted(data["by_method_split"].items())]
        rows.append(["**all**"] + [data["by_split"].get(s, 0) for s in splits] + [data["images"]])
        L += ["", _md_table(["method"] + splits + ["all"], rows)]
        if "identities_by_split" in data:
            L += ["", "Identities (real images) per split: " + ", ".join(
                f"{s} {n}" for s, n in data["identities_by_split"].items()) + ". Checked: " +
                ("no identity is in two splits." if data["identity_disjoint"] else
                 f"**{data['identities_in_two_splits']} identities are in two splits**.")]
    else:
        L += ["", "Counts per split and method: not recorded (export with `--manifest` to include them)."]
    L += ["", "## Metrics", ""]
    if ablation_md:
        L += ["The ablation table of the run that trained these models (copied from `metrics/ablation.md`):", "",
              ablation_md.strip()]
    else:
        L += ["Not recorded (export with `--tables` to include the ablation table)."]
    L += ["", "## Intended use", "",
          "Research on face-forgery detection and localization, and triage by analysts: `morphfuse detect` gives "
          "each image a score and a mask of the pixels the models consider manipulated. A score is evidence to "
          "be weighed with other evidence, not a verdict about a person or an image.", "",
          "## Limitations", ""]
    if small:
        L.append(f"- **These are not the paper's models.** They were trained at {lf['size']} px (LFDL) and "
                 f"{mt['size']} px (MITL) instead of the paper's 299 and 512 (30 epochs on DDL-I, 8 GPUs), with the "
                 "training and data listed above: a small demonstration of the workflow (the demo config trains "
                 "for minutes on a CPU). Their scores and masks show how the pipeline works; they are not fit for "
                 "deciding whether an image is manipulated.")
    else:
        L.append("- Trained on the data listed above only; the paper's numbers were obtained on DDL-I with 8 GPUs "
                 "for 30 epochs. Check the metrics above before relying on these models.")
    L += ["- Forgeries unlike the training methods (other generators, heavy compression, resizing, screenshots) "
          "may be missed; real images unlike the training photos may be flagged.",
          "- LFDL looks at detected faces only; with no face found it looks at the whole image at low resolution.",
          "- Face detection can fail on small, profile or occluded faces, which then get the whole-image crop.",
          "- The fused mask is binary at the threshold above; the probability maps beside it show uncertainty.", ""]
    if london:
        L += ["## Attribution", "", LONDON_ATTRIBUTION,
              "Any output that redistributes these photos or forgeries made from them must keep this attribution.",
              ""]
    L += ["## Files", "", _md_table(["file", "bytes", "sha256"],
                                    [[f"`{k}`", v["bytes"], f"`{v['sha256']}`"] for k, v in meta["files"].items()
                                     if k != "MODEL_CARD.md"]),
          "", "`bundle.json` holds these hashes (and that of this card); `morphfuse detect` checks them all before "
          "use.", "", "## How to use", "",
          "```bash", "morphfuse detect photo.jpg more_photos/ --models BUNDLE_DIR --out detections/", "```", ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------- export
def export_bundle(lfdl: str | os.PathLike, mitl: str | os.PathLike, config: str | os.PathLike,
                  out: str | os.PathLike, tables: str | os.PathLike | None = None,
                  manifest: str | os.PathLike | None = None, check: bool = True,
                  thresholds: str | os.PathLike | None = None) -> dict:
    """Write the bundle folder ``out`` (see the module docstring); returns bundle.json's content."""
    from .provenance import git_info

    cfg = load_stage_config(config)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _looks_like_bundle(out))):
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
        london = uses_london_set(cfg)
        meta = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "morphfuse_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git": git_info(),
            "models": models,
            "fusion": fusion_settings(cfg), "faces": face_settings(cfg), "crops": crop_settings(cfg),
            "score_rules": score_rules(cfg),
            "config": {"file": "config.yaml", "hash": config_hash(cfg)},
            "training_data": data, "attribution": LONDON_ATTRIBUTION if london else None,
            "files": file_table(tmp),
        }
        from .thresholds import bundle_thresholds

        bundle_thresholds(meta, thresholds)  # meta["thresholds"]; fitted on val: fusion and score thresholds too
        card = tmp / "MODEL_CARD.md"
        card.write_text(model_card(meta, cfg, data, ablation_md.read_text() if ablation_md else None, london))
        meta["files"]["MODEL_CARD.md"] = {"sha256": sha256_file(card), "bytes": card.stat().st_size}
        meta["files"] = dict(sorted(meta["files"].items()))
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
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


def _looks_like_bundle(folder: Path) -> bool:
    """An earlier bundle (replaced by export): its bundle.json, or its model card and config when bundle.json
    was removed (Snakemake removes a rule's output file, bundle.json, before rerunning export)."""
    return (folder / "bundle.json").is_file() or ((folder / "MODEL_CARD.md").is_file()
                                                   and (folder / "config.yaml").is_file())


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


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
