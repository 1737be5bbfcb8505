"""Adaptive face crops: the pure rule on hand cases, and `morphfuse crops` on a hand-made faces parquet."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from morphfuse.faces.backends import Face
from morphfuse.faces.crops import Crop, crop_boxes, reference_box
from morphfuse.faces.landmarks import nose_box_from_face_box


# ---------------------------------------------------------------------------------------------- crop_boxes
def test_no_face_gives_the_whole_image():
    assert crop_boxes([], 640, 480) == [Crop(-1, 0, 0, 640, 480, "no_face", -1)]


def test_face_box_enlarged_by_margin_around_its_centre():
    # 100×80 box centred on (300, 200): ×1.3 → 130×104, centred: x 235–365, y 148–252
    (c,) = crop_boxes([(250, 160, 350, 240)], 640, 480, margin=1.3, max_frac=0.7)
    assert c == Crop(0, 235, 148, 365, 252, "face", 0)
    # fractional edges are rounded outwards, so the crop always holds the enlarged box
    (c,) = crop_boxes([Face((10.2, 20.7, 50.3, 60.1), 1.0, None)], 100, 100, margin=1.0)
    assert (c.x0, c.y0, c.x1, c.y1) == (10, 20, 51, 61)


def test_margin_clipped_to_the_image():
    # a face in the top-left corner: the enlarged box would start at negative coordinates
    (c,) = crop_boxes([(0, 0, 100, 100)], 300, 200, margin=1.5)
    assert (c.x0, c.y0, c.x1, c.y1) == (0, 0, 125, 125)
    # a face cut by the right/bottom border (dlib boxes may reach past it)
    (c,) = crop_boxes([(250, 150, 330, 230)], 300, 200, margin=1.3)
    assert (c.x0, c.y0, c.x1, c.y1) == (238, 138, 300, 200) and c.kind == "face"


def test_face_larger_than_70_percent_of_the_image_gives_the_whole_image():
    # 90×90 in 100×100 = 81 % > 70 %
    assert crop_boxes([(5, 5, 95, 95)], 100, 100) == [Crop(-1, 0, 0, 100, 100, "face_too_large", 0)]
    # 80×87 = 69.6 %: still a face crop (area, not side, decides), clipped by the margin to the image
    (c,) = crop_boxes([(10, 5, 90, 92)], 100, 100)
    assert c.kind == "face" and (c.x0, c.y0, c.x1, c.y1) == (0, 0, 100, 100)
    # the threshold is a parameter
    assert crop_boxes([(10, 5, 90, 92)], 100, 100, max_frac=0.5)[0].kind == "face_too_large"
    # only the part inside the image counts: a 200×200 box mostly outside a 100×100 image covers 25 %
    assert crop_boxes([(50, 50, 250, 250)], 100, 100)[0].kind == "face"


def test_several_faces_one_crop_each_and_at_most_one_whole_image():
    faces = [(0, 0, 100, 100), (2, 2, 98, 98), (10, 10, 20, 20)]   # two too large, one small
    crops = crop_boxes(faces, 100, 100)
    assert [c.kind for c in crops] == ["face_too_large", "face"]
    assert crops[0].face_idx == -1 and crops[0].source_face == 0
    assert crops[1] == Crop(2, 8, 8, 22, 22, "face", 2)


def test_faces_outside_the_image_are_not_faces():
    assert crop_boxes([(-50, -50, -10, -10), (5, 5, 5, 5)], 100, 100) == [Crop(-1, 0, 0, 100, 100, "no_face", -1)]


def test_bad_arguments():
    with pytest.raises(ValueError):
        crop_boxes([], 0, 10)
    with pytest.raises(ValueError):
        crop_boxes([], 10, 10, margin=0)
    with pytest.raises(ValueError):
        crop_boxes([], 10, 10, max_frac=1.5)


# ----------------------------------------------------------------------------------- the release's crop rule
FIVE = np.array([[100, 100], [160, 100], [130, 120], [110, 130], [150, 130]], np.float32)  # w 60, h 30


def _release_reference(pts, width, height, ratio=1.5):
    """The IJCAI release's norm_crop_mask, written out: padding ratios scaled by h/w and w/h, then clipped."""
    x_min, x_max, y_min, y_max = pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max()
    w, h = x_max - x_min, y_max - y_min
    dx, dy = w * ratio * (h / w), h * ratio * (w / h)
    return max(0, x_min - dx), max(0, y_min - dy), min(width, x_max + dx), min(height, y_max + dy)


