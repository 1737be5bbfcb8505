"""Everything the HTML report shows besides the tables: training curves, forgery contact sheets, error-ledger
counts, the ablation table as HTML, the photos' attribution and the run's provenance.

The workflow's ``report`` rule runs this once the tables exist; ``snakemake --report results/<run>/report.html``
then bundles these files (captions in ``workflow/report/``).
"""
from __future__ import annotations

import html
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .config import load_stage_config  # noqa: E402
from .forge.contact_sheet import contact_sheet  # noqa: E402
from .imageio import atomic_path, write_csv, write_text_atomic  # noqa: E402
from .ledger import read_ledgers  # noqa: E402
from .provenance import write_provenance  # noqa: E402

log = logging.getLogger(__name__)

ATTRIBUTION_HTML = """<p>Real photographs: DeBruine, L., &amp; Jones, B. (2017). <i>Face Research Lab London Set</i>
(Version 5). figshare. <a href="https://doi.org/10.6084/m9.figshare.5047666.v5">doi:10.6084/m9.figshare.5047666.v5</a>,
licensed <a href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a>; the <code>lisa</code> and
<code>zoom</code> series are CC0. Changes: downscaled to 512 px (Lanczos), re-encoded as JPEG, and altered by the
forgery generators of this workflow (SBI, random combination), as the subjects consented to.</p>"""

METRIC_COLS = [("auc", "AUC"), ("f1", "F1"), ("iou", "IoU"), ("final", "Final")]


def add_arguments(p) -> None:
    p.add_argument("--run-dir", required=True, help="results/<run_name> of a finished run")
    p.add_argument("--config", required=True, help="the effective config of the run")
    p.add_argument("--out", required=True, help="folder for the report's files")
    p.add_argument("--sheet-rows", type=int, default=6, help="forgeries shown per contact sheet")


def training_curves(model_dirs: dict[str, Path], out: Path) -> Path:
    """Loss per optimizer step (train) and per epoch (validation loss and AUC) for each model."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, d in model_dirs.items():
        f = d / "metrics.csv"
        if not f.exists() or f.stat().st_size == 0:
            log.warning("%s: no training metrics to plot", f)
            continue
        m = pd.read_csv(f)
        if "phase" not in m or "step" not in m:
            log.warning("%s: not a morphfuse metrics log (no phase/step columns)", f)
            continue
        tr = m[m["phase"] == "train"]
        if len(tr) and "loss" in tr:
            axes[0].plot(tr["step"], tr["loss"], lw=1, label=f"{name} train loss")
        val = m[m["phase"] == "val"]
        if len(val) and "val_loss" in val:
            axes[0].plot(val["step"], val["val_loss"], "o--", label=f"{name} val loss")
        if len(val) and "val_auc" in val and val["val_auc"].notna().any():
            axes[1].plot(val["epoch"] + 1, val["val_auc"], "o-", label=f"{name} val AUC")
    axes[0].set_xlabel("optimizer step"); axes[0].set_ylabel("loss")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    axes[1].set_xlabel("epoch"); axes[1].set_ylabel("image AUC (validation identities)")
    axes[1].set_ylim(0, 1); axes[1].axhline(0.5, color="grey", lw=0.5)
    if axes[1].lines:
        axes[1].legend(fontsize=8)
    fig.suptitle("Training curves")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def ablation_html(table_csv: Path, out: Path) -> Path:
    t = pd.read_csv(table_csv)
    head = "".join(f"<th>{h}</th>" for h in ["variant"] + [h for _, h in METRIC_COLS] + ["AP", "EER", "ACC"])
    rows = []
    for r in t.itertuples(index=False):
        r = r._asdict()
        cells = [f"<td>{html.escape(str(r['variant']))}</td>"]
        for key, _ in METRIC_COLS:
            v = r.get(key)
            if v is None or pd.isna(v):
                cells.append("<td>n/a</td>")
                continue
            lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
            ci = f" <small>[{lo:.3f}, {hi:.3f}]</small>" if lo is not None and not pd.isna(lo) else ""
            cells.append(f"<td>{v:.4f}{ci}</td>")
        for key in ("ap", "eer", "accuracy"):
            v = r.get(key)
            cells.append(f"<td>{'n/a' if v is None or pd.isna(v) else f'{v:.4f}'}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    doc = (f"<html><body><table border='1' cellpadding='4' style='border-collapse:collapse'>"
           f"<tr>{head}</tr>{''.join(rows)}</table>"
           "<p>95 % bootstrap intervals over identities in brackets. Final = (AUC + F1 + IoU) / 3.</p>"
           f"{ATTRIBUTION_HTML}</body></html>")
    write_text_atomic(out, doc)
    return out


def ledger_counts(run_dir: Path) -> pd.DataFrame:
    led = read_ledgers(sorted((run_dir / "ledger").rglob("*.csv")))
    if led.empty:
        return pd.DataFrame({"stage": [], "lines": [], "images": [], "example": []})
    g = led.groupby("stage")
    return pd.DataFrame({"lines": g.size(), "images": g["image_id"].nunique(),
                         "example": g["reason"].first()}).reset_index()


def run(args) -> int:
    run_dir, out = Path(args.run_dir), Path(args.out)
    cfg = load_stage_config(args.config)
    out.mkdir(parents=True, exist_ok=True)
    training_curves({m: run_dir / "models" / m for m in ("lfdl", "mitl")}, out / "training_curves.png")
    ablation_html(run_dir / "tables" / "ablation.csv", out / "ablation.html")
    write_csv(out / "ledger_counts.csv", ledger_counts(run_dir))
    manifest = pd.read_parquet(run_dir / "manifest" / "manifest.parquet")
    for method in cfg["forge"]["methods"]:
        rows = manifest[(manifest["method"] == method) & (manifest["label"] == 1)]
        contact_sheet(rows, out / f"contact_sheet_{method}.png", index=manifest, max_rows=args.sheet_rows)
    write_text_atomic(out / "attribution.html", f"<html><body>{ATTRIBUTION_HTML}</body></html>")
    start = (run_dir / "index" / "index.parquet").stat().st_mtime
    write_provenance(run_dir / "provenance.json", cfg, started=start, ended=time.time())
    log.info("report inputs in %s", out)
    return 0
