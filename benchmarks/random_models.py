"""Model files with random weights, saved as training saves them, for the benchmarks that time or measure
inference (the time and memory spent in the networks do not depend on the weights)."""
from __future__ import annotations

import dataclasses
from pathlib import Path


def write_random_models(cfg_path: Path, work: Path) -> None:
    """``work/{lfdl,mitl}/model.pt`` for the config at ``cfg_path`` (its model sizes and options), seed 0."""
    import torch

    from morphfuse.config import load_config
    from morphfuse.models import build_model
    from morphfuse.training import checkpoint as ckpt
    from morphfuse.training import engine

    cfg = load_config(cfg_path)
    for name in ("lfdl", "mitl"):
        settings = engine.Settings.from_config(name, cfg)
        size, options = engine.model_options(name, cfg)
        torch.manual_seed(0)
        model = build_model(name, size, dict(options))
        rec = ckpt.model_record(name, size, options, engine.config_digest(name, cfg, settings),
                                ckpt.cpu_state_dict(model), train=ckpt.primitive(dataclasses.asdict(settings)),
                                step=1, epoch=1, finished=True)
        (work / name).mkdir(exist_ok=True)
        ckpt.save_atomic(rec, work / name / "model.pt")
