"""The ablation table's baselines (face crops / whole image as the mask, score 0.5), its images=all twin and the
paired bootstrap differences, on hand-computed cases (scikit-learn as the independent reference)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score

from morphfuse.cli import main
from morphfuse.metrics import Convention
from morphfuse.tables import diffs_frame, load_counts, paired_differences, variant_row

H, W = 8, 10


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def tiny(tmp_path):
    """Two fakes and a real, 10 wide and 8 high; crops for f1 (two boxes, one past the border) and r1 only."""
    root = tmp_path / "data"
    gt1 = np.zeros((H, W), bool)
    gt1[2:6, 2:6] = True            # 16 px
    gt2 = np.zeros((H, W), bool)
    gt2[0:2, 5:10] = True           # 10 px
    rng = np.random.default_rng(0)
    rows = []
    for iid, label, gt in (("f1", 1, gt1), ("f2", 1, gt2), ("r1", 0, None)):
        _save(root / "img" / f"{iid}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        if gt is not None:
            _save(root / "mask" / f"{iid}.png", gt.astype(np.uint8) * 255)
        rows.append({"image_id": iid, "root": str(root), "path": f"img/{iid}.png", "label": label,
                     "mask_path": f"mask/{iid}.png" if label else "", "group": f"p_{iid}", "split": "test",
                     "method": "sbi" if label else "real", "source": "demo", "width": W, "height": H})
    man = tmp_path / "test_00000.parquet"
    pd.DataFrame(rows).to_parquet(man)
    crops = tmp_path / "crops.parquet"
    pd.DataFrame({"image_id": ["f1", "f1", "r1"], "face_idx": [0, 1, -1], "x0": [1, 8, 0], "y0": [1, 6, 0],
                  "x1": [5, 12, W], "y1": [5, 9, H], "kind": ["face", "face", "no_face"]}).to_parquet(crops)
    return tmp_path, man, crops, {"f1": gt1, "f2": gt2}


def _evaluate_baselines(tmp_path, man, crops):
    ev = tmp_path / "ev"
    led = tmp_path / "led.csv"
    assert main(["evaluate", "--manifest", str(man), "--baseline", "face", "--crops", str(crops), "--out-counts",
                 str(ev / "baseline_face" / "s.parquet"), "--variant", "baseline_face", "--ledger", str(led)]) == 1
    assert list(pd.read_csv(led)["image_id"]) == ["f2"]  # no crop row: an error, as LFDL has no prediction there
    assert main(["evaluate", "--manifest", str(man), "--baseline", "face", "--crops", str(crops), "--out-counts",
                 str(ev / "baseline_face" / "s.parquet"), "--variant", "baseline_face", "--allow-errors"]) == 0
    assert main(["evaluate", "--manifest", str(man), "--baseline", "all", "--out-counts",
                 str(ev / "baseline_all" / "s.parquet"), "--variant", "baseline_all"]) == 0
    return ev


def test_baseline_counts_are_the_hand_computed_ones(tiny):
    tmp_path, man, crops, gts = tiny
    ev = _evaluate_baselines(tmp_path, man, crops)
    face = pd.read_parquet(ev / "baseline_face" / "s.parquet").set_index("image_id")
    full = pd.read_parquet(ev / "baseline_all" / "s.parquet").set_index("image_id")
    assert (face["score"].dropna() == 0.5).all() and (full["score"] == 0.5).all()
    # f1: box [1,5)x[1,5) (16 px) meets the gt [2,6)x[2,6) in 9 px; box [8,12)x[6,9) clipped to 2x2 = 4 px of FP
    assert tuple(face.loc["f1", ["TP", "FP", "FN", "TN"]]) == (9, 7 + 4, 7, 80 - 9 - 11 - 7)
    assert face.loc["f1", "f1"] == pytest.approx(0.5) and face.loc["f1", "iou"] == pytest.approx(1 / 3)
    assert not face.loc["f2", "ok"] and face.loc["r1", "FP"] == 80  # a whole-image crop on a real
    assert tuple(full.loc["f1", ["TP", "FP", "FN", "TN"]]) == (16, 64, 0, 0)
    assert tuple(full.loc["f2", ["TP", "FP", "FN", "TN"]]) == (10, 70, 0, 0)
    # scikit-learn on the flattened masks
    pred1 = np.zeros((H, W), bool)
    pred1[1:5, 1:5] = True
    pred1[6:8, 8:10] = True
    assert face.loc["f1", "f1"] == pytest.approx(f1_score(gts["f1"].ravel(), pred1.ravel()))
    assert face.loc["f1", "iou"] == pytest.approx(jaccard_score(gts["f1"].ravel(), pred1.ravel()))
    ones = np.ones(H * W, bool)
    for iid in ("f1", "f2"):
        assert full.loc[iid, "f1"] == pytest.approx(f1_score(gts[iid].ravel(), ones))
        assert full.loc[iid, "iou"] == pytest.approx(jaccard_score(gts[iid].ravel(), ones))
    # a baseline replaces the predictions: both given is an error
    assert main(["evaluate", "--manifest", str(man), "--baseline", "all", "--scores", str(man), "--out-counts",
                 str(tmp_path / "x.parquet")]) == 2
    assert main(["evaluate", "--manifest", str(man), "--baseline", "face", "--out-counts",
                 str(tmp_path / "x.parquet")]) == 2  # face needs --crops


def test_the_tables_show_the_baselines_under_both_image_conventions(tiny):
    tmp_path, man, crops, _ = tiny
    ev = _evaluate_baselines(tmp_path, man, crops)
    out = tmp_path / "t"
    assert main(["tables", "--counts", str(ev), "--out", str(out), "--bootstrap", "20", "--no-figures"]) == 0
    t = pd.read_csv(out / "ablation.csv").set_index("variant")
    a = pd.read_csv(out / "ablation_all.csv").set_index("variant")
    assert list(t.index) == ["baseline_face", "baseline_all"] == list(a.index)
    # fake_only, per image: face = f1 alone (f2 left out), all = mean over f1, f2
    assert t.loc["baseline_face", "f1"] == pytest.approx(0.5) and t.loc["baseline_face", "iou"] == pytest.approx(1 / 3)
    assert t.loc["baseline_all", "f1"] == pytest.approx((1 / 3 + 2 / 9) / 2)
    assert t.loc["baseline_all", "iou"] == pytest.approx((0.2 + 0.125) / 2)
    assert t.loc["baseline_all", "auc"] == pytest.approx(0.5)
    # images=all: the real r1 predicts 80 px on an empty truth: F1 = IoU = 0 for it
    assert a.loc["baseline_face", "f1"] == pytest.approx(0.25) and a.loc["baseline_face", "iou"] == pytest.approx(1 / 6)
    assert a.loc["baseline_all", "f1"] == pytest.approx((1 / 3 + 2 / 9) / 3)
    assert a.loc["baseline_all", "FP"] == 64 + 70 + 80 and t.loc["baseline_all", "FP"] == 64 + 70
    md = (out / "ablation.md").read_text()
    assert "images=all" in md and "baseline_face" in md and "Paired differences" in md
    d = pd.read_csv(out / "ablation_diffs.csv")
    assert set(d["images"]) == {"fake_only", "all"}
    assert set(zip(d["a"], d["b"])) == {("baseline_face", "baseline_all")}
    assert json.loads((out / "tables.json").read_text())["ablation_all"][0]["variant"] == "baseline_face"
    from morphfuse.report import ablation_html

    page = ablation_html(out / "ablation.csv", tmp_path / "ablation.html").read_text()
    assert page.count("<table") == 3 and "images=all" in page and "baseline_face − baseline_all" in page


# ------------------------------------------------------------------------------------------ paired bootstrap
def _counts_file(path, variant, ids, labels, scores, counts, groups):
    tp, fp, fn, tn = (np.asarray(c) for c in counts)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": ids, "label": labels, "score": scores, "group": groups, "variant": variant,
                  "TP": tp, "FP": fp, "FN": fn, "TN": tn, "ok": True, "threshold": 0.5}).to_parquet(path)


def _frames(tmp_path, variants):
    for name, spec in variants.items():
        _counts_file(tmp_path / "ev" / name / "s.parquet", name, **spec)
    frames, _ = load_counts([tmp_path / "ev"])
    return frames


def test_paired_difference_of_a_variant_with_itself_is_exactly_zero(tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    ids = [f"i{k}" for k in range(n)]
    labels = (np.arange(n) % 2).astype(int)
    tp = rng.integers(0, 40, n) * labels
    spec = dict(ids=ids, labels=labels, scores=rng.random(n), groups=[f"g{k % 17}" for k in range(n)],
                counts=(tp, rng.integers(0, 20, n), rng.integers(0, 20, n) * labels, 400 - tp))
    frames = _frames(tmp_path, {"a": spec, "b": spec})
    conv = Convention()
    d = paired_differences(frames["a"], frames["b"], conv, 200, 0, 0.95)
    assert np.array_equal(d["lo"], np.zeros(4)) and np.array_equal(d["hi"], np.zeros(4))
    assert np.array_equal(d["diff"], np.zeros(4))
    # the unpaired interval of the same two variants is not 0: the pairing is what removes it
    u = paired_differences(frames["a"], frames["b"], conv, 200, 0, 0.95, unpaired_seed=1)
    assert (u["hi"] - u["lo"] > 0.01).all()


def test_paired_difference_of_a_shifted_variant_is_the_shift(tmp_path, monkeypatch):
    """b's per-image F1 is a's minus 1/4 on every fake (hand-made counts), same scores: the F1 difference is 1/4
    in every resample, the AUC difference 0."""
    # (TP, FP, FN) of per-image F1 1, 0.75, 0.5 for a and 0.75, 0.5, 0.25 for b
    a_c = {1.0: (1, 0, 0), 0.75: (3, 1, 1), 0.5: (1, 1, 1)}
    b_c = {1.0: (3, 1, 1), 0.75: (1, 1, 1), 0.5: (1, 3, 3)}
    rng = np.random.default_rng(2)
    n = 45
    labels = np.r_[np.ones(30, int), np.zeros(15, int)]
    f1s = rng.choice([1.0, 0.75, 0.5], 30)
    scores = rng.random(n)
    groups = [f"g{k % 11}" for k in range(n)]

    def counts(table):
        c = np.array([table[f] for f in f1s] + [(0, 2, 0)] * 15)
        return c[:, 0], c[:, 1], c[:, 2], 100 - c.sum(1)

    ids = [f"i{k}" for k in range(n)]
    frames = _frames(tmp_path, {"a": dict(ids=ids, labels=labels, scores=scores, groups=groups, counts=counts(a_c)),
                                "b": dict(ids=ids, labels=labels, scores=scores, groups=groups, counts=counts(b_c))})
    assert frames["a"].summary(Convention(), 0.5)["f1"] == pytest.approx(f1s.mean())
    d = paired_differences(frames["a"], frames["b"], Convention(), 300, 3, 0.95)
    assert d["diff"][1] == pytest.approx(0.25, abs=1e-12)
    assert d["lo"][1] == pytest.approx(0.25, abs=1e-12) and d["hi"][1] == pytest.approx(0.25, abs=1e-12)
    assert d["lo"][0] == d["hi"][0] == 0.0  # same scores: AUC difference 0 in every resample
    rows = diffs_frame(frames, Convention(), 300, 3, 0.95, 0.5, pairs=[("a", "b")]).set_index("metric")
    # the tables stage reuses each row's own resamples (same seed, same groups): the same differences
    cache: dict = {}
    for name in ("a", "b"):
        variant_row(name, frames[name], Convention(), 0.5, 300, 3, 0.95, cache)
    import morphfuse.tables as T

    monkeypatch.setattr(T, "BootstrapStatistic", None)  # nothing is recomputed
    reused = diffs_frame(frames, Convention(), 300, 3, 0.95, 0.5, pairs=[("a", "b")], cache=cache).set_index("metric")
    pd.testing.assert_frame_equal(reused, rows)
    assert rows.loc["f1", "excludes_zero"] and rows.loc["f1", "ordering"] == "a > b"
    assert not rows.loc["auc", "excludes_zero"] and rows.loc["auc", "ordering"] == "not ordered"


def test_paired_interval_is_narrower_than_unpaired_on_correlated_variants(tmp_path):
    """b = a with a small per-image change: the identities' spread moves both alike, so pairing removes it."""
    rng = np.random.default_rng(4)
    n = 240
    ids = [f"i{k}" for k in range(n)]
    labels = (np.arange(n) % 2).astype(int)
    groups = [f"g{k % 40}" for k in range(n)]
    hard = rng.random(40)[np.arange(n) % 40]  # identity-level difficulty shared by both variants
    score_a = np.clip(0.5 * labels + 0.4 * rng.random(n) - 0.3 * hard * labels, 0, 1)
    score_b = np.clip(score_a + rng.normal(0, 0.03, n), 0, 1)
    gt = 50
    tp_a = (gt * (1 - hard) * labels).astype(int)
    tp_b = np.clip(tp_a + rng.integers(-2, 3, n), 0, gt) * labels
    fp = rng.integers(0, 10, n)

    def spec(score, tp):
        return dict(ids=ids, labels=labels, scores=score, groups=groups,
                    counts=(tp, fp, (gt - tp) * labels, 1000 - tp - fp - (gt - tp) * labels))

    frames = _frames(tmp_path, {"a": spec(score_a, tp_a), "b": spec(score_b, tp_b)})
    conv = Convention()
    paired = paired_differences(frames["a"], frames["b"], conv, 400, 0, 0.95)
    unpaired = paired_differences(frames["a"], frames["b"], conv, 400, 0, 0.95, unpaired_seed=99)
    wp, wu = paired["hi"] - paired["lo"], unpaired["hi"] - unpaired["lo"]
    assert (wp < 0.5 * wu).all(), (wp, wu)
