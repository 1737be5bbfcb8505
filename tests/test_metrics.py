"""Metrics: every convention against scikit-learn on random masks, plus small cases worked out by hand."""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.optimize import brentq
from sklearn.metrics import average_precision_score, f1_score, jaccard_score, roc_auc_score, roc_curve

from morphfuse import metrics as M
from morphfuse.metrics import Convention

CONVENTIONS = [Convention(averaging=a, images=i, iou=u, empty=e)
               for a, i, u, e in itertools.product(M.AVERAGING, M.IMAGES, M.IOU, M.EMPTY)]


def random_set(seed, n=40):
    """Random images of random sizes: labels, GT and predictions, with empty/empty and full/full pairs."""
    rng = np.random.default_rng(seed)
    labels, gts, preds = [], [], []
    for i in range(n):
        h, w = rng.integers(4, 14, size=2)
        label = int(rng.random() < 0.7)
        gt = (rng.random((h, w)) < rng.uniform(0.05, 0.6)) if label else np.zeros((h, w), bool)
        pred = rng.random((h, w)) < rng.uniform(0.0, 0.6)
        kind = i % 10
        if kind == 1:
            pred[:] = False  # empty prediction (on an empty GT for reals)
        if kind == 2 and label:
            gt[:] = False
            pred[:] = False  # an empty/empty fake
        if kind == 3 and label:
            gt[:] = True
            pred[:] = True  # full/full: the pristine class is 0/0
        if kind == 4:
            pred[:] = gt  # perfect
        labels.append(label)
        gts.append(gt)
        preds.append(pred)
    return np.array(labels), gts, preds


def counts_of(gts, preds):
    return np.array([M.confusion_counts(p, g) for p, g in zip(preds, gts)], dtype=np.int64).T


# --------------------------------------------------------------------------------------- scikit-learn references
def sk_per_image_value(gt, pred, metric, iou, empty):
    """One image's F1 or IoU by scikit-learn; NaN where the convention skips the image."""
    g, p = gt.ravel().astype(int), pred.ravel().astype(int)
    z = {"one": 1.0, "zero": 0.0, "skip": 0.0}[empty]
    fg_undefined = not g.any() and not p.any()
    bg_undefined = g.all() and p.all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if metric == "f1":
            return f1_score(g, p, zero_division=np.nan if empty == "skip" else z)
        if iou == "foreground":
            return math.nan if (empty == "skip" and fg_undefined) else jaccard_score(g, p, zero_division=z)
        if empty == "skip" and (fg_undefined or bg_undefined):
            return math.nan
        return jaccard_score(g, p, labels=[0, 1], average="macro", zero_division=z)


_SK_CACHE: dict = {}


def sk_cached(seed, i, gt, pred, metric, iou, empty):
    """scikit-learn is slow per call: each image's value is computed once per (metric, iou, empty)."""
    key = (seed, i, metric, iou if metric == "iou" else "", empty)
    if key not in _SK_CACHE:
        _SK_CACHE[key] = sk_per_image_value(gt, pred, metric, iou, empty)
    return _SK_CACHE[key]


def sk_localization(labels, gts, preds, conv, seed):
    keep = [i for i in range(len(labels)) if conv.images == "all" or labels[i] == 1]
    if conv.averaging == "per_image":
        f1 = np.nanmean([sk_cached(seed, i, gts[i], preds[i], "f1", conv.iou, conv.empty) for i in keep])
        iou = np.nanmean([sk_cached(seed, i, gts[i], preds[i], "iou", conv.iou, conv.empty) for i in keep])
        return f1, iou
    g = np.concatenate([gts[i].ravel() for i in keep])
    p = np.concatenate([preds[i].ravel() for i in keep])
    return sk_per_image_value(g, p, "f1", conv.iou, conv.empty), sk_per_image_value(g, p, "iou", conv.iou, conv.empty)


