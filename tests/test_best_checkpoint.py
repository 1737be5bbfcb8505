"""The best-on-val model beside the last one (``model_best.pt``), with the stand-in network of test_training.py:
it is the model of the chosen epoch (checked against a run stopped at that epoch), resume keeps it bitwise, and a
run without val rows says so."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from morphfuse.errors import UserError
from morphfuse.training import engine
from test_training import make_config, one_thread, run_train, state, write_shard  # noqa: F401 (fixture)


def _same(a, b) -> bool:
    sa, sb = state(a)["state_dict"], state(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_best_is_the_model_of_the_best_val_epoch(tmp_path):
    shard = write_shard(tmp_path / "s0.npz", 16, 8)
    cfg = make_config(tmp_path, epochs=6, augment=False, lr=3e-2, best_metric="val_auc")
    run_train(cfg, [shard], tmp_path / "long")
    m = pd.read_csv(tmp_path / "long" / "metrics.csv")
    va = m[m.phase == "val"].reset_index(drop=True)
    first_best = int(va.val_auc.to_numpy().argmax())  # ties keep the earlier epoch
    best = state(tmp_path / "long" / "model_best.pt")
    sel = best["selected"]
    assert sel["metric"] == "val_auc" and sel["value"] == pytest.approx(va.val_auc.max())
    assert sel["epoch"] == first_best + 1 and sel["step"] == int(va.step[first_best])
    assert best["format"] == "morphfuse-model" and best["finished"] is True
    # LFDL's schedule does not depend on the number of epochs: a run of `epoch` epochs ends with these weights
    run_train(make_config(tmp_path, epochs=sel["epoch"], augment=False, lr=3e-2, best_metric="val_auc"), [shard],
              tmp_path / "short")
    assert _same(tmp_path / "long" / "model_best.pt", tmp_path / "short" / "model.pt")
    if sel["epoch"] < 6:
        assert not _same(tmp_path / "long" / "model_best.pt", tmp_path / "long" / "model.pt")
    # only the checkpoint's best file is kept
    assert [p.name for p in (tmp_path / "long" / "checkpoints").glob("best-*.pt")] == [f"best-{sel['step']:09d}.pt"]

    # val_loss (the default): the lowest loss
    run_train(make_config(tmp_path, epochs=6, augment=False, lr=3e-2), [shard], tmp_path / "loss")
    va = pd.read_csv(tmp_path / "loss" / "metrics.csv").query("phase == 'val'").reset_index(drop=True)
    sel = state(tmp_path / "loss" / "model_best.pt")["selected"]
    assert sel["metric"] == "val_loss" and sel["epoch"] == int(va.val_loss.to_numpy().argmin()) + 1


@pytest.mark.parametrize("metric", ["val_auc", "val_loss"])
def test_resume_keeps_model_best_bitwise(tmp_path, metric, caplog):
    """val_auc reaches 1.0 in epoch 1 here (ties keep it: the best file outlives every later checkpoint); val_loss
    falls every epoch (each epoch's best replaces the last, so going back to an old checkpoint by hand finds its best
    file gone: said in one line, and the best of the epochs replayed is still the straight run's)."""
    shard = write_shard(tmp_path / "s0.npz", 28, 6)
    cfg = make_config(tmp_path, epochs=3, augment=True, mixup=0.5, accumulate=2, checkpoint_every=3,
                      best_metric=metric)
    run_train(cfg, [shard], tmp_path / "a")
    sel_a = state(tmp_path / "a" / "model_best.pt")["selected"]
    assert sel_a["epoch"] == (1 if metric == "val_auc" else 3)
    b = tmp_path / "b"
    run_train(cfg, [shard], b, max_steps=5)  # into epoch 2, past one validation
    assert state(b / "model_best.pt")["selected"]["epoch"] == 1
    saved = tmp_path / "step5.pt"
    shutil.copy(b / "checkpoints" / "last.pt", saved)
    run_train(cfg, [shard], b, max_steps=10)  # runs on past the epoch-2 validation ...
    shutil.copy(saved, b / "checkpoints" / "last.pt")  # ... and "dies": only the step-5 checkpoint survives
    (b / "model_best.pt").unlink()  # Snakemake removes a rerun job's outputs
    caplog.clear()
    r = run_train(cfg, [shard], b)
    assert r.finished
    assert ("which is gone" in caplog.text) == (metric == "val_loss")
    assert _same(tmp_path / "a" / "model_best.pt", b / "model_best.pt")
    assert _same(tmp_path / "a" / "model.pt", b / "model.pt")
    assert state(b / "model_best.pt")["selected"] == sel_a


def test_without_val_rows_model_best_is_the_last_model_and_says_so(tmp_path):
    shard = write_shard(tmp_path / "s0.npz", 16, 0)
    run_train(make_config(tmp_path, epochs=1), [shard], tmp_path / "o")
    best = state(tmp_path / "o" / "model_best.pt")
    assert best["selected"]["value"] is None and "no validation rows" in best["selected"]["reason"]
    assert _same(tmp_path / "o" / "model_best.pt", tmp_path / "o" / "model.pt")


def test_best_metric_is_checked():
    with pytest.raises(UserError, match="best_metric"):
        engine.Settings.from_config("lfdl", {"seed": 0, "lfdl": {"train": {"best_metric": "val_f1"}}})
    assert engine.improves("val_loss", 0.4, 0.5) and not engine.improves("val_loss", 0.5, 0.5)
    assert engine.improves("val_auc", 0.9, 0.8) and not engine.improves("val_auc", float("nan"), None)
