"""Fidelity to the release, checked on the shared tiny end-to-end run (tests/e2e_run.py, once per session):
no SBI shortcut in the manifest, LFDL trained with its pixel head, release crops."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from morphfuse.imageio import read_image, read_mask

pytestmark = pytest.mark.slow


def _img(row) -> np.ndarray:
    return read_image(Path(str(row["root"])) / str(row["path"]))


def test_every_sbi_fake_equals_a_real_of_the_manifest_outside_its_mask(e2e):
    m = pd.read_parquet(e2e.dir / "manifest/manifest.parquet")
    sbi = m[(m["method"] == "sbi") & (m["label"] == 1)]
    added = m[m["method"] == "sbi_target"]
    assert len(sbi) and len(added) and (added["label"] == 0).all()
    reals = m[m["label"] == 0]
    kernel = np.ones((15, 15), np.uint8)  # 7 px around the mask
    for _, fake in sbi.iterrows():
        rgb = _img(fake)
        mask = read_mask(Path(fake["root"]) / fake["mask_path"], expected_hw=rgb.shape[:2])
        keep = cv2.dilate(mask.astype(np.uint8), kernel) == 0
        same_person = reals[reals["group"] == fake["group"]]
        assert any(np.array_equal(rgb[keep], _img(r)[keep]) for _, r in same_person.iterrows()), fake["image_id"]
    # the added reals are the photos' own identity and split, and went through the pipeline like any real
    crops = pd.concat(pd.read_parquet(p) for p in (e2e.dir / "crops").glob("*.parquet"))
    assert set(added["image_id"]) <= set(crops["image_id"])
    src = m.set_index("image_id")
    for _, r in added.iterrows():
        assert (r["group"], r["split"]) == (src.loc[r["source_ids"], "group"], src.loc[r["source_ids"], "split"])


def test_lfdl_trained_its_pixel_head_and_crops_follow_the_release(e2e):
    metrics = pd.read_csv(e2e.dir / "models" / "lfdl" / "metrics.csv")
    assert "loss_pix" in metrics.columns and metrics["loss_pix"].dropna().gt(0).all()
    crops = pd.concat(pd.read_parquet(p) for p in (e2e.dir / "crops").glob("*.parquet"))
    faces = pd.concat(pd.read_parquet(p) for p in (e2e.dir / "faces").glob("*.parquet"))
    from morphfuse.faces.crops import release_box

    face_crops = crops[crops["kind"] == "face"]
    assert len(face_crops)
    by_key = faces.set_index(["image_id", "face_idx"])
    for _, c in face_crops.head(10).iterrows():
        lm = by_key.loc[(c["image_id"], c["face_idx"]), "landmarks"]
        x0, y0, x1, y1 = release_box(lm, 1.5)
        assert c["x0"] == max(0, int(np.floor(x0))) and c["y0"] == max(0, int(np.floor(y0)))
