"""Reduce per-shard evaluations to the ablation table (the paper's Table 2), breakdowns and figures.

Input: the per-image rows written by `morphfuse evaluate` (``--out-counts`` in manifest mode, or
``per_image.parquet`` in dataset mode), given as files or folders (searched recursively for ``*.parquet``; the
workflow's layout is ``evaluate/{variant}/{shard}.parquet``). A row's variant is its ``variant`` column, or else
the name of the folder holding its file. Pixel counts are stored per image, so the conventions (--averaging,
--images, --iou, --empty) are applied HERE and may differ from those used when evaluating; the mask threshold is
fixed by the counts and read from them.

Rows, in this order when present: lfdl, mitl, lfdl_score_mitl_mask, naive_or, mdmf, closing_or, then any other
variant. ``lfdl_score_mitl_mask`` is the ``mitl`` rows (MITL mask counts) with each image's score replaced by the
score of its ``lfdl`` row (joined on image_id; an image without a valid lfdl row is left out and counted), unless
the inputs already hold that variant. ``mitl`` keeps its own score (the one derived from the MITL mask).

Outputs in --out: ablation.csv / ablation.md (AUC, F1, IoU, Final with a 95 % bootstrap interval over identities,
plus AP, EER, ACC and the pixel counts), breakdown_method.{csv,md} (every real image + the fakes of one method),
breakdown_source.{csv,md} (the images of one source), errors.{csv,md} (rows left out per variant and, with
--ledgers, ledger lines per stage), tables.json (everything, for the report). In --figures (default OUT/figures):
roc.png, pr.png (one curve per distinct score set) and, with --panels N, panels.png: N fake test images drawn at
random (--seed), each as image | ground truth | LFDL | MITL | fused. Panels need --manifest (image and mask
paths) and --lfdl-masks, --mitl-masks, --fused-masks: folders searched for ``<image_id>.png`` directly, in
``*/`` or in ``*/masks/`` (the workflow's predict/{model} and fuse/{variant} folders qualify).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .evaluate import _clean, _fmt, _json_default, add_convention_arguments, summarize_frame
from .imageio import BadImageError, read_image, write_csv, write_text_atomic
from .ledger import read_ledgers
from .metrics import Convention, bootstrap_ci, table_statistic

log = logging.getLogger(__name__)

VARIANT_ORDER = ("lfdl", "mitl", "lfdl_score_mitl_mask", "naive_or", "mdmf", "closing_or")
SWAPPED = "lfdl_score_mitl_mask"
# SYSTEM.md, "Paper targets" (DDL-I, Table 2): variant -> (AUC, F1, IoU, Final); None = not reported.
PAPER_TARGETS = {
    "lfdl": (0.9790, 0.6840, 0.5981, 0.7497),
    "mitl": (None, None, None, 0.2349),
    "lfdl_score_mitl_mask": (None, None, None, 0.3200),
    "naive_or": (0.9790, 0.7598, 0.6657, 0.8015),
    "mdmf": (0.9790, 0.7759, 0.6902, 0.8150),
}
METRIC_KEYS = ("auc", "f1", "iou", "final")
EMPTY_NOTE = {
    "skip": "An image whose ground truth and prediction are both empty has no F1/IoU: it is left out of the "
            "per-image means ('skipped empty' below).",
    "one": "An image whose ground truth and prediction are both empty scores F1 = IoU = 1 (two-class mean 1).",
    "zero": "An image whose ground truth and prediction are both empty scores F1 = IoU = 0 (two-class mean 0.5, "
            "scikit-learn's default).",
}
REQUIRED = ("image_id", "label", "score", "TP", "FP", "FN", "TN")


# ------------------------------------------------------------------------------------------------- loading
def find_count_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.parquet") if not q.name.startswith("."))
            if not found:
                raise UserError(f"--counts {p}: no .parquet file in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"--counts {p}: no such file or folder")
    return list(dict.fromkeys(files))


def load_counts(paths: list[Path]) -> dict[str, pd.DataFrame]:
    """``variant -> per-image frame`` from evaluate's per-image files."""
    frames: dict[str, list[pd.DataFrame]] = {}
    for f in find_count_files(paths):
        try:
            df = pd.read_parquet(f)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{f}: not a readable Parquet file ({e})") from None
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise UserError(f"{f}: missing column(s) {', '.join(missing)}; is it a `morphfuse evaluate` output?")
        if "ok" not in df.columns:
            df["ok"] = df[["score", "TP", "FP", "FN", "TN"]].notna().all(axis=1)
        variant = df["variant"].astype(str) if "variant" in df.columns else pd.Series("", index=df.index)
        df["variant"] = variant.where(variant.str.len() > 0, f.parent.name)
        for v, part in df.groupby("variant", sort=False):
            frames.setdefault(str(v), []).append(part)
    out = {}
    for v, parts in frames.items():
        df = pd.concat(parts, ignore_index=True)
        for c in ("group", "method", "source", "error"):
            if c not in df.columns:
                df[c] = df["image_id"] if c == "group" else ""
            df[c] = df[c].astype(str)
        df["ok"] = df["ok"].astype(bool)
        dup = df.loc[df["ok"], "image_id"].duplicated()
        if dup.any():
            ex = df.loc[df["ok"], "image_id"][dup].iloc[0]
            raise UserError(f"variant {v}: image {ex!r} (and {int(dup.sum()) - 1} more) is in several count files; "
                            "each image must be evaluated once per variant")
        out[v] = df
    return out


