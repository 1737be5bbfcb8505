"""The real networks at size 64 with random weights, saved exactly as training writes ``model.pt``, and their
exported bundle: built once per test session (``trained`` and ``bundle`` in conftest.py, read-only for the tests:
copy before changing anything), since each copy is ~1 GB of weights on disk.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import yaml

from conftest import REPO
from morphfuse.config import load_config

S = 64


def save_model(name: str, cfg: dict, path: Path) -> None:
    """What ``engine._Run._write_model`` does, for a freshly initialised network."""
    import torch

    from morphfuse.models import build_model
    from morphfuse.training import checkpoint as ckpt
    from morphfuse.training import engine

    settings = engine.Settings.from_config(name, cfg)
    size, options = engine.model_options(name, cfg)
    torch.manual_seed(0)
    model = build_model(name, size, dict(options))
    rec = ckpt.model_record(name, size, options, engine.config_digest(name, cfg, settings), ckpt.cpu_state_dict(model),
                            train=ckpt.primitive(dataclasses.asdict(settings)), step=2, epoch=1, finished=True)
    ckpt.save_atomic(rec, path)


def make_trained(d: Path) -> dict:
    """A config at size 64, the two model files, a manifest and a tables folder, in ``d``."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["lfdl"]["size"] = cfg["mitl"]["size"] = S
    cfg_path = d / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cfg = load_config(cfg_path)
    for name in ("lfdl", "mitl"):
        (d / name).mkdir()
        save_model(name, cfg, d / name / "model.pt")
    man = pd.DataFrame({
        "image_id": [f"i{k}" for k in range(8)],
        "split": ["train", "train", "train", "train", "val", "val", "test", "test"],
        "method": ["real", "sbi", "real", "random_combination", "real", "sbi", "real", "sbi"],
        "label": [0, 1, 0, 1, 0, 1, 0, 1],
        "group": ["001", "001", "002", "002", "003", "003", "004", "004"],
        "source": "london",
    })
    man.to_parquet(d / "manifest.parquet")
    (d / "tables").mkdir()
    (d / "tables" / "ablation.md").write_text("| variant | AUC | F1 | IoU | Final |\n|---|---|---|---|---|\n"
                                              "| mdmf | 0.6100 | 0.2200 | 0.1300 | 0.3200 |\n")
    return {"dir": d, "config": cfg_path, "cfg": cfg, "lfdl": d / "lfdl" / "model.pt", "mitl": d / "mitl" / "model.pt"}


def make_bundle(trained: dict) -> Path:
    """``morphfuse export`` of :func:`make_trained`'s models into its folder."""
    from morphfuse.cli import main

    out = trained["dir"] / "bundle"
    rc = main(["export", "--lfdl", str(trained["lfdl"]), "--mitl", str(trained["mitl"]), "--config",
               str(trained["config"]), "--out", str(out), "--tables", str(trained["dir"] / "tables"),
               "--manifest", str(trained["dir"] / "manifest.parquet")])
    assert rc == 0
    return out