@pytest.mark.parametrize("conv", CONVENTIONS, ids=lambda c: f"{c.averaging}-{c.images}-{c.iou}-{c.empty}")
def test_localization_matches_sklearn(conv):
    for seed in (0, 1):
        labels, gts, preds = random_set(seed)
        tp, fp, fn, tn = counts_of(gts, preds)
        got = M.localization(tp, fp, fn, tn, labels, conv)
        f1, iou = sk_localization(labels, gts, preds, conv, seed)
        assert got["f1"] == pytest.approx(f1, abs=1e-12)
        assert got["iou"] == pytest.approx(iou, abs=1e-12)


def test_per_image_values_match_sklearn():
    labels, gts, preds = random_set(0)
    tp, fp, fn, tn = counts_of(gts, preds)
    for iou, empty in itertools.product(M.IOU, M.EMPTY):
        f1s = M.f1_from_counts(tp, fp, fn, empty=empty)
        ious = M.iou_from_counts(tp, fp, fn, tn, iou=iou, empty=empty)
        for i in range(len(labels)):
            for got, metric in ((f1s[i], "f1"), (ious[i], "iou")):
                exp = sk_cached(0, i, gts[i], preds[i], metric, iou, empty)
                if math.isnan(exp):
                    assert math.isnan(got)
                else:
                    assert got == pytest.approx(exp, abs=1e-12)


def test_counts_match_sklearn_confusion():
    from sklearn.metrics import confusion_matrix
    labels, gts, preds = random_set(4, n=15)
    for g, p in zip(gts, preds):
        tn, fp, fn, tp = confusion_matrix(g.ravel(), p.ravel(), labels=[0, 1]).ravel()
        assert M.confusion_counts(p, g) == (tp, fp, fn, tn)


# ----------------------------------------------------------------------------------------------- by hand
def test_hand_counts_f1_iou():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    gt = np.array([[1, 0, 0], [1, 1, 0]], bool)
    c = M.confusion_counts(pred, gt)
    assert c == (2, 1, 1, 2)  # TP (0,0),(1,1); FP (0,1); FN (1,0); TN (0,2),(1,2)
    assert M.f1_from_counts(*c[:3]) == pytest.approx(4 / 6)
    assert M.iou_from_counts(*c) == pytest.approx(2 / 4)
    # background IoU = TN / (TN + FP + FN) = 2/4, mean with 2/4
    assert M.iou_from_counts(*c, iou="two_class_mean") == pytest.approx(0.5)


def test_hand_empty_rules():
    c = (0, 0, 0, 12)  # empty GT, empty prediction
    assert math.isnan(M.f1_from_counts(*c[:3], empty="skip"))
    assert M.f1_from_counts(*c[:3], empty="one") == 1.0
    assert M.f1_from_counts(*c[:3], empty="zero") == 0.0
    assert math.isnan(M.iou_from_counts(*c, empty="skip"))
    assert M.iou_from_counts(*c, empty="one") == 1.0
    assert M.iou_from_counts(*c, empty="zero") == 0.0
    # two-class mean: the pristine class is perfect (12/12); the forged term is the empty value
    assert math.isnan(M.iou_from_counts(*c, iou="two_class_mean", empty="skip"))
    assert M.iou_from_counts(*c, iou="two_class_mean", empty="one") == 1.0
    assert M.iou_from_counts(*c, iou="two_class_mean", empty="zero") == 0.5  # = scikit-learn's default


