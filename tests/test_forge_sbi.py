"""SBI forgeries: exact masks, seeded bytes, and bad inputs in the ledger (forge/sbi.py, forge/cli.py).

Mask tolerance (SBI blends with a soft alpha m and truncates to uint8, as released): outside the mask the fake
equals the (possibly colour-transformed) target EXACTLY; inside, at least 93 % of the pixels where
m >= 0.25·max(m) differ from the target (a pixel keeps its value where source and target agree, e.g. saturated
highlights), and at least 75 % of all mask pixels, the thin soft edge (m < 0.25·max m) included.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import LONDON_512, CachedBackend, london
from morphfuse.forge.cli import forge_shard
from morphfuse.forge.common import Skip, rng_for
from morphfuse.forge.sbi import SBIGenerator, blend_mask, colour_transform
from morphfuse.imageio import read_image


def index_rows(paths: list[Path], root: Path = LONDON_512, split: str = "train") -> pd.DataFrame:
    rows = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        m = re.search(r"(\d{3})_\d{2}\.", rel)
        g = m.group(1) if m else p.stem
        rows.append({"image_id": "london__" + rel.replace("/", "__"), "root": str(root), "path": rel, "label": 0,
                     "mask_path": "", "source": "london", "method": "real", "group": g, "source_groups": g,
                     "source_ids": "", "split": split, "width": 0, "height": 0})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def backend():
    return CachedBackend()


@pytest.fixture(scope="module")
def photos(backend):
    out = []
    for p in london(2) + london(1, "smiling_front"):
        rgb = read_image(p)
        out.append((p, rgb, backend.detect(rgb)))
    return out


def test_sbi_mask_is_exact(photos):
    gen = SBIGenerator({"forehead": True})
    seen_sides = set()
    for p, rgb, faces in photos:
        assert faces and faces[0].landmarks is not None and len(faces[0].landmarks) == 68
        target = {"image_id": p.name, "group": p.stem[:3], "split": "train"}
        for seed in range(4):
            res = gen(target, rgb, faces, rng_for(seed, "sbi", p.name), {})
            assert not isinstance(res, Skip), res
            res.validate(rgb.shape[:2])
            mask, fake, tgt, m = res.mask, res.fake_rgb, res.extra["target"], res.extra["blend"]
            assert mask.any() and not mask.all()
            np.testing.assert_array_equal(mask, m > 0)
            assert np.array_equal(fake[~mask], tgt[~mask]), "outside the mask the fake must equal the target"
            if res.extra["transformed"] == "source":
                assert np.array_equal(tgt, rgb), "with the source transformed the target is the photo itself"
            else:
                assert not np.array_equal(tgt, rgb)
            seen_sides.add(res.extra["transformed"])
            changed = (fake != tgt).any(axis=2)
            core = m >= 0.25 * m.max()
            assert changed[core].mean() >= 0.93, (p.name, seed, changed[core].mean())
            assert changed[mask].mean() >= 0.75, (p.name, seed, changed[mask].mean())
            x0, y0, x1, y1 = res.extra["box"]
            assert not mask[:y0].any() and not mask[y1:].any() and not mask[:, :x0].any() and not mask[:, x1:].any()
            assert res.source_ids == [p.name] and res.source_groups == [p.stem[:3]]
    assert seen_sides == {"source", "target"}


def test_sbi_pieces_are_seeded_and_sane():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    a = colour_transform(rgb, np.random.default_rng(5))
    b = colour_transform(rgb, np.random.default_rng(5))
    assert a.shape == rgb.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    mask = np.zeros((300, 260), np.uint8)
    mask[80:220, 70:190] = 1
    m = blend_mask(mask, np.random.default_rng(1))
    assert m.shape == mask.shape and 0 < m.max() <= 1 and m.min() == 0
    assert not (m > 0)[:40].any(), "the blend may not spread far beyond the hull"


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.png"))}


def test_sbi_same_seed_same_bytes(tmp_path, backend):
    idx = index_rows(london(2))
    a, _ = forge_shard(idx, "sbi", 0, 2, tmp_path / "a", seed=3, backend=backend, progress=False)
    b, _ = forge_shard(idx, "sbi", 0, 2, tmp_path / "b", seed=3, backend=backend, progress=False)
    c, _ = forge_shard(idx, "sbi", 0, 2, tmp_path / "c", seed=4, backend=backend, progress=False)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    n_companions = int((a["label"] == 0).sum())  # transformed targets added as reals (target_transform: pair)
    assert len(fa) == 4 + n_companions and fa == fb
    assert all(fa[k] != fc[k] for k in fa if k.startswith("images/sbi__"))
    pd.testing.assert_frame_equal(a.drop(columns="root"), b.drop(columns="root"))


def test_forge_cli_rows_and_ledger(tmp_path, backend, monkeypatch):
    """The CLI end to end: manifest rows, 0/255 masks, and one ledger line per bad input (never a crash)."""
    data = tmp_path / "data"
    data.mkdir()
    good = london(1)[0]
    (data / "good.jpg").write_bytes(good.read_bytes())
    Image.new("RGB", (320, 240), (128, 128, 128)).save(data / "grey.png")               # no face
    (data / "empty.jpg").write_bytes(b"")                                               # unreadable
    b = bytearray(good.read_bytes())
    (data / "corrupt.jpg").write_bytes(bytes(b[: len(b) // 3]) + bytes(2000))             # unreadable
    Image.open(good).resize((96, 96)).save(data / "tiny.png")                            # face too small
    idx = index_rows(sorted(data.iterdir()), root=data)
    idx.loc[len(idx)] = {**idx.iloc[0].to_dict(), "image_id": "fake_row", "label": 1}    # not a real: not forged
    idx.to_parquet(tmp_path / "index.parquet")

    monkeypatch.setattr("morphfuse.faces.backends.backend_from_config", lambda faces: backend)
    from morphfuse.cli import main

    out = tmp_path / "out"
    rc = main(["forge", "sbi", "--index", str(tmp_path / "index.parquet"), "--shard", "s00000", "--shard-size", "10",
               "--out", str(out), "--seed", "0", "--per-real", "2", "--min-face-size", "60", "--no-progress"])
    assert rc == 0
    rows = pd.read_parquet(out / "rows.parquet")
    fakes = rows[rows["label"] == 1]
    assert list(fakes["image_id"]) == ["sbi__london__good.jpg__0", "sbi__london__good.jpg__1"]
    for _, c in rows[rows["label"] == 0].iterrows():  # the transformed target of fake k, as a real
        k = c["image_id"].rsplit("__", 1)[1]
        assert c["image_id"] == f"sbi_target__london__good.jpg__{k}" and c["method"] == "sbi_target"
        assert (c["mask_path"], c["group"], c["split"], c["source_ids"]) == ("", "good", "train", "london__good.jpg")
    r = fakes.iloc[0]
    assert r["root"] == str(out.resolve()) and r["path"] == "images/sbi__london__good.jpg__0.png"
    assert r["mask_path"] == "masks/sbi__london__good.jpg__0.png" and r["label"] == 1 and r["method"] == "sbi"
    assert r["source"] == "forge" and r["group"] == "good" and r["source_groups"] == "good"
    assert r["source_ids"] == "london__good.jpg" and r["split"] == "train"
    assert (r["width"], r["height"]) == Image.open(good).size
    mask = np.asarray(Image.open(out / r["mask_path"]))
    assert mask.ndim == 2 and set(np.unique(mask)) == {0, 255}
    ledger = pd.read_csv(out / "ledger.csv", dtype=str)
    reasons = dict(zip(ledger["image_id"], ledger["reason"]))
    assert set(reasons) == {"london__grey.png", "london__empty.jpg", "london__corrupt.jpg", "london__tiny.png"}
    assert reasons["london__grey.png"] == "no face detected"
    assert reasons["london__empty.jpg"].startswith("unreadable")
    assert reasons["london__corrupt.jpg"].startswith("unreadable")
    assert reasons["london__tiny.png"].startswith(("face too small", "no face detected"))
    assert (ledger["stage"] == "forge").all()


def test_face_too_small_goes_to_ledger(tmp_path, backend):
    idx = index_rows(london(1))
    rows, ledger = forge_shard(idx, "sbi", 0, 5, tmp_path, min_face_size=2000, backend=backend, progress=False)
    assert rows.empty and len(ledger) == 1
    assert ledger.rows[0]["reason"].startswith("face too small")
    assert pd.read_parquet(tmp_path / "rows.parquet").empty


def test_no_landmarks_goes_to_ledger(tmp_path):
    """A backend that finds a face but no landmarks (e.g. opencv): SBI records it in the ledger."""
    from morphfuse.faces.backends import Face

    class BoxOnly:
        def detect(self, rgb):
            return [Face(box=(150.0, 150.0, 350.0, 350.0), score=1.0, landmarks=None)]

    idx = index_rows(london(1))
    rows, ledger = forge_shard(idx, "sbi", 0, 5, tmp_path, backend=BoxOnly(), progress=False)
    assert rows.empty and [r["reason"] for r in ledger.rows] == ["no 68-point landmarks for the largest face"]


# ------------------------------------------------------------------------------- no "tinted => fake" shortcut
def _dilated(mask: np.ndarray, px: int = 7) -> np.ndarray:
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)) > 0


def _manifest_of(tmp_path, idx, mode, backend, per_real=3):
    from morphfuse.stages.manifest import build_manifest

    rows, _ = forge_shard(idx, "sbi", 0, 10, tmp_path / mode, seed=0, per_real=per_real, backend=backend,
                          progress=False, options={"target_transform": mode})
    return rows, build_manifest(idx.assign(fingerprint=""), [rows], 8)


def _matches_a_real(fake_row, manifest) -> bool:
    fake = read_image(Path(fake_row["root"]) / fake_row["path"])
    keep = ~_dilated(read_image(Path(fake_row["root"]) / fake_row["mask_path"])[..., 0] > 0)
    reals = manifest[(manifest["label"] == 0) & (manifest["group"] == fake_row["group"])]
    return any(np.array_equal(fake[keep], read_image(Path(r["root"]) / r["path"])[keep])
               for _, r in reals.iterrows())


def test_every_sbi_fake_equals_a_real_of_the_manifest_outside_its_mask(tmp_path, backend):
    idx = index_rows(london(3))
    rows, man = _manifest_of(tmp_path, idx, "pair", backend)
    fakes, added = man[man["label"] == 1], man[man["method"] == "sbi_target"]
    assert len(fakes) == 9 and 0 < len(added) < 9  # the target was transformed in some of them (p 0.5)
    assert all(_matches_a_real(r, man) for _, r in fakes.iterrows())
    # the added reals keep the photo's identity and split, and sit in the same shards' split
    src = idx.set_index("image_id")
    for _, r in added.iterrows():
        assert r["label"] == 0 and r["mask_path"] == "" and r["source"] == "forge"
        assert (r["group"], r["split"]) == tuple(src.loc[r["source_ids"], ["group", "split"]])
        assert r["shard"].startswith(r["split"])
    # as released: no real is added, and the fakes whose target was tinted match no real outside their mask
    _, released = _manifest_of(tmp_path, idx, "as_released", backend)
    unmatched = [
        r["image_id"] for _, r in released[released["label"] == 1].iterrows() if not _matches_a_real(r, released)
    ]
    assert (released["method"] == "sbi_target").sum() == 0
    assert sorted(unmatched) == sorted(i.replace("sbi_target__", "sbi__") for i in added["image_id"])
    # source only: the target is always the untouched photo
    rows_s, man_s = _manifest_of(tmp_path, idx, "source_only", backend)
    assert (man_s["label"] == 0).sum() == len(idx) and all(_matches_a_real(r, man_s) for _, r in
                                                           man_s[man_s["label"] == 1].iterrows())


def test_bad_target_transform_and_inconsistent_forged_reals(tmp_path, backend, photos):
    from morphfuse.errors import UserError
    from morphfuse.forge.sbi import self_blend
    from morphfuse.stages.manifest import build_manifest

    p, rgb, faces = photos[0]
    with pytest.raises(ValueError, match="target_transform"):
        self_blend(rgb, faces[0].landmarks, np.random.default_rng(0), {"target_transform": "both"})
    idx = index_rows(london(2))
    rows, _ = _manifest_of(tmp_path, idx, "pair", backend, per_real=4)
    assert (rows["label"] == 0).any()
    bad = rows.copy()
    bad.loc[bad["label"] == 0, "split"] = "test"  # a companion real in another split than its photo
    with pytest.raises(UserError, match="differ from its source"):
        build_manifest(idx.assign(fingerprint=""), [bad], 8)
    orphan = rows.copy()
    orphan.loc[orphan["label"] == 0, "source_ids"] = "nobody"
    with pytest.raises(UserError, match="not a real image of the index"):
        build_manifest(idx.assign(fingerprint=""), [orphan], 8)
