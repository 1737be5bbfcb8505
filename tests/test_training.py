"""The training engine with a tiny stand-in network that follows the model protocol (docs/CONTRACTS.md):
loss goes down, an interrupted + resumed run ends bitwise equal to a straight one, checkpoints load with
weights_only, bad checkpoints fail clearly, DDP runs under torchrun (2 CPU processes, gloo); and one small run of
the real LFDL.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from morphfuse.errors import UserError
from morphfuse.training import checkpoint as ckpt
from morphfuse.training import engine
from morphfuse.training.data import epoch_batches

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
S = 32


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the test machines share 2 cores, and oversubscribed OpenMP threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- stand-in model
class StandIn(nn.Module):
    """Protocol twin of LFDL/MITL: conv + BN + dropout; a score and a mask on a G×G grid (LFDL) or at the input
    size (MITL). Dropout and BN make RNG and buffer state matter for exact resume."""

    def __init__(self, name: str = "lfdl", size: int = S, grid: int = 4, **options):
        super().__init__()
        self.name, self.size, self.grid = name, size, grid
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.cls = nn.Linear(8, 1)
        self.loc = nn.Conv2d(8, 1, 1)

    def forward(self, batch):
        x = batch["rgb"] * 2 - 1
        if "srm" in batch:  # precomputed inputs are used when given
            x = x + 0.0 * batch["srm"]
        f = F.relu(self.bn(self.conv(x)))
        logit = self.cls(self.drop(f.mean((2, 3))))[:, 0]
        g = f if self.name == "mitl" else F.adaptive_avg_pool2d(f, self.grid)
        return {"logit": logit, "loc": self.loc(g)}

    def loss(self, out, batch):
        y = batch["label"].float()
        l_cls = F.binary_cross_entropy_with_logits(out["logit"], y)
        target = batch["mask"].float()
        if self.name != "mitl":
            target = F.adaptive_max_pool2d(target, self.grid)
        l_loc = F.binary_cross_entropy_with_logits(out["loc"], target)
        total = l_cls + l_loc
        return total, {
            "loss": float(total.detach()),
            "loss_cls": float(l_cls.detach()),
            "loss_loc": float(l_loc.detach()),
        }

    @torch.no_grad()
    def predict_proba(self, batch):
        out = self.forward(batch)
        return torch.sigmoid(out["logit"]), torch.sigmoid(out["loc"])


def make_standin(name, size, options):
    return StandIn(name, size)


# ------------------------------------------------------------------------------------------------ fixtures
def write_shard(path: Path, n_train: int, n_val: int, seed: int = 0, size: int = S, extra: dict | None = None):
    """A learnable toy shard: fakes carry a bright rectangle (their mask), reals are plain noise."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    label = np.arange(n) % 2
    rgb = rng.integers(0, 120, (n, size, size, 3), dtype=np.uint8)
    mask = np.zeros((n, size, size), np.uint8)
    for i in np.flatnonzero(label):
        y0, x0 = rng.integers(0, size // 2, 2)
        mask[i, y0:y0 + size // 3, x0:x0 + size // 3] = 255
        rgb[i][mask[i] > 0] = 230
    arrays = {
        "image_id": np.array([f"img{seed}_{i:03d}" for i in range(n)]),
        "face_idx": np.full(n, -1, np.int64),
        "crop_box": np.tile(np.array([0, 0, size, size], np.int64), (n, 1)),
        "rgb": rgb, "mask": mask, "has_mask": np.ones(n, bool), "label": label.astype(np.int64),
        "ref_box": np.full((n, 4), np.nan, np.float32),
        "split": np.array(["train"] * n_train + ["val"] * n_val),
        "orig_hw": np.tile(np.array([size, size], np.int64), (n, 1)),
    }
    arrays.update(extra or {})
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def make_config(tmp: Path, model: str = "lfdl", size: int = S, **train) -> dict:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    block = cfg[model]
    block["size"] = size
    block["train"].update({"epochs": 2, "batch_size": 4, "accumulate": 1, "lr": 1e-2, "augment": True,
                           "num_workers": 0, "checkpoint_every": 100, "tensorboard": False})
    if model == "lfdl":
        block["train"]["mixup"] = 0.0
    block["train"].update(train)
    path = tmp / f"config_{model}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def settings(model: str, **train) -> engine.Settings:
    """A model's training settings: the schema's defaults with ``train`` on top."""
    return engine.Settings.from_config(model, {"seed": 0, model: {"train": train}})


def run_train(cfg, shards, out, model="lfdl", **kw):
    kw.setdefault("factory", make_standin)
    return engine.train(model, cfg, shards, out, progress=False, **kw)


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------- tests
def test_loss_decreases_and_outputs(tmp_path):
    shard = write_shard(tmp_path / "s0.npz", 16, 8)
    cfg = make_config(tmp_path, epochs=6, augment=False, tensorboard=True, lr=3e-2)
    res = run_train(cfg, [shard], tmp_path / "out")
    assert res.finished and res.step == 6 * 4 == res.total_steps
    m = pd.read_csv(tmp_path / "out" / "metrics.csv")
    tr = m[m.phase == "train"]
    assert list(tr.step) == list(range(1, 25))
    assert {"loss", "loss_cls", "loss_loc", "lr", "images_per_s", "epoch"} <= set(tr.columns)
    assert tr.loss.iloc[-4:].mean() < 0.8 * tr.loss.iloc[:4].mean()
    va = m[m.phase == "val"]
    assert len(va) == 6 and va.val_auc.notna().all() and va.val_auc.iloc[-1] >= 0.9
    rec = state(tmp_path / "out" / "model.pt")
    assert rec["format"] == "morphfuse-model" and rec["model_name"] == "lfdl" and rec["size"] == S
    assert rec["finished"] is True and len(rec["config_hash"]) == 16 and "stem_padding" in rec["options"]
    assert list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))
    # StepLR(5 epochs, 0.5): epoch 6 runs at half the rate.
    assert tr.lr.iloc[0] == pytest.approx(3e-2) and tr.lr.iloc[-1] == pytest.approx(1.5e-2)


