"""`morphfuse evaluate` on small DDL-I layouts and manifest shards, and `morphfuse tables` on its outputs."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score, roc_auc_score

from morphfuse.cli import main


def save(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def blob(rng, h, w, p=0.3):
    m = np.zeros((h, w), bool)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[y0:y0 + rng.integers(2, h // 2 + 2), x0:x0 + rng.integers(2, w // 2 + 2)] = True
    return m | (rng.random((h, w)) < p * 0.1)


def make_split(root, rng, n_real=4, n_fake=5, exif_real=True):
    """A DDL-I split; returns ({image_id: (label, gt bool, prob uint8)}, scores dict)."""
    truth, scores = {}, {}
    for i in range(n_real):
        h, w = 20 + i, 30
        iid = f"r{i}"
        if exif_real and i == 0:
            # stored 30x20 (w x h) with EXIF orientation 6 (rotate 90°): displayed 20 wide, 30 high
            exif = Image.Exif()
            exif[0x0112] = 6
            save(root / "real" / f"{iid}.jpg", rgb(rng, 20, 30), exif=exif.tobytes())
            h, w = 30, 20
        else:
            save(root / "real" / f"{iid}.{'png' if i % 2 else 'jpg'}", rgb(rng, h, w))
        prob = (rng.random((h, w)) * 140).astype(np.uint8)  # a few pixels >= 128: false positives
        truth[iid] = (0, np.zeros((h, w), bool), prob)
        scores[iid] = round(float(rng.uniform(0, 0.7)), 3)
    for i in range(n_fake):
        h, w = 24, 28 + i
        iid = f"f{i}"
        save(root / "fake" / f"{iid}.{'png' if i % 2 else 'jpg'}", rgb(rng, h, w))
        gt = blob(rng, h, w)
        save(root / ("masks" if i < 3 else "mask") / f"{iid}.png", gt.astype(np.uint8) * 255)
        noisy = gt ^ (rng.random((h, w)) < 0.15)
        prob = np.where(noisy, rng.integers(128, 256, (h, w)), rng.integers(0, 128, (h, w))).astype(np.uint8)
        if i == 0:
            prob[:] = 0  # an empty prediction on a fake: F1 0
        truth[iid] = (1, gt, prob)
        scores[iid] = round(float(rng.uniform(0.3, 1.0)), 3)
    return truth, scores


def write_preds(pred_dir, truth, scores, csv, skip=()):
    for iid, (_, _, prob) in truth.items():
        if iid not in skip:
            save(pred_dir / f"{iid}.png", prob)
    pd.DataFrame({"image_id": list(scores), "score": list(scores.values())}).to_csv(csv, index=False)


def sk_expected(truth, scores, images="fake_only"):
    ids = sorted(truth)
    y = [truth[i][0] for i in ids]
    s = [scores[i] for i in ids]
    f1s, ious = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in ids:
            label, gt, prob = truth[i]
            if images == "fake_only" and label == 0:
                continue
            g, p = gt.ravel(), (prob.ravel() / 255.0 >= 0.5)
            if not g.any() and not p.any():
                continue  # empty: skip
            f1s.append(f1_score(g, p))
            ious.append(jaccard_score(g, p))
    auc = roc_auc_score(y, s)
    f1, iou = float(np.mean(f1s)), float(np.mean(ious))
    return auc, f1, iou


def run_eval(split, preds, csv, out, *extra):
    return main(["evaluate", "--dataset", str(split), "--pred-masks", str(preds), "--scores", str(csv),
                 "--out", str(out), *extra])


def test_evaluate_dataset_matches_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    split = tmp_path / "valid"
    truth, scores = make_split(split, rng)
    write_preds(tmp_path / "pred", truth, scores, tmp_path / "scores.csv")
    out = tmp_path / "out"
    assert run_eval(split, tmp_path / "pred", tmp_path / "scores.csv", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    auc, f1, iou = sk_expected(truth, scores)
    assert m["auc"] == pytest.approx(auc) and m["f1"] == pytest.approx(f1) and m["iou"] == pytest.approx(iou)
    assert m["final"] == pytest.approx((auc + f1 + iou) / 3)
    assert (m["n_real"], m["n_fake"], m["n_errors"], m["n_resized"]) == (4, 5, 0, 0)
    for k in ("ap", "eer", "accuracy", "counts", "detection_counts"):
        assert m[k] is not None
    assert m["convention"] == {"averaging": "per_image", "images": "fake_only", "iou": "foreground",
                               "empty": "skip", "threshold": 0.5}
    # pooled pixel counts of the fakes
    tp = sum(int((truth[i][1] & (truth[i][2] >= 128)).sum()) for i in truth if truth[i][0] == 1)
    assert m["counts"]["TP"] == tp
    df = pd.read_parquet(out / "per_image.parquet")
    for c in ("image_id", "label", "score", "group", "TP", "FP", "FN", "TN", "f1", "iou", "ok"):
        assert c in df.columns
    r0 = df.set_index("image_id").loc["r0"]
    assert (r0["height"], r0["width"]) == (30, 20) and not r0["resized"]  # EXIF orientation 6 honoured
    assert r0["TP"] == 0 and r0["FN"] == 0 and r0["FP"] == int((truth["r0"][2] >= 128).sum())
    assert "| AUC |" in (out / "metrics.md").read_text()
    assert len(pd.read_csv(out / "ledger.csv")) == 0
    # images=all, pooled: real images add false positives
    out2 = tmp_path / "out2"
    assert run_eval(split, tmp_path / "pred", tmp_path / "scores.csv", out2, "--images", "all") == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["f1"] == pytest.approx(sk_expected(truth, scores, images="all")[1])
    assert m2["counts"]["FP"] > m["counts"]["FP"]


def test_evaluate_one_class_auc_is_null(tmp_path):
    rng = np.random.default_rng(1)
    split = tmp_path / "fakes_only"
    truth, scores = make_split(split, rng, n_real=0, n_fake=3)
    write_preds(tmp_path / "pred", truth, scores, tmp_path / "scores.csv")
    out = tmp_path / "out"
    assert run_eval(split, tmp_path / "pred", tmp_path / "scores.csv", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["auc"] is None and "one class" in m["auc_reason"]
    assert m["final"] is None and m["final_reason"]
    assert m["f1"] is not None and m["eer"] is None and m["ap"] is not None


def test_evaluate_bad_inputs_listed_rest_evaluated(tmp_path, capsys):
    rng = np.random.default_rng(2)
    split = tmp_path / "valid"
    truth, scores = make_split(split, rng, exif_real=False)
    clean_truth, clean_scores = dict(truth), dict(scores)
    # add the problems
    save(split / "fake" / "nomask.png", rgb(rng, 10, 10))  # fake without a GT mask
    save(split / "fake" / "badsize.png", rgb(rng, 10, 12))  # GT mask of another size
    save(split / "masks" / "badsize.png", np.zeros((12, 10), np.uint8))
    (split / "real" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # unreadable image
    save(split / "real" / "clash.png", rgb(rng, 10, 10))  # same stem in real/ and fake/
    save(split / "fake" / "clash.jpg", rgb(rng, 10, 10))
    save(split / "masks" / "clash.png", np.zeros((10, 10), np.uint8))
    extra = {i: (0, None, np.zeros((10, 10), np.uint8)) for i in ("nomask", "badsize", "corrupt", "clash")}
    truth.update(extra)
    scores.update({i: 0.5 for i in extra})
    del scores["f1"]  # missing score
    write_preds(tmp_path / "pred", truth, scores, tmp_path / "scores.csv", skip=("r1",))  # missing pred mask
    out = tmp_path / "out"
    assert run_eval(split, tmp_path / "pred", tmp_path / "scores.csv", out) == 1
    ledger = pd.read_csv(out / "ledger.csv")
    reasons = dict(zip(ledger["image_id"], ledger["reason"]))
    assert set(reasons) == {"f1", "r1", "nomask", "badsize", "corrupt", "clash"}
    assert "score" in reasons["f1"] and "predicted mask" in reasons["r1"]
    assert "without a ground-truth mask" in reasons["nomask"] and "10x12" in reasons["badsize"]
    assert "clash" in reasons["clash"] and (ledger["image_id"] == "clash").sum() == 2
    err = capsys.readouterr().err
    assert "problem(s)" in err and "corrupt" in err
    # the rest is evaluated exactly as if the bad images did not exist
    m = json.loads((out / "metrics.json").read_text())
    for i in ("f1", "r1"):
        clean_truth.pop(i), clean_scores.pop(i)
    auc, f1, iou = sk_expected(clean_truth, clean_scores)
    assert m["auc"] == pytest.approx(auc) and m["f1"] == pytest.approx(f1) and m["iou"] == pytest.approx(iou)
    assert m["n_errors"] == 7 and m["n_images"] == len(clean_truth)
    assert run_eval(split, tmp_path / "pred", tmp_path / "scores.csv", tmp_path / "o2", "--allow-errors") == 0
    # user errors: exit 2
    pd.DataFrame({"id": ["x"], "score": [0.1]}).to_csv(tmp_path / "bad.csv", index=False)
    assert run_eval(split, tmp_path / "pred", tmp_path / "bad.csv", tmp_path / "o3") == 2
    assert run_eval(tmp_path / "pred", tmp_path / "pred", tmp_path / "scores.csv", tmp_path / "o4") == 2


# ------------------------------------------------------------------------------------ manifest mode + tables
def make_manifest_run(tmp_path, rng, n=16):
    """A manifest shard, LFDL/MITL-like predictions, and per-variant counts in evaluate/{variant}/s00000.parquet."""
    root = tmp_path / "data"
    rows, truth = [], {}
    for i in range(n):
        label = int(i % 2)
        iid = f"img{i:02d}"
        h, w = 16, 20
        save(root / "img" / f"{iid}.png", rgb(rng, h, w))
        gt = blob(rng, h, w) if label else np.zeros((h, w), bool)
        if label:
            save(root / "mask" / f"{iid}.png", gt.astype(np.uint8) * 255)
        truth[iid] = (label, gt)
        rows.append({"image_id": iid, "root": str(root), "path": f"img/{iid}.png", "label": label,
                     "mask_path": f"mask/{iid}.png" if label else "", "group": f"person{i // 3}",
                     "split": "test" if i < n - 2 else "train",
                     "method": ["sbi", "rc"][i // 2 % 2] if label else "real",
                     "source": "london", "width": w, "height": h})
    man = tmp_path / "s00000.parquet"
    pd.DataFrame(rows).to_parquet(man)
    preds = {}
    for model, flip in (("lfdl", 0.1), ("mitl", 0.25)):
        d = tmp_path / "predict" / model / "s00000"
        sc = {}
        for iid, (label, gt) in truth.items():
            noisy = gt ^ (rng.random(gt.shape) < flip)
            save(d / "masks" / f"{iid}.png", np.where(noisy, 200, 30).astype(np.uint8))
            sc[iid] = float(np.clip(label * 0.5 + rng.normal(0.25, 0.2 if model == "lfdl" else 0.4), 0, 1))
        pd.DataFrame({"image_id": list(sc), "score": list(sc.values())}).to_csv(d / "scores.csv", index=False)
        preds[model] = d
    ev = tmp_path / "evaluate"
    for variant in ("lfdl", "mitl", "mdmf"):
        if variant == "mdmf":
            fused = tmp_path / "fuse" / "mdmf" / "s00000" / "masks"
            assert main(["fuse", "--lfdl-masks", str(preds["lfdl"] / "masks"), "--mitl-masks",
                         str(preds["mitl"] / "masks"), "--out", str(fused), "--variant", "mdmf", "--kernel", "3"]) == 0
            masks, scores = fused, preds["lfdl"] / "scores.csv"
        else:
            masks, scores = preds[variant] / "masks", preds[variant] / "scores.csv"
        rc = main(["evaluate", "--manifest", str(man), "--pred-masks", str(masks), "--scores", str(scores),
                   "--out-counts", str(ev / variant / "s00000.parquet"), "--variant", variant])
        assert rc == 0
    return man, preds, ev, truth


def test_manifest_mode_and_tables(tmp_path, capsys):
    rng = np.random.default_rng(3)
    man, preds, ev, truth = make_manifest_run(tmp_path, rng)
    counts = pd.read_parquet(ev / "mitl" / "s00000.parquet")
    assert len(counts) == 14 and set(counts["split"]) == {"test"} and counts["ok"].all()
    assert set(counts["variant"]) == {"mitl"} and counts["group"].str.startswith("person").all()
    # per-image counts equal a direct count
    r = counts.set_index("image_id").loc["img01"]
    pred = np.asarray(Image.open(preds["mitl"] / "masks" / "img01.png")) >= 128
    gt = truth["img01"][1]
    assert (r["TP"], r["FP"], r["FN"], r["TN"]) == (int((pred & gt).sum()), int((pred & ~gt).sum()),
                                                    int((~pred & gt).sum()), int((~pred & ~gt).sum()))
    # missing predictions -> ledger rows, counted; --allow-errors for the workflow
    (preds["mitl"] / "masks" / "img03.png").unlink()
    led = tmp_path / "ledger" / "evaluate" / "s00000.csv"
    args = ["evaluate", "--manifest", str(man), "--pred-masks", str(preds["mitl"] / "masks"), "--scores",
            str(preds["mitl"] / "scores.csv"), "--out-counts", str(tmp_path / "x.parquet"), "--ledger", str(led)]
    assert main(args) == 1
    assert main(args + ["--allow-errors", "--split", "all"]) == 0
    assert list(pd.read_csv(led)["image_id"]) == ["img03"]
    assert len(pd.read_parquet(tmp_path / "x.parquet")) == 16

    out = tmp_path / "tables"
    rc = main(["tables", "--counts", str(ev), "--out", str(out), "--bootstrap", "40", "--ledgers", str(led),
               "--panels", "2", "--manifest", str(man), "--lfdl-masks", str(tmp_path / "predict" / "lfdl"),
               "--mitl-masks", str(tmp_path / "predict" / "mitl"), "--fused-masks", str(tmp_path / "fuse" / "mdmf")])
    assert rc == 0
    tab = pd.read_csv(out / "ablation.csv")
    assert list(tab["variant"]) == ["lfdl", "mitl", "lfdl_score_mitl_mask", "mdmf"]
    t = tab.set_index("variant")
    # the swapped row: mitl's masks, lfdl's scores
    assert t.loc["lfdl_score_mitl_mask", "auc"] == pytest.approx(t.loc["lfdl", "auc"])
    assert t.loc["lfdl_score_mitl_mask", "f1"] == pytest.approx(t.loc["mitl", "f1"])
    assert t.loc["lfdl_score_mitl_mask", "TP"] == t.loc["mitl", "TP"]
    # AUC equals scikit-learn's on the evaluated rows; intervals bracket the estimates
    lf = pd.read_parquet(ev / "lfdl" / "s00000.parquet")
    assert t.loc["lfdl", "auc"] == pytest.approx(roc_auc_score(lf["label"], lf["score"]))
    for k in ("auc", "f1", "iou", "final"):
        assert (t[f"{k}_lo"] <= t[k] + 1e-12).all() and (t[k] <= t[f"{k}_hi"] + 1e-12).all()
    md = (out / "ablation.md").read_text()
    assert "averaging=per_image" in md and "0.8150" in md and "bootstrap" in md
    bm = pd.read_csv(out / "breakdown_method.csv")
    assert set(bm["method"]) == {"sbi", "rc"} and (bm["n_real"] == 7).all()
    assert "evaluate" in (out / "errors.md").read_text()
    for f in ("roc.png", "pr.png", "panels.png"):
        assert (out / "figures" / f).stat().st_size > 1000
    assert json.loads((out / "tables.json").read_text())["ablation"][0]["variant"] == "lfdl"
    # another convention, from the same counts
    assert main(["tables", "--counts", str(ev / "mdmf" / "s00000.parquet"), "--out", str(tmp_path / "t2"),
                 "--bootstrap", "0", "--averaging", "pooled", "--no-figures", "--threshold", "0.5"]) == 0
    assert main(["tables", "--counts", str(ev), "--out", str(tmp_path / "t3"), "--threshold", "0.6"]) == 2
    t2 = pd.read_csv(tmp_path / "t2" / "ablation.csv")
    assert list(t2["variant"]) == ["mdmf"]
    mdmf = pd.read_parquet(ev / "mdmf" / "s00000.parquet")
    fk = mdmf[mdmf["label"] == 1]
    assert t2["f1"][0] == pytest.approx(2 * fk["TP"].sum() / (2 * fk["TP"].sum() + fk["FP"].sum() + fk["FN"].sum()))


def test_tables_reduce_per_file_and_join_by_id(tmp_path, capsys):
    """`tables` reads the count files one at a time: the swapped row joins lfdl scores onto mitl counts by image
    id across files (an image without a valid lfdl row is counted as left out), groups are coded as their sorted
    names (the bootstrap's resamples), and an image counted twice is named."""
    rng = np.random.default_rng(5)

    def rows(ids, variant, ok=True):
        n = len(ids)
        tp = rng.integers(0, 50, n)
        return pd.DataFrame({"image_id": ids, "label": [i % 2 for i in range(n)], "score": rng.random(n),
                             "group": [f"g{i % 3}" for i in range(n)], "variant": variant, "TP": tp,
                             "FP": rng.integers(0, 9, n), "FN": rng.integers(0, 9, n), "TN": 1000 - tp, "ok": ok,
                             "threshold": 0.5})

    ev = tmp_path / "ev"
    (ev / "lfdl").mkdir(parents=True)
    (ev / "mitl").mkdir()
    ids = [f"im{i:02d}" for i in range(20)]
    lf_a, lf_b = rows(ids[:10], "lfdl"), rows(ids[10:19], "lfdl")  # im19 has no lfdl row
    mi = rows(ids[::-1], "mitl")  # another order, one file
    lf_a.to_parquet(ev / "lfdl" / "a.parquet")
    lf_b.to_parquet(ev / "lfdl" / "b.parquet")
    mi.to_parquet(ev / "mitl" / "a.parquet")
    assert main(["tables", "--counts", str(ev), "--out", str(tmp_path / "t"), "--bootstrap", "30",
                 "--no-figures"]) == 0
    t = pd.read_csv(tmp_path / "t" / "ablation.csv").set_index("variant")
    joined = mi.drop(columns="score").merge(pd.concat([lf_a, lf_b])[["image_id", "score"]], on="image_id")
    assert t.loc["lfdl_score_mitl_mask", "n_images"] == 19 and t.loc["lfdl_score_mitl_mask", "n_errors"] == 1
    assert t.loc["lfdl_score_mitl_mask", "auc"] == pytest.approx(roc_auc_score(joined["label"], joined["score"]))
    assert t.loc["mitl", "n_groups"] == 3
    # the same counts in one file give the same table, intervals included (same group codes, same resamples)
    pd.concat([lf_a, lf_b]).to_parquet(ev / "lfdl" / "a.parquet")
    (ev / "lfdl" / "b.parquet").unlink()
    assert main(["tables", "--counts", str(ev), "--out", str(tmp_path / "t2"), "--bootstrap", "30",
                 "--no-figures"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t" / "ablation.csv"),
                                  pd.read_csv(tmp_path / "t2" / "ablation.csv"))
    lf_b.iloc[:1].to_parquet(ev / "lfdl" / "dup.parquet")
    assert main(["tables", "--counts", str(ev), "--out", str(tmp_path / "t3"), "--no-figures"]) == 2
    assert "image 'im10'" in capsys.readouterr().err


@pytest.mark.parametrize("averaging,images", [("per_image", "fake_only"), ("pooled", "all")])
def test_grouped_bootstrap_equals_the_generic_one(averaging, images):
    """tables' per-group bootstrap = metrics.bootstrap_ci over metrics.table_statistic: same resamples, same
    values (float summation order aside), ties and one-class resamples included."""
    from morphfuse import metrics as M
    from morphfuse.tables import grouped_bootstrap

    rng = np.random.default_rng(1)
    n = 300
    labels = (rng.random(n) < 0.6).astype(np.int64)
    scores = np.round(np.clip(rng.normal(0.3 + 0.3 * labels, 0.25), 0, 1), 2)  # many ties
    tp, fp, fn = rng.integers(0, 30, n), rng.integers(0, 30, n), rng.integers(0, 30, n)
    tp[:20] = fp[:20] = fn[:20] = 0  # empty pairs (skipped)
    tn = 2000 - tp - fp - fn
    groups = np.array([f"id{i % 37:03d}" for i in range(n)])
    conv = M.Convention(averaging=averaging, images=images)
    lo, hi = M.bootstrap_ci(None, groups, M.table_statistic(labels, scores, tp, fp, fn, tn, conv), n_resamples=60,
                            seed=4)
    glo, ghi = grouped_bootstrap(labels, scores, tp, fp, fn, tn, M.group_codes(groups), conv, 60, 4, 0.95)
    np.testing.assert_allclose(glo, lo, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ghi, hi, rtol=1e-12, atol=1e-14)


def test_curves_are_thinned_for_plotting_within_tolerance():
    from morphfuse.metrics import roc_curve
    from morphfuse.plots import thin_curve

    rng = np.random.default_rng(0)
    labels = (rng.random(50_000) < 0.5).astype(int)
    fpr, tpr = roc_curve(labels, rng.normal(labels * 0.8, 1.0))
    x, y = thin_curve(fpr, tpr, 500)
    assert len(x) <= 2 * 500 + 2 and (x[0], y[0], x[-1], y[-1]) == (fpr[0], tpr[0], fpr[-1], tpr[-1])
    # every point of the full curve is within the spacing of the thinned polyline (tpr is monotone in fpr)
    assert np.abs(np.interp(fpr, x, y) - tpr).max() < 2 * (np.hypot(1, 1) * 2 / 500)
    small = thin_curve(fpr[:100], tpr[:100], 500)
    assert np.array_equal(small[0], fpr[:100])
