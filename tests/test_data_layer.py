"""Indexing, identity-disjoint splitting, sharding and config validation."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import LONDON_512, REPO
from morphfuse.cli import main
from morphfuse.config import load_config, validate_config
from morphfuse.errors import UserError
from morphfuse.ledger import Ledger
from morphfuse.sources import IdentityRule, index_sources
from morphfuse.split import assign_splits, split_groups
from morphfuse.stages.manifest import build_manifest, forge_shard_count

LONDON_RULE = {"rule": "regex", "pattern": r"(\d{3})_\d{2}\.[A-Za-z]+$", "fallback": "folder"}


def test_identity_rule_for_the_london_set():
    rule = IdentityRule(**LONDON_RULE)
    assert rule("neutral_front/001_03.jpg") == "001"
    assert rule("smiling_front/001_08.jpg") == "001"
    assert rule("lisa/lisa1.jpg") == "lisa" and rule("zoom/z3.jpg") == "zoom"
    assert IdentityRule()("a/b.jpg") == "a/b.jpg"  # default: each file its own identity
    with pytest.raises(UserError, match="capture group"):
        IdentityRule(rule="regex", pattern=r"\d+")


def test_split_is_identity_disjoint_deterministic_and_has_every_split():
    groups = [f"{i:03d}" for i in range(10)]
    a = split_groups(groups, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    b = split_groups(list(reversed(groups)), {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    assert a == b
    assert sorted(pd.Series(a).value_counts().to_dict().items()) == [("test", 2), ("train", 6), ("val", 2)]
    small = split_groups(["x", "y", "z"], {"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    assert set(small.values()) == {"train", "val", "test"}


def test_index_of_the_demo_photos_keeps_people_in_one_split():
    src = {"name": "london", "kind": "folder", "root": str(LONDON_512), "identity": LONDON_RULE}
    ledger = Ledger("index")
    df = index_sources([src], ledger)
    df = assign_splits(df, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    assert len(df) == 212 and len(ledger) == 0
    assert (df.groupby("group")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    assert df["image_id"].is_unique and not df["image_id"].str.contains("/").any()
    both = df[df["group"] == "001"]
    assert set(both["path"]) == {"neutral_front/001_03.jpg", "smiling_front/001_08.jpg"}
    assert (df[["width", "height"]].max(axis=1) == 512).all()


def _ddl(tmp_path: Path) -> Path:
    root = tmp_path / "ddl"
    photos = sorted((LONDON_512 / "neutral_front").glob("*.jpg"))[:4]
    for part in ("train", "valid"):
        for sub in ("real", "fake", "masks"):
            (root / part / sub).mkdir(parents=True)
    shutil.copy(photos[0], root / "train/real/r0.jpg")
    shutil.copy(photos[1], root / "train/fake/f0.jpg")
    w, h = Image.open(photos[1]).size
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(root / "train/masks/f0.png")
    shutil.copy(photos[2], root / "train/fake/f_nomask.jpg")  # fake without a mask
    shutil.copy(photos[3], root / "train/fake/f_badmask.jpg")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "train/masks/f_badmask.png")  # wrong size
    shutil.copy(photos[0], root / "valid/real/v0.jpg")
    (root / "test").mkdir()
    shutil.copy(photos[1], root / "test/t0.jpg")
    (root / "train/real/broken.jpg").write_text("not an image")
    return root


def test_ddl_layout_with_bad_files_goes_to_the_ledger(tmp_path):
    root = _ddl(tmp_path)
    ledger = Ledger("index")
    df = index_sources([{"name": "ddl", "kind": "ddl", "root": str(root)}], ledger).set_index("image_id")
    assert df.loc["ddl__train__real__r0", "split"] == "train" and df.loc["ddl__train__fake__f0", "label"] == 1
    assert df.loc["ddl__train__fake__f0", "mask_path"] == "train/masks/f0.png"
    assert df.loc["ddl__valid__real__v0", "split"] == "val"
    assert df.loc["ddl__test__t0", "split"] == "unlabeled" and df.loc["ddl__test__t0", "label"] == -1
    reasons = ledger.frame().set_index("image_id")["reason"]
    assert "without a mask" in reasons["ddl__train__fake__f_nomask"]
    assert "mask is (10, 10)" in reasons["ddl__train__fake__f_badmask"]
    assert "unknown format" in reasons["ddl__train__real__broken"]


def test_generators_layout(tmp_path):
    root = tmp_path / "gen"
    (root / "simswap/fake").mkdir(parents=True)
    (root / "simswap/mask").mkdir()
    photo = sorted((LONDON_512 / "neutral_front").glob("*.jpg"))[0]
    shutil.copy(photo, root / "simswap/fake/001_03.jpg")
    w, h = Image.open(photo).size
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(root / "simswap/mask/001_03.png")
    df = index_sources([{"name": "ext", "kind": "generators", "root": str(root), "identity": LONDON_RULE}], Ledger("i"))
    assert df.iloc[0]["method"] == "simswap" and df.iloc[0]["group"] == "001" and df.iloc[0]["label"] == 1


def test_manifest_shards_never_mix_splits():
    idx = pd.DataFrame({"image_id": [f"i{k:02d}" for k in range(10)], "split": ["train"] * 7 + ["test"] * 3,
                        "label": 0})
    for c in ["root", "path", "mask_path", "source", "method", "group", "source_groups", "source_ids", "fingerprint"]:
        idx[c] = ""
    idx["width"] = idx["height"] = 8
    m = build_manifest(idx, [], shard_size=3)
    assert m.groupby("shard")["split"].nunique().max() == 1
    assert sorted(m["shard"].unique()) == ["test_00000", "train_00000", "train_00001", "train_00002"]
    assert forge_shard_count(idx, 3) == 4


def test_config_validation_names_key_value_and_expectation(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    validate_config(cfg)
    cfg["fusion"]["kernel"] = 4
    cfg["split"]["fractions"]["train"] = 0.9
    with pytest.raises(UserError) as ei:
        validate_config(cfg, "my.yaml")
    msg = str(ei.value)
    assert "fusion.kernel = 4: must be odd" in msg and "split.fractions" in msg and "my.yaml" in msg
    p = tmp_path / "c.yaml"
    p.write_text("sources: [")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p)


def test_index_cli_writes_index_and_ledger(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["sources"][0]["root"] = str(LONDON_512)
    cfg["sources"][0]["include"] = ["lisa/**", "zoom/**"]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert (
        main(["index", "--config", str(p), "--out", str(tmp_path / "i.parquet"), "--ledger", str(tmp_path / "l.csv")])
        == 0
    )
    df = pd.read_parquet(tmp_path / "i.parquet")
    assert len(df) == 8 and set(df["group"]) == {"lisa", "zoom"}
    cfg["sources"][0]["root"] = str(tmp_path / "nowhere")
    p.write_text(yaml.safe_dump(cfg))
    assert main(["index", "--config", str(p), "--out", str(tmp_path / "j.parquet")]) == 2