def test_release_rule_widens_the_five_landmark_box():
    face = Face((95, 80, 165, 160), 1.0, FIVE)
    (c,) = crop_boxes([face], 640, 480)  # the default rule
    # dx = 1.5·h = 45 left and right, dy = 1.5·w = 90 above and below: (55, 10, 205, 220)
    assert c == Crop(0, 55, 10, 205, 220, "face", 0)
    assert (c.x0, c.y0, c.x1, c.y1) == _release_reference(FIVE, 640, 480)
    (c,) = crop_boxes([Face(face.box, 1.0, FIVE - [0, 60])], 640, 480)  # near the top: clipped at 0
    assert (c.y0, c.y1) == (0, 160) and (c.y0, c.y1) == _release_reference(FIVE - [0, 60], 640, 480)[1::2]
    (c,) = crop_boxes([face], 640, 480, expand=1.0)  # the factor is a parameter
    assert (c.x0, c.y0, c.x1, c.y1) == (70, 40, 190, 190)


def test_release_rule_tests_the_expanded_box_against_0_7():
    # landmarks moved up 9 px: expanded box (55, 1, 205, 211) = 150×210 = 31,500 px, inside both images below;
    # the detector box is 70×80 = 5,600 px
    face = Face((95, 71, 165, 151), 1.0, FIVE - [0, 9])
    assert crop_boxes([face], 213, 213)[0] == Crop(0, 55, 1, 205, 211, "face", 0)  # 31,500 < 0.7·213² = 31,758
    assert crop_boxes([face], 212, 212) == [Crop(-1, 0, 0, 212, 212, "face_too_large", 0)]  # > 31,461
    # the margin rule tests the detector box: a face crop in the same image
    assert crop_boxes([face], 212, 212, rule="margin")[0].kind == "face"
    # only the part of the expanded box inside the image counts (as released: the box is clipped first)
    edge = crop_boxes([Face((0, 80, 60, 160), 1.0, FIVE - [95, 0])], 210, 210)
    assert edge[0] == Crop(0, 0, 10, 110, 210, "face", 0)  # 110×200 = 22,000 < 30,870


def test_release_rule_from_68_points_and_fallback_without_landmarks():
    from morphfuse.faces.crops import uses_fallback
    from morphfuse.faces.landmarks import five_points

    rng = np.random.default_rng(0)
    lm68 = rng.uniform(100, 200, (68, 2)).astype(np.float32)
    five = five_points(lm68)
    np.testing.assert_allclose(five, [lm68[36:42].mean(0), lm68[42:48].mean(0), lm68[30], lm68[48], lm68[54]],
                               rtol=1e-6)
    (c,) = crop_boxes([Face((90, 90, 210, 210), 1.0, lm68)], 640, 480)
    ref = _release_reference(five, 640, 480)
    assert (c.x0, c.y0, c.x1, c.y1) == (math.floor(ref[0]), math.floor(ref[1]), math.ceil(ref[2]), math.ceil(ref[3]))
    # without landmarks: the margin rule, and the shard counts the fallback
    (c,) = crop_boxes([Face((250, 160, 350, 240), 1.0, None)], 640, 480)
    assert c == Crop(0, 235, 148, 365, 252, "face", 0)
    assert uses_fallback("release", None) and not uses_fallback("margin", None) and not uses_fallback("release", FIVE)
    with pytest.raises(ValueError, match="rule"):
        crop_boxes([], 10, 10, rule="wide")


