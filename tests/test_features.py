"""`morphfuse features`: LFDL crops + SRM and MITL images + DCT bands per shard; precompute = on the fly."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import LONDON_512, london
from morphfuse import dct, features, srm
from morphfuse.cli import main
from morphfuse.imageio import read_image

S, M = 64, 96  # small sides keep the test fast; nothing depends on 299 / 512
F16 = 2.0 ** -11  # float16 relative rounding


def _row(image_id, root, path, label, mask_path="", split="train", wh=(384, 512), method="real"):
    return {"image_id": image_id, "root": str(root), "path": path, "label": label, "mask_path": mask_path,
            "source": "london", "method": method, "group": image_id[:3], "source_groups": image_id[:3],
            "source_ids": "", "split": split, "width": wh[0], "height": wh[1]}


def _crop(image_id, face_idx, box, ref=None, kind="face"):
    ref = ref if ref is not None else (np.nan,) * 4
    return {"image_id": image_id, "face_idx": face_idx, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
            "kind": kind, "ref_x0": ref[0], "ref_y0": ref[1], "ref_x1": ref[2], "ref_y1": ref[3]}


@pytest.fixture
def shard(tmp_path):
    """A real photo (read in place, read-only), a fake with a mask and a fake without one (copies in tmp_path)."""
    real, other = london(2)
    src = tmp_path / "src"
    (src / "fake").mkdir(parents=True)
    (src / "mask").mkdir()
    shutil.copy(other, src / "fake" / "002.jpg")
    w, h = Image.open(other).size
    mask = np.zeros((h, w), np.uint8)
    mask[150:300, 100:200] = 255
    Image.fromarray(mask).save(src / "mask" / "002.png")
    rows = [
        _row("real_001", LONDON_512, str(real.relative_to(LONDON_512)), 0, split="train", wh=(w, h)),
        _row("fake_002", src, "fake/002.jpg", 1, "mask/002.png", split="val", wh=(w, h), method="paste"),
        _row("fake_nomask", src, "fake/002.jpg", 1, "", split="train", wh=(w, h), method="import"),
    ]
    crops = [
        _crop("real_001", 0, (60, 100, 320, 380), ref=(150.0, 200.0, 230.0, 260.0)),  # shrinks
        _crop("real_001", 1, (10, 10, 50, 40)),                                          # enlarges
        _crop("fake_002", -1, (0, 0, w, h), kind="no_face"),
        _crop("fake_nomask", 0, (100, 50, 140, 300)),                                    # mixed: 40 wide, 250 tall
    ]
    man, cr = tmp_path / "s00000.parquet", tmp_path / "crops.parquet"
    pd.DataFrame(rows).to_parquet(man, index=False)
    pd.DataFrame(crops).to_parquet(cr, index=False)
    return {"manifest": man, "crops": cr, "tmp": tmp_path, "real": real, "mask": mask, "wh": (w, h)}


def _run(shard, mode, tag, low_band="l_shape", extra=()):
    out = shard["tmp"] / tag
    argv = ["features", "--manifest", str(shard["manifest"]), "--crops", str(shard["crops"]),
            "--out-lfdl", str(out / "lfdl.npz"), "--out-mitl", str(out / "mitl.npz"), "--lfdl-size", str(S),
            "--mitl-size", str(M), "--mode", mode, "--low-band", low_band, "--ledger", str(out / "ledger.csv"),
            *extra]
    assert main(argv) == 0
    return out


def test_cli_precompute_equals_on_the_fly(shard):
    pre, otf = _run(shard, "precompute", "pre", "square"), _run(shard, "on_the_fly", "otf", "square")
    assert pd.read_csv(pre / "ledger.csv").empty
    for kind, derived in (("lfdl", ("srm",)), ("mitl", ("dct_high", "dct_low"))):
        a = features.load_feature_shard(pre / f"{kind}.npz")
        b = features.load_feature_shard(otf / f"{kind}.npz")
        assert set(a) - set(b) == set(derived) and not set(b) - set(a)
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # same pixels, masks and labels in both modes
        meta = features.feature_shard_meta(pre / f"{kind}.npz")
        assert meta["kind"] == kind and meta["mode"] == "precompute" and meta["n"] == len(a["image_id"])
        with np.load(pre / f"{kind}.npz", allow_pickle=False) as z:  # no pickles anywhere
            assert all(z[k].dtype != object for k in z.files)
        if kind == "lfdl":
            fly = features.lfdl_inputs_from_rgb(b["rgb"])
            assert a["srm"].dtype == np.float16 and a["srm"].shape == (4, 3, S, S)
            np.testing.assert_allclose(a["srm"].astype(np.float32), fly["srm"].numpy(), rtol=F16, atol=1e-6)
        else:
            fly = features.mitl_inputs_from_rgb(b["rgb"], low_band="square")
            for k in derived:
                assert a[k].dtype == np.float16 and a[k].shape == (3, 3, M, M)
                np.testing.assert_allclose(a[k].astype(np.float32), fly[k].numpy(), rtol=F16, atol=1e-6)
        np.testing.assert_array_equal(fly["rgb"].numpy(), b["rgb"].transpose(0, 3, 1, 2) / np.float32(255))


def test_cli_entries(shard):
    out = _run(shard, "precompute", "pre")
    L = features.load_feature_shard(out / "lfdl.npz")
    T = features.load_feature_shard(out / "mitl.npz")
    w, h = shard["wh"]
    assert L["image_id"].dtype.kind == "U" and L["split"].dtype.kind == "U"
    assert list(L["image_id"]) == ["real_001", "real_001", "fake_002", "fake_nomask"]
    assert list(L["face_idx"]) == [0, 1, -1, 0] and list(L["label"]) == [0, 0, 1, 1]
    assert list(L["has_mask"]) == [True, True, True, False]  # a fake without a mask is kept for SSPSL
    assert list(L["crop_kind"]) == ["face", "face", "no_face", "face"]
    assert L["rgb"].shape == (4, S, S, 3) and L["rgb"].dtype == np.uint8 and L["mask"].shape == (4, S, S)
    assert (L["orig_hw"] == [h, w]).all() and L["crop_box"][2].tolist() == [0, 0, w, h]
    img = read_image(shard["real"])
    np.testing.assert_array_equal(L["rgb"][0], cv2.resize(img[100:380, 60:320], (S, S), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(L["rgb"][1], cv2.resize(img[10:40, 10:50], (S, S), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_allclose(L["ref_box"][0], [90 * S / 260, 100 * S / 280, 170 * S / 260, 160 * S / 280], rtol=1e-6)
    assert np.isnan(L["ref_box"][1:]).all()
    assert set(np.unique(L["mask"])) <= {0, 255} and not L["mask"][[0, 1, 3]].any()
    frac = shard["mask"].mean() / 255
    assert abs((L["mask"][2] > 0).mean() - frac) < 0.02 and abs((T["mask"][1] > 0).mean() - frac) < 0.02
    assert list(T["image_id"]) == ["real_001", "fake_002", "fake_nomask"]
    assert list(T["split"]) == ["train", "val", "train"]
    assert T["rgb"].shape == (3, M, M, 3) and list(T["has_mask"]) == [True, True, False]
    np.testing.assert_array_equal(T["rgb"][0], cv2.resize(img, (M, M), interpolation=cv2.INTER_AREA))
    for k in ("dct_high", "dct_low"):
        assert T[k].min() == 0 and T[k].max() == 1  # min-max normalised per sample


def test_inputs_match_independent_numpy():
    """The on-the-fly helpers equal the numpy SRM / DCT of the normalised pixels, for uint8 and float input."""
    rgb = np.asarray(Image.open(london(1)[0]).convert("RGB").resize((48, 40)))[None]
    x01 = rgb.transpose(0, 3, 1, 2).astype(np.float64) / 255
    lf = features.lfdl_inputs_from_rgb(rgb)
    np.testing.assert_allclose(lf["srm"].numpy(), srm.srm_residuals_np((x01 - 0.5) / 0.5), atol=1e-5)
    lf2 = features.lfdl_inputs_from_rgb(torch.from_numpy(x01).float())
    assert torch.allclose(lf2["srm"], lf["srm"], atol=1e-6)
    mean = np.array(features.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(features.IMAGENET_STD).reshape(1, 3, 1, 1)
    mi = features.mitl_inputs_from_rgb(rgb[0])  # one H×W×3 image works too
    hi, lo = dct.dct_bands_np((x01 - mean) / std)
    np.testing.assert_allclose(mi["dct_high"].numpy(), hi, atol=1e-5)
    np.testing.assert_allclose(mi["dct_low"].numpy(), lo, atol=1e-5)
    # MITL normalises with timm's constants: ours must be the same numbers (read without importing all of timm)
    timm_spec = importlib.util.find_spec("timm")
    if timm_spec is None:
        pytest.skip("timm is not installed")
    spec = importlib.util.spec_from_file_location("_timm_constants",
                                                  Path(timm_spec.origin).parent / "data" / "constants.py")
    consts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(consts)
    assert features.IMAGENET_MEAN == consts.IMAGENET_DEFAULT_MEAN
    assert features.IMAGENET_STD == consts.IMAGENET_DEFAULT_STD


def test_bad_inputs_go_to_the_ledger(shard):
    tmp = shard["tmp"]
    src = tmp / "src"
    good = bytearray((src / "fake" / "002.jpg").read_bytes())
    (src / "fake" / "corrupt.jpg").write_bytes(bytes(good[: len(good) // 3]) + bytes(3000))
    w, h = shard["wh"]
    Image.fromarray(np.zeros((h // 2, w), np.uint8)).save(src / "mask" / "small.png")
    rows = pd.read_parquet(shard["manifest"]).to_dict("records")[:2]
    rows += [
        _row("corrupt", src, "fake/corrupt.jpg", 0, wh=(w, h)),
        _row("no_mask_file", src, "fake/002.jpg", 1, "mask/missing.png", wh=(w, h)),
        _row("small_mask", src, "fake/002.jpg", 1, "mask/small.png", wh=(w, h)),
        _row("resized", src, "fake/002.jpg", 0, wh=(w * 2, h * 2)),
        _row("no_crop", src, "fake/002.jpg", 0, wh=(w, h)),
    ]
    crops = pd.read_parquet(shard["crops"])
    crops = crops[crops.image_id != "fake_nomask"].to_dict("records")
    crops += [_crop(i, -1, (0, 0, w, h), kind="no_face") for i in ("corrupt", "no_mask_file", "small_mask", "resized")]
    crops += [_crop("real_001", 2, (w + 5, 10, w + 50, 40))]  # entirely outside the image
    pd.DataFrame(rows).to_parquet(shard["manifest"], index=False)
    pd.DataFrame(crops).to_parquet(shard["crops"], index=False)
    out = _run(shard, "precompute", "bad")
    ledger = pd.read_csv(out / "ledger.csv", keep_default_na=False)
    assert len(ledger) == 6, ledger
    assert all("\n" not in r for r in ledger.reason) and set(ledger.stage) == {"features"}
    assert "corrupt.jpg" in ledger.set_index("image_id").loc["corrupt", "path"]
    assert "missing.png" in ledger.set_index("image_id").loc["no_mask_file", "path"]
    assert "does not exist" in ledger.set_index("image_id").loc["no_mask_file", "reason"]
    assert "but its image is" in ledger.set_index("image_id").loc["small_mask", "reason"]
    assert "manifest says" in ledger.set_index("image_id").loc["resized", "reason"]
    assert "no crop row" in ledger.set_index("image_id").loc["no_crop", "reason"]
    assert "empty" in ledger[ledger.image_id == "real_001"].reason.iloc[0]
    L = features.load_feature_shard(out / "lfdl.npz")
    T = features.load_feature_shard(out / "mitl.npz")
    assert list(L["image_id"]) == ["real_001", "real_001", "fake_002"] and L["srm"].shape[0] == 3
    assert list(T["image_id"]) == ["real_001", "fake_002", "no_crop"] and T["dct_low"].shape[0] == 3


def test_empty_shard_and_single_outputs(tmp_path):
    cols = list(_row("x", "/", "x", 0))
    man, cr = tmp_path / "m.parquet", tmp_path / "c.parquet"
    pd.DataFrame({c: pd.Series([], dtype=object if c not in ("label", "width", "height") else "int64")
                  for c in cols}).to_parquet(man, index=False)
    pd.DataFrame(columns=list(_crop("x", 0, (0, 0, 1, 1)))).to_parquet(cr, index=False)
    assert main(["features", "--manifest", str(man), "--crops", str(cr), "--out-lfdl", str(tmp_path / "l.npz"),
                 "--lfdl-size", str(S), "--mode", "precompute", "--ledger", str(tmp_path / "l.csv")]) == 0
    assert main(["features", "--manifest", str(man), "--out-mitl", str(tmp_path / "t.npz"), "--mitl-size", str(M),
                 "--mode", "precompute", "--ledger", str(tmp_path / "t.csv")]) == 0
    L = features.load_feature_shard(tmp_path / "l.npz")
    T = features.load_feature_shard(tmp_path / "t.npz")
    assert L["rgb"].shape == (0, S, S, 3) and L["srm"].shape == (0, 3, S, S) and L["ref_box"].shape == (0, 4)
    assert T["rgb"].shape == (0, M, M, 3) and T["dct_high"].shape == (0, 3, M, M) and len(T["image_id"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet", "l.csv", "l.npz", "m.parquet", "t.csv", "t.npz"]


def test_user_errors(shard, capsys):
    base = ["features", "--manifest", str(shard["manifest"]), "--ledger", str(shard["tmp"] / "l.csv")]
    assert main(base + ["--out-lfdl", str(shard["tmp"] / "l.npz")]) == 2  # no --crops
    assert "--crops" in capsys.readouterr().err
    assert main(base) == 2  # no output
    assert main(base + ["--out-mitl", str(shard["tmp"] / "t.npz"), "--mitl-size", "0"]) == 2
    other = shard["tmp"] / "other.parquet"
    pd.DataFrame([_crop("someone_else", 0, (0, 0, 10, 10))]).to_parquet(other, index=False)
    assert main(base + ["--crops", str(other), "--out-lfdl", str(shard["tmp"] / "l.npz")]) == 2
    assert "not in the manifest shard" in capsys.readouterr().err
    with pytest.raises(Exception, match="does not exist"):
        features.load_feature_shard(shard["tmp"] / "nope.npz")


def test_resize_rules():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    half = features.resize_image(img, 20)[:, :, 0]  # 60→20 wide, 40→20 tall: area average
    assert half.shape == (20, 20)
    np.testing.assert_array_equal(features.resize_image(img[:, :40], 20),
                                  cv2.resize(img[:, :40], (20, 20), interpolation=cv2.INTER_AREA))
    block = img[:, :40, 0].astype(float).reshape(20, 2, 20, 2).mean(axis=(1, 3))
    assert np.abs(features.resize_image(img[:, :40], 20)[..., 0] - block).max() <= 0.5 + 1e-9
    np.testing.assert_array_equal(features.resize_image(img, 80),
                                  cv2.resize(img, (80, 80), interpolation=cv2.INTER_LINEAR))
    assert features.resize_image(img, 50).shape == (50, 50, 3)  # mixed: 60 shrinks, 40 grows
    np.testing.assert_array_equal(features.resize_image(img[:, :40], 40), img[:, :40])
    m = np.zeros((40, 60), bool)
    m[10:20, 30:45] = True
    rm = features.resize_mask(m, 20)
    assert rm.dtype == np.uint8 and set(np.unique(rm)) == {0, 255}
    np.testing.assert_array_equal(rm[5:10, 10:15], 255)  # exact rows 10..19 → 5..9, cols 30..44 → 10..14
    assert rm.sum() == 25 * 255
    nan = features.box_to_crop_coords((np.nan, 1, 2, 3), (0, 0, 10, 10), 20)
    assert np.isnan(nan).all()
    assert np.isnan(features.box_to_crop_coords((20, 20, 30, 30), (0, 0, 10, 10), 20)).all()  # outside the crop
    np.testing.assert_allclose(features.box_to_crop_coords((-5, 2, 5, 12), (0, 0, 10, 20), 20), [0, 2, 10, 12])


def test_streamed_shard_is_what_savez_writes(tmp_path):
    """ShardWriter (rows appended to disk, assembled in chunks) gives np.savez's file: same members, same order,
    same bytes at the same offsets; np.load and the row reader read it."""
    from morphfuse.shards import NpzRows

    rng = np.random.default_rng(0)
    arrays = {"image_id": np.array(["a", "bb", "ccc"]), "rgb": rng.integers(0, 256, (3, 7, 7, 3), dtype=np.uint8),
              "mask": rng.integers(0, 2, (3, 7, 7), dtype=np.uint8) * 255, "label": np.array([0, 1, 1]),
              "srm": rng.normal(size=(3, 3, 7, 7)).astype(np.float16)}
    features.write_feature_shard(tmp_path / "ref.npz", arrays, {"n": 3})
    with features.ShardWriter(tmp_path / "new.npz") as w:
        for k in ("rgb", "mask", "srm"):
            w.declare(k, arrays[k].dtype, arrays[k].shape[1:])
        for i in range(3):
            for k in ("rgb", "mask", "srm"):
                w.append(k, arrays[k][i:i + 1])
        w.close({k: arrays[k] for k in ("image_id", "label")}, {"n": 3}, ["image_id", "rgb", "mask", "label", "srm"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npz", "ref.npz"]  # temporaries removed
    ref, new = NpzRows(tmp_path / "ref.npz"), NpzRows(tmp_path / "new.npz")
    assert list(ref.members) == list(new.members) and ref.members == new.members
    with open(tmp_path / "ref.npz", "rb") as f1, open(tmp_path / "new.npz", "rb") as f2:
        a, b = f1.read(), f2.read()
    for m in ref.members.values():
        end = m.offset + m.row_bytes * len(m) if m.shape else m.offset
        assert a[m.offset:end] == b[m.offset:end], m.name
    loaded = features.load_feature_shard(tmp_path / "new.npz")
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
    np.testing.assert_array_equal(new.rows("rgb", [2, 0]), arrays["rgb"][[2, 0]])
    assert features.feature_shard_meta(tmp_path / "new.npz") == {"n": 3}
    lazy = features.open_feature_shard(tmp_path / "new.npz")
    assert lazy["rgb"].shape == (3, 7, 7, 3) and isinstance(lazy["label"], np.ndarray)
    before = lazy["rgb"].store.bytes_read
    np.testing.assert_array_equal(lazy["rgb"][np.array([1, 2])], arrays["rgb"][1:3])
    np.testing.assert_array_equal(lazy["srm"][0], arrays["srm"][0])
    assert lazy["rgb"].store.bytes_read - before == 2 * 7 * 7 * 3 + 3 * 7 * 7 * 2  # those rows only
