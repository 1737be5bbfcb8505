"""Thresholds fitted on the val split (`morphfuse thresholds`): hand-computed optima, a brute-force reference with
scikit-learn, the fused masks made with them, and the bundle that records them (which detect then uses)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from morphfuse.cli import main
from morphfuse.errors import UserError
from morphfuse.fusion import fuse_masks
from morphfuse.thresholds import DEFAULT_GRID, fit_mask_threshold, fit_score_threshold, mask_counts, parse_grid


def test_score_threshold_hand_computed():
    # acc 5/7 on (0.2, 0.3], (0.35, 0.6] and (0.7, 0.8]: the tie goes to the candidate closest to 0.5, 0.5 itself
    labels = [1, 1, 1, 0, 0, 0, 0]
    scores = [0.3, 0.6, 0.8, 0.1, 0.2, 0.35, 0.7]
    assert fit_score_threshold(labels, scores) == (0.5, pytest.approx(5 / 7))
    # separable on (0.65, 0.7]: candidates 0.675 (midpoint) and 0.7; 0.675 is the closer to 0.5
    t, acc = fit_score_threshold([1, 1, 1, 0, 0, 0], [0.7, 0.8, 0.9, 0.1, 0.6, 0.65])
    assert (t, acc) == (0.675, 1.0)
    with pytest.raises(UserError, match="real and fake"):
        fit_score_threshold([1, 1], [0.2, 0.3])


def test_score_threshold_is_the_best_of_a_dense_scan():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(0.3 * labels + rng.normal(0.4, 0.2, 200), 0, 1).round(3)
    t, acc = fit_score_threshold(labels, scores)
    dense = max(accuracy_score(labels, scores >= g) for g in np.linspace(0, 1, 2001))
    assert acc == pytest.approx(dense) and accuracy_score(labels, scores >= t) == pytest.approx(acc)


def test_mask_threshold_hand_computed():
    """Inside the truth v = 77 (p 0.302), on a ring around it v = 26 (p 0.102): only 0.15 ... 0.3 give F1 1; 0.3 is
    closest to 0.5. (v = round(0.3 * 255) = 76 would be p 0.298, below 0.3.)"""
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    lf = np.zeros((20, 20), np.uint8)
    lf[3:17, 3:17] = 26
    lf[gt] = 77
    mi = np.zeros_like(lf)
    counts = mask_counts([(lf, mi, gt)], "lfdl", 1, DEFAULT_GRID)
    t, f1 = fit_mask_threshold(counts, DEFAULT_GRID, "per_image")
    assert (t, f1) == (0.3, 1.0)
    i = DEFAULT_GRID.index(0.1)
    assert tuple(counts[0, i]) == (100, 14 * 14 - 100, 0)
    assert parse_grid("0.1:0.3:0.1") == (0.1, 0.2, 0.3) and parse_grid("0.4,0.6") == (0.4, 0.6)
    with pytest.raises(UserError):
        parse_grid("0:2:0.5")


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def val_run(tmp_path):
    """One val shard (6 fakes, 6 reals) with LFDL/MITL predict folders; LFDL scores separate the classes at ~0.7."""
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    rows, truth = [], {}
    for model in ("lfdl", "mitl"):
        (tmp_path / "predict" / model / "val_00000" / "masks").mkdir(parents=True)
    scores = []
    for k in range(12):
        iid, label = f"v{k:02d}", k % 2
        h, w = 24, 28
        _save(root / "img" / f"{iid}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        gt = np.zeros((h, w), bool)
        if label:
            y, x = rng.integers(2, 10, 2)
            gt[y:y + 10, x:x + 12] = True
            _save(root / "mask" / f"{iid}.png", gt.astype(np.uint8) * 255)
        truth[iid] = gt
        # probabilities: ~0.35 inside the truth, ~0.15 outside (noise), so the best mask threshold is low
        for model, level in (("lfdl", 0.35), ("mitl", 0.3)):
            p = np.clip(np.where(gt, level, 0.12) + rng.normal(0, 0.04, gt.shape), 0, 1)
            _save(
                tmp_path / "predict" / model / "val_00000" / "masks" / f"{iid}.png", np.round(p * 255).astype(np.uint8)
            )
        scores.append({"image_id": iid, "score": round(float(0.6 + 0.3 * label + rng.normal(0, 0.04)), 4)})
        rows.append({"image_id": iid, "root": str(root), "path": f"img/{iid}.png", "label": label,
                     "mask_path": f"mask/{iid}.png" if label else "", "group": f"p{k // 2}", "split": "val",
                     "method": "sbi" if label else "real", "source": "demo", "width": w, "height": h})
    pd.DataFrame(scores).to_csv(tmp_path / "predict" / "lfdl" / "val_00000" / "scores.csv", index=False)
    man = tmp_path / "val_00000.parquet"
    pd.DataFrame(rows).to_parquet(man)
    return tmp_path, man, truth, pd.DataFrame(scores)


def test_cli_fits_both_thresholds_and_fuse_uses_them(val_run):
    tmp_path, man, truth, scores = val_run
    out = tmp_path / "thresholds.json"
    pl, pm = tmp_path / "predict" / "lfdl" / "val_00000", tmp_path / "predict" / "mitl" / "val_00000"
    assert main(["thresholds", "--manifest", str(man), "--lfdl", str(pl), "--mitl", str(pm), "--variant", "mdmf",
                 "--kernel", "3", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["source"] == "val" and d["val"]["n_images"] == 12 and d["val"]["n_fake"] == 6
    # score: the reals are near 0.6 and the fakes near 0.9; the fitted t separates them, 0.5 does not
    labels = np.arange(12) % 2
    assert accuracy_score(labels, scores["score"] >= d["score_threshold"]) == 1.0 == d["val"]["accuracy"]
    assert d["val"]["accuracy_at_0.5"] == 0.5
    # mask: brute force over the grid with fusion.fuse_masks and scikit-learn's per-image F1
    ids = [f"v{k:02d}" for k in range(1, 12, 2)]

    def u8(model, iid):
        return np.asarray(Image.open(tmp_path / "predict" / model / "val_00000" / "masks" / f"{iid}.png"))

    ref = [np.mean([f1_score(truth[i].ravel(), fuse_masks(u8("lfdl", i), u8("mitl", i), "mdmf", 3, g).ravel(),
                             zero_division=0) for i in ids]) for g in DEFAULT_GRID]
    assert d["mask_threshold"] == DEFAULT_GRID[int(np.argmax(ref))] and d["val"]["f1"] == pytest.approx(max(ref))
    assert d["mask_threshold"] < 0.5 and d["val"]["f1"] > d["val"]["f1_at_0.5"]
    # fuse --thresholds binarises at the fitted value
    fused = tmp_path / "fused"
    assert main(["fuse", "--lfdl-masks", str(pl / "masks"), "--mitl-masks", str(pm / "masks"), "--out", str(fused),
                 "--variant", "lfdl", "--thresholds", str(out)]) == 0
    i = ids[0]
    expect = u8("lfdl", i) / 255.0 >= d["mask_threshold"]
    assert np.array_equal(np.asarray(Image.open(fused / f"{i}.png")) > 127, expect)
    # a thresholds file that is not one is refused in one line
    bad = tmp_path / "bad.json"
    bad.write_text('{"score_threshold": 2}')
    assert main(["fuse", "--lfdl-masks", str(pl / "masks"), "--mitl-masks", str(pm / "masks"), "--out",
                 str(tmp_path / "f2"), "--variant", "lfdl", "--thresholds", str(bad)]) == 2


def test_the_bundle_records_the_thresholds_and_detect_uses_them(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("dlib")
    from conftest import REPO
    from morphfuse.config import load_config
    from morphfuse.detect import Detector
    from morphfuse.bundle import load_bundle
    from model_bundle import save_model

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["lfdl"]["size"] = cfg["mitl"]["size"] = 64
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cfg = load_config(tmp_path / "config.yaml")
    for name in ("lfdl", "mitl"):
        save_model(name, cfg, tmp_path / f"{name}.pt")
    th = tmp_path / "thresholds.json"
    th.write_text(json.dumps({"source": "val", "score_threshold": 0.62, "mask_threshold": 0.35, "variant": "mdmf",
                              "kernel": 5, "val": {"n_images": 10}}))
    base = ["export", "--lfdl", str(tmp_path / "lfdl.pt"), "--mitl", str(tmp_path / "mitl.pt"), "--config",
            str(tmp_path / "config.yaml"), "--no-check"]
    assert main(base + ["--out", str(tmp_path / "b_val"), "--thresholds", str(th)]) == 0
    assert main(base + ["--out", str(tmp_path / "b_cfg")]) == 0
    meta = json.loads((tmp_path / "b_val" / "bundle.json").read_text())
    assert meta["fusion"]["threshold"] == 0.35 and meta["score_rules"]["fake_threshold"] == 0.62
    assert meta["thresholds"]["source"] == "val" and meta["thresholds"]["val"] == {"n_images": 10}
    cfg_meta = json.loads((tmp_path / "b_cfg" / "bundle.json").read_text())
    assert cfg_meta["thresholds"] == {"source": "config", "mask_threshold": 0.5, "score_threshold": 0.5}
    card = (tmp_path / "b_val" / "MODEL_CARD.md").read_text()
    assert "binarised at p >= 0.35" in card and "score >= 0.62" in card and "fitted on the val split" in card
    det = Detector(load_bundle(tmp_path / "b_val"))
    assert det.threshold == 0.35 and det.fake_threshold == 0.62