# ----------------------------------------------------------------------------------------- reference boxes
def test_reference_box_from_landmarks_box_estimate_or_none():
    lm = np.stack([np.arange(68), np.arange(68)], 1).astype(np.float32)
    assert reference_box(lm, (0, 0, 68, 68), "nose", 5, 100, 100) == (22.0, 22.0, 40.0, 40.0)
    assert reference_box(lm, (0, 0, 68, 68), "face", 5, 100, 100) == (0.0, 0.0, 72.0, 72.0)  # clipped at 0
    box = (100, 100, 200, 220)
    nx0, ny0, nx1, ny1 = nose_box_from_face_box(box)
    assert (nx0, nx1) == pytest.approx((142, 158)) and (ny0, ny1) == pytest.approx((100 + 0.38 * 120, 100 + 0.67 * 120))
    assert reference_box(None, box, "nose", 0, 640, 480) == pytest.approx((nx0, ny0, nx1, ny1))
    assert reference_box(np.zeros(0), box, "mouth", 5, 640, 480) is None   # no landmarks, not the nose: unknown
    assert reference_box(lm + 500, None, "nose", 5, 100, 100) is None      # entirely outside the image


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_crops_end_to_end(tmp_path):
    from morphfuse.cli import main
    from morphfuse.faces.cli import face_rows, write_faces
    from morphfuse.ledger import Ledger

    lm68 = np.stack([np.linspace(100, 200, 68), np.linspace(120, 220, 68)], 1).astype(np.float32)
    faces = face_rows("two_faces", [Face((100, 120, 200, 220), 2.0, lm68),
                                    Face((300, 50, 340, 90), 0.5, lm68 + 200)], "dlib")
    faces += face_rows("big_face", [Face((0, 0, 600, 450), 1.5, lm68)], "dlib")
    faces += face_rows("haar", [Face((100, 100, 200, 220), 12.0, None)], "opencv")
    write_faces(tmp_path / "faces.parquet", faces)
    manifest = pd.DataFrame({"image_id": ["two_faces", "none", "big_face", "haar", "broken", "no_size"],
                             "root": "/data", "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"],
                             "width": [640, 640, 640, 640, 640, 0], "height": [480, 480, 480, 480, 480, 0]})
    manifest.to_parquet(tmp_path / "m.parquet")
    led = Ledger("faces")
    led.add("broken", "/data/e.jpg", "image file is truncated")
    led.write(tmp_path / "faces.csv")

    rc = main(["crops", "--manifest", str(tmp_path / "m.parquet"), "--faces", str(tmp_path / "faces.parquet"),
               "--faces-ledger", str(tmp_path / "faces.csv"), "--out", str(tmp_path / "crops.parquet"),
               "--ledger", str(tmp_path / "crops.csv"), "--rule", "margin", "--margin", "1.3",
               "--max-face-area-fraction", "0.7", "--reference-region", "nose", "--reference-pad", "5"])
    assert rc == 0
    df = pd.read_parquet(tmp_path / "crops.parquet")
    assert list(df.columns) == ["image_id", "face_idx", "x0", "y0", "x1", "y1", "kind",
                                "ref_x0", "ref_y0", "ref_x1", "ref_y1"]
    assert list(df["image_id"]) == ["two_faces", "two_faces", "none", "big_face", "haar"]
    assert list(df["kind"]) == ["face", "face", "no_face", "face_too_large", "face"]
    assert list(df["face_idx"]) == [0, 1, -1, -1, 0]
    assert df["x0"].dtype == np.int64
    r = df.iloc[0]
    assert (r.x0, r.y0, r.x1, r.y1) == (85, 105, 215, 235)
    nose = lm68[27:36]
    assert (r.ref_x0, r.ref_y0, r.ref_x1, r.ref_y1) == pytest.approx(
        (nose[:, 0].min() - 5, nose[:, 1].min() - 5, nose[:, 0].max() + 5, nose[:, 1].max() + 5))
    assert df.iloc[1].ref_x0 == pytest.approx(nose[:, 0].min() + 195)
    assert df.iloc[2][["ref_x0", "ref_y0", "ref_x1", "ref_y1"]].isna().all()      # no face: no reference
    assert df.iloc[3].ref_x0 == pytest.approx(r.ref_x0)                             # the large face's nose
    assert (df.iloc[3].x0, df.iloc[3].x1, df.iloc[3].y1) == (0, 640, 480)
    h = df.iloc[4]                                                                  # landmark-free: estimated
    assert (h.ref_x0, h.ref_y0) == pytest.approx((100 + 0.42 * 100 - 5, 100 + 0.38 * 120 - 5))
    crops_led = pd.read_csv(tmp_path / "crops.csv")
    assert list(crops_led["image_id"]) == ["broken", "no_size"]
    assert "truncated" in crops_led["reason"][0] and (crops_led["stage"] == "crops").all()

    # the default rule is the release's: the 5-point box of the (diagonal) landmarks, widened, tested expanded
    rc = main(["crops", "--manifest", str(tmp_path / "m.parquet"), "--faces", str(tmp_path / "faces.parquet"),
               "--out", str(tmp_path / "release.parquet")])
    rel = pd.read_parquet(tmp_path / "release.parquet")
    five = np.stack([lm68[36:42].mean(0), lm68[42:48].mean(0), lm68[30], lm68[48], lm68[54]])
    x0, y0, x1, y1 = _release_reference(five, 640, 480)
    r = rel.iloc[0]
    assert rc == 0 and (r.x0, r.y0, r.x1, r.y1) == (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
    assert rel[rel.image_id == "haar"].iloc[0][["x0", "y0", "x1", "y1"]].tolist() == [85, 82, 215, 238]  # fallback


def test_cli_crops_refuses_faces_of_another_shard(tmp_path, capsys):
    from morphfuse.cli import main
    from morphfuse.faces.cli import face_rows, write_faces

    write_faces(tmp_path / "f.parquet", face_rows("elsewhere", [Face((0, 0, 10, 10), 1.0, None)], "opencv"))
    pd.DataFrame({"image_id": ["a"], "width": [10], "height": [10]}).to_parquet(tmp_path / "m.parquet")
    rc = main(["crops", "--manifest", str(tmp_path / "m.parquet"), "--faces", str(tmp_path / "f.parquet"),
               "--out", str(tmp_path / "c.parquet")])
    assert rc == 2 and "not in" in capsys.readouterr().err
    rc = main(["crops", "--manifest", str(tmp_path / "m.parquet"), "--faces", str(tmp_path / "f.parquet"),
               "--out", str(tmp_path / "c.parquet"), "--margin", "-1"])
    assert rc == 2 and "--margin" in capsys.readouterr().err


def test_empty_faces_parquet_gives_whole_image_crops(tmp_path):
    from morphfuse.cli import main
    from morphfuse.faces.cli import write_faces

    write_faces(tmp_path / "f.parquet", [])
    pd.DataFrame({"image_id": ["a", "b"], "width": [10, 20], "height": [30, 40]}).to_parquet(tmp_path / "m.parquet")
    assert main(["crops", "--manifest", str(tmp_path / "m.parquet"), "--faces", str(tmp_path / "f.parquet"),
                 "--out", str(tmp_path / "c.parquet")]) == 0
    df = pd.read_parquet(tmp_path / "c.parquet")
    assert df[["x1", "y1"]].values.tolist() == [[10, 30], [20, 40]] and (df["kind"] == "no_face").all()
    assert math.isnan(df["ref_x0"].iloc[0])
