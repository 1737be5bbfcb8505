"""The robustness table and plot: every fusion variant's ablation row under every perturbation of the sweep.

Input: one ``ablation.csv`` per perturbation (the ``tables`` stage run on the perturbed test images, with its
bootstrap intervals over identities), named by ``--ablation ID=CSV`` where ID is the perturbation id (``none`` for
the clean images, ``jpeg_70``, ``downscale_0.5``, ...). Output in ``--out``: ``robustness.csv`` (and the same as
``robustness.html``; one row per variant × perturbation: kind, level, AUC, F1, IoU, Final with their 95 % intervals),
``robustness.md`` (Final with its interval, variants as rows, perturbations as columns; then AUC / F1 / IoU) and
``--figure`` (one panel per perturbation kind: Final against level, one line per variant, the clean value at the left
end, interval bands).

Example:
  morphfuse robustness --ablation none=tables/ablation.csv jpeg_70=robustness/jpeg_70/tables/ablation.csv \\
      --out tables/robustness --figure figures/robustness.png
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .imageio import atomic_path, write_csv, write_text_atomic
from .perturb import parse
from .textfmt import fmt_estimate, md_table

log = logging.getLogger(__name__)

METRICS = ("auc", "f1", "iou", "final")
LEVEL_WORD = {"jpeg": "JPEG quality", "downscale": "downscale factor (then back)", "blur": "Gaussian blur σ (px)",
              "noise": "Gaussian noise σ (0–255)"}


def read_ablation(spec: str) -> tuple[str, pd.DataFrame]:
    pid, sep, path = spec.partition("=")
    if not sep:
        raise UserError(f"--ablation {spec!r}: expected ID=CSV (e.g. jpeg_70=robustness/jpeg_70/tables/ablation.csv)")
    p = parse(pid)
    f = Path(path)
    if not f.is_file():
        raise UserError(f"{f}: ablation table of perturbation {pid} does not exist")
    try:
        df = pd.read_csv(f)
    except Exception as e:  # pandas raises several kinds for a damaged file
        raise UserError(f"{f}: not a readable ablation CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in ("variant",) + METRICS if c not in df.columns]
    if missing:
        raise UserError(f"{f}: not an ablation table (no column {', '.join(missing)})")
    return p.id, df


def robustness_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table: variant, perturbation, kind, level and each metric with its interval."""
    rows = []
    for pid, df in tables.items():
        p = parse(pid)
        for r in df.to_dict("records"):
            row = {"variant": r["variant"], "perturbation": pid, "kind": p.kind,
                   "level": None if p.level is None else float(p.level)}
            for k in METRICS:
                for suffix in ("", "_lo", "_hi"):
                    v = r.get(f"{k}{suffix}")
                    row[f"{k}{suffix}"] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            row["n_images"] = r.get("n_images")
            rows.append(row)
    return pd.DataFrame(rows)


def robustness_markdown(long: pd.DataFrame, order: list[str]) -> str:
    variants = list(dict.fromkeys(long["variant"]))
    by = {(r["variant"], r["perturbation"]): r for r in long.to_dict("records")}
    lines = ["# Robustness: the ablation under perturbations of the test images", "",
             "Each column is the whole pipeline (faces, crops, both networks, fusion) run on the perturbed test "
             "images; ground truth unchanged (every perturbation keeps the image's geometry). "
             "Final = (AUC + F1 + IoU) / 3 with its 95 % bootstrap interval over identities.", "",
             "## Final", ""]
    head = ["variant"] + order
    lines += md_table(head, [[v] + [fmt_estimate(by.get((v, p), {}), "final", nd=3) for p in order] for v in variants])
    for k, title in (("auc", "AUC"), ("f1", "F1"), ("iou", "IoU")):
        lines += ["", f"## {title}", ""]
        lines += md_table(head, [[v] + [fmt_estimate(by.get((v, p), {}), k, nd=3, interval=False) for p in order]
                                 for v in variants])
    return "\n".join(lines) + "\n"


def robustness_figure(long: pd.DataFrame, out: Path) -> Path:
    """One panel per kind: Final against level (clean at the start), one line per variant, interval bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in LEVEL_WORD if k in set(long["kind"])]
    clean = long[long["kind"] == "none"]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.2 * max(1, len(kinds)), 3.6), squeeze=False,
                             sharey=True)
    colours = plt.get_cmap("tab10")
    variants = list(dict.fromkeys(long["variant"]))
    for ax, kind in zip(axes[0], kinds):
        part = long[long["kind"] == kind]
        # the clean point sits where the perturbation vanishes: quality 100, factor 1, sigma 0
        origin = {"jpeg": 100.0, "downscale": 1.0, "blur": 0.0, "noise": 0.0}[kind]
        for i, v in enumerate(variants):
            rows = part[part["variant"] == v].sort_values("level")
            c0 = clean[clean["variant"] == v]
            xs = list(rows["level"])
            ys, lo, hi = list(rows["final"]), list(rows["final_lo"]), list(rows["final_hi"])
            if len(c0):
                xs, ys = [origin] + xs, [c0["final"].iloc[0]] + ys
                lo, hi = [c0["final_lo"].iloc[0]] + lo, [c0["final_hi"].iloc[0]] + hi
            order = np.argsort(xs)
            xs, ys = np.asarray(xs, float)[order], np.asarray(ys, float)[order]
            lo, hi = np.asarray(lo, float)[order], np.asarray(hi, float)[order]
            ax.plot(xs, ys, "o-", color=colours(i % 10), label=v, lw=1.5, ms=4)
            if np.isfinite(lo).any():
                ax.fill_between(xs, lo, hi, color=colours(i % 10), alpha=0.12, lw=0)
        if kind == "jpeg" or kind == "downscale":
            ax.invert_xaxis()  # stronger perturbation to the right
        ax.set_xlabel(LEVEL_WORD[kind])
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Final = (AUC + F1 + IoU) / 3")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("Robustness (leftmost point: the clean test images; bands: 95 % bootstrap intervals)", fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return out


def robustness_html(long: pd.DataFrame) -> str:
    """robustness.csv as an HTML table (the report shows it inline), numbers to 4 decimals."""
    body = long.to_html(index=False, border=1, na_rep="n/a", float_format=lambda v: f"{v:.4f}")
    return ("<html><head><meta charset='utf-8'></head><body><h3>Robustness</h3>" + body +
            "<p>One row per variant and perturbation; _lo / _hi: 95 % bootstrap interval over identities. "
            "Final = (AUC + F1 + IoU) / 3.</p></body></html>")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ablation", nargs="+", required=True, metavar="ID=CSV",
                   help="one ablation.csv per perturbation: none=tables/ablation.csv jpeg_70=... (ids as in "
                        "morphfuse.perturb: none, jpeg_Q, downscale_F, blur_S, noise_S)")
    p.add_argument("--out", required=True, help="folder for robustness.csv, robustness.html and robustness.md")
    p.add_argument("--figure", default=None, help="PNG of Final against level (default OUT/robustness.png)")


def run(args: argparse.Namespace) -> int:
    tables = dict(read_ablation(s) for s in args.ablation)
    long = robustness_table(tables)
    out = Path(args.out)
    write_csv(out / "robustness.csv", long)
    write_text_atomic(out / "robustness.md", robustness_markdown(long, list(tables)))
    write_text_atomic(out / "robustness.html", robustness_html(long))
    robustness_figure(long, Path(args.figure) if args.figure else out / "robustness.png")
    log.info("robustness: %d variants × %d perturbations -> %s", long["variant"].nunique(), len(tables), out)
    return 0
