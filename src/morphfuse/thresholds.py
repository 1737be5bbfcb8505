"""Image-score and mask thresholds fitted on the val split (``evaluate.thresholds: val``; ``morphfuse thresholds``).

The test split must not choose its own thresholds, so they are fitted on val and then used for the test split's
fusion, tables and the bundle:

- score threshold (an image is fake when LFDL's score >= t): the t of highest val accuracy among 0.5, every
  distinct val score and the midpoints between consecutive ones; ties go to the t closest to 0.5.
- mask threshold (probability maps binarised at v/255 >= t before fusion, ``fusion.threshold``): the t of the grid
  (--grid, 0.05 ... 0.95 by default) of highest val F1 of the fused ``--variant`` (its kernel ``--kernel``) on the val
  fakes, under --averaging (per_image: the mean of per-image F1, an image with empty truth and prediction left
  out; pooled: from the summed counts); ties go to the t closest to 0.5. Each val image is read once and fused at
  every grid value.

Inputs: the val manifest shards (``--manifest``, rows of split ``val``) and, per shard, the predict folders of LFDL
(``--lfdl``: ``scores.csv`` and ``masks/``) and MITL (``--mitl``: ``masks/``), in the same order. A val image
without a score or a mask, or whose masks do not have its size, is left out and counted; no usable val image of
both classes is an error.

Output (``--out``, JSON, written atomically)::

    {"source": "val", "score_threshold": t_s, "mask_threshold": t_m, "variant", "kernel", "averaging", "grid",
     "val": {"n_images", "n_real", "n_fake", "n_left_out", "accuracy", "accuracy_at_0.5", "f1", "f1_at_0.5"}}

The workflow passes it to ``fuse --thresholds``, ``tables --thresholds`` and ``export --thresholds``; the bundle
records it as meta["thresholds"] and sets meta["fusion"]["threshold"] and meta["score_rules"]["fake_threshold"],
which ``detect`` uses.

Example:
  morphfuse thresholds --manifest manifest/shards/val_00000.parquet --lfdl predict/lfdl/val_00000 \\
      --mitl predict/mitl/val_00000 --variant mdmf --kernel 5 --out thresholds/thresholds.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)
DEFAULT_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))


def _closest_to_half(candidates: np.ndarray, values: np.ndarray) -> int:
    """Index of the best value; among ties (equal up to 1e-12), the candidate closest to 0.5 (then the lower)."""
    best = np.nanmax(values)
    tied = np.flatnonzero(values >= best - 1e-12)
    return int(tied[np.lexsort((candidates[tied], np.abs(candidates[tied] - 0.5)))][0])


def fit_score_threshold(labels, scores) -> tuple[float, float]:
    """``(t, accuracy)``: the threshold of highest accuracy of ``score >= t`` (see the module docstring)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not labels.any() or labels.all():
        raise UserError("thresholds: the val images must include real and fake images to fit a score threshold")
    u = np.unique(scores)
    cand = np.unique(np.concatenate([[0.5], u, (u[1:] + u[:-1]) / 2]))
    fake_sorted, real_sorted = np.sort(scores[labels]), np.sort(scores[~labels])
    tp = len(fake_sorted) - np.searchsorted(fake_sorted, cand, side="left")   # fakes with score >= t
    tn = np.searchsorted(real_sorted, cand, side="left")                      # reals with score < t
    acc = (tp + tn) / len(scores)
    i = _closest_to_half(cand, acc)
    return float(cand[i]), float(acc[i])


def accuracy_at(labels, scores, t: float) -> float:
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    return float(np.mean((scores >= t) == labels))


def mask_counts(images, variant: str, kernel: int, grid) -> np.ndarray:
    """``(n_images, len(grid), 3)`` TP, FP, FN of the fused ``variant`` at every grid threshold, from
    ``images`` = iterable of ``(lfdl_u8, mitl_u8, gt_bool)``."""
    from .fusion import _fuse_u8

    out = []
    for lf, mi, gt in images:
        n_gt = int(np.count_nonzero(gt))
        row = []
        for t in grid:
            pred = _fuse_u8(lf, mi, variant, kernel, float(t)) != 0
            tp = int(np.count_nonzero(pred & gt))
            row.append((tp, int(np.count_nonzero(pred)) - tp, n_gt - tp))
        out.append(row)
    return np.asarray(out, dtype=np.int64).reshape(len(out), len(grid), 3)


