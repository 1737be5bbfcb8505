"""Detection and localization metrics (METRICS.md): pure functions on arrays.

Localization works from per-image pixel counts ``(TP, FP, FN, TN)`` of a binarised prediction against the ground
truth at the original image size, so a shard can stream its images and a reduce step can apply any convention:

- ``averaging``: ``per_image`` (F1 and IoU per image, then their mean) or ``pooled`` (sum the counts of the image
  set, then one F1 and one IoU);
- ``images``: ``fake_only`` (manipulated images only) or ``all`` (real images too, with an empty ground truth);
- ``iou``: ``foreground`` (IoU of the manipulated class) or ``two_class_mean`` (mean of the manipulated-class IoU
  and the pristine-class IoU);
- ``empty``: what a 0/0 term is worth, i.e. a class that is absent from both the ground truth and the prediction
  (for the manipulated class: an empty ground truth with an empty prediction): ``skip`` (the image is left out of
  the per-image mean), ``one`` or ``zero``.

Every value equals scikit-learn's on the flattened masks: F1 = ``f1_score(gt, pred, zero_division=z)``, foreground
IoU = ``jaccard_score(gt, pred, zero_division=z)``, two-class mean = ``jaccard_score(gt, pred, labels=[0, 1],
average="macro", zero_division=z)``, with z = 1 for ``one`` and 0 for ``zero``. On an empty/empty image this gives
F1 = IoU = z and a two-class mean of (z + 1) / 2: scikit-learn's default (z = 0) makes it 0.5, ``one`` makes it 1.
With ``skip`` such images are left out (and counted as ``n_skipped``). F1 is always the manipulated class's F1.
The same rule applies to a pooled value whose denominator is 0 (no positive pixel anywhere): ``skip`` → undefined.

Detection: ROC-AUC, average precision and equal error rate from one score per image (exact, ties counted as
scikit-learn does), and accuracy at a score threshold. A metric that needs both classes is ``None`` with a reason
when one is absent, never 0.5. ``final = (AUC + F1 + IoU) / 3`` (``None`` when any part is).

Intervals: :func:`bootstrap_ci` resamples identities (groups) with replacement and evaluates a statistic on the
images of the drawn groups, as per-image weights (an image drawn twice counts twice), which is exactly the
statistic of the materialised resample and far cheaper.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import cv2
import numpy as np

AVERAGING = ("per_image", "pooled")
IMAGES = ("fake_only", "all")
IOU = ("foreground", "two_class_mean")
EMPTY = ("skip", "one", "zero")


@dataclass(frozen=True)
class Convention:
    """The options of METRICS.md; the defaults are the reported ones."""

    averaging: str = "per_image"
    images: str = "fake_only"
    iou: str = "foreground"
    empty: str = "skip"
    threshold: float = 0.5

    def __post_init__(self):
        for name, allowed in (("averaging", AVERAGING), ("images", IMAGES), ("iou", IOU), ("empty", EMPTY)):
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {v!r}")
        t = self.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (0.0 <= float(t) <= 1.0):
            raise ValueError(f"threshold must be a probability in [0, 1]; got {t!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"averaging={self.averaging}, images={self.images}, iou={self.iou}, empty={self.empty}, "
                f"mask threshold={self.threshold:g}")


# ------------------------------------------------------------------------------------------ per-image counts
class Counts(NamedTuple):
    tp: int
    fp: int
    fn: int
    tn: int


def resize_nearest(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize a bool/uint8 mask to ``hw = (H, W)`` with nearest neighbour (``cv2.INTER_NEAREST``)."""
    h, w = int(hw[0]), int(hw[1])
    if mask.shape[:2] == (h, w):
        return mask
    src = mask.view(np.uint8) if mask.dtype == bool else mask
    out = cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST)
    return out.view(bool) if mask.dtype == bool else out


