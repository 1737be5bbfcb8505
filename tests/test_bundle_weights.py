"""Bundles hold safetensors weights and nothing else than what export writes (issue 13 item 7), with the real
networks at size 64 (the bundle of test_export_detect.py)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import london
from morphfuse.errors import UserError


def _no_unpickling(monkeypatch):
    """Make any unpickling (torch.load, pickle) fail loudly for the rest of the test."""
    import torch

    def refuse(*a, **k):
        raise AssertionError("a bundle was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_bundle_holds_safetensors_weights_and_loads_without_pickle(bundle, monkeypatch):
    from morphfuse.detect import Detector, clear_model_cache

    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert "lfdl.safetensors" in files and "mitl.safetensors" in files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".ckpt"))]
    # only what export writes: no bookkeeping (.snakemake_timestamp), every file listed in bundle.json
    meta = json.loads((bundle / "bundle.json").read_text())
    assert sorted(files) == sorted([*meta["files"], "bundle.json"])
    assert not [f for f in files if Path(f).name.startswith(".")]
    # a safetensors file is a JSON header and raw tensor bytes: no pickle opcodes (0x80 protocol marker + ...)
    raw = (bundle / "lfdl.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "morphfuse-weights", "model_name": "lfdl", "size": "64"}
    clear_model_cache()
    _no_unpickling(monkeypatch)
    r = Detector.from_bundle(bundle)(london(1)[0])
    assert 0 <= r.score <= 1


def test_a_bundle_of_the_earlier_format_pt_records_gives_the_same_detection(bundle, trained, tmp_path):
    """An earlier bundle (lfdl.pt / mitl.pt model records) still loads, and both formats give equal results."""
    from morphfuse.detect import Detector, clear_model_cache
    from morphfuse.imageio import sha256_file

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    meta = json.loads((old / "bundle.json").read_text())
    for name in ("lfdl", "mitl"):
        (old / f"{name}.safetensors").unlink()
        del meta["files"][f"{name}.safetensors"]
        shutil.copyfile(trained[name], old / f"{name}.pt")  # exactly what the earlier export copied
        meta["files"][f"{name}.pt"] = {"sha256": sha256_file(old / f"{name}.pt"),
                                      "bytes": (old / f"{name}.pt").stat().st_size}
        meta["models"][name]["file"] = f"{name}.pt"
    (old / "bundle.json").write_text(json.dumps(meta))
    photo = london(2)[1]
    clear_model_cache()
    a = Detector.from_bundle(bundle)(photo)
    clear_model_cache()
    b = Detector.from_bundle(old)(photo)
    assert a.score == b.score and np.array_equal(a.mask, b.mask) and np.array_equal(a.prob_mitl_u8, b.prob_mitl_u8)


def test_weights_of_the_wrong_model_or_a_damaged_file_are_named(bundle, tmp_path):
    from morphfuse.bundle import load_bundle
    from morphfuse.imageio import sha256_file

    swapped = tmp_path / "swapped"
    shutil.copytree(bundle, swapped)
    meta = json.loads((swapped / "bundle.json").read_text())
    meta["models"]["lfdl"]["file"] = "mitl.safetensors"
    (swapped / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"mitl\.safetensors: holds the weights of 'mitl', not of the lfdl model"):
        load_bundle(swapped).load_model("lfdl")
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "lfdl.safetensors").write_bytes(b"\xff" * 64)
    meta = json.loads((bad / "bundle.json").read_text())
    meta["files"]["lfdl.safetensors"] = {"sha256": sha256_file(bad / "lfdl.safetensors"), "bytes": 64}
    (bad / "bundle.json").write_text(json.dumps(meta))  # hashes fit: the file itself is not safetensors
    with pytest.raises(UserError, match=r"lfdl\.safetensors: not a readable safetensors file"):
        load_bundle(bad).load_model("lfdl")
    # and the checksum check still names an altered weights file
    bad2 = tmp_path / "bad2"
    shutil.copytree(bundle, bad2)
    data = bytearray((bad2 / "mitl.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad2 / "mitl.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"mitl\.safetensors: SHA-256 does not match bundle\.json"):
        load_bundle(bad2)


def test_export_replaces_a_bundle_whose_bundle_json_was_removed(trained, tmp_path):
    from morphfuse.cli import main

    out = tmp_path / "b"
    args = ["export", "--lfdl", str(trained["lfdl"]), "--mitl", str(trained["mitl"]), "--config",
            str(trained["config"]), "--out", str(out), "--no-check"]
    assert main(args) == 0
    (out / "bundle.json").unlink()  # what Snakemake does before rerunning the rule
    (out / ".snakemake_timestamp").write_text("")
    assert main(args) == 0
    assert (out / "bundle.json").is_file() and not (out / ".snakemake_timestamp").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*args[:-3], "--out", str(other), "--no-check"]) == 2
