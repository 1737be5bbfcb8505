"""Everything the HTML report shows besides the evaluation's figures: training curves, forgery contact sheets, the
ablation table, the errors (ledger counts, or "no errors"), the photos' attribution, the run's config and its
provenance. Tables, config and provenance are HTML files, which the Snakemake report shows inline (a CSV item
would only be a download).

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

from .attribution import attribution_html  # noqa: E402
from .config import load_stage_config  # noqa: E402
from .forge.contact_sheet import contact_sheet  # noqa: E402
from .imageio import atomic_path, write_csv, write_text_atomic  # noqa: E402
from .ledger import read_ledgers  # noqa: E402
from .provenance import write_provenance  # noqa: E402

log = logging.getLogger(__name__)

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
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("loss")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("image AUC (validation identities)")
    axes[1].set_ylim(0, 1)
    axes[1].axhline(0.5, color="grey", lw=0.5)
    if axes[1].get_legend_handles_labels()[0]:  # the chance line at 0.5 has no label
        axes[1].legend(fontsize=8)
    fig.suptitle("Training curves")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def _ablation_rows(t: pd.DataFrame) -> str:
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
    return (f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>{head}</tr>{''.join(rows)}"
            "</table>")


def _diffs_rows(d: pd.DataFrame) -> str:
    """The paired differences: one row per (images, a − b), one cell per metric; bold = the interval excludes 0."""
    head = "".join(f"<th>{h}</th>" for h in ["images", "a − b"] + [h for _, h in METRIC_COLS])
    rows = []
    for (images, a, b), part in d.groupby(["images", "a", "b"], sort=False):
        by = {r["metric"]: r for r in part.to_dict("records")}
        cells = [f"<td>{html.escape(str(images))}</td>", f"<td>{html.escape(f'{a} − {b}')}</td>"]
        for key, _ in METRIC_COLS:
            r = by.get(key)
            if r is None or pd.isna(r["diff"]):
                cells.append("<td>n/a</td>")
                continue
            ci = f" [{r['lo']:+.3f}, {r['hi']:+.3f}]" if not pd.isna(r["lo"]) else ""
            cell = f"{r['diff']:+.4f}<small>{ci}</small>"
            cells.append(f"<td>{f'<b>{cell}</b>' if r['excludes_zero'] is True else cell}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>{head}</tr>{''.join(rows)}"
            "</table>")


def ablation_html(table_csv: Path, out: Path, credit_html: str = "") -> Path:
    """The ablation table; beside it (when the tables stage wrote them) the same table with images=all and the
    paired bootstrap differences; ``credit_html``: the photos' attribution (:func:`attribution.attribution_html`)."""
    parts = [_ablation_rows(pd.read_csv(table_csv)),
             "<p>95 % bootstrap intervals over identities in brackets. Final = (AUC + F1 + IoU) / 3. baseline_face: "
             "the face crops as the mask, baseline_all: the whole image, both with score 0.5.</p>"]
    all_csv, diffs_csv = table_csv.with_name("ablation_all.csv"), table_csv.with_name("ablation_diffs.csv")
    if all_csv.is_file():
        parts += ["<h3>With images=all (real images in the pixel metrics: their predicted pixels are false "
                  "positives)</h3>", _ablation_rows(pd.read_csv(all_csv))]
    if diffs_csv.is_file():
        d = pd.read_csv(diffs_csv)
        if len(d):
            parts += ["<h3>Paired differences a − b</h3>", _diffs_rows(d),
                      "<p>95 % intervals from the same identity resamples for both variants; bold: the interval "
                      "excludes 0 (an ordering).</p>"]
    write_text_atomic(out, f"<html><body>{''.join(parts)}{credit_html}</body></html>")
    return out


def _page(title: str, body: str) -> str:
    return (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h3>{html.escape(title)}</h3>{body}</body></html>")


def errors_html(counts: pd.DataFrame, out: Path) -> Path:
    """The errors item: "No errors" when every stage used every input, else one row per stage (lines, images,
    an example reason) and where the full ledgers are."""
    if counts.empty:
        body = ("<p><b>No errors</b>: every stage used every input it was given (the ledgers in "
                "<code>ledger/</code> are empty).</p>")
    else:
        table = counts.rename(columns={"lines": "ledger lines", "images": "images", "example": "example reason"})
        body = (f"<p><b>{int(counts['lines'].sum())} input(s) could not be used</b>, in {len(counts)} stage(s); "
                "each was skipped with its reason and the run went on. The full lists are in "
                "<code>ledger/&lt;stage&gt;/</code>.</p>"
                + table.to_html(index=False, border=1, escape=True, na_rep=""))
    write_text_atomic(out, _page("Errors", body))
    return out


def text_html(title: str, text: str, out: Path, note: str = "") -> Path:
    """A text file (the config, provenance.json) as an HTML page: preformatted, escaped."""
    body = (f"<p>{note}</p>" if note else "") + f"<pre style='font-size:90%'>{html.escape(text)}</pre>"
    write_text_atomic(out, _page(title, body))
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
    credit = attribution_html(cfg, cfg["forge"]["methods"])
    ablation_html(run_dir / "tables" / "ablation.csv", out / "ablation.html", credit)
    counts = ledger_counts(run_dir)
    write_csv(out / "ledger_counts.csv", counts)
    errors_html(counts, out / "errors.html")
    manifest = pd.read_parquet(run_dir / "manifest" / "manifest.parquet")
    for method in cfg["forge"]["methods"]:
        rows = manifest[(manifest["method"] == method) & (manifest["label"] == 1)]
        contact_sheet(rows, out / f"contact_sheet_{method}.png", index=manifest, max_rows=args.sheet_rows,
                      cfg=cfg)
    write_text_atomic(out / "attribution.html", "<html><body>" + (credit or "<p>No source of this run declares "
                      "an attribution (<code>sources[].attribution</code> in the config).</p>") + "</body></html>")
    start = (run_dir / "index" / "index.parquet").stat().st_mtime
    write_provenance(run_dir / "provenance.json", cfg, started=start, ended=time.time())
    text_html("Config", Path(args.config).read_text(), out / "config.html",
              note="The effective config of this run (every default filled in), as the stages read it.")
    text_html("Provenance", (run_dir / "provenance.json").read_text(), out / "provenance.html",
              note="provenance.json: the config's hash, package versions, git commit, machine and times.")
    log.info("report inputs in %s", out)
    return 0