def test_hand_averaging_and_images():
    # image A: TP2 FP1 FN1 TN2 (F1 2/3, IoU 1/2); image B: perfect TP1 TN3 (F1 1, IoU 1)
    # real image R: FP2 TN2 (F1 0, IoU 0)
    tp, fp, fn, tn = np.array([2, 1, 0]), np.array([1, 0, 2]), np.array([1, 0, 0]), np.array([2, 3, 2])
    labels = np.array([1, 1, 0])
    per = M.localization(tp, fp, fn, tn, labels, Convention())
    assert per["f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert per["iou"] == pytest.approx(0.75)
    assert per["counts"] == {"TP": 3, "FP": 1, "FN": 1, "TN": 5} and per["n_pixel_images"] == 2
    pooled = M.localization(tp, fp, fn, tn, labels, Convention(averaging="pooled"))
    assert pooled["f1"] == pytest.approx(6 / 8)  # 2·3 / (2·3 + 1 + 1)
    assert pooled["iou"] == pytest.approx(3 / 5)
    al = M.localization(tp, fp, fn, tn, labels, Convention(images="all"))
    assert al["f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert al["iou"] == pytest.approx((0.5 + 1 + 0) / 3)
    al_pooled = M.localization(tp, fp, fn, tn, labels, Convention(images="all", averaging="pooled"))
    assert al_pooled["f1"] == pytest.approx(6 / 10)
    # skip: an empty/empty fake is left out and counted
    sk = M.localization([2, 0], [1, 0], [1, 0], [2, 6], [1, 1], Convention())
    assert sk["f1"] == pytest.approx(2 / 3) and sk["n_skipped"] == 1
    # only empty/empty fakes under skip: undefined, with a reason; no fake at all: undefined too
    none = M.localization([0], [0], [0], [6], [1], Convention())
    assert none["f1"] is None and none["iou"] is None and none["reason"]
    assert M.localization([0], [3], [0], [3], [0], Convention())["f1"] is None


def test_hand_resize_nearest():
    pred = np.array([[1, 0], [0, 0]], bool)
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    assert M.confusion_counts(pred, gt) == (4, 0, 0, 12)
    gt2 = np.zeros((4, 6), bool)
    gt2[:2, :3] = True
    assert M.confusion_counts(pred, gt2) == (6, 0, 0, 18)


def test_convention_validation():
    with pytest.raises(ValueError, match="averaging"):
        Convention(averaging="macro")
    with pytest.raises(ValueError, match="empty"):
        Convention(empty="nan")
    with pytest.raises(ValueError, match="threshold"):
        Convention(threshold=128)
    with pytest.raises(TypeError):
        M.confusion_counts(np.zeros((2, 2), np.uint8), np.zeros((2, 2), bool))


# ---------------------------------------------------------------------------------------------- detection
def test_detection_matches_sklearn():
    rng = np.random.default_rng(0)
    for n, decimals in ((50, 1), (300, 2), (200, 6)):  # coarse rounding -> many ties
        y = rng.integers(0, 2, n)
        s = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), decimals)
        w = rng.integers(0, 4, n).astype(float)
        auc, reason = M.roc_auc(y, s)
        assert reason is None and auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.roc_auc(y, s, w)[0] == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
        assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert M.average_precision(y, s, w) == pytest.approx(average_precision_score(y, s, sample_weight=w), abs=1e-12)
        assert M.accuracy(y, s, 0.5) == pytest.approx(np.mean((s >= 0.5) == y))


def test_eer_against_interpolated_roc():
    rng = np.random.default_rng(1)
    for n in (40, 400):
        y = rng.integers(0, 2, n)
        s = rng.normal(y * 1.0, 1.0)
        fpr, tpr, _ = roc_curve(y, s)
        ref = brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0)
        assert M.equal_error_rate(y, s) == pytest.approx(ref, abs=1e-6)


def test_detection_by_hand():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert M.roc_auc(y, s)[0] == pytest.approx(0.75)  # 3 of the 4 (fake, real) pairs are ordered
    # from the top: 0.8 fake (P 1, R .5), 0.4 real, 0.35 fake (P 2/3, R 1): AP = .5·1 + .5·2/3
    assert M.average_precision(y, s) == pytest.approx(0.5 + 1 / 3)
    assert M.accuracy(y, s, 0.5) == 0.75
    assert M.detection_counts(y, s, 0.5) == {"TP": 1, "FP": 0, "FN": 1, "TN": 2}
    # EER: ROC points (fpr, fnr) (0, 1) (0, .5) (1/3, .5) (1/3, 0) ...: they cross at fpr = fnr = 1/3
    y2 = np.array([0, 0, 0, 1, 1])
    s2 = np.array([0.1, 0.2, 0.7, 0.6, 0.9])
    assert M.equal_error_rate(y2, s2) == pytest.approx(1 / 3)
    assert M.equal_error_rate([0, 1], [0.2, 0.9]) == 0.0
    assert M.equal_error_rate([0, 1], [0.9, 0.2]) == 1.0
    assert M.roc_auc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5])[0] == 0.5  # all tied: exactly chance


