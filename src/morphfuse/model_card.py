"""The model card of a bundle (MODEL_CARD.md): what the models are, the training data, the metrics, intended
use, limitations and the photos' attribution (declared per source in the config: :mod:`morphfuse.attribution`)."""
from __future__ import annotations

import os
from typing import Any

from .attribution import attribution_text
from .bundle import MODEL_NAMES
from .textfmt import md_table

PAPER = ("Shuai et al. (2025). Morphology-optimized Multi-Scale Fusion: Combining Local Artifacts and Mesoscopic "
         "Semantics for Deepfake Detection and Localization. 3rd place, image track of the IJCAI 2025 Deepfake "
         "Detection and Localization challenge (DDL-I).")

# ------------------------------------------------------------------------------------------ training data
def manifest_summary(path: str | os.PathLike) -> dict:
    """Counts of the manifest: images per split × method, sources, identities per split, and whether the split is
    identity-disjoint (no ``group`` in two splits)."""
    import pandas as pd

    from .inputs import read_parquet_arg

    df = read_parquet_arg(path, "--manifest", ["split", "method", "label"])
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


# ---------------------------------------------------------------------------------------------- model card
def _train_line(e: dict) -> str:
    t = e.get("train") or {}
    parts = [f"size {e['size']}", f"{e.get('step')} optimizer steps", f"{e.get('epoch')} epoch(s) done"]
    if t:
        parts.append(f"batch {t.get('batch_size')}, lr {t.get('lr')}, {t.get('epochs')} epoch(s) planned")
    if e.get("n_parameters"):
        parts.append(f"{e['n_parameters'] / 1e6:.2f} M parameters")
    parts.append("training finished" if e.get("finished") else "**training did not finish**")
    return "; ".join(parts)


def _models_section(meta: dict) -> list[str]:
    """Title, provenance line and "What the models are"."""
    lf, mt = meta["models"]["lfdl"], meta["models"]["mitl"]
    fu, fa, cr, sc = meta["fusion"], meta["faces"], meta["crops"], meta["score_rules"]
    L = ["# Model card: morphfuse LFDL + MITL (fused by MDMF)", "",
         f"Bundle format {meta['format_version']}, morphfuse {meta['morphfuse_version']}, created "
         f"{meta['created']}" + (f", git {meta['git']['commit'][:12]}{' (dirty tree)' if meta['git']['dirty'] else ''}"
                                 if meta.get("git") else "") + f", config hash `{meta['config']['hash']}`.", "",
         "## What the models are", "",
         f"A reimplementation of {PAPER}", "",
         f"- **LFDL** (local facial forgery detection and localization): a two-stream (RGB + SRM residual) Xception "
         f"network applied to each detected face crop; it gives a face score and a patch-level mask. "
         f"{_train_line(lf)}.",
         f"- **MITL** (Mesorch, whole image): DCT high/low bands, ConvNeXt-Tiny + SegFormer (MiT-B3) encoders, eight "
         f"per-scale masks with adaptive weighting; it gives a full-image mask. {_train_line(mt)}.",
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
         " of it.", ""]
    return L


def _data_section(cfg: dict, data: dict | None) -> list[str]:
    """"Training data": the configured sources and methods, and the manifest's counts when known."""
    L = ["## Training data", ""]
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
        L += ["", "\n".join(md_table(["method"] + splits + ["all"], rows))]
        if "identities_by_split" in data:
            L += ["", "Identities (real images) per split: " + ", ".join(
                f"{s} {n}" for s, n in data["identities_by_split"].items()) + ". Checked: " +
                ("no identity is in two splits." if data["identity_disjoint"] else
                 f"**{data['identities_in_two_splits']} identities are in two splits**.")]
    else:
        L += ["", "Counts per split and method: not recorded (export with `--manifest` to include them)."]
    return L


def _metrics_section(ablation_md: str | None) -> list[str]:
    L = ["## Metrics", ""]
    if ablation_md:
        L += ["The ablation table of the run that trained these models (copied from `metrics/ablation.md`):", "",
              ablation_md.strip()]
    else:
        L += ["Not recorded (export with `--tables` to include the ablation table)."]
    return L


def _use_section(meta: dict) -> list[str]:
    """"Intended use" and "Limitations" (what these models are not: the paper's, when trained smaller)."""
    lf, mt = meta["models"]["lfdl"], meta["models"]["mitl"]
    paper_sizes = {"lfdl": 299, "mitl": 512}
    small = [m for m in MODEL_NAMES if meta["models"][m]["size"] < paper_sizes[m]]
    L = ["## Intended use", "",
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
    return L


def _files_section(meta: dict) -> list[str]:
    return ["## Files", "", "\n".join(md_table(["file", "bytes", "sha256"],
                                    [[f"`{k}`", v["bytes"], f"`{v['sha256']}`"] for k, v in meta["files"].items()
                                     if k != "MODEL_CARD.md"])),
          "", "`bundle.json` holds these hashes (and that of this card); `morphfuse detect` checks them all before "
          "use.", "", "## How to use", "",
          "```bash", "morphfuse detect photo.jpg more_photos/ --models BUNDLE_DIR --out detections/", "```", ""]


def model_card(meta: dict, cfg: dict, data: dict | None, ablation_md: str | None) -> str:
    """MODEL_CARD.md of a bundle from its bundle.json (``meta``), the effective config, the manifest's counts
    (:func:`manifest_summary`) and the run's ablation table (Markdown)."""
    L = _models_section(meta) + _data_section(cfg, data) + [""] + _metrics_section(ablation_md) + [""]
    L += _use_section(meta)
    credit = attribution_text(cfg, (cfg.get("forge") or {}).get("methods", []))
    if credit:
        L += ["## Attribution", "", credit, ""]
    return "\n".join(L + _files_section(meta))