def f1_per_threshold(counts: np.ndarray, averaging: str) -> np.ndarray:
    """F1 at each grid threshold: the mean of per-image F1 (0/0 left out) or the pooled F1."""
    tp, fp, fn = (counts[..., k].astype(np.float64) for k in range(3))
    if averaging == "pooled":
        tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
        den = 2 * tp + fp + fn
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(f1, axis=0) if f1.size else np.full(counts.shape[1], np.nan)


def fit_mask_threshold(counts: np.ndarray, grid, averaging: str) -> tuple[float, float]:
    f1 = f1_per_threshold(counts, averaging)
    if np.all(np.isnan(f1)):
        raise UserError("thresholds: no val fake image with a usable mask: cannot fit the mask threshold")
    g = np.asarray(grid, dtype=np.float64)
    i = _closest_to_half(g, np.where(np.isnan(f1), -np.inf, f1))
    return float(g[i]), float(f1[i])


def parse_grid(text: str) -> tuple[float, ...]:
    """``"0.05:0.95:0.05"`` (start:stop:step, stop included) or ``"0.3,0.5,0.7"``; values in (0, 1]."""
    try:
        if ":" in text:
            a, b, c = (float(x) for x in text.split(":"))
            if c <= 0:
                raise ValueError
            vals = [round(a + k * c, 10) for k in range(int(math.floor((b - a) / c + 1e-9)) + 1)]
        else:
            vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--grid {text!r}: expected START:STOP:STEP or a comma-separated list of numbers") from None
    if not vals or any(not 0.0 < v <= 1.0 for v in vals):
        raise UserError(f"--grid {text!r}: thresholds must lie in (0, 1]")
    return tuple(vals)


# ------------------------------------------------------------------------------------------------ reading
def val_images(manifests, lfdl_dirs, mitl_dirs):
    """``(labels, scores, images, n_left_out)``: the val rows with a score and both masks of their size; images is
    a generator of ``(lfdl_u8, mitl_u8, gt)`` over the fakes (read one at a time)."""
    from .evaluate import manifest_items, read_scores
    from .imageio import read_mask, read_prob_u8
    from .imageio import BadImageError

    if not (len(manifests) == len(lfdl_dirs) == len(mitl_dirs)):
        raise UserError("--manifest, --lfdl and --mitl need one entry per val shard each, in the same order")
    labels, scores, fakes, left_out = [], [], [], 0
    for man, lf, mi in zip(manifests, lfdl_dirs, mitl_dirs):
        sc = read_scores(Path(lf) / "scores.csv")
        for it in manifest_items(Path(man), "val"):
            s = sc.get(it.image_id)
            paths = (Path(lf) / "masks" / f"{it.image_id}.png", Path(mi) / "masks" / f"{it.image_id}.png")
            if it.error or not isinstance(s, float) or not all(p.is_file() for p in paths):
                left_out += 1
                continue
            labels.append(it.label)
            scores.append(s)
            if it.label == 1:
                fakes.append((it, paths))
    n_bad = [0]

    def images():
        for it, (pl, pm) in fakes:
            try:
                gt, a, b = read_mask(it.gt_path), read_prob_u8(pl), read_prob_u8(pm)
            except BadImageError as e:
                log.warning("left out of the mask threshold: %s", e)
                n_bad[0] += 1
                continue
            if not (gt.shape == a.shape == b.shape):
                log.warning("left out of the mask threshold: %s (masks of another size than its truth)", it.image_id)
                n_bad[0] += 1
                continue
            yield a, b, gt

    return np.asarray(labels, np.int64), np.asarray(scores, np.float64), images, left_out, n_bad


