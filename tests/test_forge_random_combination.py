"""Random combination and paste_random: exact masks, identity/split rules, seeded bytes (forge/random_combination.py).

Mask tolerance: the paste is hard (binary alpha), so outside the mask the fake equals the target EXACTLY and
inside at least 99 % of the pixels differ (a donor pixel may equal the target's by chance).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import LONDON_512, CachedBackend, london
from morphfuse.forge.cli import forge_shard
from morphfuse.forge.common import DonorPool, Skip, rng_for
from morphfuse.forge.random_combination import RandomCombination, face_box
from morphfuse.imageio import read_image


@pytest.fixture(scope="module")
def backend():
    return CachedBackend()


@pytest.fixture(scope="module")
def index() -> pd.DataFrame:
    """Persons 1-2 in train, 3-4 in test, each with a neutral and a smiling photo (same person, same split)."""
    rows = []
    for p in london(4) + london(4, "smiling_front"):
        rel = p.relative_to(LONDON_512).as_posix()
        g = p.name[:3]
        rows.append({"image_id": "london__" + rel.replace("/", "__"), "root": str(LONDON_512), "path": rel,
                     "label": 0, "mask_path": "", "source": "london", "method": "real", "group": g,
                     "source_groups": g, "source_ids": "", "split": "train" if g in ("001", "002") else "test",
                     "width": 0, "height": 0})
    df = pd.DataFrame(rows)
    assert set(df.groupby("split")["group"].nunique()) == {2}
    return df


@pytest.fixture(scope="module")
def pool(index, backend):
    def load(row):
        rgb = read_image(Path(row["root"]) / row["path"])
        return rgb, backend.detect(rgb)
    return DonorPool(index, load)


def _check(res, rgb, target, index, n_donors):
    assert not isinstance(res, Skip), res
    res.validate(rgb.shape[:2])
    assert res.mask.any() and not res.mask.all()
    assert np.array_equal(res.fake_rgb[~res.mask], rgb[~res.mask]), "outside the mask the fake must equal the target"
    changed = (res.fake_rgb != rgb).any(axis=2)
    assert changed[res.mask].mean() >= 0.99
    assert res.source_ids[0] == target["image_id"] and res.source_groups[0] == target["group"]
    donors = index.set_index("image_id").loc[res.source_ids[1:]]
    assert n_donors[0] <= len(donors) <= n_donors[1]
    assert (donors["group"] != target["group"]).all(), "a donor must show another person"
    assert donors["group"].is_unique, "no two donors of one forgery show the same person"
    assert (donors["split"] == target["split"]).all(), "donors come from the target's split"
    assert list(donors["group"]) == res.source_groups[1:]


def test_random_combination_mask_and_rules(index, pool, backend):
    gen = RandomCombination({}, "random_combination")
    for _, target in index.iloc[[0, 2, 5]].iterrows():
        rgb = read_image(Path(target["root"]) / target["path"])
        faces = backend.detect(rgb)
        for seed in range(3):
            res = gen(target, rgb, faces, rng_for(seed, gen.method, target["image_id"]), {}, donors=pool)
            _check(res, rgb, target, index, (1, 1))
            # the pasted hull is scaled to cover the target's face box (the detector's, as released): max(wB/wA, hB/hA)
            (info,) = res.extra["placements"]
            x0, y0, x1, y1 = face_box(faces[0], "detector")
            assert (x0, y0, x1, y1) == tuple(float(v) for v in faces[0].box)
            w, h = info["size"]
            assert w >= (x1 - x0) - 1 and h >= (y1 - y0) - 1
            assert min(w - (x1 - x0), h - (y1 - y0)) <= 2


def test_paste_random_mask_and_rules(index, pool, backend):
    gen = RandomCombination({}, "paste_random")
    one_split = index.assign(split="train")                       # 4 people: up to 3 donors
    wide = DonorPool(one_split, pool._load)
    counts = {}
    for idx, donors in ((index, pool), (one_split, wide)):
        n = set()
        for _, target in idx.iloc[[1, 3, 6]].iterrows():
            rgb = read_image(Path(target["root"]) / target["path"])
            faces = backend.detect(rgb)
            for seed in range(4):
                res = gen(target, rgb, faces, rng_for(seed, gen.method, target["image_id"]), {}, donors=donors)
                _check(res, rgb, target, idx, (1, 3))
                n.add(len(res.source_ids) - 1)
                fw = faces[0].box[2] - faces[0].box[0]
                for pl in res.extra["placements"]:
                    x, y = pl["xy"]
                    w, h = pl["size"]
                    assert 0 <= x and 0 <= y and x + w <= rgb.shape[1] and y + h <= rgb.shape[0]
                    assert 0.4 * fw - 1 <= w <= 0.6 * fw + 1, (w, fw)  # 0.4-0.6 x the target's face width
        counts[len(counts)] = n
    assert counts[0] == {1}, "two people per split: one donor of the other person at most"
    assert len(counts[1]) > 1 and counts[1] <= {1, 2, 3}


def test_donor_pool_rules():
    rows = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], "group": list("aabbccdd"),
                         "split": ["train"] * 4 + ["test"] * 4, "label": [0] * 7 + [1]})
    pool = DonorPool(rows, load=lambda r: "never loaded")
    assert [r["image_id"] for r in pool.candidates("train", "a")] == ["i2", "i3"]
    assert [r["image_id"] for r in pool.candidates("test", "c")] == ["i6"]          # i7 is a fake
    target = {"image_id": "i0", "group": "a", "split": "train"}
    assert pool.draw(np.random.default_rng(0), target, 2) == []                    # none loads
    assert len(pool.failures) == 2                                                  # both photos of b tried


def test_no_donor_goes_to_ledger_and_bytes_are_seeded(tmp_path, index, backend):
    one_split = index[index["group"].isin(["001", "003"])].assign(split="train")
    solo = index[index["group"] == "002"].assign(split="val")   # alone in its split: no donor of another person
    idx = pd.concat([one_split, solo], ignore_index=True)
    kw = dict(backend=backend, progress=False)
    a, la = forge_shard(idx, "random_combination", 0, 8, tmp_path / "a", seed=1, **kw)
    b, _ = forge_shard(idx, "random_combination", 0, 8, tmp_path / "b", seed=1, **kw)
    c, _ = forge_shard(idx, "random_combination", 0, 8, tmp_path / "c", seed=2, **kw)
    assert len(a) == 4 and len(la) == 2
    assert all(r["reason"].startswith("no usable donor") for r in la.rows)
    assert {r["image_id"].split("__")[-2][:3] for r in la.rows} == {"002"}
    for name in a["path"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert list(a["source_ids"]) == list(b["source_ids"])
    diff = [(tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes() for n in a["path"]]
    assert any(diff)
    for _, r in a.iterrows():
        groups = r["source_groups"].split("|")
        assert groups[0] == r["group"] and groups[1] != groups[0]


def test_paste_random_geometry_as_released(index, backend):
    """Half faces about half the time (left/right/top/bottom), width 0.4-0.6 x the target's detector box, the hull
    over the forehead; with p_half 0 and scale 1 the previous whole-face, full-width paste."""
    from morphfuse.forge.random_combination import half_face, hull_cut

    one_split = index.assign(split="train")
    def load(row):
        rgb = read_image(Path(row["root"]) / row["path"])
        return rgb, backend.detect(rgb)
    donors = DonorPool(one_split, load)
    gen = RandomCombination({}, "paste_random")
    parts, scales = [], []
    for _, target in one_split.iterrows():
        rgb = read_image(Path(target["root"]) / target["path"])
        faces = backend.detect(rgb)
        fw = faces[0].box[2] - faces[0].box[0]
        for seed in range(4):
            res = gen(target, rgb, faces, rng_for(seed, gen.method, target["image_id"]), {}, donors=donors)
            for pl in res.extra["placements"]:
                parts.append(pl["part"])
                scales.append(pl["size"][0] / fw)
    halves = [p for p in parts if p != "whole"]
    assert 0.3 < len(halves) / len(parts) < 0.7 and set(halves) == {"left", "right", "top", "bottom"}, parts
    assert 0.39 < min(scales) and max(scales) < 0.61 and max(scales) - min(scales) > 0.1
    # half_face cuts exactly half of the crop
    crop = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    alpha = np.ones((6, 8), bool)
    got = {half_face(crop, alpha, np.random.default_rng(s))[2]: half_face(crop, alpha, np.random.default_rng(s))[:2]
           for s in range(40)}
    assert np.array_equal(got["left"][0], crop[:, :4]) and np.array_equal(got["bottom"][0], crop[3:])
    # the forehead hull reaches above the brows (the release's 81-point model covers the forehead)
    rgb = read_image(Path(index.iloc[0]["root"]) / index.iloc[0]["path"])
    lm = backend.detect(rgb)[0].landmarks
    plain, fore = hull_cut(rgb, lm, forehead=False)[1], hull_cut(rgb, lm, forehead=True)[1]
    assert fore.shape[0] > plain.shape[0] * 1.15 and fore.sum() > plain.sum() * 1.15
    old = RandomCombination({"p_half": 0.0, "scale": (1.0, 1.0), "forehead": False}, "paste_random")
    target = one_split.iloc[0]
    faces = backend.detect(rgb)
    res = old(target, rgb, faces, rng_for(0, "paste_random", target["image_id"]), {}, donors=donors)
    fw = faces[0].box[2] - faces[0].box[0]
    assert all(pl["part"] == "whole" and abs(pl["size"][0] - fw) <= 1 for pl in res.extra["placements"])