def test_exact_resume_is_bitwise(tmp_path):
    shard = write_shard(tmp_path / "s0.npz", 28, 6)
    # augmentation, mixup, accumulation, dropout and BN all on: 7 micro-batches = 4 steps per epoch.
    cfg = make_config(tmp_path, epochs=2, augment=True, mixup=0.5, accumulate=2, checkpoint_every=3)
    a = run_train(cfg, [shard], tmp_path / "a")
    assert a.finished and a.total_steps == 8

    b = tmp_path / "b"
    r = run_train(cfg, [shard], b, max_steps=3)  # stops mid-epoch 1 with a checkpoint
    assert not r.finished and r.step == 3 and state(b / "model.pt")["finished"] is False
    ck3 = state(b / "checkpoints" / "last.pt")
    assert (ck3["step"], ck3["epoch"], ck3["batch_in_epoch"]) == (3, 0, 6)
    assert ck3["order"]["epoch"] == 0 and sorted(ck3["order"]["indices"][0].tolist()) == list(range(28))
    saved3 = tmp_path / "step3.pt"
    shutil.copy(b / "checkpoints" / "last.pt", saved3)
    run_train(cfg, [shard], b, max_steps=6)  # resumes, runs on into epoch 2 ...
    shutil.copy(saved3, b / "checkpoints" / "last.pt")  # ... and "dies": only the step-3 checkpoint survives
    r = run_train(cfg, [shard], b)
    assert r.finished and r.step == 8

    sa, sb = state(tmp_path / "a" / "model.pt")["state_dict"], state(b / "model.pt")["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ma, mb = (pd.read_csv(p / "metrics.csv") for p in (tmp_path / "a", b))
    cols = [c for c in ma.columns if c != "images_per_s"]
    pd.testing.assert_frame_equal(ma[cols], mb[cols])  # rows past the surviving checkpoint were redone once

    # The augmentation is seeded by sample position: data workers change nothing.
    c = tmp_path / "c"
    run_train(make_config(tmp_path, epochs=2, augment=True, mixup=0.5, accumulate=2, checkpoint_every=3,
                          num_workers=2), [shard], c)
    sc = state(c / "model.pt")["state_dict"]
    assert all(torch.equal(sa[k], sc[k]) for k in sa)

    # Checkpoints are plain tensors and containers.
    ck = state(b / "checkpoints" / "last.pt")
    assert ck["format"] == "morphfuse-checkpoint" and ck["step"] == 8 and ck["epoch"] == 2
    assert isinstance(ck["rng"][0]["torch"], torch.Tensor) and len(ck["rng"]) == 1


def test_stop_signal_writes_a_checkpoint_and_resume_is_exact(tmp_path):
    shard = write_shard(tmp_path / "s0.npz", 16, 4)
    cfg = make_config(tmp_path, epochs=2, mixup=0.5)
    calls = {"n": 0}

    def signalling(name, size, options):
        m = StandIn(name, size)
        forward = m.forward

        def fwd(batch):
            calls["n"] += 1
            if calls["n"] == 3:  # during optimizer step 3 (mid-epoch 1), as SLURM would before a time-limit kill
                os.kill(os.getpid(), signal.SIGTERM)
            return forward(batch)

        m.forward = fwd
        return m

    out = tmp_path / "out"
    with pytest.raises(engine.TrainingInterrupted, match="SIGTERM.*step 3 of 8"):
        run_train(cfg, [shard], out, factory=signalling)
    assert state(out / "checkpoints" / "last.pt")["step"] == 3 and not (out / "model.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored
    run_train(cfg, [shard], out)
    run_train(cfg, [shard], tmp_path / "straight")
    sa, sb = state(out / "model.pt")["state_dict"], state(tmp_path / "straight" / "model.pt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    shard = write_shard(tmp_path / "s0.npz", 8, 2)
    cfg = make_config(tmp_path, epochs=1)
    out = tmp_path / "out"
    run_train(cfg, [shard], out)
    last = out / "checkpoints" / "last.pt"
    good = last.read_bytes()
    for bad in (good[: len(good) // 2], b"not a checkpoint at all", b""):
        last.write_bytes(bad)
        with pytest.raises(UserError) as e:
            run_train(cfg, [shard], out)
        assert str(last) in str(e.value) and ("corrupt" in str(e.value) or "empty" in str(e.value))
    # --resume never starts over past a broken file
    assert run_train(cfg, [shard], out, resume="never").finished


def test_checkpoint_of_another_model_or_size_is_refused(tmp_path):
    shard = write_shard(tmp_path / "s0.npz", 8, 2)
    cfg = make_config(tmp_path, epochs=1)
    run_train(cfg, [shard], tmp_path / "lfdl")
    out = tmp_path / "mitl"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "lfdl" / "checkpoints" / "last.pt", out / "checkpoints" / "last.pt")
    mcfg = make_config(tmp_path, model="mitl", epochs=1)
    with pytest.raises(UserError, match=r"is for model 'lfdl' but this run uses 'mitl'"):
        run_train(mcfg, [shard], out, model="mitl")
    with pytest.raises(UserError, match=r"at size 32 but this run uses size 64"):
        ckpt.load_checkpoint(tmp_path / "lfdl" / "checkpoints" / "last.pt", "lfdl", 64)
    opts = dict(state(tmp_path / "lfdl" / "model.pt")["options"], mpff_c=2.0)
    with pytest.raises(UserError, match=r"other lfdl model options \(mpff_c differ\)"):
        ckpt.load_checkpoint(tmp_path / "lfdl" / "checkpoints" / "last.pt", "lfdl", S, opts)
    with pytest.raises(UserError, match="final model file, not a training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "lfdl" / "model.pt")
    # A shard of another size is refused before any compute.
    big = write_shard(tmp_path / "big.npz", 4, 0, size=64)
    with pytest.raises(UserError, match="configured for size 32"):
        run_train(cfg, [big], tmp_path / "x")


def test_a_malformed_shard_is_refused_from_its_headers_naming_file_and_fault(tmp_path):
    """open_shards checks every shard from its .npy headers before any pixel is read or any step is taken."""
    from morphfuse.training.data import check_shard, open_shards

    good = write_shard(tmp_path / "good.npz", 4, 2)
    assert [check_shard(sh, "lfdl", S) for sh in open_shards([good], "lfdl", S).shards] == [6]
    cases = {
        "lacks label": dict(label=None),
        "'mask' has 5 rows but 'image_id' has 6": dict(mask=np.zeros((5, S, S), np.uint8)),
        "'rgb' must be N×S×S×3 uint8": dict(rgb=np.zeros((6, S, S, 3), np.float32)),
        "'mask' is (6, 16, 16), expected (6, 32, 32)": dict(mask=np.zeros((6, 16, 16), np.uint8)),
    }
    for message, change in cases.items():
        bad = write_shard(tmp_path / "bad.npz", 4, 2, extra={k: v for k, v in change.items() if v is not None})
        if "label" in change:  # rewrite without the member
            with np.load(bad) as z:
                arrays = {k: z[k] for k in z.files if k != "label"}
            np.savez(bad, **arrays)
        with pytest.raises(UserError) as e:
            open_shards([good, bad], "lfdl", S)
        assert str(bad) in str(e.value) and message in str(e.value), (message, str(e.value))


def test_mitl_schedule_and_cli(tmp_path, monkeypatch):
    """MITL through the CLI (--set relative to the model block), AdamW groups and the warm-up/cosine schedule."""
    from morphfuse.cli import main

    shard = write_shard(tmp_path / "s0.npz", 8, 4)
    make_config(tmp_path, model="mitl", epochs=3, lr=1e-3, warmup_epochs=1, min_lr=1e-5)
    monkeypatch.syspath_prepend(str(TESTS))
    rc = main(["train", "mitl", "--config", str(tmp_path / "config_mitl.yaml"), "--features", str(tmp_path),
               "--out", str(tmp_path / "out"), "--set", "train.epochs=2", "--set", "mitl.train.batch_size=2",
               "--model-factory", "test_training:make_standin", "--no-progress"])
    assert rc == 0
    m = pd.read_csv(tmp_path / "out" / "metrics.csv")
    tr = m[m.phase == "train"]
    assert len(tr) == 2 * 4  # epochs=2 from --set, 8 rows / batch 2
    lr = tr.lr.to_numpy()
    np.testing.assert_allclose(lr[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up over one epoch
    assert np.all(np.diff(lr[4:]) < 0) and lr[-1] > 1e-5  # then half-cosine down towards min_lr
    f = engine.lr_factor_fn(
        "mitl", settings("mitl", epochs=2, batch_size=1, lr=1e-3, warmup_epochs=1, min_lr=1e-5), 4, 8
    )
    assert f(4) == pytest.approx(1.0) and f(8) * 1e-3 == pytest.approx(1e-5)
    opt = engine.build_optimizer("mitl", StandIn("mitl"), settings("mitl", epochs=1, batch_size=1, lr=1e-4,
                                 weight_decay=0.05), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    m2 = StandIn("mitl")
    opt2 = engine.build_optimizer("lfdl", m2, settings("lfdl", epochs=1, batch_size=1, lr=1e-4, weight_decay=1e-5),
                                  torch.device("cpu"))
    assert isinstance(opt2, torch.optim.Adam) and opt2.defaults["betas"] == (0.9, 0.999)
    decayed = {id(p) for g in opt2.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(m2.conv.weight), id(m2.cls.weight), id(m2.loc.weight)}  # no bias, no BN
    # CLI errors are one line, exit 2
    (tmp_path / "out" / "checkpoints" / "last.pt").write_bytes(b"junk")
    rc = main(["train", "mitl", "--config", str(tmp_path / "config_mitl.yaml"), "--features", str(shard),
               "--out", str(tmp_path / "out"), "--model-factory", "test_training:make_standin", "--no-progress"])
    assert rc == 2


def test_data_order_and_auc():
    # DistributedSampler order: ranks disjoint, together every row; the same for the same (seed, epoch).
    b0 = epoch_batches(12, 2, seed=3, epoch=1, world_size=2, rank=0)
    b1 = epoch_batches(12, 2, seed=3, epoch=1, world_size=2, rank=1)
    assert sorted(i for b in b0 + b1 for i in b) == list(range(12))
    assert b0 == epoch_batches(12, 2, seed=3, epoch=1, world_size=2, rank=0)
    assert b0 != epoch_batches(12, 2, seed=3, epoch=2, world_size=2, rank=0)
    # An incomplete last batch is dropped (BN, SSPSL anchors), unless it is the only one.
    assert [len(b) for b in epoch_batches(10, 4, seed=0, epoch=0)] == [4, 4]
    assert [len(b) for b in epoch_batches(3, 4, seed=0, epoch=0)] == [3]
    assert engine.val_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert engine.val_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(engine.val_auc([1, 1], [0.1, 0.2]))


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun, 2 processes, gloo: both ranks train on disjoint halves; rank 0 writes; every rank's RNG saved."""
    shard = write_shard(tmp_path / "s0.npz", 16, 4)
    make_config(tmp_path, epochs=1, checkpoint_every=1, augment=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MORPHFUSE_DEVICE="cpu")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "morphfuse.cli", "train", "lfdl",
           "--config", str(tmp_path / "config_lfdl.yaml"), "--features", str(shard), "--out", str(tmp_path / "out"),
           "--model-factory", "test_training:make_standin", "--no-progress"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = state(tmp_path / "out" / "checkpoints" / "last.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    assert ck["step"] == 2  # 16 rows / 2 ranks / batch 4
    m = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert list(m[m.phase == "train"].step) == [1, 2] and m.val_auc.notna().any()
    assert state(tmp_path / "out" / "model.pt")["finished"] is True


def test_real_lfdl_trains_resumes_and_predicts(tmp_path):
    """Integration: the real LFDL (S = 64) through the engine, then predict on the same shard."""
    pytest.importorskip("timm")
    from morphfuse.predict import predict_shard

    shard = write_shard(tmp_path / "s0.npz", 2, 2, size=64)
    cfg = make_config(tmp_path, size=64, epochs=1, batch_size=2, augment=True, lr=1e-4)
    res = engine.train("lfdl", cfg, [shard], tmp_path / "out", progress=False)
    assert res.finished and res.step == 1
    # Resuming a finished run only rewrites model.pt (the real optimizer and scheduler states load back).
    assert engine.train("lfdl", cfg, [shard], tmp_path / "out", progress=False).step == 1
    rec = ckpt.load_model_file(tmp_path / "out" / "model.pt", "lfdl")
    model = ckpt.build_from_record(rec)
    m = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert {"loss_cls", "loss_loc"} <= set(m.columns) and np.isfinite(m.loss.dropna()).all()
    man = tmp_path / "man.parquet"
    ids = np.load(shard)["image_id"].tolist()
    pd.DataFrame({"image_id": ids, "path": ids, "width": 64, "height": 64}).to_parquet(man)
    out = predict_shard("lfdl", model, shard, man, tmp_path / "pred", batch_size=4)
    assert out["predicted"] == len(ids)
    sc = pd.read_csv(tmp_path / "pred" / "scores.csv")
    assert len(sc) == len(ids) and sc.score.between(0, 1).all()


# ------------------------------------------------------------------------------------------ streaming data
def test_training_data_is_streamed_from_the_shards(tmp_path):
    """The index reads headers and per-row labels only; a sample reads its own row; fingerprint from ids."""
    from morphfuse.features import load_feature_shard
    from morphfuse.training.data import FeatureDataset, SplitRows, finish_batch, fingerprint, open_shards

    a = write_shard(tmp_path / "a.npz", 10, 4, seed=0)
    b = write_shard(tmp_path / "b.npz", 6, 2, seed=1)
    pool = open_shards([a, b], "lfdl", S)
    rows = SplitRows(pool, "lfdl", "train", precomputed=False)
    pixel_bytes = S * S * 4  # one row of rgb + mask
    assert len(rows) == 16 and pool.bytes_read < pixel_bytes  # split, label, has_mask only
    whole = [load_feature_shard(p) for p in (a, b)]
    train = {k: np.concatenate([w[k][w["split"] == "train"] for w in whole]) for k in ("image_id", "face_idx", "rgb")}
    assert rows.fingerprint() == fingerprint(train)
    before = pool.bytes_read
    ds = FeatureDataset(rows, "lfdl", augment=False, seed=0)
    item = ds[12]  # row 2 of the second shard
    np.testing.assert_array_equal(item["rgb"].permute(1, 2, 0).numpy(), train["rgb"][12])
    assert item["rgb"].dtype == torch.uint8 and int(item["row"]) == 12
    assert pool.bytes_read - before == pixel_bytes + 16  # rgb + mask + ref_box of that row, nothing else
    batch = finish_batch(torch.utils.data.default_collate([ds[i] for i in (0, 12)]))
    old = torch.from_numpy(train["rgb"][[0, 12]]).permute(0, 3, 1, 2).float() / 255.0  # the former per-item rule
    assert batch["rgb"].dtype == torch.float32 and torch.equal(batch["rgb"], old)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0} and batch["mask"].shape == (2, 1, S, S)
    # A damaged shard is a one-line error naming the file.
    bad = tmp_path / "bad.npz"
    bad.write_bytes(a.read_bytes()[:5000])
    with pytest.raises(UserError, match="bad.npz"):
        open_shards([bad], "lfdl", S)


# ---------------------------------------------------------------------------------------------- balance
def shard_labels(paths, split="train") -> np.ndarray:
    """The labels of a split's rows, read from the shards (the expected counts come from the data)."""
    parts = []
    for p in paths:
        with np.load(p) as z:
            parts.append(z["label"][z["split"] == split])
    return np.concatenate(parts)


def write_unbalanced(path: Path, n_fake: int, n_real: int, n_val: int = 4, seed: int = 0) -> Path:
    """A toy shard whose train rows hold n_fake fakes and n_real reals (in mixed order)."""
    n = n_fake + n_real
    write_shard(path, n, n_val, seed=seed)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    rng = np.random.default_rng(seed + 100)
    label = np.zeros(n, np.int64)
    label[rng.choice(n, n_fake, replace=False)] = 1
    arrays["label"][:n] = label
    arrays["mask"][:n][label == 0] = 0
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize("n_fake,n_real", [(7, 3), (3, 8), (5, 5)])
def test_resample_real_draws_the_fake_count_per_epoch(n_fake, n_real):
    from morphfuse.training.data import EpochSamples, epoch_samples

    rng = np.random.default_rng(n_fake * 10 + n_real)
    labels = np.zeros(n_fake + n_real, np.int64)
    labels[rng.choice(len(labels), n_fake, replace=False)] = 1
    fakes, reals = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    e0 = epoch_samples(labels, "resample_real", 3, 0)
    assert len(e0) == 2 * n_fake and np.all(np.diff(e0) >= 0)  # row order, copies side by side
    np.testing.assert_array_equal(np.intersect1d(e0, fakes), fakes)
    assert np.sum(np.isin(e0, fakes)) == n_fake  # every fake exactly once
    drawn = e0[np.isin(e0, reals)]
    counts = np.bincount(drawn, minlength=len(labels))[reals]
    q = n_fake // n_real
    assert counts.min() >= q and counts.max() <= q + 1  # reals: q copies each, the rest drawn without replacement
    assert np.array_equal(e0, epoch_samples(labels, "resample_real", 3, 0))  # deterministic per (seed, epoch)
    others = [epoch_samples(labels, "resample_real", 3, e) for e in range(1, 6)]
    if n_fake == n_real:
        assert all(np.array_equal(o, np.arange(len(labels))) for o in [e0] + others)  # balanced: the plain epoch
    else:
        assert any(not np.array_equal(o, e0) for o in others)  # a new draw each epoch
    assert epoch_samples(labels, "none", 3, 0) is None
    assert epoch_samples(np.ones(4, np.int64), "resample_real", 3, 0) is None  # one class: nothing to balance
    es = EpochSamples(labels, "resample_real", 3)
    keys = es.keys(0, range(es.length(0)))
    assert [r for _, r, _ in keys] == e0.tolist()
    assert len(set(keys)) == len(keys)  # the copies of a row are distinct samples (their own augmentation seed)


def test_balanced_training_counts_come_from_the_shards(tmp_path):
    a = write_unbalanced(tmp_path / "a.npz", n_fake=9, n_real=4)
    b = write_unbalanced(tmp_path / "b.npz", n_fake=3, n_real=6, seed=1)
    labels = shard_labels([a, b])
    n_fake = int(np.sum(labels == 1))
    cfg = make_config(tmp_path, epochs=2, batch_size=4, balance="resample_real", checkpoint_every=100)
    res = run_train(cfg, [a, b], tmp_path / "bal")
    assert res.total_steps == 2 * ((2 * n_fake) // 4)
    cfg = make_config(tmp_path, epochs=2, batch_size=4, balance="none")
    assert run_train(cfg, [a, b], tmp_path / "none").total_steps == 2 * (len(labels) // 4)
    ck = state(tmp_path / "bal" / "checkpoints" / "last.pt")
    assert ck["data"]["n"] == len(labels)
    with pytest.raises(UserError, match="balance"):
        run_train(make_config(tmp_path, balance="oversample"), [a], tmp_path / "x")


def test_max_steps_from_the_config(tmp_path):
    shard = write_shard(tmp_path / "s0.npz", 16, 4)
    cfg = make_config(tmp_path, epochs=3, max_steps=2)
    r = run_train(cfg, [shard], tmp_path / "out")
    assert (r.step, r.finished) == (2, False) and state(tmp_path / "out" / "model.pt")["finished"] is False
    assert run_train(cfg, [shard], tmp_path / "out2", max_steps=5).step == 5  # --max-steps wins
    cfg["lfdl"]["train"]["max_steps"] = None
    r = run_train(cfg, [shard], tmp_path / "out")  # without it the run resumes and finishes
    assert r.finished and r.step == r.total_steps == 12
    with pytest.raises(UserError, match="max_steps"):
        run_train(make_config(tmp_path, max_steps=0), [shard], tmp_path / "y")


# ------------------------------------------------------------------------------------ DDP, balanced, kill -9
def make_recording_standin(name, size, options):
    """StandIn that appends each training batch's rows to $MF_TEST_TRACE.<rank> and SIGKILLs its process at
    training forward number $MF_TEST_KILL_AT (every rank at once, as a node failure would)."""
    m = StandIn(name, size)
    forward, calls = m.forward, {"n": 0}
    trace, kill_at, rank = os.environ.get("MF_TEST_TRACE"), int(os.environ.get("MF_TEST_KILL_AT", "0")), \
        os.environ.get("RANK", "0")

    def fwd(batch):
        if m.training:
            calls["n"] += 1
            if kill_at and calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if trace:
                with open(f"{trace}.{rank}", "a") as f:
                    f.write(" ".join(str(int(r)) for r in batch["row"]) + "\n")
        return forward(batch)

    m.forward = fwd
    return m


def test_ddp_balanced_disjoint_ranks_and_kill9_resume(tmp_path):
    """torchrun, 2 gloo processes, balance resample_real: each epoch the ranks train on disjoint samples whose
    union is the epoch's balanced sample set (counts from the shard's labels); kill -9 of both processes
    mid-epoch and a resume end with bitwise the weights of an uninterrupted run."""
    from morphfuse.training.data import epoch_samples

    shard = write_unbalanced(tmp_path / "s0.npz", n_fake=12, n_real=5)
    labels = shard_labels([shard])
    n_fake = int(np.sum(labels == 1))
    epochs, batch, world = 2, 4, 2
    make_config(tmp_path, epochs=epochs, batch_size=batch, checkpoint_every=1, augment=True, mixup=0.5,
                balance="resample_real", num_workers=1)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MORPHFUSE_DEVICE="cpu")

    def launch(out, **extra):
        cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "morphfuse.cli", "train", "lfdl",
               "--config", str(tmp_path / "config_lfdl.yaml"), "--features", str(shard), "--out", str(out),
               "--model-factory", "test_training:make_recording_standin", "--no-progress"]
        return subprocess.run(cmd, env=dict(env, **extra), capture_output=True, text=True, timeout=300, cwd=tmp_path)

    p = launch(tmp_path / "straight", MF_TEST_TRACE=str(tmp_path / "trace"))
    assert p.returncode == 0, p.stderr[-3000:]
    per_rank = [[list(map(int, line.split())) for line in (tmp_path / f"trace.{r}").read_text().splitlines()]
                for r in range(world)]
    steps = (2 * n_fake) // world // batch
    assert all(len(lines) == epochs * steps for lines in per_rank)
    for e in range(epochs):
        got = [sorted(r for line in lines[e * steps:(e + 1) * steps] for r in line) for lines in per_rank]
        expected = epoch_samples(labels, "resample_real", 0, e)
        assert len(got[0]) == len(got[1]) == n_fake  # 2·fakes samples, split evenly
        assert sorted(got[0] + got[1]) == expected.tolist()  # the union is the balanced epoch ...
        fakes = [{r for r in g if labels[r] == 1} for g in got]
        assert fakes[0].isdisjoint(fakes[1]) and len(fakes[0]) + len(fakes[1]) == n_fake  # each fake on one rank
        assert np.sum(labels[got[0] + got[1]] == 1) == n_fake  # half fakes, half (re)drawn reals
    # The ranks' positions in the epoch's samples are disjoint: no sample (row, copy) is trained twice.
    ck = state(tmp_path / "straight" / "checkpoints" / "last.pt")
    order = ck["order"]["indices"]
    assert order.shape == (world, n_fake) and len(set(order.flatten().tolist())) == 2 * n_fake

    out = tmp_path / "killed"
    p = launch(out, MF_TEST_KILL_AT=str(steps + 2))  # both ranks die at step steps+2 (epoch 2), SIGKILL
    assert p.returncode != 0 and not (out / "model.pt").exists()
    assert state(out / "checkpoints" / "last.pt")["step"] == steps + 1
    p = launch(out)
    assert p.returncode == 0, p.stderr[-3000:]
    sa, sb = state(tmp_path / "straight" / "model.pt")["state_dict"], state(out / "model.pt")["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_memory_request_follows_batch_workers_and_gpus():
    """SLURM mem_mb of the train rules: from batch size, data workers and processes (one per GPU); the formula
    by hand, and the profile leaves it to the rule."""
    from morphfuse.config import deep_update
    from morphfuse.training.resources import BASE_MB, MARGIN, WORKER_MB, train_mem_mb, train_mem_mb_from_config

    per = BASE_MB["lfdl"] + 4 * WORKER_MB + 76 * (299 * 299 * 4 / 2**20) * (8 + 2 * 4)
    assert train_mem_mb("lfdl", 299, 76, 4, 8) == int(np.ceil(8 * per * MARGIN / 1000) * 1000)
    assert (
        train_mem_mb("mitl", 512, 10, 4, 8) > train_mem_mb("mitl", 512, 10, 0, 8) > train_mem_mb("mitl", 512, 10, 0, 1)
    )
    assert train_mem_mb("lfdl", 299, 304, 4, 8) > train_mem_mb("lfdl", 299, 76, 4, 8)
    paper = deep_update(yaml.safe_load((REPO / "config.yaml").read_text()),
                        yaml.safe_load((REPO / "configs" / "paper.yaml").read_text()))
    assert train_mem_mb_from_config(paper, "lfdl") == train_mem_mb("lfdl", 299, 76, 4, 8)
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert all("mem_mb" not in profile["set-resources"][f"train_{m}"] for m in ("lfdl", "mitl"))
    assert "train_mem_mb_from_config(config, _model)" in (REPO / "workflow" / "rules" / "models.smk").read_text()


# --------------------------------------------------------------------------- resume means "the same run" (issue 9)
def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = state(a)["state_dict"], state(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_changed_recipe_trains_from_scratch_and_free_settings_resume(tmp_path, caplog):
    shard = write_shard(tmp_path / "s0.npz", 16, 4)
    out = tmp_path / "out"
    run_train(make_config(tmp_path, epochs=2, lr=1e-2), [shard], out)
    first = (out / "model.pt").read_bytes()

    # Another learning rate is another run: from scratch, metrics from step 1, the same weights as a fresh run.
    caplog.set_level("INFO", logger="morphfuse.train")
    res = run_train(make_config(tmp_path, epochs=2, lr=2e-2), [shard], out)
    assert res.finished and "of another run (train.lr differs); training lfdl from scratch" in caplog.text
    m = pd.read_csv(out / "metrics.csv")
    assert m[m.phase == "train"].step.iloc[0] == 1 and m[m.phase == "train"].lr.iloc[0] == pytest.approx(2e-2)
    run_train(make_config(tmp_path, epochs=2, lr=2e-2), [shard], tmp_path / "fresh")
    assert _same_weights(out / "model.pt", tmp_path / "fresh" / "model.pt")
    assert (out / "model.pt").read_bytes() != first

    # Settings that do not change the weights resume the finished run: nothing is retrained.
    caplog.clear()
    before = pd.read_csv(out / "metrics.csv")
    run_train(make_config(tmp_path, epochs=2, lr=2e-2, num_workers=1, checkpoint_every=7), [shard], out)
    assert "from scratch" not in caplog.text and "resuming lfdl" in caplog.text
    assert _same_weights(out / "model.pt", tmp_path / "fresh" / "model.pt")

    # Snakemake deletes a rerun job's outputs: they come back whole from the checkpoint, never an empty log.
    (out / "model.pt").unlink()
    (out / "metrics.csv").unlink()
    run_train(make_config(tmp_path, epochs=2, lr=2e-2), [shard], out)
    cols = [c for c in before.columns if c != "images_per_s"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv")[cols], before[cols])
    assert _same_weights(out / "model.pt", tmp_path / "fresh" / "model.pt")

    # Another training set is another run too.
    caplog.clear()
    other = write_shard(tmp_path / "s1.npz", 16, 4, seed=5)
    run_train(make_config(tmp_path, epochs=2, lr=2e-2), [other], out)
    assert "(data differs)" in caplog.text


def test_more_epochs_continue_an_lfdl_run_exactly(tmp_path):
    """LFDL's StepLR does not depend on the number of epochs: 2 epochs then 3 equals 3 straight away."""
    shard = write_shard(tmp_path / "s0.npz", 16, 4)
    run_train(make_config(tmp_path, epochs=2, mixup=0.5), [shard], tmp_path / "a")
    res = run_train(make_config(tmp_path, epochs=3, mixup=0.5), [shard], tmp_path / "a")
    assert res.finished and res.step == 3 * 4
    run_train(make_config(tmp_path, epochs=3, mixup=0.5), [shard], tmp_path / "b")
    assert _same_weights(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")
    m = pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert list(m[m.phase == "train"].step) == list(range(1, 13))
