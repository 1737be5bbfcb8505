"""A report an analyst reads (issue 13 item 5): config and provenance in it, tables inline as HTML, panel labels
that do not overlap, legends that do not cover curves, an errors item that says "no errors" or lists them."""
from __future__ import annotations

import base64
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphfuse.plots import PanelRow, _panel_fig, _pr_fig, _roc_fig
from morphfuse.report import errors_html, text_html, training_curves


def _extent(fig, artist):
    return artist.get_window_extent(fig.canvas.get_renderer())


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _sets(n: int = 6):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(200)].astype(int)
    return {f"variant_{k}": (y, y * (0.3 + 0.1 * k) + rng.random(400)) for k in range(n)}


def test_training_curves_without_val_auc_draw_no_empty_legend(tmp_path):
    """A run whose validation has no AUC (one class in val): the AUC panel keeps only its unlabelled chance line,
    and matplotlib is not asked for a legend of nothing (it warned on every report)."""
    import warnings

    (tmp_path / "lfdl").mkdir()
    (tmp_path / "lfdl" / "metrics.csv").write_text(
        "phase,step,epoch,loss,val_loss,val_auc\ntrain,1,0,0.7,,\ntrain,2,0,0.6,,\nval,2,0,,0.65,\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = training_curves({"lfdl": tmp_path / "lfdl"}, tmp_path / "curves.png")
    assert out.stat().st_size > 1000


@pytest.mark.parametrize("make", [_roc_fig, _pr_fig])
def test_curve_legends_are_outside_the_axes(make):
    import matplotlib.pyplot as plt

    fig = make(_sets())
    fig.canvas.draw()
    ax = fig.axes[0]
    leg = ax.get_legend()
    assert leg is not None and len(leg.get_texts()) == 6
    assert not _overlap(_extent(fig, leg), _extent(fig, ax))  # nothing of the plot area is covered
    plt.close(fig)


def test_panel_row_labels_are_short_and_do_not_overlap_and_a_key_names_the_images():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    m = rng.random((64, 64)) > 0.5
    ids = [f"london_512__neutral_front__{k:03d}_03__random_combination_with_a_long_suffix" for k in range(5)]
    rows = [PanelRow(i, img, m, m, m, m, label="random_combination") for i in ids]
    fig = _panel_fig(rows, "mdmf")
    fig.canvas.draw()
    labels = [fig.axes[i * 5].yaxis.label for i in range(len(rows))]
    assert [t.get_text() for t in labels] == [f"#{k}" for k in range(1, 6)]
    boxes = [_extent(fig, t) for t in labels]
    assert all(not _overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    # no row label runs into a tile
    tiles = [_extent(fig, ax) for ax in fig.axes]
    assert all(not _overlap(b, t) for b in boxes for t in tiles)
    key = [t for t in fig.texts if "#1" in t.get_text()]
    assert len(key) == 1 and all(i in key[0].get_text() for i in ids)
    kb = _extent(fig, key[0])
    assert all(not _overlap(kb, t) for t in tiles)  # the key is below the grid
    plt.close(fig)


def test_errors_item_says_no_errors_or_lists_them(tmp_path):
    empty = pd.DataFrame({"stage": [], "lines": [], "images": [], "example": []})
    text = errors_html(empty, tmp_path / "e.html").read_text()
    assert "No errors" in text and "<table" not in text
    counts = pd.DataFrame({"stage": ["faces", "features"], "lines": [3, 1], "images": [2, 1],
                           "example": ["corrupt <jpeg>", "too small"]})
    text = errors_html(counts, tmp_path / "e2.html").read_text()
    assert "No errors" not in text and "4 input(s) could not be used" in text
    assert text.count("<tr") == 3 and "corrupt &lt;jpeg&gt;" in text  # header + 2 rows, escaped
    t = text_html("Config", "a: <b>\n", tmp_path / "c.html").read_text()
    assert "<pre" in t and "a: &lt;b&gt;" in t


# ------------------------------------------------------------------------------------------ the built report
def _report_texts(path: Path) -> str:
    """Everything the report holds as text: the HTML itself and every embedded (base64) file in it."""
    raw = path.read_text(errors="replace")
    out = [raw]
    for m in re.finditer(r"data:[a-z/+.-]+(?:;[a-z]+=[^;,\"]*)*;base64,([A-Za-z0-9+/=]+)", raw):
        try:
            out.append(base64.b64decode(m.group(1)).decode("utf-8", errors="replace"))
        except ValueError:
            continue
    return "\n".join(out)


def test_the_built_report_shows_config_provenance_tables_and_errors_inline(e2e, tmp_path):
    from e2e_run import snakemake

    d = e2e.dir
    rep = d / "report"
    # the report stage's HTML items
    cfg_html = (rep / "config.html").read_text()
    assert "<pre" in cfg_html and f"run_name: {e2e.cfg['run_name']}" in cfg_html
    prov = json.loads((d / "provenance.json").read_text())
    prov_html = (rep / "provenance.html").read_text()
    assert prov["config_hash"] in prov_html
    counts = pd.read_csv(rep / "ledger_counts.csv")
    err = (rep / "errors.html").read_text()
    if counts.empty:
        assert "No errors" in err
    else:  # the e2e run feeds bad inputs on purpose: they are listed
        assert "No errors" not in err and all(s in err for s in counts["stage"])
    abl = (rep / "ablation.html").read_text()
    table = pd.read_csv(d / "tables" / "ablation.csv")
    assert all(f"<td>{v}</td>" in abl for v in table["variant"])
    # the bundle holds only export's files: no Snakemake timestamp (the rule's output is bundle.json)
    bundle = d / "bundle"
    meta = json.loads((bundle / "bundle.json").read_text())
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == \
        sorted([*meta["files"], "bundle.json"])

    # The Snakemake report: every one of these is an item, and no item is a CSV download
    out = tmp_path / "report.zip"
    snakemake(e2e.work, "--report", str(out))
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
    items = {Path(n).name for n in names}
    for want in ("config.html", "provenance.html", "errors.html", "ablation.html", "panels.png", "roc.png"):
        assert want in items, (want, sorted(items))
    assert not [n for n in names if n.endswith(".csv") and "/data/raw/" not in n], names
    html_out = tmp_path / "report.html"
    snakemake(e2e.work, "--report", str(html_out))
    text = _report_texts(html_out)
    assert f"run_name: {e2e.cfg['run_name']}" in text and prov["config_hash"] in text
