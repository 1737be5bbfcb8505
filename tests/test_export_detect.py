"""Model bundle (export, verification on load) and the analyst CLI (detect) with the real networks at size 64.

The two models are built with ``build_model`` (random weights) and saved exactly as the training engine writes
``model.pt`` (``checkpoint.model_record`` + ``save_atomic`` with the engine's options and config digest).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, london
from model_bundle import S  # the networks' size in the session's bundle (conftest)
from morphfuse.errors import UserError
from morphfuse.imageio import read_gray, read_image

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("dlib")


# ---------------------------------------------------------------------------------------------------- export
def test_bundle_layout_and_hashes(bundle, trained):
    from morphfuse.imageio import sha256_file

    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["format"] == "morphfuse-bundle" and meta["format_version"] == 1
    assert set(meta["files"]) == {"lfdl.safetensors", "mitl.safetensors", "config.yaml", "MODEL_CARD.md",
                                  "metrics/ablation.md"}
    for rel, info in meta["files"].items():
        assert sha256_file(bundle / rel) == info["sha256"] and (bundle / rel).stat().st_size == info["bytes"]
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == \
        sorted([*meta["files"], "bundle.json"])
    for name in ("lfdl", "mitl"):
        m = meta["models"][name]
        assert m["model_name"] == name and m["size"] == S and m["finished"] is True and m["config_matches"] is True
        assert m["n_parameters"] > 1_000_000 and isinstance(m["options"], dict)
    assert meta["fusion"] == {"variant": "mdmf", "variants": ["lfdl", "mitl", "naive_or", "mdmf", "closing_or"],
                              "kernel": 5, "threshold": 0.5}
    faces_cfg = trained["cfg"]["faces"]
    assert meta["faces"]["backend"] == faces_cfg["backend"] == "dlib"
    assert meta["faces"]["options"] == {"upsample": faces_cfg.get("upsample", 1), "min_score": faces_cfg["min_score"],
                                        "gray": bool(faces_cfg.get("gray", False))}
    assert meta["crops"] == {"rule": "release", "expand": 1.5, "margin": 1.3, "max_face_area_fraction": 0.7}
    assert meta["score_rules"]["image_score"] == "lfdl" and meta["score_rules"]["mitl"]["rule"] == "top_percent"
    assert meta["training_data"]["identity_disjoint"] is True
    # The bundle's model files hold the weights only (no optimizer): safetensors, equal to model.pt's state dict.
    import torch
    from safetensors.torch import load_file

    rec = torch.load(trained["lfdl"], map_location="cpu", weights_only=True)
    w = load_file(bundle / "lfdl.safetensors")
    assert w.keys() == rec["state_dict"].keys() and all(torch.equal(w[k], rec["state_dict"][k]) for k in w)
    assert yaml.safe_load((bundle / "config.yaml").read_text()) == trained["cfg"]


def test_model_card_content(bundle):
    card = (bundle / "MODEL_CARD.md").read_text()
    for needle in ("LFDL", "MITL", "MDMF", "Shuai et al. (2025)", "identity-disjoint", "| sbi |",
                   "| mdmf | 0.6100", "Intended use", "Limitations", "not the paper's models",
                   "DeBruine", "CC BY 4.0", "https://doi.org/10.6084/m9.figshare.5047666.v5", "lfdl.safetensors"):
        assert needle in card, needle


def test_tampered_or_missing_file_is_named(bundle, tmp_path):
    from morphfuse.bundle import load_bundle

    copy = tmp_path / "b"
    copy.mkdir()
    for p in bundle.iterdir():
        if p.suffix == ".pt":
            os.link(p, copy / p.name)  # big files: hard links, never modified here
        elif p.is_dir():
            shutil.copytree(p, copy / p.name)
        else:
            shutil.copy(p, copy / p.name)
    load_bundle(copy)  # intact
    cfg = copy / "config.yaml"
    text = cfg.read_text()
    cfg.write_text(text.replace("kernel: 5", "kernel: 7"))  # same size, other bytes
    with pytest.raises(UserError, match=r"config\.yaml: SHA-256 does not match"):
        load_bundle(copy)
    cfg.write_text(text)
    (copy / "mitl.safetensors").unlink()
    with pytest.raises(UserError, match=r"mitl\.safetensors: missing from the bundle"):
        load_bundle(copy)


def test_export_refuses_a_foreign_folder(trained, tmp_path):
    from morphfuse.export import export_bundle

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a morphfuse bundle"):
        export_bundle(trained["lfdl"], trained["mitl"], trained["config"], tmp_path / "x")
    with pytest.raises(UserError, match="is for model 'lfdl'"):
        export_bundle(trained["lfdl"], trained["lfdl"], trained["config"], tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))


# ---------------------------------------------------------------------------------------------------- detect
def test_names_are_unique_and_safe(tmp_path):
    from morphfuse.detect import collect_inputs

    for rel in ("a/x.jpg", "b/x.jpg", "b/c d/y.png", "x.jpg", "x.png", ".hidden/z.jpg", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    items, missing = collect_inputs([str(tmp_path), str(tmp_path / "a" / "x.jpg"), str(tmp_path / "nope.jpg")])
    names = [i.name for i in items]
    assert names == ["x", "x_png", "a__x", "b__x", "b__c_d__y"]  # a/x.jpg given again: processed once
    assert missing == [(str(tmp_path / "nope.jpg"), "no such file or folder")]


def test_detect_folder_with_bad_files(bundle, tmp_path, bad_inputs):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    good = london(2)
    shutil.copy(good[0], src / good[0].name)
    shutil.copy(good[1], src / "sub" / good[1].name)
    shutil.copy(bad_inputs["corrupt_jpeg"], src / "corrupt.jpg")
    shutil.copy(bad_inputs["text_as_jpg"], src / "text.jpg")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-m", "morphfuse", "detect", str(src), "--models", str(bundle), "--out",
                           str(out), "--device", "cpu", "--batch-size", "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("morphfuse detect: skipped")]
    assert len(skipped) == 2 and any("corrupt.jpg" in s for s in skipped) and any("text.jpg" in s for s in skipped)

    names = {good[0].stem: good[0], f"sub__{good[1].stem}": good[1]}
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == ["image", "path", "score", "mitl_score", "fake", "n_faces", "mask_fraction", "stamp"]
    assert sorted(scores["image"]) == sorted(names)
    assert scores["score"].between(0, 1).all() and scores["mitl_score"].between(0, 1).all()
    assert scores["mask_fraction"].between(0, 1).all()
    assert (scores["fake"] == (scores["score"] >= 0.5)).all()
    assert (scores["n_faces"] == 1).all()  # frontal studio portraits: dlib finds the one face
    for name, path in names.items():
        h, w = read_image(path).shape[:2]
        mask = read_gray(out / "masks" / f"{name}.png")
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        for branch in ("lfdl", "mitl"):
            assert read_gray(out / "prob" / f"{name}_{branch}.png").shape == (h, w)
        assert read_image(out / "overlays" / f"{name}.png").shape == (h, w, 3)
    ledger = pd.read_csv(out / "ledger.csv")
    assert sorted(ledger["image_id"]) == ["corrupt", "text"] and (ledger["stage"] == "detect").all()
    doc = json.loads((out / "scores.json").read_text())
    assert doc["settings"]["variant"] == "mdmf" and len(doc["images"]) == 2 and len(doc["failed"]) == 2
    assert {r["image"] for r in doc["images"]} == set(names)


def test_detect_files_all_good_exit_0(bundle, tmp_path, capsys):
    from morphfuse.cli import main

    photo = tmp_path / "photo.jpg"
    shutil.copy(london(3)[2], photo)
    rc = main(["detect", str(photo), "--models", str(bundle), "--out", str(tmp_path / "o"), "--variant",
               "closing_or", "--no-progress"])
    assert rc == 0
    assert pd.read_csv(tmp_path / "o" / "scores.csv")["image"].tolist() == ["photo"]
    assert pd.read_csv(tmp_path / "o" / "ledger.csv").empty
    assert json.loads((tmp_path / "o" / "scores.json").read_text())["settings"]["variant"] == "closing_or"
    # A damaged bundle is a usage error (exit 2, one line), before any image is read.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bundle.json").write_text("{")
    assert main(["detect", str(photo), "--models", str(broken), "--out", str(tmp_path / "o2")]) == 2
    assert "bundle.json: not readable JSON" in capsys.readouterr().err


def test_detect_help_explains_outputs(capsys):
    from morphfuse.cli import main

    with pytest.raises(SystemExit) as e:
        main(["detect", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("masks/NAME.png", "overlays/NAME.png", "scores.csv", "ledger.csv", "--variant", "--models"):
        assert needle in text
