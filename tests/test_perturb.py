"""The robustness perturbations (morphfuse.perturb) against independent references on a real photo: OpenCV's JPEG
codec, a box average computed with numpy and Pillow's bilinear resize, scipy's Gaussian filter, and the noise's
own statistics; plus the stage that writes a perturbed shard."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from conftest import london
from morphfuse import perturb as P
from morphfuse.cli import main
from morphfuse.errors import UserError
from morphfuse.imageio import read_image


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rgb = read_image(london(1)[0])
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[: h - h % 4, : w - w % 4])  # even sides: the box reference needs them


def mad(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("q", [90, 70, 50])
def test_jpeg_equals_opencvs_codec(photo, q):
    ours = P.parse(f"jpeg:{q}")(photo)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    ref = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert ours.shape == photo.shape and ours.dtype == np.uint8
    assert mad(ours, ref) < 1.0, mad(ours, ref)          # two libjpeg builds, the same quantisation
    assert mad(ours, photo) > 0.3                          # it really compressed


def test_lower_jpeg_quality_loses_more(photo):
    errs = [mad(P.parse(f"jpeg:{q}")(photo), photo) for q in (90, 70, 50)]
    assert errs[0] < errs[1] < errs[2]


@pytest.mark.parametrize("factor", [0.5, 0.75])
def test_downscale_then_back(photo, factor):
    ours = P.parse(f"downscale:{factor}")(photo)
    assert ours.shape == photo.shape
    h, w = photo.shape[:2]
    if factor == 0.5:  # the area shrink by 2 is the 2×2 box mean, computed here with numpy
        box = photo.reshape(h // 2, 2, w // 2, 2, 3).astype(np.float64).mean(axis=(1, 3))
        small = cv2.resize(photo, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        assert np.abs(small.astype(np.float64) - box).max() <= 0.5 + 1e-9
    # the whole round trip against Pillow's box shrink and bilinear enlargement
    sw, sh = round(w * factor), round(h * factor)
    ref = np.asarray(
        Image.fromarray(photo).resize((sw, sh), Image.Resampling.BOX).resize((w, h), Image.Resampling.BILINEAR)
    )
    assert mad(ours, ref) < 1.5, mad(ours, ref)
    assert mad(ours, photo) > 0.5


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_equals_scipys_gaussian_filter(photo, sigma):
    ours = P.parse(f"blur:{sigma}")(photo)
    radius = math.ceil(3 * sigma)
    ref = np.stack([ndimage.gaussian_filter(photo[..., c].astype(np.float64), sigma, mode="mirror",
                                            truncate=radius / sigma) for c in range(3)], axis=-1)
    diff = np.abs(ours.astype(np.float64) - ref)
    assert diff.max() <= 1.5 and diff.mean() < 0.3  # OpenCV's 8-bit fixed-point kernel vs float64


@pytest.mark.parametrize("sigma", [3.0, 7.0])
def test_noise_has_the_stated_distribution_and_is_seeded(sigma):
    grey = np.full((256, 256, 3), 128, np.uint8)  # no clipping at mid-grey
    p = P.parse(f"noise:{sigma}")
    a = p(grey, P.image_seed(0, p, "img1"))
    d = a.astype(np.float64) - 128
    assert abs(d.mean()) < 0.05 and abs(d.std() - math.sqrt(sigma ** 2 + 1 / 12)) < 0.05  # + rounding's variance
    assert np.array_equal(a, p(grey, P.image_seed(0, p, "img1")))
    assert not np.array_equal(a, p(grey, P.image_seed(0, p, "img2")))
    assert not np.array_equal(a, p(grey, P.image_seed(1, p, "img1")))


def test_specs_ids_and_errors():
    assert P.parse("jpeg:90").id == "jpeg_90" and P.parse("jpeg_90") == P.parse("jpeg:90")
    assert P.parse("downscale:0.75").id == "downscale_0.75" and P.parse("none").id == "none"
    assert [p.id for p in P.sweep({"jpeg": [90, 70], "blur": [1]})] == ["none", "jpeg_90", "jpeg_70", "blur_1"]
    for bad, why in (("jpeg:101", r"\[1, 100\]"), ("blur", "KIND:LEVEL"), ("rotate:3", "KIND:LEVEL"),
                     ("noise:x", "not a number"), ("jpeg:70.5", "integer"), ("downscale:2", r"\[0.01, 1.0\]")):
        with pytest.raises(UserError, match=why):
            P.parse(bad)


def test_perturb_stage_writes_a_shard_of_perturbed_pngs(tmp_path, bad_inputs):
    rows = []
    for i, path in enumerate(london(2) + [bad_inputs["zero_byte"]]):
        rows.append({"image_id": f"im{i}", "root": str(path.parent), "path": path.name, "label": 0, "mask_path": "",
                     "split": "test"})
    man = tmp_path / "m.parquet"
    pd.DataFrame(rows).to_parquet(man)
    args = ["perturb", "--manifest", str(man), "--perturb", "jpeg:50", "--images", str(tmp_path / "img"),
            "--out", str(tmp_path / "p.parquet"), "--ledger", str(tmp_path / "l.csv")]
    assert main(args) == 0
    out = pd.read_parquet(tmp_path / "p.parquet")
    assert list(out["image_id"]) == ["im0", "im1"]
    ledger = pd.read_csv(tmp_path / "l.csv")
    assert list(ledger["image_id"]) == ["im2"]
    for r in out.itertuples():
        got = read_image(Path(r.root) / r.path)  # root / absolute path = the perturbed file
        src = read_image(london(2)[int(r.image_id[-1])])
        assert np.array_equal(got, P.parse("jpeg:50")(src))
    first = (tmp_path / "img" / "im0.png").read_bytes()
    assert main(args) == 0 and (tmp_path / "img" / "im0.png").read_bytes() == first  # same bytes again


def test_robustness_reducer_table_markdown_and_figure(tmp_path):
    """morphfuse robustness joins one ablation table per perturbation into the long table, the Markdown
    (Final with intervals) and the plot."""
    def ablation(shift: float) -> pd.DataFrame:
        rows = []
        for i, v in enumerate(["lfdl", "mitl", "mdmf"]):
            row = {"variant": v, "n_images": 20}
            for k in ("auc", "f1", "iou"):
                row[k], row[f"{k}_lo"], row[f"{k}_hi"] = 0.8 - 0.1 * i - shift, 0.7 - shift, 0.9 - shift
            row["final"] = (row["auc"] + row["f1"] + row["iou"]) / 3
            row["final_lo"], row["final_hi"] = row["final"] - 0.05, row["final"] + 0.05
            rows.append(row)
        return pd.DataFrame(rows)

    specs = []
    for pid, shift in (("none", 0.0), ("jpeg_90", 0.01), ("jpeg_50", 0.05), ("blur_2", 0.1)):
        p = tmp_path / f"{pid}.csv"
        ablation(shift).to_csv(p, index=False)
        specs.append(f"{pid}={p}")
    assert main(["robustness", "--ablation", *specs, "--out", str(tmp_path / "out")]) == 0
    long = pd.read_csv(tmp_path / "out" / "robustness.csv")
    assert len(long) == 12 and set(long["kind"]) == {"none", "jpeg", "blur"}
    got = long.set_index(["variant", "perturbation"])["final"]
    assert got[("mdmf", "blur_2")] == pytest.approx(ablation(0.1).set_index("variant").loc["mdmf", "final"])
    md = (tmp_path / "out" / "robustness.md").read_text()
    assert "| variant | none | jpeg_90 | jpeg_50 | blur_2 |" in md and "[" in md
    assert (tmp_path / "out" / "robustness.png").stat().st_size > 10_000
    assert main(["robustness", "--ablation", f"rotate_3={tmp_path / 'none.csv'}", "--out", str(tmp_path / "x")]) == 2
