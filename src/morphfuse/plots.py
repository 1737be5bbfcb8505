"""Figures of the evaluation: ROC and precision-recall curves, and qualitative panels (as the paper's Figure 3).

Pure plotting functions: they take arrays and write one PNG each (atomically, matplotlib's Agg backend, no
display needed). `morphfuse tables` gathers the data and calls them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .imageio import atomic_path  # noqa: E402
from .metrics import average_precision, pr_curve, roc_auc, roc_curve  # noqa: E402


MAX_CURVE_POINTS = 4000  # a 5-inch plot at 120 dpi shows ~600 px: more points only cost memory


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` points of a curve, spaced evenly along its length (the ends and both ends of
    every segment longer than the spacing kept), so the drawn line stays within 1/max_points of the curve's
    length of the full one. A DDL-I curve has one point per distinct score (1.5 M)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size <= max_points:
        return x, y
    d = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    step = d[-1] / max_points if d[-1] > 0 else 1.0
    bucket = np.floor(d / step)
    keep = np.flatnonzero(np.diff(bucket) != 0)
    idx = np.unique(np.concatenate([[0, x.size - 1], keep, keep + 1]))
    return x[idx], y[idx]


def _save(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _legend_outside(ax) -> None:
    """The legend to the right of the axes, so that it never covers a curve (the saved figure is cropped to
    include it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)


def roc_figure(score_sets: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
               title: str = "ROC") -> None:
    """One ROC curve per named ``(labels, scores)`` set, AUC in the legend (outside the axes); one-class sets are
    listed as such."""
    _save(_roc_fig(score_sets, title), path)


def _roc_fig(score_sets, title: str = "ROC"):
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.8", lw=1, ls="--")
    for name, (labels, scores) in score_sets.items():
        auc, reason = roc_auc(labels, scores)
        if auc is None:
            ax.plot([], [], label=f"{name}: AUC undefined (one class)")
            continue
        fpr, tpr = thin_curve(*roc_curve(labels, scores))
        ax.plot(fpr, tpr, lw=1.5, label=f"{name}: AUC {auc:.4f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


def pr_figure(score_sets: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
              title: str = "Precision-recall") -> None:
    """One precision-recall curve per named ``(labels, scores)`` set (fake is the positive class), AP in the legend
    (outside the axes)."""
    _save(_pr_fig(score_sets, title), path)


def _pr_fig(score_sets, title: str = "Precision-recall"):
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (labels, scores) in score_sets.items():
        ap = average_precision(labels, scores)
        if ap is None:
            ax.plot([], [], label=f"{name}: AP undefined (no fake)")
            continue
        recall, precision = thin_curve(*pr_curve(labels, scores))
        ax.step(recall, precision, where="post", lw=1.5, label=f"{name}: AP {ap:.4f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=title)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


@dataclass
class PanelRow:
    """One image of a qualitative panel. Masks are bool (binarised) or ``None`` when the file was missing;
    ``notes`` are short texts shown under the tiles, by column name (e.g. per-image F1)."""

    image_id: str
    image: np.ndarray | None
    gt: np.ndarray | None
    lfdl: np.ndarray | None
    mitl: np.ndarray | None
    fused: np.ndarray | None
    label: str = ""
    notes: dict[str, str] = field(default_factory=dict)


PANEL_COLUMNS = ("image", "ground truth", "LFDL", "MITL", "fused")


def _thumb(arr: np.ndarray | None, max_side: int, mask: bool) -> np.ndarray | None:
    if arr is None:
        return None
    a = arr.astype(np.uint8) * 255 if arr.dtype == bool else arr
    h, w = a.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s < 1.0:
        a = cv2.resize(a, (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_NEAREST if mask else cv2.INTER_AREA)
    return a


def qualitative_panel(rows: list[PanelRow], path: str | os.PathLike, fused_name: str = "fused",
                      max_side: int = 256) -> None:
    """A grid, one image per row: image | ground truth | LFDL | MITL | fused (binary masks, white = manipulated).
    Rows are labelled #1, #2, ... (horizontal, beside the row); a key under the grid gives each row's image id and
    label, so long ids never overlap."""
    _save(_panel_fig(rows, fused_name, max_side), path)


def _panel_fig(rows: list[PanelRow], fused_name: str = "fused", max_side: int = 256):
    if not rows:
        raise ValueError("qualitative_panel needs at least one row")
    cols = PANEL_COLUMNS[:-1] + (fused_name,)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.3 * len(cols), 2.5 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        tiles = (r.image, r.gt, r.lfdl, r.mitl, r.fused)
        for j, (name, tile) in enumerate(zip(cols, tiles)):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            t = _thumb(tile, max_side, mask=j > 0)
            if t is None:
                ax.set_facecolor("0.85")
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            else:
                ax.imshow(t, cmap=None if t.ndim == 3 else "gray", vmin=0, vmax=255, interpolation="nearest")
            if i == 0:
                ax.set_title(name, fontsize=10)
            note = r.notes.get(name if j < 4 else "fused")
            if note:
                ax.set_xlabel(note, fontsize=8)
        axes[i, 0].set_ylabel(f"#{i + 1}", rotation=0, fontsize=11, ha="right", va="center", labelpad=6)
    fig.tight_layout()
    key = "\n".join(f"#{i + 1}  {r.image_id}" + (f"  ({r.label})" if r.label else "") for i, r in enumerate(rows))
    fig.text(0.01, -0.005, key, ha="left", va="top", fontsize=8, family="monospace")
    return fig


def message_figure(text: str, path: str | os.PathLike) -> None:
    """A small figure that only states ``text`` (for a figure that has nothing to show, and says why)."""
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    _save(fig, path)