def add_swapped_variant(frames: dict[str, pd.DataFrame]) -> str | None:
    """Add ``lfdl_score_mitl_mask`` (mitl counts, lfdl scores) if absent and both sources are present."""
    if SWAPPED in frames or "lfdl" not in frames or "mitl" not in frames:
        return None
    mitl = frames["mitl"].drop(columns=["score"])
    lfdl = frames["lfdl"][["image_id", "score", "ok"]].rename(columns={"ok": "_lfdl_ok"})
    lfdl = lfdl[lfdl["_lfdl_ok"]].drop_duplicates("image_id")
    df = mitl.merge(lfdl, on="image_id", how="left")
    no_lfdl = df["_lfdl_ok"].isna()
    df["ok"] = df["ok"] & ~no_lfdl
    df.loc[no_lfdl, "error"] = (df.loc[no_lfdl, "error"] + "; no valid lfdl row for its score").str.strip("; ")
    df["variant"] = SWAPPED
    frames[SWAPPED] = df.drop(columns=["_lfdl_ok"])
    return f"{SWAPPED}: the mitl rows (MITL mask counts) with each image's lfdl score"


def ordered_variants(frames) -> list[str]:
    return [v for v in VARIANT_ORDER if v in frames] + sorted(v for v in frames if v not in VARIANT_ORDER)


# ------------------------------------------------------------------------------------------------- metrics
def _arrays(ok: pd.DataFrame):
    return (ok["label"].to_numpy(np.int64), ok["score"].to_numpy(np.float64),
            *(ok[c].to_numpy(np.int64) for c in ("TP", "FP", "FN", "TN")))


def variant_row(name: str, df: pd.DataFrame, conv: Convention, score_threshold: float, n_boot: int, seed: int,
                confidence: float) -> dict:
    m = summarize_frame(df, conv, score_threshold)
    row = {"variant": name}
    for k in METRIC_KEYS:
        row[k] = m[k]
        row[f"{k}_lo"] = row[f"{k}_hi"] = None
    ok = df[df["ok"]]
    if n_boot > 0 and len(ok):
        stat = table_statistic(*_arrays(ok), conv)
        lo, hi = bootstrap_ci(None, ok["group"].to_numpy(), stat, n_resamples=n_boot, seed=seed,
                              confidence=confidence)
        for i, k in enumerate(METRIC_KEYS):
            if m[k] is not None and not math.isnan(lo[i]):
                row[f"{k}_lo"], row[f"{k}_hi"] = float(lo[i]), float(hi[i])
    row.update({"ap": m["ap"], "eer": m["eer"], "accuracy": m["accuracy"], **m["counts"],
                "n_images": m["n_images"], "n_real": m["n_real"], "n_fake": m["n_fake"],
                "n_groups": int(ok["group"].nunique()), "n_pixel_images": m["n_pixel_images"],
                "n_skipped_empty": m["n_skipped_empty"], "n_errors": m["n_errors"],
                "note": "; ".join(m[k] for k in ("auc_reason", "localization_reason") if m.get(k))})
    return row


