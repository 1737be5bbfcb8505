"""MDMF fusion: pure functions against an independent NumPy morphology, a hand-computed case, and `morphfuse fuse`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from morphfuse import fusion, imageio
from morphfuse.cli import main


# ------------------------------------------------------------------------------ independent NumPy references
def ref_binarize(u8, t):
    return u8.astype(np.float64) / 255.0 >= t


def ref_dilate(m, k):
    """OR over the k×k window; outside the image counts as False (the border never dilates)."""
    r = k // 2
    p = np.pad(m, r, constant_values=False)
    out = np.zeros_like(m)
    for dy in range(k):
        for dx in range(k):
            out |= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return out


def ref_erode(m, k):
    """AND over the k×k window; outside the image counts as True (the border never erodes)."""
    r = k // 2
    p = np.pad(m, r, constant_values=True)
    out = np.ones_like(m)
    for dy in range(k):
        for dx in range(k):
            out &= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return out


def ref_fuse(a_u8, b_u8, variant, k, t):
    a, b = ref_binarize(a_u8, t), ref_binarize(b_u8, t)
    return {
        "lfdl": a,
        "mitl": b,
        "naive_or": a | b,
        "mdmf": ref_dilate(a, k) | ref_erode(b, k),
        "closing_or": ref_erode(ref_dilate(a, k), k) | ref_erode(ref_dilate(b, k), k),
    }[variant]


def random_prob(rng, shape, density):
    """Probability-like masks: blobs of high values plus noise, values touching the image border."""
    v = rng.integers(0, 256, size=shape, dtype=np.uint8)
    keep = rng.random(shape) < density
    return np.where(keep, v, 0).astype(np.uint8)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("variant", fusion.VARIANTS)
def test_fuse_matches_numpy_reference(variant, k):
    rng = np.random.default_rng(k * 31 + len(variant))
    for shape, density, t in (((23, 31), 0.3, 0.5), ((16, 9), 0.8, 0.25), ((40, 40), 0.05, 0.75), ((5, 6), 0.9, 0.5)):
        a, b = random_prob(rng, shape, density), random_prob(rng, shape, density)
        got = fusion.fuse_masks(a, b, variant, kernel=k, threshold=t)
        assert got.dtype == bool and got.shape == shape
        np.testing.assert_array_equal(got, ref_fuse(a, b, variant, k, t))


def test_morphology_border_rule():
    full = np.ones((6, 8), bool)
    np.testing.assert_array_equal(fusion.erode(full, 5), full)  # the border does not erode
    np.testing.assert_array_equal(fusion.dilate(~full, 5), ~full)  # nor dilate
    m = np.zeros((6, 8), bool)
    m[0, 7] = True  # a corner pixel
    exp = np.zeros_like(m)
    exp[0:2, 6:8] = True
    np.testing.assert_array_equal(fusion.dilate(m, 3), exp)
    rng = np.random.default_rng(0)
    for _ in range(5):
        r = rng.random((13, 17)) < 0.6
        np.testing.assert_array_equal(fusion.dilate(r, 3), ref_dilate(r, 3))
        np.testing.assert_array_equal(fusion.erode(r, 5), ref_erode(r, 5))
        np.testing.assert_array_equal(fusion.closing(r, 3), ref_erode(ref_dilate(r, 3), 3))
        # uint8 0/255 in, uint8 out
        np.testing.assert_array_equal(fusion.dilate(r.astype(np.uint8) * 255, 3) > 0, ref_dilate(r, 3))


def _grid(s):
    return np.array([[c == "1" for c in row.split()] for row in s.strip().splitlines()])


def test_hand_computed_7x7():
    lf = np.zeros((7, 7), np.uint8)
    lf[0, 0] = 128  # exactly 0.5 after /255 rounding: 128/255 >= 0.5 -> in
    lf[3, 3] = 200
    lf[3, 5] = 255
    lf[6, 6] = 127  # 127/255 < 0.5 -> out
    mi = np.zeros((7, 7), np.uint8)
    mi[0:3, 4:7] = 255  # a 3x3 block on the top-right corner
    mi[5, 1] = 255  # an isolated pixel
    expected = {
        "lfdl": """
            1 0 0 0 0 0 0
            0 0 0 0 0 0 0
            0 0 0 0 0 0 0
            0 0 0 1 0 1 0
            0 0 0 0 0 0 0
            0 0 0 0 0 0 0
            0 0 0 0 0 0 0""",
        "mitl": """
            0 0 0 0 1 1 1
            0 0 0 0 1 1 1
            0 0 0 0 1 1 1
            0 0 0 0 0 0 0
            0 0 0 0 0 0 0
            0 1 0 0 0 0 0
            0 0 0 0 0 0 0""",
        "naive_or": """
            1 0 0 0 1 1 1
            0 0 0 0 1 1 1
            0 0 0 0 1 1 1
            0 0 0 1 0 1 0
            0 0 0 0 0 0 0
            0 1 0 0 0 0 0
            0 0 0 0 0 0 0""",
        # dilate(LFDL): corner -> 2x2, the two centre pixels -> rows 2-4 x cols 2-6;
        # erode(MITL): the corner block keeps its 2x2 corner (the border does not erode), the lone pixel vanishes.
        "mdmf": """
            1 1 0 0 0 1 1
            1 1 0 0 0 1 1
            0 0 1 1 1 1 1
            0 0 1 1 1 1 1
            0 0 1 1 1 1 1
            0 0 0 0 0 0 0
            0 0 0 0 0 0 0""",
        # closing fills the one-pixel gap between (3,3) and (3,5); the block survives unchanged. Near the border a
        # closing GROWS toward it (the border erodes nothing back): (3,6) joins the row, and the lone MITL pixel
        # (5,1), dilated to rows 4-6 x cols 0-2, erodes back to rows 5-6 x cols 0-1, not to itself.
        "closing_or": """
            1 0 0 0 1 1 1
            0 0 0 0 1 1 1
            0 0 0 0 1 1 1
            0 0 0 1 1 1 1
            0 0 0 0 0 0 0
            1 1 0 0 0 0 0
            1 1 0 0 0 0 0""",
    }
    for variant, grid in expected.items():
        np.testing.assert_array_equal(fusion.fuse_masks(lf, mi, variant, kernel=3), _grid(grid), err_msg=variant)


def test_threshold_is_exact_on_uint8():
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for t in (0.0, 1.0, 0.5, 1 / 3, 128 / 255, 127 / 255, 0.50196, 0.999, 1e-9):
        np.testing.assert_array_equal(imageio.binarize_prob(v, t), ref_binarize(v, t), err_msg=str(t))
    assert imageio.threshold_to_uint8(0.5) == 128
    assert imageio.threshold_to_uint8(0.0) == 0
    assert imageio.threshold_to_uint8(1.0) == 255


@pytest.mark.parametrize("k", [0, 2, 4, -1, -3, 2.0, 5.0, True, "5", None])
def test_kernel_validation(k):
    m = np.zeros((5, 5), np.uint8)
    with pytest.raises(ValueError, match="kernel"):
        fusion.fuse_masks(m, m, "mdmf", kernel=k)


def test_bad_inputs():
    a = np.zeros((5, 6), np.uint8)
    with pytest.raises(ValueError, match="6x5.*7x5|size"):
        fusion.fuse_masks(a, np.zeros((5, 7), np.uint8), "mdmf")
    with pytest.raises(ValueError, match="variant"):
        fusion.fuse_masks(a, a, "union")
    with pytest.raises(ValueError, match="threshold"):
        fusion.fuse_masks(a, a, "mdmf", threshold=128)
    with pytest.raises(ValueError, match="uint8"):
        fusion.fuse_masks(a.astype(np.float32), a.astype(np.float32), "naive_or")


# ----------------------------------------------------------------------------------------------------- CLI
def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _setup(tmp_path, rng):
    lf, mi = tmp_path / "lfdl", tmp_path / "mitl"
    pairs = {}
    for name in ("a", "b", "c"):
        a, b = random_prob(rng, (33, 45), 0.4), random_prob(rng, (33, 45), 0.4)
        _png(lf / f"{name}.png", a)
        _png(mi / f"{name}.png", b)
        pairs[name] = (a, b)
    _png(lf / "d.png", random_prob(rng, (33, 45), 0.4))  # no MITL partner
    _png(lf / "e.png", random_prob(rng, (33, 45), 0.4))  # sizes differ
    _png(mi / "e.png", random_prob(rng, (45, 33), 0.4))
    _png(lf / "f.png", random_prob(rng, (33, 45), 0.4))  # unreadable MITL file
    (mi / "f.png").write_bytes(b"this is not a png")
    _png(mi / "g.png", random_prob(rng, (33, 45), 0.4))  # no LFDL partner
    (lf / "notes.txt").write_text("ignored")
    return lf, mi, pairs


@pytest.mark.parametrize("variant", ["mdmf", "lfdl"])
def test_cli_fuse_end_to_end(tmp_path, capsys, variant):
    lf, mi, pairs = _setup(tmp_path, np.random.default_rng(1))
    out, led = tmp_path / "out", tmp_path / "ledger.csv"
    rc = main(["fuse", "--lfdl-masks", str(lf), "--mitl-masks", str(mi), "--out", str(out), "--variant", variant,
               "--kernel", "3", "--ledger", str(led)])
    assert rc == 1
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # hidden: run record, lock
    assert written == ["a.png", "b.png", "c.png"]  # good ones written, nothing else (no temp files left)
    for name, (a, b) in pairs.items():
        img = Image.open(out / f"{name}.png")
        assert img.mode == "L"
        got = np.asarray(img)
        assert set(np.unique(got)) <= {0, 255}
        np.testing.assert_array_equal(got == 255, ref_fuse(a, b, variant, 3, 0.5))
    ledger = pd.read_csv(led)
    assert sorted(ledger["image_id"]) == ["d", "e", "f", "g"]
    assert set(ledger["stage"]) == {"fuse"}
    reasons = dict(zip(ledger["image_id"], ledger["reason"]))
    assert "partner" in reasons["d"] and "MITL" in reasons["d"]
    assert "partner" in reasons["g"] and "LFDL" in reasons["g"]
    assert "size" in reasons["e"] and "45x33" in reasons["e"]
    err = capsys.readouterr().err
    assert "4 image(s) not fused" in err and "e:" in err


def test_cli_fuse_ids_and_errors(tmp_path, capsys):
    lf, mi, pairs = _setup(tmp_path, np.random.default_rng(2))
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n\n# comment\nb\n")
    out = tmp_path / "out"
    base = ["fuse", "--lfdl-masks", str(lf), "--mitl-masks", str(mi), "--out", str(out)]
    assert main(base + ["--variant", "closing_or", "--ids", str(ids)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a.png", "b.png"]
    a, b = pairs["a"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")) == 255, ref_fuse(a, b, "closing_or", 5, 0.5))
    # another variant into the same --out would mix two runs' masks: refused (exit 2), the folder untouched
    assert main(base + ["--variant", "mdmf", "--ids", str(ids)]) == 2
    assert "another run" in capsys.readouterr().err
    base = ["fuse", "--lfdl-masks", str(lf), "--mitl-masks", str(mi), "--out", str(tmp_path / "out_mdmf")]
    # an id listed but absent from both folders is an error too; --allow-errors exits 0 but still lists it
    ids.write_text("a\nzzz\n../a\n")
    assert main(base + ["--variant", "mdmf", "--ids", str(ids)]) == 1
    err = capsys.readouterr().err
    assert "zzz" in err and "missing both masks" in err and "not a valid image_id" in err
    assert not (tmp_path / "a.png").exists()
    assert main(base + ["--variant", "mdmf", "--ids", str(ids), "--allow-errors"]) == 0
    # user errors: exit 2 with a sentence, no traceback
    assert main(base + ["--variant", "mdmf", "--kernel", "4"]) == 2
    assert "kernel" in capsys.readouterr().err
    assert main(["fuse", "--lfdl-masks", str(tmp_path / "nope"), "--mitl-masks", str(mi), "--out", str(out),
                 "--variant", "mdmf"]) == 2