def confusion_counts(pred: np.ndarray, gt: np.ndarray) -> Counts:
    """Pixel counts of a boolean prediction against a boolean ground truth.

    A prediction of another size is resized to the ground truth's with nearest neighbour first.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.dtype != bool or gt.dtype != bool:
        raise TypeError(f"confusion_counts expects bool masks, got {pred.dtype} and {gt.dtype}")
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"masks must be 2-D, got {pred.shape} and {gt.shape}")
    if pred.shape != gt.shape:
        pred = resize_nearest(pred, gt.shape)
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    tp = int(np.count_nonzero(np.logical_and(pred, gt)))
    fp, fn = n_pred - tp, n_gt - tp
    return Counts(tp, fp, fn, gt.size - tp - fp - fn)


# ---------------------------------------------------------------------------------------- F1 / IoU, per image
def _empty_value(empty: str) -> float:
    if empty not in EMPTY:
        raise ValueError(f"empty must be one of {', '.join(EMPTY)}; got {empty!r}")
    return {"skip": math.nan, "one": 1.0, "zero": 0.0}[empty]


def _ratio(num, den, fill: float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, fill, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def f1_from_counts(tp, fp, fn, tn=None, empty: str = "skip") -> np.ndarray:
    """F1 of the manipulated class, ``2TP / (2TP + FP + FN)``; a 0/0 follows ``empty`` (NaN for ``skip``)."""
    tp = np.asarray(tp, dtype=np.float64)
    return _ratio(2 * tp, 2 * tp + np.asarray(fp) + np.asarray(fn), _empty_value(empty))


def iou_from_counts(tp, fp, fn, tn, iou: str = "foreground", empty: str = "skip") -> np.ndarray:
    """IoU: ``TP / (TP + FP + FN)`` (foreground), or its mean with the pristine-class ``TN / (TN + FP + FN)``.

    A 0/0 class term takes the ``empty`` value (1 or 0); with ``skip`` the result is NaN (left out).
    """
    if iou not in IOU:
        raise ValueError(f"iou must be one of {', '.join(IOU)}; got {iou!r}")
    fill = _empty_value(empty)
    fp = np.asarray(fp, dtype=np.float64)
    fn = np.asarray(fn, dtype=np.float64)
    fg = _ratio(tp, np.asarray(tp, dtype=np.float64) + fp + fn, fill)
    if iou == "foreground":
        return fg
    bg = _ratio(tn, np.asarray(tn, dtype=np.float64) + fp + fn, fill)
    return (fg + bg) / 2.0  # NaN (skip) propagates


def is_empty_pair(tp, fp, fn) -> np.ndarray:
    """True where the ground truth and the prediction are both empty (the case the ``empty`` option decides)."""
    return (np.asarray(tp) + np.asarray(fp) + np.asarray(fn)) == 0


def pixel_image_mask(labels, images: str) -> np.ndarray:
    """Which images enter the pixel metrics: the fakes (``fake_only``) or every image (``all``)."""
    labels = np.asarray(labels)
    if images not in IMAGES:
        raise ValueError(f"images must be one of {', '.join(IMAGES)}; got {images!r}")
    return labels == 1 if images == "fake_only" else np.ones(labels.shape, bool)


def localization(tp, fp, fn, tn, labels, convention: Convention, weights=None) -> dict:
    """F1 and IoU of an image set under a convention, from per-image counts (arrays, one entry per image).

    ``weights`` (per image, e.g. bootstrap multiplicities) act as repeated images. Returns a dict with ``f1``,
    ``iou`` (``None`` when undefined, with ``reason``), ``n_pixel_images`` (images of the set),
    ``n_skipped`` (left out by ``empty: skip``; per-image averaging) and the pooled ``counts`` of the set.
    """
    tp, fp, fn, tn = (np.asarray(x, dtype=np.int64) for x in (tp, fp, fn, tn))
    sel = pixel_image_mask(labels, convention.images)
    w = np.ones(tp.shape, np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    sel = sel & (w > 0)
    tp, fp, fn, tn, w = tp[sel], fp[sel], fn[sel], tn[sel], w[sel]
    counts = {"TP": int(tp.sum()), "FP": int(fp.sum()), "FN": int(fn.sum()), "TN": int(tn.sum())}
    out = {"f1": None, "iou": None, "reason": None, "n_pixel_images": int(sel.sum()), "n_skipped": 0,
           "counts": counts}
    if tp.size == 0:
        out["reason"] = ("no fake image to evaluate the masks on" if convention.images == "fake_only"
                         else "no image to evaluate the masks on")
        return out
    if convention.averaging == "pooled":
        s = [float(np.dot(w, x)) for x in (tp, fp, fn, tn)]
        f1 = float(f1_from_counts(*s[:3], empty=convention.empty))
        iou = float(iou_from_counts(*s, iou=convention.iou, empty=convention.empty))
    else:
        f1s = f1_from_counts(tp, fp, fn, empty=convention.empty)
        ious = iou_from_counts(tp, fp, fn, tn, iou=convention.iou, empty=convention.empty)
        out["n_skipped"] = int(np.count_nonzero(np.isnan(ious) | np.isnan(f1s)))
        f1 = _weighted_nanmean(f1s, w)
        iou = _weighted_nanmean(ious, w)
    out["f1"] = None if math.isnan(f1) else f1
    out["iou"] = None if math.isnan(iou) else iou
    if out["f1"] is None or out["iou"] is None:
        out["reason"] = "every image of the set has an empty ground truth and an empty prediction (empty: skip)"
    return out


def _weighted_nanmean(v: np.ndarray, w: np.ndarray) -> float:
    ok = ~np.isnan(v)
    sw = float(w[ok].sum())
    return float(np.dot(v[ok], w[ok]) / sw) if sw > 0 else math.nan


# -------------------------------------------------------------------------------------------------- detection
class _Ranked:
    """Scores grouped by unique value (ascending), for exact, tie-aware weighted ROC/PR quantities."""

    def __init__(self, labels, scores):
        self.labels = np.asarray(labels).astype(np.int64)
        self.scores = np.asarray(scores, dtype=np.float64)
        if self.labels.shape != self.scores.shape or self.labels.ndim != 1:
            raise ValueError(f"labels and scores must be 1-D of the same length, got {self.labels.shape} and "
                             f"{self.scores.shape}")
        if np.isnan(self.scores).any():
            raise ValueError("scores contain NaN")
        if not np.isin(self.labels, (0, 1)).all():
            raise ValueError("labels must be 0 (real) or 1 (fake)")
        self.uniq, self.inv = np.unique(self.scores, return_inverse=True)
        self.pos = self.labels == 1

    def weights_by_value(self, weights=None):
        w = np.ones(self.labels.shape) if weights is None else np.asarray(weights, dtype=np.float64)
        u = self.uniq.size
        posw = np.bincount(self.inv, weights=w * self.pos, minlength=u)
        negw = np.bincount(self.inv, weights=w * ~self.pos, minlength=u)
        return posw, negw

    def auc(self, weights=None) -> float:
        posw, negw = self.weights_by_value(weights)
        P, N = posw.sum(), negw.sum()
        if P <= 0 or N <= 0:
            return math.nan
        neg_below = np.cumsum(negw) - negw
        return float(np.dot(posw, neg_below + 0.5 * negw) / (P * N))

    def curve(self, weights=None):
        """Cumulative (TP, FP) weights at each unique threshold, from the highest score down."""
        posw, negw = self.weights_by_value(weights)
        return np.cumsum(posw[::-1]), np.cumsum(negw[::-1]), self.uniq[::-1]

    def average_precision(self, weights=None) -> float:
        tps, fps, _ = self.curve(weights)
        P = tps[-1] if tps.size else 0.0
        if P <= 0:
            return math.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
        recall = tps / P
        return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))

    def eer(self, weights=None) -> float:
        tps, fps, _ = self.curve(weights)
        P, N = (tps[-1], fps[-1]) if tps.size else (0.0, 0.0)
        if P <= 0 or N <= 0:
            return math.nan
        fpr = np.concatenate([[0.0], fps / N])
        fnr = 1.0 - np.concatenate([[0.0], tps / P])
        d = fpr - fnr  # non-decreasing from -1 to 1
        i = int(np.argmax(d >= 0))
        if d[i] == 0 or i == 0:
            return float(fpr[i])
        a = -d[i - 1] / (d[i] - d[i - 1])
        return float(fpr[i - 1] + a * (fpr[i] - fpr[i - 1]))


def roc_auc(labels, scores, weights=None) -> tuple[float | None, str | None]:
    """ROC-AUC (equal scores count half, as ``sklearn.metrics.roc_auc_score``) → ``(auc, None)`` or
    ``(None, reason)`` when a class is absent."""
    r = _Ranked(labels, scores)
    reason = _one_class_reason(r.labels, weights)
    return (None, reason) if reason else (r.auc(weights), None)


def average_precision(labels, scores, weights=None) -> float | None:
    """Average precision as ``sklearn.metrics.average_precision_score``; ``None`` without a fake image."""
    v = _Ranked(labels, scores).average_precision(weights)
    return None if math.isnan(v) else v


def equal_error_rate(labels, scores, weights=None) -> float | None:
    """The rate where the false-positive and false-negative rates are equal on the ROC curve, linearly
    interpolated between its points; ``None`` when a class is absent."""
    v = _Ranked(labels, scores).eer(weights)
    return None if math.isnan(v) else v


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)`` from (0, 0) to (1, 1), one per distinct score (for plots)."""
    r = _Ranked(labels, scores)
    tps, fps, _ = r.curve()
    P, N = (tps[-1], fps[-1]) if tps.size else (0.0, 0.0)
    fpr = np.concatenate([[0.0], fps / N if N > 0 else np.zeros_like(fps)])
    tpr = np.concatenate([[0.0], tps / P if P > 0 else np.zeros_like(tps)])
    return fpr, tpr


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall points ``(recall, precision)``, one per distinct score from the highest down, starting
    at recall 0 with the first point's precision (for plots; AP is the step-wise area)."""
    r = _Ranked(labels, scores)
    tps, fps, _ = r.curve()
    P = tps[-1] if tps.size else 0.0
    if P <= 0:
        return np.zeros(1), np.ones(1)
    precision = tps / np.maximum(tps + fps, 1e-300)
    recall = tps / P
    return np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision])


