"""Import of external generator outputs (forge/importer.py) and contact sheets (forge/contact_sheet.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO

from morphfuse.attribution import attribution_text
from morphfuse.config import load_config
from morphfuse.forge.contact_sheet import contact_sheet
from morphfuse.forge.importer import import_generated
from morphfuse.ledger import Ledger


def _img(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def gen_root(tmp_path):
    rng = np.random.default_rng(0)
    rgb = lambda h=40, w=50: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 15:35] = 255
    r = tmp_path / "gen"
    s = r / "simswap"
    _img(s / "fake" / "ok.png", rgb())
    _img(s / "mask" / "ok.png", mask)
    _img(s / "fake" / "sub" / "deep.jpg", rgb())
    _img(s / "mask" / "sub" / "deep.png", mask)   # nested, other ext
    _img(s / "fake" / "nomask.png", rgb())
    _img(s / "fake" / "size.png", rgb())
    _img(s / "mask" / "size.png", mask[:30])
    _img(s / "fake" / "empty.png", rgb())
    _img(s / "mask" / "empty.png", np.zeros_like(mask))
    _img(s / "fake" / "zeroone.png", rgb())
    _img(s / "mask" / "zeroone.png", (mask > 0).astype(np.uint8))
    soft = mask.copy()
    soft[10:30, 15:20] = 100
    soft[10:30, 20:25] = 200     # 10 % non-binary, still > 127 inside
    _img(s / "fake" / "soft.png", rgb())
    _img(s / "mask" / "soft.png", soft)
    (s / "fake" / "notes.txt").write_text("not an image")
    (s / "fake" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _img(s / "mask" / "broken.png", mask)
    f = r / "facedancer"
    _img(f / "fake" / "a.png", rgb())
    _img(f / "masks" / "a.png", mask)                  # masks/ also accepted
    (r / "README").write_text("not a method")
    return r


def test_import_checks(gen_root):
    ledger = Ledger("forge_import")
    rows = import_generated(gen_root, split="train", ledger=ledger)
    assert sorted(rows["image_id"]) == ["facedancer__a", "simswap__ok", "simswap__soft", "simswap__sub__deep",
                                        "simswap__zeroone"]  # a 0/1 mask is binary (noted once, below)
    ok = rows.set_index("image_id").loc["simswap__ok"]
    assert ok["root"] == str(gen_root.resolve()) and ok["path"] == "simswap/fake/ok.png"
    assert ok["mask_path"] == "simswap/mask/ok.png" and ok["label"] == 1 and ok["method"] == "simswap"
    assert (ok["width"], ok["height"], ok["split"], ok["source"]) == (50, 40, "train", "import")
    assert rows.set_index("image_id").loc["facedancer__a", "mask_path"] == "facedancer/masks/a.png"
    assert rows.set_index("image_id").loc["simswap__sub__deep", "mask_path"] == "simswap/mask/sub/deep.png"
    reasons = {r["image_id"]: r["reason"] for r in ledger.rows}
    assert set(reasons) == {"simswap__nomask", "simswap__size", "simswap__empty", "",
                            "simswap__soft", "simswap__notes", "simswap__broken"}
    assert "no mask" in reasons["simswap__nomask"]
    assert "30" in reasons["simswap__size"] and "40" in reasons["simswap__size"]
    assert "empty" in reasons["simswap__empty"]
    assert reasons[""].startswith("note: 1 generator mask(s) hold only the values 0 and 1")
    assert reasons["simswap__soft"].startswith("warning:") and "10.0%" in reasons["simswap__soft"]
    assert "not an image" in reasons["simswap__notes"]
    assert reasons["simswap__broken"]


def test_import_cli_and_sheet(gen_root, tmp_path):
    from morphfuse.cli import main

    out = tmp_path / "rows.parquet"
    assert main(["forge", "import", "--root", str(gen_root), "--out", str(out), "--methods", "facedancer"]) == 0
    rows = pd.read_parquet(out)
    assert list(rows["image_id"]) == ["facedancer__a"]
    assert pd.read_csv(tmp_path / "ledger.csv").empty
    sheet = tmp_path / "sheet.png"
    assert main(["forge", "sheet", "--rows", str(out), "--out", str(sheet), "--tile", "64",
                 "--config", str(REPO / "config.yaml")]) == 0
    img = np.asarray(Image.open(sheet))
    assert img.ndim == 3 and img.shape[0] > 64 and img.shape[1] >= 900
    # the attribution is drawn into the image: a block of dark text pixels below the tiles
    assert (img[64 + 28:, :, :].min(axis=2) < 100).sum() > 500
    credit = attribution_text(load_config(REPO / "config.yaml"), ["facedancer"])  # declared per source
    assert "10.6084/m9.figshare.5047666.v5" in credit and "CC BY 4.0" in credit and "(facedancer)" in credit
    with pytest.raises(SystemExit):
        main(["forge", "sheet", "--out", str(sheet)])                   # --rows is required


def test_contact_sheet_with_sources(tmp_path):
    root = tmp_path / "r"
    src = np.full((60, 40, 3), 90, np.uint8)
    fake = src.copy()
    fake[10:30, 10:30] = 200
    m = np.zeros((60, 40), np.uint8)
    m[10:30, 10:30] = 255
    _img(root / "src.png", src)
    _img(root / "images" / "f.png", fake)
    _img(root / "masks" / "f.png", m)
    _img(root / "donor.png", np.full((60, 40, 3), 30, np.uint8))
    index = pd.DataFrame([{"image_id": "s", "root": str(root), "path": "src.png"},
                          {"image_id": "d", "root": str(root), "path": "donor.png"}])
    rows = pd.DataFrame([{"image_id": "x", "root": str(root), "path": "images/f.png", "mask_path": "masks/f.png",
                          "label": 1, "method": "random_combination", "source_ids": "s|d"}])
    out = contact_sheet(rows, tmp_path / "sheet.png", index=index, tile=60)
    img = np.asarray(Image.open(out))
    assert img.shape[1] >= 4 * 40                        # fake | overlay | source | donor
    row = img[24 + 30]                                    # a line through the middle of the tiles
    assert (np.abs(row.astype(int) - 90).max(axis=1) == 0).sum() >= 20      # the source tile is there
    assert (np.abs(row.astype(int) - 30).max(axis=1) == 0).sum() >= 20      # and the donor tile
