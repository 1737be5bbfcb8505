"""Prediction: paste-back and score rules on hand cases; a shard end to end (ledger, resume) with a fixed model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from morphfuse.errors import UserError
from morphfuse.imageio import read_gray
from morphfuse.predict import (
    image_score_release,
    lfdl_image_prob,
    mask_score,
    mitl_image_prob,
    paste_patch_map,
    predict_shard,
)
from morphfuse.training import checkpoint as ckpt


# ---------------------------------------------------------------------------------------------- hand cases
def test_paste_upsamples_bilinear_into_the_box():
    canvas = np.zeros((6, 8), np.float32)
    patch = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
    paste_patch_map(canvas, patch, (2, 1, 6, 5))  # a 4×4 box at x 2..5, y 1..4
    # 2 → 4 bilinear with half-pixel centres samples source rows/cols at -.25 (clamped), .25, .75, 1.25 (clamped)
    rows = np.array([1.0, 0.75, 0.25, 0.0])  # weight of source row 0
    cols = np.array([0.0, 0.25, 0.75, 1.0])  # weight of source col 1
    expected = np.zeros((6, 8), np.float32)
    expected[1:5, 2:6] = np.outer(rows, cols)
    np.testing.assert_allclose(canvas, expected, atol=1e-6)


def test_paste_takes_the_max_and_cuts_at_the_border():
    canvas = np.full((4, 4), 0.5, np.float32)
    paste_patch_map(canvas, np.full((2, 2), 0.2, np.float32), (0, 0, 2, 2))  # lower: canvas kept
    paste_patch_map(canvas, np.full((2, 2), 0.9, np.float32), (1, 1, 3, 3))  # higher: replaces
    paste_patch_map(canvas, np.full((3, 3), 0.7, np.float32), (3, -1, 6, 2))  # mostly outside: cut
    expected = np.array([[0.5, 0.5, 0.5, 0.7],
                         [0.5, 0.9, 0.9, 0.7],
                         [0.5, 0.9, 0.9, 0.5],
                         [0.5, 0.5, 0.5, 0.5]], np.float32)
    np.testing.assert_allclose(canvas, expected, atol=1e-6)


def test_image_score_release_rule():
    assert image_score_release([0.2, 0.7, 0.9]) == pytest.approx(0.8)   # mean of the faces ≥ 0.5
    assert image_score_release([0.2, 0.4]) == pytest.approx(0.3)        # none ≥ 0.5: mean of all
    assert image_score_release([0.5, 0.1]) == pytest.approx(0.5)        # 0.5 counts as ≥ 0.5
    assert image_score_release([0.3]) == pytest.approx(0.3)             # no face: the whole-image crop's score
    with pytest.raises(ValueError):
        image_score_release([])


def test_mask_score_rules():
    p = np.zeros((10, 20))
    p[0, :3] = [1.0, 0.5, 0.25]
    assert mask_score(p, "max") == 1.0
    assert mask_score(p, "top_percent", 1.0) == pytest.approx(0.75)     # 1 % of 200 px = top 2
    assert mask_score(p, "top_percent", 1.5) == pytest.approx(1.75 / 3)  # 3 px
    assert mask_score(p, "top_percent", 0.01) == 1.0                   # at least one pixel
    assert mask_score(p, "top_percent", 100) == pytest.approx(1.75 / 200)


def test_lfdl_image_prob_pastes_every_crop_and_scores_by_the_release_rule():
    # a 6×8 image, two crops: a 2×2 map of 0.3 over box (0,0,4,4), a 1×1 map of 0.9 over (2,2,6,5): max where
    # they overlap; score: only 0.9 is ≥ 0.5.
    score, prob = lfdl_image_prob([0.3, 0.9], [np.full((2, 2), 0.3, np.float32), np.full((1, 1), 0.9, np.float32)],
                                  [(0, 0, 4, 4), (2, 2, 6, 5)], (6, 8))
    expected = np.zeros((6, 8), np.float32)
    expected[0:4, 0:4] = 0.3
    expected[2:5, 2:6] = 0.9
    assert prob.dtype == np.float32 and prob.shape == (6, 8)
    np.testing.assert_allclose(prob, expected, atol=1e-6)
    assert score == pytest.approx(0.9)
    # one whole-image crop (no face): its score whatever it is; a box cut at the border
    score, prob = lfdl_image_prob(np.array([0.2]), np.full((1, 2, 2), 0.2, np.float32), np.array([[-1, 0, 3, 2]]),
                                  (2, 2))
    assert score == pytest.approx(0.2)
    np.testing.assert_allclose(prob, np.full((2, 2), 0.2), atol=1e-6)


def test_mitl_image_prob_resizes_clips_and_scores_the_stored_values():
    # 2×2 → 4×4 bilinear (half-pixel centres): the outer product of the paste test's row/column weights.
    score, prob = mitl_image_prob(np.array([[0.0, 1.0], [0.0, 0.0]], np.float32), (4, 4), "top_percent", 12.5)
    expected = np.outer([1.0, 0.75, 0.25, 0.0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(prob, expected, atol=1e-6)
    # top 12.5 % of 16 px = 2 px: 1.0 and 0.75, the latter stored as round(255·0.75) = 191 → 191/255
    assert score == pytest.approx((1.0 + 191 / 255) / 2, abs=1e-12)
    assert mitl_image_prob(expected, (4, 4), "max")[0] == 1.0  # same size: as is
    score, prob = mitl_image_prob(np.array([[1.5, -0.5]], np.float32), (1, 2), "max")  # clipped to [0, 1]
    np.testing.assert_array_equal(prob, [[1.0, 0.0]])
    assert score == 1.0


# ------------------------------------------------------------------------------------------- fixed model
class Fixed(nn.Module):
    """Protocol stand-in with known outputs: score = mean of the red channel; LFDL map = that value on a 2×2
    grid; MITL mask = the red channel itself. Counts the crops it sees."""

    def __init__(self, name="lfdl", size=8):
        super().__init__()
        self.name, self.size = name, size
        self.zero = nn.Parameter(torch.zeros(1))
        self.seen = 0

    @torch.no_grad()
    def predict_proba(self, batch):
        red = batch["rgb"][:, :1]
        self.seen += red.shape[0]
        score = red.mean((1, 2, 3)) + self.zero
        if self.name == "lfdl":
            return score, score[:, None, None, None].expand(-1, 1, 2, 2)
        return score, red


def make_fixed(name, size, options):
    return Fixed(name, size)


def _lfdl_shard(path, size=8):
    # image A: two faces (red 51 = 0.2 at box (0,0,4,4); red 204 = 0.8 at box (4,2,8,6)), original 6×10;
    # image B: one whole-image crop (red 102 = 0.4), original 5×7.
    reds = [51, 204, 102]
    rgb = np.zeros((3, size, size, 3), np.uint8)
    for i, r in enumerate(reds):
        rgb[i, ..., 0] = r
    arrays = {
        "image_id": np.array(["A", "A", "B"]), "face_idx": np.array([0, 1, -1]),
        "crop_box": np.array([[0, 0, 4, 4], [4, 2, 8, 6], [0, 0, 7, 5]]),
        "rgb": rgb, "mask": np.zeros((3, size, size), np.uint8), "has_mask": np.ones(3, bool),
        "label": np.array([1, 1, 0]), "ref_box": np.full((3, 4), np.nan, np.float32),
        "split": np.array(["test"] * 3), "orig_hw": np.array([[6, 10], [6, 10], [5, 7]]),
    }
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _manifest(path, ids):
    pd.DataFrame({"image_id": ids, "path": [f"{i}.jpg" for i in ids], "width": 10, "height": 6}).to_parquet(path)
    return path


def test_lfdl_shard_end_to_end_with_ledger_and_resume(tmp_path):
    shard = _lfdl_shard(tmp_path / "s.npz")
    man = _manifest(tmp_path / "s.parquet", ["A", "B", "C"])  # C failed an earlier stage: no features
    out = tmp_path / "pred"
    model = Fixed()
    res = predict_shard("lfdl", model, shard, man, out, batch_size=2)
    assert res == {"images": 3, "predicted": 2, "skipped_done": 0, "no_features": 1}
    sc = pd.read_csv(out / "scores.csv")
    assert list(sc.image_id) == ["A", "B"]
    assert sc.score.tolist() == pytest.approx([0.8, 0.4])  # A: faces ≥ .5 → 0.8 only; B: its one crop
    a = read_gray(out / "masks" / "A.png")
    expected = np.zeros((6, 10), np.uint8)
    expected[0:4, 0:4] = 51
    expected[2:6, 4:8] = 204  # max with the first face where they overlap (none here) and the zero canvas
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(read_gray(out / "masks" / "B.png"), np.full((5, 7), 102, np.uint8))
    led = pd.read_csv(out / "ledger.csv")
    assert led.image_id.tolist() == ["C"] and "no entry" in led.reason[0]
    assert not (out / "scores.partial.csv").exists()

    # Resume: nothing to do when complete; a lost mask is redone alone.
    model.seen = 0
    assert predict_shard("lfdl", model, shard, man, out)["predicted"] == 0 and model.seen == 0
    (out / "masks" / "B.png").unlink()
    assert predict_shard("lfdl", model, shard, man, out)["predicted"] == 1 and model.seen == 1

    # A killed run: partial scores with a half-written last line; only the unscored image is redone.
    (out / "scores.csv").unlink()
    (out / "scores.partial.csv").write_text("image_id,score\nA,0.8\nB,0.4")  # "B" line has no newline
    model.seen = 0
    res = predict_shard("lfdl", model, shard, man, out)
    assert res["skipped_done"] == 1 and res["predicted"] == 1 and model.seen == 1
    assert pd.read_csv(out / "scores.csv").score.tolist() == pytest.approx([0.8, 0.4])


def test_mitl_mask_back_to_original_size(tmp_path):
    m = 8
    rgb = np.zeros((1, m, m, 3), np.uint8)
    rgb[0, :4, :4, 0] = 255
    arrays = {"image_id": np.array(["X"]), "rgb": rgb, "mask": np.zeros((1, m, m), np.uint8),
              "label": np.array([1]), "split": np.array(["test"]), "orig_hw": np.array([[16, 12]])}
    with open(tmp_path / "m.npz", "wb") as f:
        np.savez(f, **arrays)
    man = _manifest(tmp_path / "m.parquet", ["X"])
    for rule, expected in (("max", 1.0), ("top_percent", 1.0)):
        out = tmp_path / rule
        predict_shard("mitl", Fixed("mitl", m), tmp_path / "m.npz", man, out, score_rule=rule, score_percent=1)
        mask = read_gray(out / "masks" / "X.png")
        assert mask.shape == (16, 12) and mask[0, 0] == 255 and mask[-1, -1] == 0
        assert pd.read_csv(out / "scores.csv").score[0] == pytest.approx(expected)
    out = tmp_path / "all"
    predict_shard("mitl", Fixed("mitl", m), tmp_path / "m.npz", man, out, score_rule="top_percent", score_percent=100)
    stored = read_gray(out / "masks" / "X.png") / 255.0
    assert pd.read_csv(out / "scores.csv").score[0] == pytest.approx(stored.mean())  # scored from stored values


class Fusable(Fixed):
    """Records ``fuse_for_inference`` calls (MITL's inference speed-up) and the mode they came in."""

    def __init__(self, *args):
        super().__init__(*args)
        self.fused_in_eval = []

    def fuse_for_inference(self):
        self.fused_in_eval.append(not self.training)
        return self


def test_mitl_prediction_fuses_the_model_after_eval(tmp_path):
    rgb = np.zeros((1, 8, 8, 3), np.uint8)
    arrays = {"image_id": np.array(["X"]), "rgb": rgb, "orig_hw": np.array([[8, 8]])}
    with open(tmp_path / "m.npz", "wb") as f:
        np.savez(f, **arrays)
    man = _manifest(tmp_path / "m.parquet", ["X"])
    mitl, lfdl = Fusable("mitl", 8).train(), Fusable("lfdl", 8)
    predict_shard("mitl", mitl, tmp_path / "m.npz", man, tmp_path / "o")
    assert mitl.fused_in_eval == [True]
    predict_shard("lfdl", lfdl, _lfdl_shard(tmp_path / "s.npz"), _manifest(tmp_path / "s.parquet", ["A", "B"]),
                  tmp_path / "p")
    assert lfdl.fused_in_eval == []  # only MITL's path fuses


def test_cli_and_model_file_checks(tmp_path, monkeypatch):
    from pathlib import Path

    from morphfuse.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    shard = _lfdl_shard(tmp_path / "s.npz")
    man = _manifest(tmp_path / "s.parquet", ["A", "B"])
    rec = ckpt.model_record("lfdl", 8, {}, "0" * 16, ckpt.cpu_state_dict(Fixed()), finished=True)
    ckpt.save_atomic(rec, tmp_path / "model.pt")
    args = ["--model", str(tmp_path / "model.pt"), "--features", str(shard), "--manifest", str(man),
            "--model-factory", "test_predict:make_fixed", "--no-progress"]
    assert main(["predict", "lfdl", *args, "--out", str(tmp_path / "p")]) == 0
    assert pd.read_csv(tmp_path / "p" / "scores.csv").shape == (2, 2)
    assert main(["predict", "mitl", *args, "--out", str(tmp_path / "q")]) == 2  # an LFDL model file
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.pt"):
        ckpt.load_model_file(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="trained at size 16"):
        predict_shard("lfdl", Fixed("lfdl", 16), shard, man, tmp_path / "r")


def test_real_lfdl_pastes_its_pixel_map_not_the_patch_grid(tmp_path):
    """A real LFDL (S = 40, G = 3): each crop's S×S pixel-head map is resized into its box; with mask_head: patch
    the G×G grid is. The two differ, and each equals the hand-pasted map of its head (cv2 resize, max)."""
    import cv2

    from morphfuse.models.lfdl import LFDL

    torch.manual_seed(0)
    model = LFDL(40).eval()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    arrays = {"image_id": np.array(["A", "A"]), "face_idx": np.array([0, 1]),
              "crop_box": np.array([[0, 0, 30, 24], [20, 10, 50, 40]]), "rgb": rgb,
              "orig_hw": np.array([[40, 60], [40, 60]])}
    with open(tmp_path / "s.npz", "wb") as f:
        np.savez(f, **arrays)
    man = _manifest(tmp_path / "s.parquet", ["A"])
    batch = {"rgb": torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255}
    written = {}
    for head in ("pixel", "patch"):
        model.mask_head = head
        _, maps = model.predict_proba(batch)
        assert maps.shape[-1] == (40 if head == "pixel" else model.grid)
        expected = np.zeros((40, 60), np.float32)
        for m, (x0, y0, x1, y1) in zip(maps[:, 0].numpy(), arrays["crop_box"]):
            up = cv2.resize(m, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
            expected[y0:y1, x0:x1] = np.maximum(expected[y0:y1, x0:x1], up)
        predict_shard("lfdl", model, tmp_path / "s.npz", man, tmp_path / head)
        written[head] = read_gray(tmp_path / head / "masks" / "A.png")
        np.testing.assert_array_equal(written[head], np.round(expected * 255).astype(np.uint8))
    assert (written["pixel"] != written["patch"]).mean() > 0.5