def accuracy(labels, scores, threshold: float = 0.5) -> float | None:
    """Share of images with ``(score >= threshold) == label``; ``None`` for no image."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return None
    return float(np.mean((np.asarray(scores) >= threshold) == (labels == 1)))


def detection_counts(labels, scores, threshold: float = 0.5) -> dict:
    pred = np.asarray(scores) >= threshold
    y = np.asarray(labels) == 1
    return {"TP": int(np.sum(pred & y)), "FP": int(np.sum(pred & ~y)), "FN": int(np.sum(~pred & y)),
            "TN": int(np.sum(~pred & ~y))}


def _one_class_reason(labels, weights=None) -> str | None:
    labels = np.asarray(labels)
    if weights is not None:
        labels = labels[np.asarray(weights) > 0]
    n_fake = int(np.sum(labels == 1))
    n_real = int(labels.size - n_fake)
    if n_fake and n_real:
        return None
    if not labels.size:
        return "no image"
    return (f"only one class present ({n_fake} fake, {n_real} real images): AUC is undefined")


def final_score(auc: float | None, f1: float | None, iou: float | None) -> float | None:
    """(AUC + F1 + IoU) / 3, or ``None`` when any of them is undefined."""
    if auc is None or f1 is None or iou is None:
        return None
    return (auc + f1 + iou) / 3.0


# ------------------------------------------------------------------------------------------ whole summaries
def summarize(labels, scores, tp, fp, fn, tn, convention: Convention, score_threshold: float = 0.5) -> dict:
    """All the metrics of one prediction set (arrays with one entry per image, all valid)."""
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    auc, auc_reason = roc_auc(labels, scores) if labels.size else (None, "no image")
    loc = localization(tp, fp, fn, tn, labels, convention)
    final = final_score(auc, loc["f1"], loc["iou"])
    out = {
        "auc": auc, "f1": loc["f1"], "iou": loc["iou"], "final": final,
        "ap": average_precision(labels, scores) if labels.size else None,
        "eer": equal_error_rate(labels, scores) if labels.size else None,
        "accuracy": accuracy(labels, scores, score_threshold),
        "final_without_auc": (None if loc["f1"] is None or loc["iou"] is None else (loc["f1"] + loc["iou"]) / 2.0),
        "n_images": int(labels.size), "n_real": int(np.sum(labels == 0)), "n_fake": int(np.sum(labels == 1)),
        "n_pixel_images": loc["n_pixel_images"], "n_skipped_empty": loc["n_skipped"],
        "counts": loc["counts"],
        "detection_counts": detection_counts(labels, scores, score_threshold),
        "score_threshold": score_threshold,
        "convention": convention.as_dict(),
    }
    if auc_reason:
        out["auc_reason"] = auc_reason
    if loc["reason"]:
        out["localization_reason"] = loc["reason"]
    if final is None:
        out["final_reason"] = "; ".join(r for r in (auc_reason, loc["reason"]) if r) or "undefined"
    return out


# ---------------------------------------------------------------------------------------- grouped bootstrap
def group_codes(groups) -> np.ndarray:
    """Integer code 0..G-1 of each image's group."""
    return np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].ravel()