def test_one_class_is_none_with_reason():
    auc, reason = M.roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    assert auc is None and "one class" in reason
    assert M.equal_error_rate([1, 1], [0.2, 0.3]) is None
    assert M.average_precision([0, 0], [0.2, 0.3]) is None
    assert M.average_precision([1, 1], [0.2, 0.3]) == 1.0
    assert M.final_score(None, 0.5, 0.4) is None
    assert M.final_score(0.9, 0.6, 0.3) == pytest.approx(0.6)
    s = M.summarize([1, 1], [0.3, 0.9], [2, 1], [0, 0], [0, 1], [4, 4], Convention())
    assert s["auc"] is None and s["final"] is None and "one class" in s["auc_reason"] and s["final_reason"]
    assert s["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["final_without_auc"] == pytest.approx((s["f1"] + s["iou"]) / 2)


# ---------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_weights_are_group_multiplicities():
    groups = np.array(["a", "a", "b", "c", "c", "c", "d"])
    seen = []

    def stat(_records, w):
        seen.append(w.copy())
        return float(w.sum())

    M.bootstrap_ci(None, groups, stat, n_resamples=30, seed=3)
    codes = M.group_codes(groups)
    for w in seen:
        assert np.all(w == np.round(w)) and np.all(w >= 0)
        for g in range(codes.max() + 1):
            assert len(set(w[codes == g])) == 1  # a whole group is drawn, never part of it
        per_group = [w[codes == g][0] for g in range(codes.max() + 1)]
        assert sum(per_group) == 4  # as many draws as there are groups


def test_bootstrap_deterministic_and_sensible():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 3)
    values = rng.normal(size=groups.size)
    stat = lambda _r, w: float(np.average(values, weights=w))  # noqa: E731
    a = M.bootstrap_ci(None, groups, stat, n_resamples=200, seed=7)
    assert a == M.bootstrap_ci(None, groups, stat, n_resamples=200, seed=7)
    assert a != M.bootstrap_ci(None, groups, stat, n_resamples=200, seed=8)
    lo, hi = a
    assert lo < values.mean() < hi
    # a value constant within groups and identical across groups: a zero-width interval
    assert M.bootstrap_ci(None, groups, lambda _r, w: 0.25, n_resamples=20) == (0.25, 0.25)
    # two groups of opposite values: the interval spans both (resamples of identities, not of images)
    lo2, hi2 = M.bootstrap_ci(None, np.array(["x"] * 50 + ["y"] * 50),
                              lambda _r, w: float(np.average(np.r_[np.zeros(50), np.ones(50)], weights=w)),
                              n_resamples=200, seed=0)
    assert lo2 == 0.0 and hi2 == 1.0


def test_table_statistic_weights_equal_materialised_resample():
    labels, gts, preds = random_set(5, n=30)
    scores = np.round(np.random.default_rng(5).random(len(labels)), 2)
    tp, fp, fn, tn = counts_of(gts, preds)
    w = np.random.default_rng(6).integers(0, 3, len(labels))
    w[:2] = 1
    w[np.flatnonzero(labels == 0)[0]] = 1  # both classes stay present
    for conv in (Convention(), Convention(averaging="pooled", images="all", iou="two_class_mean", empty="zero")):
        stat = M.table_statistic(labels, scores, tp, fp, fn, tn, conv)(None, w.astype(float))
        rep = lambda x: np.repeat(x, w)  # noqa: E731
        s = M.summarize(rep(labels), rep(scores), rep(tp), rep(fp), rep(fn), rep(tn), conv)
        np.testing.assert_allclose(stat, [s["auc"], s["f1"], s["iou"], s["final"]], atol=1e-12)
        assert s["auc"] == pytest.approx(roc_auc_score(rep(labels), rep(scores)))
    # an array statistic gives arrays; NaN resamples (one class) are left out of that component only
    lo, hi = M.bootstrap_ci(None, np.arange(len(labels)), M.table_statistic(labels, scores, tp, fp, fn, tn,
                                                                           Convention()), n_resamples=50)
    assert lo.shape == (4,) and np.all(lo <= hi)