def breakdown(frames, by: str, conv: Convention, score_threshold: float) -> pd.DataFrame:
    """Per variant and value of ``by`` (method or source). For ``method``: all real images + the fakes of that
    method (detection needs both classes); for ``source``: the images of that source."""
    rows = []
    for v in ordered_variants(frames):
        df = frames[v]
        ok = df[df["ok"]]
        if by == "method":
            values = sorted(ok.loc[ok["label"] == 1, "method"].unique())
            subsets = [(x, ok[(ok["label"] == 0) | (ok["method"] == x)]) for x in values]
        else:
            subsets = [(x, ok[ok["source"] == x]) for x in sorted(ok["source"].unique())]
        for x, sub in subsets:
            m = summarize_frame(sub, conv, score_threshold)
            rows.append({"variant": v, by: x, "auc": m["auc"], "f1": m["f1"], "iou": m["iou"], "final": m["final"],
                         "ap": m["ap"], "eer": m["eer"], "accuracy": m["accuracy"], **m["counts"],
                         "n_real": m["n_real"], "n_fake": m["n_fake"], "note": m.get("auc_reason", "")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ markdown
def _cell(row, k) -> str:
    v = row.get(k)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    lo, hi = row.get(f"{k}_lo"), row.get(f"{k}_hi")
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{v:.4f}"
    return f"{v:.4f} [{lo:.4f}, {hi:.4f}]"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def ablation_markdown(table: pd.DataFrame, conv: Convention, score_threshold: float, n_boot: int,
                      confidence: float, seed: int, notes: list[str]) -> str:
    recs = table.to_dict("records")
    lines = ["# Ablation (layout of the paper's Table 2)", "",
             f"Convention: {conv.describe()}, score threshold={score_threshold:g}. Final = (AUC + F1 + IoU) / 3.",
             EMPTY_NOTE[conv.empty],
             (f"Intervals: {confidence:.0%} percentile bootstrap over identities (groups), {n_boot} resamples, "
              f"seed {seed}; the same resamples for every variant. Differences smaller than the intervals are not "
              "an ordering." if n_boot > 0 else "No bootstrap intervals (--bootstrap 0)."), ""]
    lines += _md_table(["variant", "AUC", "F1", "IoU", "Final", "AP", "EER", "ACC"],
                       [[r["variant"]] + [_cell(r, k) for k in METRIC_KEYS + ("ap", "eer", "accuracy")] for r in recs])
    lines += ["", "Counts behind each row (pixels pooled over the images of the pixel metrics):", ""]
    lines += _md_table(["variant", "TP", "FP", "FN", "TN", "images", "real", "fake", "identities",
                        "pixel-metric images", "skipped empty", "left out (errors)"],
                       [[r["variant"]] + [str(r[k]) for k in ("TP", "FP", "FN", "TN", "n_images", "n_real", "n_fake",
                                                               "n_groups", "n_pixel_images", "n_skipped_empty",
                                                               "n_errors")] for r in recs])
    notes = notes + [f"{r['variant']}: {r['note']}" for r in recs if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "Paper targets (DDL-I, Table 2; for reference: the order of the rows, not the values, is what "
                  "another data set can reproduce):", ""]
    lines += _md_table(["variant", "AUC", "F1", "IoU", "Final"],
                       [[v] + [_fmt(x) for x in t] for v, t in PAPER_TARGETS.items()])
    lines += ["", "The paper's lfdl Final (0.7497) is not its row's own mean (0.7537), a typo in the paper. "
                  "Challenge: 1st 0.846, 2nd 0.8161.", ""]
    return "\n".join(lines)


def frame_markdown(df: pd.DataFrame, title: str, first: list[str]) -> str:
    if df.empty:
        return f"# {title}\n\n(no rows)\n"
    cols = first + [c for c in ("auc", "f1", "iou", "final", "ap", "eer", "accuracy", "TP", "FP", "FN", "TN",
                                "n_real", "n_fake", "note") if c in df.columns]
    rows = [[(_fmt(x) if isinstance(x, float) else ("–" if x is None else str(x))) for x in r]
            for r in df[cols].itertuples(index=False)]
    return "\n".join([f"# {title}", ""] + _md_table(cols, rows)) + "\n"


# ------------------------------------------------------------------------------------------------- figures
def distinct_score_sets(frames) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One ``(labels, scores)`` per distinct score set; variants sharing one are named together (a = b)."""
    sets: list[tuple[list[str], pd.Series, np.ndarray, np.ndarray]] = []
    for v in ordered_variants(frames):
        ok = frames[v][frames[v]["ok"]].sort_values("image_id")
        key = pd.Series(ok["score"].to_numpy(), index=ok["image_id"].to_numpy())
        for names, k, _, _ in sets:
            if k.index.equals(key.index) and np.array_equal(k.to_numpy(), key.to_numpy()):
                names.append(v)
                break
        else:
            sets.append(([v], key, ok["label"].to_numpy(), ok["score"].to_numpy()))
    return {" = ".join(n): (lab, sc) for n, _, lab, sc in sets}


def find_mask(roots: list[Path], image_id: str) -> Path | None:
    """``<image_id>.png`` directly in a root, in ``root/*/`` or in ``root/*/masks/``."""
    name = glob.escape(f"{image_id}.png")
    for root in roots:
        for pattern in (name, f"masks/{name}", f"*/{name}", f"*/masks/{name}"):
            hits = sorted(root.glob(pattern))
            if hits:
                return hits[0]
    return None


def make_panels(frames, fused_variant: str, manifests: list[Path], lfdl_roots, mitl_roots, fused_roots, n: int,
                seed: int, threshold: float, path: Path) -> int:
    from .fusion import binarize, read_gt, read_u8  # noqa: PLC0415
    from .plots import PanelRow, qualitative_panel  # noqa: PLC0415

    man = pd.concat([pd.read_parquet(m) for m in manifests], ignore_index=True)
    man = man.drop_duplicates("image_id").set_index("image_id")
    df = frames[fused_variant]
    cand = sorted(set(df.loc[df["ok"] & (df["label"] == 1), "image_id"]) & set(man.index))
    if not cand:
        log.warning("no fake image of %s found in the manifest: no qualitative panel", fused_variant)
        return 0
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(cand), size=min(n, len(cand)), replace=False))
    f1 = {v: frames[v].set_index("image_id")["f1"] for v in ("lfdl", "mitl", fused_variant) if v in frames}

    def load(fn, p):
        if p is None:
            return None
        try:
            return fn(p)
        except BadImageError as e:
            log.warning("panel: %s", e)
            return None

    rows = []
    for i in chosen:
        image_id = cand[i]
        r = man.loc[image_id]
        root = Path(str(r["root"]))
        lf, mi, fu = (find_mask(roots, image_id) for roots in (lfdl_roots, mitl_roots, fused_roots))
        lf_u8, mi_u8, fu_u8 = load(read_u8, lf), load(read_u8, mi), load(read_u8, fu)
        notes = {}
        for col, v in (("LFDL", "lfdl"), ("MITL", "mitl"), ("fused", fused_variant)):
            val = f1.get(v, pd.Series(dtype=float)).get(image_id)
            if val is not None and not (isinstance(val, float) and math.isnan(val)):
                notes[col] = f"F1 {val:.3f}"
        rows.append(PanelRow(
            image_id=image_id, image=load(read_image, root / str(r["path"])),
            gt=load(read_gt, root / str(r["mask_path"])) if str(r.get("mask_path", "")) else None,
            lfdl=None if lf_u8 is None else binarize(lf_u8, threshold),
            mitl=None if mi_u8 is None else binarize(mi_u8, threshold),
            fused=None if fu_u8 is None else fu_u8 > 127,
            label=str(r.get("method", "")), notes=notes))
    qualitative_panel(rows, path, fused_name=fused_variant)
    return len(rows)


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--counts", nargs="+", required=True, type=Path, metavar="DIR_OR_FILE",
                   help="per-image parquet files of `morphfuse evaluate`, or folders holding them")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder for the tables")
    p.add_argument("--figures", type=Path, metavar="DIR", help="output folder for the figures (default OUT/figures)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    from .config import default

    p.add_argument("--bootstrap", type=int, default=default("evaluate.bootstrap"), metavar="N",
                   help="resamples of identities for the intervals (default 1000; 0: no intervals)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the panel sample")
    p.add_argument("--ledgers", nargs="*", type=Path, default=[], metavar="CSV",
                   help="error ledgers of the stages, counted per stage in errors.md")
    add_convention_arguments(p, with_threshold=False)
    p.add_argument("--threshold", type=float, default=None,
                   help="the mask threshold the counts must have been made with (checked; the counts carry it)")
    g = p.add_argument_group("qualitative panels (image | ground truth | LFDL | MITL | fused)")
    g.add_argument("--panels", type=int, default=0, metavar="N", help="number of fake images to show (default 0)")
    g.add_argument("--manifest", nargs="*", type=Path, default=[], metavar="PARQUET",
                   help="manifest(s) giving each image's root, path and mask_path")
    g.add_argument("--lfdl-masks", nargs="*", type=Path, default=[], metavar="DIR", help="LFDL probability masks")
    g.add_argument("--mitl-masks", nargs="*", type=Path, default=[], metavar="DIR", help="MITL probability masks")
    g.add_argument("--fused-masks", nargs="*", type=Path, default=[], metavar="DIR", help="fused binary masks")
    g.add_argument("--fused-variant", default="mdmf", help="variant whose masks --fused-masks holds (default mdmf)")


def run(args: argparse.Namespace) -> int:
    frames = load_counts(args.counts)
    thresholds = sorted({float(t) for df in frames.values() if "threshold" in df.columns
                         for t in df["threshold"].dropna().unique()})
    if len(thresholds) > 1:
        raise UserError(f"the count files were made with different mask thresholds {thresholds}; evaluate every "
                        "variant with the same --threshold")
    if args.threshold is not None and thresholds and thresholds != [args.threshold]:
        raise UserError(f"--threshold {args.threshold}: the count files were made with mask threshold "
                        f"{thresholds[0]}; rerun `morphfuse evaluate` with --threshold {args.threshold}")
    threshold = thresholds[0] if thresholds else (0.5 if args.threshold is None else args.threshold)
    try:
        conv = Convention(averaging=args.averaging, images=args.images, iou=args.iou, empty=args.empty,
                          threshold=threshold)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    notes = [n for n in [add_swapped_variant(frames)] if n]
    variants = ordered_variants(frames)
    log.info("variants: %s", ", ".join(f"{v} ({len(frames[v])} rows)" for v in variants))
    table = pd.DataFrame([variant_row(v, frames[v], conv, args.score_threshold, args.bootstrap, args.seed,
                                      args.confidence) for v in variants])
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "ablation.csv", table)
    write_text_atomic(out / "ablation.md", ablation_markdown(table, conv, args.score_threshold, args.bootstrap,
                                                             args.confidence, args.seed, notes))
    result = {"convention": conv.as_dict(), "score_threshold": args.score_threshold, "bootstrap": args.bootstrap,
              "confidence": args.confidence, "seed": args.seed, "notes": notes,
              "ablation": table.to_dict("records")}
    for by in ("method", "source"):
        bd = breakdown(frames, by, conv, args.score_threshold)
        write_csv(out / f"breakdown_{by}.csv", bd)
        title = ("Per method (all real images + the fakes of the method)" if by == "method"
                 else "Per source (the images of the source)")
        write_text_atomic(out / f"breakdown_{by}.md", frame_markdown(bd, f"{title}; {conv.describe()}",
                                                                     ["variant", by]))
        result[f"breakdown_{by}"] = bd.to_dict("records")
    # errors: rows left out per variant, and ledger lines per stage
    err = pd.DataFrame([{"variant": v, "rows": len(frames[v]), "left_out": int((~frames[v]["ok"]).sum())}
                        for v in variants])
    write_csv(out / "errors.csv", err)
    md = ["# Errors", "", "Images left out of each variant's metrics (an error in one of its inputs):", ""]
    md += _md_table(["variant", "rows", "left out"], [[r.variant, str(r.rows), str(r.left_out)]
                                                     for r in err.itertuples(index=False)])
    if args.ledgers:
        led = read_ledgers(args.ledgers)
        per_stage = (led.groupby("stage").agg(lines=("image_id", "size"), images=("image_id", "nunique"))
                     .reset_index() if len(led) else pd.DataFrame(columns=["stage", "lines", "images"]))
        write_csv(out / "ledger_counts.csv", per_stage)
        md += ["", f"Error ledgers ({len(args.ledgers)} files):", ""]
        md += _md_table(["stage", "lines", "images"], [[str(x) for x in r] for r in per_stage.itertuples(index=False)])
        result["ledger_counts"] = per_stage.to_dict("records")
    write_text_atomic(out / "errors.md", "\n".join(md) + "\n")
    result["errors"] = err.to_dict("records")
    if not args.no_figures:
        from .plots import pr_figure, roc_figure  # noqa: PLC0415

        fig_dir = args.figures or out / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        sets = distinct_score_sets(frames)
        roc_figure(sets, fig_dir / "roc.png")
        pr_figure(sets, fig_dir / "pr.png")
        figures = ["roc.png", "pr.png"]
        if args.panels > 0:
            if not args.manifest:
                raise UserError("--panels needs --manifest (and --lfdl-masks, --mitl-masks, --fused-masks)")
            fv = args.fused_variant
            if fv not in frames:
                raise UserError(f"--fused-variant {fv}: no such variant in the counts ({', '.join(variants)})")
            if not make_panels(frames, fv, args.manifest, args.lfdl_masks, args.mitl_masks, args.fused_masks,
                               args.panels, args.seed, conv.threshold, fig_dir / "panels.png"):
                # Still write the figure the workflow expects, saying why it is empty.
                from .plots import message_figure  # noqa: PLC0415

                message_figure(f"No manipulated image with a valid {fv} prediction to show.", fig_dir / "panels.png")
            figures.append("panels.png")
        result["figures"] = [str(fig_dir / f) for f in figures]
    write_text_atomic(out / "tables.json", json.dumps(_clean(result), indent=2, default=_json_default) + "\n")
    print(ablation_markdown(table, conv, args.score_threshold, args.bootstrap, args.confidence, args.seed, notes)
          .split("\n\nCounts")[0])
    return 0