def fit(manifests, lfdl_dirs, mitl_dirs, variant: str, kernel: int, averaging: str = "per_image",
        grid=DEFAULT_GRID) -> dict:
    labels, scores, images, left_out, n_bad = val_images(manifests, lfdl_dirs, mitl_dirs)
    if not len(labels):
        raise UserError("thresholds: no usable val image (with a score and both masks): is there a val split?")
    t_s, acc = fit_score_threshold(labels, scores)
    counts = mask_counts(images(), variant, kernel, grid)
    t_m, f1 = fit_mask_threshold(counts, grid, averaging)
    f1_all = f1_per_threshold(counts, averaging)
    half = [i for i, g in enumerate(grid) if abs(g - 0.5) < 1e-12]
    return {"source": "val", "score_threshold": t_s, "mask_threshold": t_m, "variant": variant, "kernel": int(kernel),
            "averaging": averaging, "grid": [float(g) for g in grid],
            "val": {"n_images": int(len(labels)), "n_real": int((labels == 0).sum()), "n_fake": int(labels.sum()),
                    "n_left_out": int(left_out + n_bad[0]), "accuracy": acc,
                    "accuracy_at_0.5": accuracy_at(labels, scores, 0.5), "f1": f1,
                    "f1_at_0.5": float(f1_all[half[0]]) if half and not math.isnan(f1_all[half[0]]) else None,
                    "f1_by_threshold": [None if math.isnan(x) else float(x) for x in f1_all]}}


def read_thresholds(path) -> dict:
    """A thresholds JSON written by :func:`fit` (checked: both thresholds are numbers in [0, 1])."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--thresholds {p}: not a readable thresholds JSON ({e})") from None
    for k in ("score_threshold", "mask_threshold"):
        v = d.get(k) if isinstance(d, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise UserError(f"--thresholds {p}: '{k}' must be a number in [0, 1] (is it a `morphfuse thresholds` "
                            "output?)")
    return d


def bundle_thresholds(meta: dict, path=None) -> None:
    """Record in a bundle's meta the thresholds it is exported with: fitted on val (``path``, a thresholds JSON:
    they replace meta["fusion"]["threshold"] and meta["score_rules"]["fake_threshold"], which detect uses) or the
    config's (no path)."""
    if path is None:
        meta["thresholds"] = {"source": "config", "mask_threshold": meta["fusion"]["threshold"],
                              "score_threshold": meta["score_rules"]["fake_threshold"]}
        return
    d = read_thresholds(path)
    meta["fusion"]["threshold"] = float(d["mask_threshold"])
    meta["score_rules"]["fake_threshold"] = float(d["score_threshold"])
    meta["thresholds"] = {"source": "val", "mask_threshold": float(d["mask_threshold"]),
                          "score_threshold": float(d["score_threshold"]),
                          **{k: d[k] for k in ("variant", "kernel", "averaging", "val") if k in d}}


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .config import default

    p.add_argument("--manifest", nargs="+", required=True, type=Path, metavar="SHARD.parquet",
                   help="the val manifest shards (rows of split val are used)")
    p.add_argument("--lfdl", nargs="+", required=True, type=Path, metavar="DIR",
                   help="LFDL predict folders (scores.csv, masks/), one per shard, in --manifest's order")
    p.add_argument("--mitl", nargs="+", required=True, type=Path, metavar="DIR",
                   help="MITL predict folders (masks/), one per shard, in --manifest's order")
    p.add_argument("--variant", default="mdmf", help="the fusion variant whose F1 chooses the mask threshold")
    p.add_argument("--kernel", type=int, default=default("fusion.kernel"), help="its structuring element side")
    p.add_argument("--averaging", choices=("per_image", "pooled"), default=default("evaluate.averaging"),
                   help="F1 per image then the mean, or from the pooled counts")
    p.add_argument("--grid", default="0.05:0.95:0.05", help="mask thresholds tried: START:STOP:STEP or a,b,c")
    p.add_argument("--out", required=True, type=Path, metavar="JSON", help="the thresholds file")


def run(args: argparse.Namespace) -> int:
    from .fusion import VARIANTS, check_kernel
    from .imageio import write_text_atomic

    if args.variant not in VARIANTS:
        raise UserError(f"--variant {args.variant!r}: expected one of {', '.join(VARIANTS)}")
    try:
        kernel = check_kernel(args.kernel)
    except ValueError as e:
        raise UserError(f"--kernel: {e}") from None
    d = fit(args.manifest, args.lfdl, args.mitl, args.variant, kernel, args.averaging, parse_grid(args.grid))
    write_text_atomic(args.out, json.dumps(d, indent=2) + "\n")
    v = d["val"]
    log.info("val (%d images, %d left out): score threshold %.4g (accuracy %.4f; %.4f at 0.5), mask threshold %.2f "
             "(%s F1 %.4f; %s at 0.5)", v["n_images"], v["n_left_out"], d["score_threshold"], v["accuracy"],
             v["accuracy_at_0.5"], d["mask_threshold"], args.variant, v["f1"], v["f1_at_0.5"])
    return 0