def bootstrap_ci(records, groups, statistic: Callable, n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95, codes=None):
    """Percentile bootstrap interval of ``statistic`` over images resampled by group.

    Each resample draws as many groups as there are, with replacement; every image of a drawn group enters
    once per draw. ``statistic(records, weights)`` receives the records unchanged and the per-image weights
    (how many times each image is in the resample) and returns a float or a 1-D array (several statistics on
    the same resamples). Resamples where a statistic is NaN/None (e.g. AUC of a one-class resample) are left
    out of that statistic's interval. Returns ``(lo, hi)`` (floats, or arrays for an array statistic; NaN where
    no resample gave a value). Deterministic for a given ``seed``. ``codes``: the images' :func:`group_codes`
    when the caller has them (``groups`` is then ignored), e.g. computed without holding every group name.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    codes = group_codes(groups) if codes is None else np.asarray(codes, dtype=np.int64)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    if n_groups == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    scalar = True
    for i in range(n_resamples):
        mult = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
        v = statistic(records, mult[codes].astype(np.float64))
        if i == 0:
            scalar = v is None or np.ndim(v) == 0
        values.append(np.asarray([np.nan if x is None else x for x in np.atleast_1d(v)], dtype=np.float64))
    values = np.vstack(values)
    alpha = (1.0 - confidence) / 2.0
    lo = np.full(values.shape[1], np.nan)
    hi = np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        col = values[:, j][~np.isnan(values[:, j])]
        if col.size:
            lo[j], hi[j] = np.quantile(col, [alpha, 1.0 - alpha])
    return (float(lo[0]), float(hi[0])) if scalar else (lo, hi)


def table_statistic(labels, scores, tp, fp, fn, tn, convention: Convention) -> Callable:
    """A statistic for :func:`bootstrap_ci` giving ``[AUC, F1, IoU, Final]`` of weighted per-image records.

    Equal to :func:`roc_auc` and :func:`localization` with the same weights; what does not depend on the weights
    (score ranks, the image set, per-image F1/IoU) is computed once, so a resample costs a few dot products.
    """
    ranked = _Ranked(labels, scores)
    sel = pixel_image_mask(labels, convention.images)
    c = [np.asarray(x, dtype=np.float64)[sel] for x in (tp, fp, fn, tn)]
    pooled = convention.averaging == "pooled"
    if not pooled:
        f1s = f1_from_counts(c[0], c[1], c[2], empty=convention.empty)
        ious = iou_from_counts(*c, iou=convention.iou, empty=convention.empty)
        f1_ok, iou_ok = ~np.isnan(f1s), ~np.isnan(ious)
        f1s, ious = f1s[f1_ok], ious[iou_ok]

    def stat(_records, weights):
        weights = np.asarray(weights, dtype=np.float64)
        auc = ranked.auc(weights)
        w = weights[sel]
        if pooled:
            s = [float(np.dot(w, x)) for x in c]
            f1 = float(f1_from_counts(s[0], s[1], s[2], empty=convention.empty)) if w.sum() > 0 else math.nan
            iou = float(iou_from_counts(*s, iou=convention.iou, empty=convention.empty)) if w.sum() > 0 else math.nan
        else:
            wf, wi = w[f1_ok], w[iou_ok]
            f1 = float(np.dot(wf, f1s) / wf.sum()) if wf.sum() > 0 else math.nan
            iou = float(np.dot(wi, ious) / wi.sum()) if wi.sum() > 0 else math.nan
        return np.array([auc, f1, iou, (auc + f1 + iou) / 3.0])

    return stat
