"""Reduce per-shard evaluations to the ablation table (the paper's Table 2), breakdowns and figures.

Input: the per-image rows written by `morphfuse evaluate` (``--out-counts`` in manifest mode, or
``per_image.parquet`` in dataset mode), given as files or folders (searched recursively for ``*.parquet``; the
workflow's layout is ``evaluate/{variant}/{shard}.parquet``). A row's variant is its ``variant`` column, or else
the name of the folder holding its file. Pixel counts are stored per image, so the conventions (--averaging,
--images, --iou, --empty) are applied HERE and may differ from those used when evaluating; the mask threshold is
fixed by the counts and read from them.

Memory: the count files are read one at a time, only the columns used; of each valid row only what the exact AUC,
the bootstrap and the breakdowns need is kept (score, label, identity / method / source codes, the four pixel
counts, F1 for the panels and a 64-bit key of the image id for joins: ~45 bytes), so 1.5 M images × 6 variants
stay under 1.5 GB (BENCHMARKS.md). Identities are coded as their sorted names, which keeps the bootstrap's
resamples those of a table computed from the whole frames.

Rows, in this order when present: lfdl, mitl, lfdl_score_mitl_mask, naive_or, mdmf, closing_or, baseline_face,
baseline_all (``morphfuse evaluate --baseline``: the face crops / the whole image as the mask, score 0.5), then any
other variant. ``lfdl_score_mitl_mask`` is the ``mitl`` rows (MITL mask counts) with each image's score replaced by the
score of its ``lfdl`` row (joined on image_id; an image without a valid lfdl row is left out and counted), unless
the inputs already hold that variant. ``mitl`` keeps its own score (the one derived from the MITL mask).

Outputs in --out: ablation.csv / ablation.md (AUC, F1, IoU, Final with a 95 % bootstrap interval over identities,
plus AP, EER, ACC and the pixel counts), ablation_all.csv (the same table with --images all: the reals' predicted
pixels count as false positives; shown in ablation.md beside the configured one), ablation_diffs.csv / .md
(a − b for the pairs of DIFF_PAIRS present, e.g. mdmf − naive_or, per metric, with a PAIRED bootstrap interval: the
same identity resamples for both variants; ``excludes_zero`` says whether the interval supports an ordering; under
the configured --images and under all; also in ablation.md), breakdown_method.{csv,md} (every real image + the
fakes of one method), breakdown_source.{csv,md} (the images of one source), errors.{csv,md} (rows left out per
variant and, with --ledgers, ledger lines per stage), tables.json (everything, for the report). In --figures
(default OUT/figures): roc.png, pr.png (one curve per distinct score set) and, with --panels N, panels.png: N fake
test images drawn at random (--seed), each as image | ground truth | LFDL | MITL | fused. Panels need
--manifest (image and mask paths) and --lfdl-masks, --mitl-masks, --fused-masks: folders searched for
``<image_id>.png`` directly, in ``*/`` or in ``*/masks/`` (the workflow's predict/{model} and fuse/{variant}
folders qualify).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .evaluate import add_convention_arguments
from .textfmt import fmt_estimate, fmt_metric, json_default, json_ready, md_table
from .imageio import BadImageError, read_image, write_csv, write_text_atomic
from .ledger import read_ledgers
from .metrics import Convention, summarize

log = logging.getLogger(__name__)

VARIANT_ORDER = ("lfdl", "mitl", "lfdl_score_mitl_mask", "naive_or", "mdmf", "closing_or", "baseline_face",
                 "baseline_all")
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
# Read per file; nothing else of a file is kept than these per-image columns of its valid rows.
OPTIONAL = ("ok", "variant", "group", "method", "source", "threshold", "f1")


def panel_variant(variants) -> str:
    """The fused variant the qualitative panels show: MDMF when it is run, else the last configured one."""
    return "mdmf" if "mdmf" in variants else list(variants)[-1]


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


def id_keys(ids) -> np.ndarray:
    """64-bit keys of image ids (pandas' SipHash): joins and duplicate checks without holding the strings."""
    return pd.util.hash_pandas_object(pd.Series(ids, dtype=object).astype(str), index=False).to_numpy(np.uint64)


class Names:
    """Strings (groups, methods, sources) as integer codes in order of first appearance; :meth:`sorted_codes`
    maps them to the codes of the sorted names (what ``np.unique`` of the strings would give)."""

    def __init__(self):
        self.index: dict[str, int] = {}

    def codes(self, values) -> np.ndarray:
        codes, uniques = pd.factorize(pd.Series(values, dtype=object).astype(str), sort=False)
        table = np.array([self.index.setdefault(u, len(self.index)) for u in uniques], dtype=np.int32)
        return table[codes] if len(table) else np.zeros(len(codes), np.int32)

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def rank(self) -> np.ndarray:
        """``rank[code]``: the position of the code's name among all names sorted."""
        order = sorted(range(len(self.index)), key=self.names.__getitem__)
        rank = np.empty(len(order), np.int32)
        rank[order] = np.arange(len(order), dtype=np.int32)
        return rank


class Column:
    """A growable 1-D array: appends go into one block that grows by half when full (large blocks come from and
    go back to the OS, where thousands of per-file pieces would fragment the heap and keep RSS)."""

    def __init__(self):
        self.data: np.ndarray | None = None
        self.n = 0

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if self.data is None:
            self.data = np.empty(max(1 << 16, len(values)), values.dtype)
        dtype = np.result_type(self.data.dtype, values.dtype)
        need = self.n + len(values)
        if need > len(self.data) or dtype != self.data.dtype:
            grown = np.empty(max(need, int(len(self.data) * 1.5)), dtype)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.data[self.n:need] = values
        self.n = need

    def array(self) -> np.ndarray:
        return np.zeros(0) if self.data is None else self.data[:self.n].copy()


class VariantRows:
    """The valid (``ok``) rows of one variant as compact columns (about 45 bytes per image), plus how many rows
    there were and how many were left out; what the metrics, the bootstrap and the breakdowns need."""

    COLUMNS = ("key", "label", "score", "group", "method", "source", "TP", "FP", "FN", "TN", "f1")

    def __init__(self, name: str):
        self.name = name
        self.n_rows = 0
        self.n_errors = 0
        self.files: list[Path] = []
        self._parts: dict[str, Column] = {c: Column() for c in self.COLUMNS}
        self.cols: dict[str, np.ndarray] = {}

    def add(self, f: Path, df: pd.DataFrame, ok: np.ndarray, names: dict[str, Names]) -> None:
        self.n_rows += len(df)
        self.n_errors += int(len(df) - ok.sum())
        self.files.append(f)
        d = df[ok]
        p = self._parts
        p["key"].append(id_keys(d["image_id"]))
        p["label"].append(d["label"].to_numpy(np.int8))
        p["score"].append(d["score"].to_numpy(np.float64))
        p["group"].append(names["group"].codes(d["group"] if "group" in d else d["image_id"]))
        for c in ("method", "source"):
            p[c].append(names[c].codes(d[c] if c in d else np.full(len(d), "", object)).astype(np.int16))
        for c in ("TP", "FP", "FN", "TN"):
            v = d[c].to_numpy(np.int64)
            p[c].append(v.astype(np.int32) if not len(v) or v.max() < 2**31 else v)
        p["f1"].append(d["f1"].to_numpy(np.float32) if "f1" in d else np.full(len(d), np.nan, np.float32))

    def finish(self, group_rank: np.ndarray) -> None:
        for c in list(self._parts):
            self.cols[c] = self._parts.pop(c).array()
        self.cols["group"] = group_rank[self.cols["group"]] if len(self.cols["group"]) else self.cols["group"]

    def __getattr__(self, item):
        cols = self.__dict__.get("cols", {})
        if item in cols:
            return cols[item]
        raise AttributeError(item)

    def __len__(self) -> int:
        return len(self.cols["key"])

    def subset(self, name: str, sel: np.ndarray, **replace) -> "VariantRows":
        out = VariantRows(name)
        out.n_rows, out.files, out._parts = self.n_rows, self.files, {}
        out.method_names, out.source_names = self.method_names, self.source_names
        out.n_errors = self.n_errors + int(len(sel) - sel.sum())
        out.cols = {c: (replace[c] if c in replace else v)[sel] for c, v in self.cols.items()}
        return out

    def summary(self, conv: Convention, score_threshold: float, sel: np.ndarray | None = None) -> dict:
        c = self.cols if sel is None else {k: v[sel] for k, v in self.cols.items()}
        m = summarize(c["label"], c["score"], c["TP"], c["FP"], c["FN"], c["TN"], conv, score_threshold)
        m["n_errors"] = self.n_errors if sel is None else 0
        return m

    def image_id_of(self, key: int) -> str:
        """Find an image id by its key again (for messages): rescans this variant's files."""
        for f in self.files:
            ids = pd.read_parquet(f, columns=["image_id"])["image_id"].astype(str)
            hit = ids[id_keys(ids) == np.uint64(key)]
            if len(hit):
                return str(hit.iloc[0])
        return f"<key {key}>"


def load_counts(paths: list[Path]) -> tuple[dict[str, VariantRows], list[float]]:
    """``variant -> VariantRows`` from evaluate's per-image files, read one file at a time (only the columns
    used), and the mask thresholds found."""
    import pyarrow.parquet as pq

    names = {k: Names() for k in ("group", "method", "source")}
    variants: dict[str, VariantRows] = {}
    thresholds: set[float] = set()
    for f in find_count_files(paths):
        try:
            have = set(pq.read_schema(f).names)
            df = pd.read_parquet(f, columns=[c for c in REQUIRED + OPTIONAL if c in have])
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{f}: not a readable Parquet file ({e})") from None
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise UserError(f"{f}: missing column(s) {', '.join(missing)}; is it a `morphfuse evaluate` output?")
        if "threshold" in df.columns:
            thresholds.update(float(t) for t in df["threshold"].dropna().unique())
        ok = (df["ok"].astype(bool) if "ok" in df.columns
              else df[["score", "TP", "FP", "FN", "TN"]].notna().all(axis=1)).to_numpy(bool)
        variant = df["variant"].astype(str) if "variant" in df.columns else pd.Series("", index=df.index)
        variant = variant.where(variant.str.len() > 0, f.parent.name).to_numpy()
        for v in pd.unique(variant):
            rows = variant == v
            variants.setdefault(str(v), VariantRows(str(v))).add(f, df[rows], ok[rows], names)
        del df
    rank = names["group"].rank()
    for v in variants.values():
        v.finish(rank)
        v.method_names, v.source_names = names["method"].names, names["source"].names
        keys = np.sort(v.key)
        dup = keys[1:][keys[1:] == keys[:-1]]
        if dup.size:
            raise UserError(f"variant {v.name}: image {v.image_id_of(int(dup[0]))!r} (and {len(np.unique(dup)) - 1} "
                            "more) is in several count files; each image must be evaluated once per variant")
    return variants, sorted(thresholds)


def add_swapped_variant(frames: dict[str, VariantRows]) -> str | None:
    """Add ``lfdl_score_mitl_mask`` (mitl counts, lfdl scores) if absent and both sources are present."""
    if SWAPPED in frames or "lfdl" not in frames or "mitl" not in frames:
        return None
    lf, mi = frames["lfdl"], frames["mitl"]
    order = np.argsort(lf.key, kind="stable")
    lk = lf.key[order]
    pos = np.clip(np.searchsorted(lk, mi.key), 0, max(len(lk) - 1, 0))
    found = (lk[pos] == mi.key) if len(lk) else np.zeros(len(mi), bool)
    score = np.where(found, lf.score[order][pos] if len(lk) else 0.0, np.nan)
    frames[SWAPPED] = mi.subset(SWAPPED, found, score=score)
    return f"{SWAPPED}: the mitl rows (MITL mask counts) with each image's lfdl score"


def ordered_variants(frames) -> list[str]:
    return [v for v in VARIANT_ORDER if v in frames] + sorted(v for v in frames if v not in VARIANT_ORDER)


# ------------------------------------------------------------------------------------------------- metrics
def variant_row(name: str, v: VariantRows, conv: Convention, score_threshold: float, n_boot: int, seed: int,
                confidence: float, cache: dict | None = None) -> dict:
    """One row of the ablation table. ``cache`` (a dict) receives the row's bootstrap values per resample, keyed by
    (name, convention), for :func:`paired_differences` to reuse (the same resamples when the groups are the same)."""
    m = v.summary(conv, score_threshold)
    row = {"variant": name}
    for k in METRIC_KEYS:
        row[k] = m[k]
        row[f"{k}_lo"] = row[f"{k}_hi"] = None
    codes = np.unique(v.group, return_inverse=True)[1].ravel() if len(v) else np.zeros(0, np.int64)
    if n_boot > 0 and len(v):
        values = bootstrap_values(v.label, v.score, v.TP, v.FP, v.FN, v.TN, codes, conv, n_boot, seed)
        lo, hi = _percentiles(values, confidence)
        if cache is not None:
            cache[(name, conv)] = (np.unique(v.group), n_boot, seed, values)
        for i, k in enumerate(METRIC_KEYS):
            if m[k] is not None and not math.isnan(lo[i]):
                row[f"{k}_lo"], row[f"{k}_hi"] = float(lo[i]), float(hi[i])
    row.update({"ap": m["ap"], "eer": m["eer"], "accuracy": m["accuracy"], **m["counts"],
                "n_images": m["n_images"], "n_real": m["n_real"], "n_fake": m["n_fake"],
                "n_groups": int(codes.max()) + 1 if codes.size else 0, "n_pixel_images": m["n_pixel_images"],
                "n_skipped_empty": m["n_skipped_empty"], "n_errors": m["n_errors"],
                "note": "; ".join(m[k] for k in ("auc_reason", "localization_reason") if m.get(k))})
    return row


class BootstrapStatistic:
    """[AUC, F1, IoU, Final] of one variant under bootstrap multiplicities of its groups, from per-group sums: an
    image's bootstrap weight is its group's multiplicity, so every weighted sum is a sum over groups, and the AUC's
    per-score weights are a sparse (scores × groups) count matrix times the multiplicities. One resample costs one
    gather and one bincount per class instead of several dense passes over all images.

    ``codes`` are the images' group codes in ``range(n_groups)``; ``mult`` (length ``n_groups``) is how often each
    group was drawn. Several variants coded against the same groups can be evaluated on the same ``mult``: the
    paired bootstrap (:func:`paired_differences`)."""

    def __init__(self, labels, scores, tp, fp, fn, tn, codes, n_groups: int, conv: Convention):
        from .metrics import f1_from_counts, iou_from_counts, pixel_image_mask

        labels = np.asarray(labels).astype(np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        G = self.G = int(n_groups)
        self.conv = conv
        uniq, inv = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
        inv = inv.ravel()
        self.n_values = uniq.size
        pos = labels == 1

        def pairs(m):
            key = np.unique(inv[m] * G + codes[m], return_counts=True)
            return key[0] // G, key[0] % G, key[1].astype(np.float64)

        self.pos, self.neg = pairs(pos), pairs(~pos)
        sel = pixel_image_mask(labels, conv.images)
        cs = codes[sel]
        c = [np.asarray(x, dtype=np.float64)[sel] for x in (tp, fp, fn, tn)]
        self.pooled = conv.averaging == "pooled"
        if self.pooled:
            self.sums = [np.bincount(cs, weights=x, minlength=G) for x in c]
            self.n_sel = np.bincount(cs, minlength=G).astype(np.float64)
        else:
            f1s = f1_from_counts(c[0], c[1], c[2], empty=conv.empty)
            ious = iou_from_counts(*c, iou=conv.iou, empty=conv.empty)
            f1_ok, iou_ok = ~np.isnan(f1s), ~np.isnan(ious)
            self.f1_sum = np.bincount(cs[f1_ok], weights=f1s[f1_ok], minlength=G)
            self.f1_n = np.bincount(cs[f1_ok], minlength=G).astype(np.float64)
            self.iou_sum = np.bincount(cs[iou_ok], weights=ious[iou_ok], minlength=G)
            self.iou_n = np.bincount(cs[iou_ok], minlength=G).astype(np.float64)

    def __call__(self, mult: np.ndarray) -> tuple[float, float, float, float]:
        from .metrics import f1_from_counts, iou_from_counts

        conv = self.conv
        (p_val, p_grp, p_cnt), (n_val, n_grp, n_cnt) = self.pos, self.neg
        posw = np.bincount(p_val, weights=p_cnt * mult[p_grp], minlength=self.n_values)
        negw = np.bincount(n_val, weights=n_cnt * mult[n_grp], minlength=self.n_values)
        P, N = posw.sum(), negw.sum()
        auc = math.nan if P <= 0 or N <= 0 else float(np.dot(posw, np.cumsum(negw) - 0.5 * negw) / (P * N))
        if self.pooled:
            s = [float(np.dot(mult, x)) for x in self.sums]
            ok = float(np.dot(mult, self.n_sel)) > 0
            f1 = float(f1_from_counts(s[0], s[1], s[2], empty=conv.empty)) if ok else math.nan
            iou = float(iou_from_counts(*s, iou=conv.iou, empty=conv.empty)) if ok else math.nan
        else:
            wf, wi = float(np.dot(mult, self.f1_n)), float(np.dot(mult, self.iou_n))
            f1 = float(np.dot(mult, self.f1_sum) / wf) if wf > 0 else math.nan
            iou = float(np.dot(mult, self.iou_sum) / wi) if wi > 0 else math.nan
        return auc, f1, iou, (auc + f1 + iou) / 3.0


def _multiplicities(rng: np.random.Generator, G: int) -> np.ndarray:
    """One resample of ``G`` groups with replacement, as each group's multiplicity (metrics.bootstrap_ci's draw)."""
    return np.bincount(rng.integers(0, G, size=G), minlength=G).astype(np.float64)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        col = values[:, j][~np.isnan(values[:, j])]
        if col.size:
            lo[j], hi[j] = np.quantile(col, [alpha, 1.0 - alpha])
    return lo, hi


def bootstrap_values(labels, scores, tp, fp, fn, tn, codes, conv: Convention, n_resamples: int,
                     seed: int) -> np.ndarray:
    """``(n_resamples, 4)``: [AUC, F1, IoU, Final] in each resample of the groups ``codes`` (0 .. G-1)."""
    codes = np.asarray(codes, dtype=np.int64)
    G = int(codes.max()) + 1
    stat = BootstrapStatistic(labels, scores, tp, fp, fn, tn, codes, G, conv)
    rng = np.random.default_rng(seed)
    return np.array([stat(_multiplicities(rng, G)) for _ in range(n_resamples)]).reshape(n_resamples, 4)


def grouped_bootstrap(labels, scores, tp, fp, fn, tn, codes, conv: Convention, n_resamples: int, seed: int,
                      confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """``metrics.bootstrap_ci(None, groups, metrics.table_statistic(...))`` — the same resamples (the same draws
    of the same generator), the same statistics [AUC, F1, IoU, Final] up to float summation order — computed from
    per-group sums (:class:`BootstrapStatistic`)."""
    return _percentiles(bootstrap_values(labels, scores, tp, fp, fn, tn, codes, conv, n_resamples, seed), confidence)


# Differences whose sign is an ordering claim of the paper (mdmf > naive_or > lfdl) or of the baselines (the models
# beat the face prior); a pair is shown when both variants are in the table.
DIFF_PAIRS = (("mdmf", "naive_or"), ("naive_or", "lfdl"), ("mdmf", "lfdl"), ("closing_or", "mdmf"),
              ("lfdl", "baseline_face"), ("mdmf", "baseline_face"), ("baseline_face", "baseline_all"))


def paired_differences(a: VariantRows, b: VariantRows, conv: Convention, n_resamples: int, seed: int,
                       confidence: float, score_threshold: float = 0.5, unpaired_seed: int | None = None,
                       cache: dict | None = None) -> dict:
    """Metrics of ``a`` minus those of ``b`` [AUC, F1, IoU, Final], with a percentile bootstrap interval of the
    difference from PAIRED resamples: the groups (identities) of both variants are coded together and each resample
    draws them once, for both (a group only one variant has weighs in that variant alone). What varies between
    resamples that moves both variants alike cancels in the difference, so the interval is that of the difference,
    not of either metric. ``unpaired_seed`` draws ``b``'s resamples from a generator of their own instead (for
    comparison only: the interval of two independent bootstraps). ``cache`` (filled by :func:`variant_row`) gives
    both variants' values per resample when each has all the groups of the pair: its resamples are then these
    very resamples (same seed, same groups), and nothing is recomputed."""
    ma, mb = a.summary(conv, score_threshold), b.summary(conv, score_threshold)
    diff = np.array([(math.nan if ma[k] is None or mb[k] is None else ma[k] - mb[k]) for k in METRIC_KEYS], float)
    union = np.union1d(a.group, b.group)
    G = len(union)
    lo = hi = np.full(4, np.nan)
    cached = [cache.get((v.name, conv)) if cache is not None and unpaired_seed is None else None for v in (a, b)]
    if n_resamples > 0 and len(a) and len(b) and all(
            c is not None and c[1] == n_resamples and c[2] == seed and np.array_equal(c[0], union) for c in cached):
        lo, hi = _percentiles(cached[0][3] - cached[1][3], confidence)
        lo, hi = np.where(np.isnan(diff), np.nan, lo), np.where(np.isnan(diff), np.nan, hi)
    elif n_resamples > 0 and len(a) and len(b):
        sa = BootstrapStatistic(a.label, a.score, a.TP, a.FP, a.FN, a.TN, np.searchsorted(union, a.group), G, conv)
        sb = BootstrapStatistic(b.label, b.score, b.TP, b.FP, b.FN, b.TN, np.searchsorted(union, b.group), G, conv)
        rng = np.random.default_rng(seed)
        rng_b = rng if unpaired_seed is None else np.random.default_rng(unpaired_seed)
        values = np.empty((n_resamples, 4))
        for r in range(n_resamples):
            mult = _multiplicities(rng, G)
            mult_b = mult if unpaired_seed is None else _multiplicities(rng_b, G)
            values[r] = np.subtract(sa(mult), sb(mult_b))
        lo, hi = _percentiles(values, confidence)
        lo, hi = np.where(np.isnan(diff), np.nan, lo), np.where(np.isnan(diff), np.nan, hi)
    return {"diff": diff, "lo": lo, "hi": hi, "n_groups": G}


def diffs_frame(frames: dict[str, VariantRows], conv: Convention, n_resamples: int, seed: int, confidence: float,
                score_threshold: float, pairs=DIFF_PAIRS, cache: dict | None = None) -> pd.DataFrame:
    """One row per (pair, metric): ``a - b`` with its paired interval and whether the interval excludes 0."""
    rows = []
    for a, b in pairs:
        if a not in frames or b not in frames:
            continue
        d = paired_differences(frames[a], frames[b], conv, n_resamples, seed, confidence, score_threshold,
                               cache=cache)
        for i, k in enumerate(METRIC_KEYS):
            x, lo, hi = (float(d[c][i]) for c in ("diff", "lo", "hi"))
            known = not (math.isnan(lo) or math.isnan(hi))
            excl = known and (lo > 0 or hi < 0)
            order = (f"{a} > {b}" if lo > 0 else f"{a} < {b}") if excl else ("not ordered" if known else "–")
            rows.append({"images": conv.images, "a": a, "b": b, "metric": k, "diff": None if math.isnan(x) else x,
                         "lo": lo if known else None, "hi": hi if known else None, "excludes_zero": excl,
                         "ordering": order, "n_groups": d["n_groups"]})
    return pd.DataFrame(rows, columns=["images", "a", "b", "metric", "diff", "lo", "hi", "excludes_zero", "ordering",
                                       "n_groups"])


def breakdown(frames, by: str, conv: Convention, score_threshold: float) -> pd.DataFrame:
    """Per variant and value of ``by`` (method or source). For ``method``: all real images + the fakes of that
    method (detection needs both classes); for ``source``: the images of that source."""
    rows = []
    for name in ordered_variants(frames):
        v = frames[name]
        codes = getattr(v, by)
        labels = v.method_names if by == "method" else v.source_names
        if by == "method":
            present = np.unique(codes[v.label == 1])
            subsets = [(labels[c], (v.label == 0) | (codes == c)) for c in present]
        else:
            subsets = [(labels[c], codes == c) for c in np.unique(codes)]
        for x, sel in sorted(subsets, key=lambda t: t[0]):
            m = v.summary(conv, score_threshold, sel)
            rows.append({"variant": name, by: x, "auc": m["auc"], "f1": m["f1"], "iou": m["iou"], "final": m["final"],
                         "ap": m["ap"], "eer": m["eer"], "accuracy": m["accuracy"], **m["counts"],
                         "n_real": m["n_real"], "n_fake": m["n_fake"], "note": m.get("auc_reason", "")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ markdown
def _metric_rows(table: pd.DataFrame) -> list[list[str]]:
    return [[r["variant"]] + [fmt_estimate(r, k) for k in METRIC_KEYS + ("ap", "eer", "accuracy")]
            for r in table.to_dict("records")]


def _diff_cell(r) -> str:
    if r is None or r["diff"] is None or (isinstance(r["diff"], float) and math.isnan(r["diff"])):
        return "–"
    if r["lo"] is None or (isinstance(r["lo"], float) and math.isnan(r["lo"])):
        return f"{r['diff']:+.4f}"
    cell = f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]"
    return f"**{cell}**" if r["excludes_zero"] else cell


def diffs_markdown(diffs: pd.DataFrame, n_boot: int, confidence: float) -> list[str]:
    """The paired differences as one table: a row per (images, a − b), a column per metric."""
    if diffs.empty:
        return ["(no pair of the compared variants is in the table)"]
    lines = [f"Each cell: a − b and its {confidence:.0%} interval from PAIRED bootstrap resamples ({n_boot}; the "
             "same identities drawn for both variants, the same resamples as the table's intervals). **Bold**: the "
             "interval excludes 0, so the ordering is supported; otherwise the data do not order the two.", ""]
    rows = []
    for (images, a, b), part in diffs.groupby(["images", "a", "b"], sort=False):
        by = {r["metric"]: r for r in part.to_dict("records")}
        rows.append([images, f"{a} − {b}"] + [_diff_cell(by.get(k)) for k in METRIC_KEYS])
    return lines + md_table(["images", "a − b", "AUC", "F1", "IoU", "Final"], rows)


def ablation_markdown(table: pd.DataFrame, conv: Convention, score_threshold: float, n_boot: int,
                      confidence: float, seed: int, notes: list[str], table_all: pd.DataFrame | None = None,
                      diffs: pd.DataFrame | None = None) -> str:
    recs = table.to_dict("records")
    lines = ["# Ablation (layout of the paper's Table 2)", "",
             f"Convention: {conv.describe()}, score threshold={score_threshold:g}. Final = (AUC + F1 + IoU) / 3.",
             EMPTY_NOTE[conv.empty],
             (f"Intervals: {confidence:.0%} percentile bootstrap over identities (groups), {n_boot} resamples, "
              f"seed {seed}; the same resamples for every variant. Differences smaller than the intervals are not "
              "an ordering." if n_boot > 0 else "No bootstrap intervals (--bootstrap 0)."), ""]
    lines += md_table(["variant", "AUC", "F1", "IoU", "Final", "AP", "EER", "ACC"], _metric_rows(table))
    if any(r["variant"].startswith("baseline_") for r in recs):
        lines += ["", "Baselines: baseline_face marks the image's face crops (the boxes LFDL sees) as manipulated, "
                      "baseline_all the whole image; both score every image 0.5 (AUC 0.5). A model's F1/IoU above "
                      "baseline_face is what it localizes beyond knowing where the faces are."]
    if table_all is not None and conv.images != "all":
        lines += ["", "The same table with images=all (real images enter the pixel metrics with an empty ground "
                      "truth: every pixel they predict is a false positive, and an empty prediction on a real "
                      f"follows empty={conv.empty} as above) (ablation_all.csv):", ""]
        lines += md_table(["variant", "AUC", "F1", "IoU", "Final", "AP", "EER", "ACC"], _metric_rows(table_all))
    if diffs is not None:
        lines += ["", "Paired differences (ablation_diffs.csv):", ""] + diffs_markdown(diffs, n_boot, confidence)
    lines += ["", "Counts behind each row (pixels pooled over the images of the pixel metrics):", ""]
    lines += md_table(["variant", "TP", "FP", "FN", "TN", "images", "real", "fake", "identities",
                        "pixel-metric images", "skipped empty", "left out (errors)"],
                       [[r["variant"]] + [str(r[k]) for k in ("TP", "FP", "FN", "TN", "n_images", "n_real", "n_fake",
                                                               "n_groups", "n_pixel_images", "n_skipped_empty",
                                                               "n_errors")] for r in recs])
    notes = notes + [f"{r['variant']}: {r['note']}" for r in recs if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "Paper targets (DDL-I, Table 2; for reference: the order of the rows, not the values, is what "
                  "another data set can reproduce):", ""]
    lines += md_table(["variant", "AUC", "F1", "IoU", "Final"],
                       [[v] + [fmt_metric(x) for x in t] for v, t in PAPER_TARGETS.items()])
    lines += ["", "The paper's lfdl Final (0.7497) is not its row's own mean (0.7537), a typo in the paper. "
                  "Challenge: 1st 0.846, 2nd 0.8161.", ""]
    return "\n".join(lines)


def frame_markdown(df: pd.DataFrame, title: str, first: list[str]) -> str:
    if df.empty:
        return f"# {title}\n\n(no rows)\n"
    cols = first + [c for c in ("auc", "f1", "iou", "final", "ap", "eer", "accuracy", "TP", "FP", "FN", "TN",
                                "n_real", "n_fake", "note") if c in df.columns]
    rows = [[(fmt_metric(x) if isinstance(x, float) else ("–" if x is None else str(x))) for x in r]
            for r in df[cols].itertuples(index=False)]
    return "\n".join([f"# {title}", ""] + md_table(cols, rows)) + "\n"


# ------------------------------------------------------------------------------------------------- figures
def distinct_score_sets(frames) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One ``(labels, scores)`` per distinct score set; variants sharing one are named together (a = b)."""
    sets: list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]] = []
    for name in ordered_variants(frames):
        v = frames[name]
        order = np.argsort(v.key, kind="stable")
        key, score = v.key[order], v.score[order]
        for names, k, sc, _ in sets:
            if np.array_equal(k, key) and np.array_equal(sc, score):
                names.append(name)
                break
        else:
            sets.append(([name], key, score, v.label[order]))
    return {" = ".join(n): (lab, sc) for n, _, sc, lab in sets}


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
    from .imageio import binarize_prob, read_mask, read_prob_u8  # noqa: PLC0415
    from .plots import PanelRow, qualitative_panel  # noqa: PLC0415

    fv = frames[fused_variant]
    fake_keys = np.unique(fv.key[fv.label == 1])
    parts = []
    for m in manifests:  # only the manifest rows of the variant's valid fakes are kept
        part = pd.read_parquet(m)
        parts.append(part[np.isin(id_keys(part["image_id"]), fake_keys)])
    man = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["image_id"])
    man["image_id"] = man["image_id"].astype(str)
    man = man.drop_duplicates("image_id").set_index("image_id")
    cand = sorted(man.index)
    if not cand:
        log.warning("no fake image of %s found in the manifest: no qualitative panel", fused_variant)
        return 0
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(cand), size=min(n, len(cand)), replace=False))
    chosen_keys = id_keys([cand[i] for i in chosen])
    f1 = {}
    for v in ("lfdl", "mitl", fused_variant):
        if v in frames:
            hit = np.isin(frames[v].key, chosen_keys)
            at = {int(k): float(x) for k, x in zip(frames[v].key[hit], frames[v].f1[hit])}
            f1[v] = {cand[i]: at.get(int(k)) for i, k in zip(chosen, chosen_keys)}

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
        lf_u8, mi_u8, fu_u8 = load(read_prob_u8, lf), load(read_prob_u8, mi), load(read_prob_u8, fu)
        notes = {}
        for col, v in (("LFDL", "lfdl"), ("MITL", "mitl"), ("fused", fused_variant)):
            val = f1.get(v, {}).get(image_id)
            if val is not None and not (isinstance(val, float) and math.isnan(val)):
                notes[col] = f"F1 {val:.3f}"
        rows.append(PanelRow(
            image_id=image_id, image=load(read_image, root / str(r["path"])),
            gt=load(read_mask, root / str(r["mask_path"])) if str(r.get("mask_path", "")) else None,
            lfdl=None if lf_u8 is None else binarize_prob(lf_u8, threshold),
            mitl=None if mi_u8 is None else binarize_prob(mi_u8, threshold),
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
    p.add_argument("--thresholds", type=Path, metavar="JSON",
                   help="a `morphfuse thresholds` file (fitted on val): its score_threshold replaces "
                        "--score-threshold, and the file is recorded in tables.json")
    g = p.add_argument_group("qualitative panels (image | ground truth | LFDL | MITL | fused)")
    g.add_argument("--panels", type=int, default=0, metavar="N", help="number of fake images to show (default 0)")
    g.add_argument("--manifest", nargs="*", type=Path, default=[], metavar="PARQUET",
                   help="manifest(s) giving each image's root, path and mask_path")
    g.add_argument("--lfdl-masks", nargs="*", type=Path, default=[], metavar="DIR", help="LFDL probability masks")
    g.add_argument("--mitl-masks", nargs="*", type=Path, default=[], metavar="DIR", help="MITL probability masks")
    g.add_argument("--fused-masks", nargs="*", type=Path, default=[], metavar="DIR", help="fused binary masks")
    g.add_argument("--fused-variant", default="mdmf", help="variant whose masks --fused-masks holds (default mdmf)")


def _convention(args: argparse.Namespace, thresholds: list) -> Convention:
    """The metric convention of the tables: the CLI's, at the mask threshold the count files were made with."""
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
    return conv


def _write_breakdowns(frames, conv, args, out: Path, result: dict) -> None:
    """Per method and per source: breakdown_{method,source}.{csv,md}."""
    for by in ("method", "source"):
        bd = breakdown(frames, by, conv, args.score_threshold)
        write_csv(out / f"breakdown_{by}.csv", bd)
        title = ("Per method (all real images + the fakes of the method)" if by == "method"
                 else "Per source (the images of the source)")
        write_text_atomic(out / f"breakdown_{by}.md", frame_markdown(bd, f"{title}; {conv.describe()}",
                                                                     ["variant", by]))
        result[f"breakdown_{by}"] = bd.to_dict("records")


def _write_errors(frames, variants, args, out: Path, result: dict) -> None:
    """errors.{csv,md}: rows left out per variant, and ledger lines per stage."""
    err = pd.DataFrame([{"variant": v, "rows": frames[v].n_rows, "left_out": frames[v].n_errors} for v in variants])
    write_csv(out / "errors.csv", err)
    md = ["# Errors", "", "Images left out of each variant's metrics (an error in one of its inputs):", ""]
    md += md_table(["variant", "rows", "left out"], [[r.variant, str(r.rows), str(r.left_out)]
                                                     for r in err.itertuples(index=False)])
    if args.ledgers:
        led = read_ledgers(args.ledgers)
        per_stage = (led.groupby("stage").agg(lines=("image_id", "size"), images=("image_id", "nunique"))
                     .reset_index() if len(led) else pd.DataFrame(columns=["stage", "lines", "images"]))
        write_csv(out / "ledger_counts.csv", per_stage)
        md += ["", f"Error ledgers ({len(args.ledgers)} files):", ""]
        md += md_table(["stage", "lines", "images"], [[str(x) for x in r] for r in per_stage.itertuples(index=False)])
        result["ledger_counts"] = per_stage.to_dict("records")
    write_text_atomic(out / "errors.md", "\n".join(md) + "\n")
    result["errors"] = err.to_dict("records")


def _write_figures(frames, variants, conv, args, out: Path, result: dict) -> None:
    """ROC and PR curves, and the qualitative panels (--panels)."""
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


def run(args: argparse.Namespace) -> int:
    frames, thresholds = load_counts(args.counts)
    conv = _convention(args, thresholds)
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    fitted, notes = None, []
    if args.thresholds is not None:
        from .thresholds import read_thresholds

        fitted = read_thresholds(args.thresholds)
        args.score_threshold = float(fitted["score_threshold"])
        notes.append(f"thresholds fitted on the val split ({args.thresholds}): image score >= "
                     f"{fitted['score_threshold']:.4g} is fake; LFDL/MITL masks binarised at "
                     f"{fitted['mask_threshold']:g} before fusion")
    notes += [n for n in [add_swapped_variant(frames)] if n]
    variants = ordered_variants(frames)
    log.info("variants: %s", ", ".join(f"{v} ({frames[v].n_rows} rows)" for v in variants))
    cache: dict = {}  # each row's bootstrap values, reused by the paired differences
    table = pd.DataFrame([variant_row(v, frames[v], conv, args.score_threshold, args.bootstrap, args.seed,
                                      args.confidence, cache) for v in variants])
    # The same table with the reals in the pixel metrics (their predicted pixels are false positives).
    conv_all = dataclasses.replace(conv, images="all")
    table_all = table if conv.images == "all" else pd.DataFrame(
        [variant_row(v, frames[v], conv_all, args.score_threshold, args.bootstrap, args.seed, args.confidence, cache)
         for v in variants])
    diffs = pd.concat([diffs_frame(frames, c, args.bootstrap, args.seed, args.confidence, args.score_threshold,
                                   cache=cache) for c in dict.fromkeys([conv, conv_all])], ignore_index=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "ablation.csv", table)
    write_csv(out / "ablation_all.csv", table_all)
    write_csv(out / "ablation_diffs.csv", diffs)
    write_text_atomic(out / "ablation_diffs.md", "\n".join(
        [f"# Paired differences of the ablation rows ({conv.describe()}; and images=all)", ""]
        + diffs_markdown(diffs, args.bootstrap, args.confidence)) + "\n")
    ablation_md = ablation_markdown(table, conv, args.score_threshold, args.bootstrap, args.confidence, args.seed,
                                    notes, table_all, diffs)
    write_text_atomic(out / "ablation.md", ablation_md)
    result = {"convention": conv.as_dict(), "score_threshold": args.score_threshold, "bootstrap": args.bootstrap,
              "confidence": args.confidence, "seed": args.seed, "notes": notes,
              "ablation": table.to_dict("records"), "ablation_all": table_all.to_dict("records"),
              "ablation_diffs": diffs.to_dict("records")}
    if fitted is not None:
        result["thresholds"] = fitted
    _write_breakdowns(frames, conv, args, out, result)
    _write_errors(frames, variants, args, out, result)
    if not args.no_figures:
        _write_figures(frames, variants, conv, args, out, result)
    write_text_atomic(out / "tables.json", json.dumps(json_ready(result), indent=2, default=json_default) + "\n")
    print(ablation_md.split("\n\nCounts")[0])
    return 0
