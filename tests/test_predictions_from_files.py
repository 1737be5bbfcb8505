"""Predictions taken from files (any method's masks and scores) land where the model predictions would."""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from morphfuse.cli import main


def _shard(tmp_path):
    rows = [{"image_id": "src__a", "root": str(tmp_path), "path": "imgs/a.jpg", "width": 8, "height": 6},
            {"image_id": "src__b", "root": str(tmp_path), "path": "imgs/b.jpg", "width": 8, "height": 6},
            {"image_id": "src__c", "root": str(tmp_path), "path": "imgs/c.jpg", "width": 8, "height": 6}]
    p = tmp_path / "shard.parquet"
    pd.DataFrame(rows).to_parquet(p)
    return p


def test_masks_by_id_or_stem_resized_to_the_image_and_missing_ones_in_the_ledger(tmp_path):
    shard = _shard(tmp_path)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((6, 8), 200, np.uint8)).save(masks / "src__a.png")  # by image_id, right size
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).save(masks / "b.png")  # by file stem, 2x2
    pd.DataFrame({"image_id": ["src__a", "b"], "score": [0.9, 0.1]}).to_csv(tmp_path / "s.csv", index=False)
    out = tmp_path / "out"
    assert main(["predictions-from-files", "--manifest", str(shard), "--masks", str(masks),
                 "--scores", str(tmp_path / "s.csv"), "--out", str(out)]) == 0
    scores = pd.read_csv(out / "scores.csv")
    assert scores.to_dict("list") == {"image_id": ["src__a", "src__b"], "score": [0.9, 0.1]}
    a = np.asarray(Image.open(out / "masks" / "src__a.png"))
    b = np.asarray(Image.open(out / "masks" / "src__b.png"))
    assert a.shape == b.shape == (6, 8) and (a == 200).all()
    assert b[0, 0] < 128 < b[0, -1]  # the 2x2 checkerboard, upsampled to the image
    ledger = pd.read_csv(out / "ledger.csv")
    assert list(ledger["image_id"]) == ["src__c"] and "no score" in ledger["reason"][0]


def test_missing_folder_is_a_one_line_user_error(tmp_path, capsys):
    shard = _shard(tmp_path)
    rc = main(["predictions-from-files", "--manifest", str(shard), "--masks", str(tmp_path / "nope"),
               "--scores", str(tmp_path / "s.csv"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "mask folder does not exist" in capsys.readouterr().err
