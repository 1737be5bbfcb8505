"""Both networks, trained through the one engine on REAL demo data (the e2e run's face crops and images of
London photos and their SBI / random-combination forgeries), lower their training loss."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from morphfuse.training import engine

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model, epochs, lr", [("lfdl", 4, 5e-4), ("mitl", 4, 3e-4)])
def test_training_on_demo_data_lowers_the_loss(e2e, tmp_path, model, epochs, lr):
    cfg = yaml.safe_load((e2e.work / "config.yaml").read_text())
    cfg[model]["train"].update(epochs=epochs, augment=False, mixup=0.0, checkpoint_every=1000, lr=lr,
                               warmup_epochs=0, tensorboard=False)
    shards = sorted((e2e.dir / "features" / model).glob("train_*.npz"))
    assert shards
    res = engine.train(model, cfg, shards, tmp_path / model, progress=False)
    assert res.finished
    m = pd.read_csv(tmp_path / model / "metrics.csv")
    tr = m[m["phase"] == "train"]
    per_epoch = tr.groupby("epoch")["loss"].mean()
    assert len(per_epoch) == epochs
    assert per_epoch.iloc[-1] < 0.9 * per_epoch.iloc[0], per_epoch.to_dict()
