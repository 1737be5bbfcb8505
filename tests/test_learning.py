"""The networks can learn: the real LFDL and MITL at 64 px fit 8 samples within a fixed step budget, and a control
with learning rate 0 does not.

Data: 8 images of 64 px, smooth random colour fields; 4 are fakes in which a rectangle (two to three 16-px cells
per side, so that LFDL's 4×4 logit grid at 64 px can draw it: the test is about learning, not resolution) carries
added Gaussian noise (σ = 0.15), a splice-like noise inconsistency; its mask is that rectangle. Training: the
engine's own optimizer builders (Adam for LFDL, AdamW for MITL, weight decay as configured), full batch, no
augmentation, lr 5e-4 (the paper's LFDL rate) for both, 12 LFDL and 20 MITL steps, each model's own loss (LFDL:
cls + patch + pixel; MITL: BCE). Check: the models'
``predict_proba`` in eval mode: train AUC 1.0 and pooled pixel IoU ≥ 0.7 over all 8 images (reals count: a
mask on a real is a false positive).

BatchNorm: after a few dozen large Adam steps the running statistics (momentum 0.1) lag the weights, so LFDL's
eval-mode output would not be the network that was trained; before checking, the statistics are re-estimated on
the 8 samples (reset, then one cumulative pass in train mode without gradients: "precise BN"). MITL has no
BatchNorm. The control (lr 0) keeps every weight at its initial value (asserted); since the statistics are
re-estimated from scratch before the check, one step of it is the same as any number.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from morphfuse import metrics
from morphfuse.models import build_model
from morphfuse.training.engine import Settings, build_optimizer

SIZE = 64
STEPS = {"lfdl": 12, "mitl": 20}
LR = 5e-4  # the paper's LFDL learning rate, for both
WEIGHT_DECAY = {"lfdl": 1e-5, "mitl": 0.05}
CPU_BUDGET_S = 180  # both fits together, one thread
NOISE = 0.15  # σ of the noise added inside a fake's rectangle (images in [0, 1])


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def eight_samples(seed: int = 0) -> dict[str, torch.Tensor]:
    import cv2

    rng = np.random.default_rng(seed)
    imgs, masks = [], []
    for i in range(8):
        img = cv2.resize(rng.uniform(0, 1, (4, 4, 3)).astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        mask = np.zeros((SIZE, SIZE), np.float32)
        if i % 2:
            h, w = 16 * rng.integers(2, 4, 2)
            y, x = 16 * rng.integers(0, (SIZE - h) // 16 + 1), 16 * rng.integers(0, (SIZE - w) // 16 + 1)
            mask[y:y + h, x:x + w] = 1
            img = np.where(mask[..., None] > 0, np.clip(img + rng.normal(0, NOISE, img.shape), 0, 1), img)
        imgs.append(img)
        masks.append(mask)
    return {"rgb": torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().contiguous(),
            "mask": torch.from_numpy(np.stack(masks))[:, None],
            "label": torch.tensor([i % 2 for i in range(8)], dtype=torch.float32),
            "has_mask": torch.ones(8, dtype=torch.bool), "ref_box": torch.full((8, 4), float("nan"))}


@torch.no_grad()
def precise_bn(model: nn.Module, batch: dict) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batch``: reset, one cumulative pass in train mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    model(batch)
    for m in bns:
        m.momentum = 0.1


@torch.no_grad()
def check(model: nn.Module, batch: dict) -> tuple[float, float]:
    """Train AUC of the scores and pooled pixel IoU of (p > 0.5) against the masks, at 64 px, in eval mode."""
    precise_bn(model, batch)
    model.eval()
    score, prob = model.predict_proba(batch)
    if prob.shape[-1] != SIZE:
        prob = F.interpolate(prob, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    pred, gt = prob[:, 0] > 0.5, batch["mask"][:, 0] > 0.5
    iou = float((pred & gt).sum()) / max(1, int((pred | gt).sum()))
    auc, _ = metrics.roc_auc(batch["label"].numpy() > 0.5, score.numpy().astype(np.float64))
    return float(auc), iou


def fit(name: str, lr: float, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, SIZE, {})
    batch = eight_samples(seed)
    train = {"epochs": 1, "batch_size": 8, "lr": max(lr, 1e-12), "weight_decay": WEIGHT_DECAY[name]}
    if name == "mitl":
        train["min_lr"] = 0.0  # the schedule is not used here; the lr-0 control must pass the min_lr <= lr check
    settings = Settings.from_config(name, {"seed": seed, name: {"train": train}})
    opt = build_optimizer(name, model, settings, torch.device("cpu"))
    for group in opt.param_groups:
        group["lr"] = lr
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    losses = []
    for _ in range(steps):
        total, _ = model.loss(model(batch), batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    moved = any(not torch.equal(p.detach(), start[k]) for k, p in model.named_parameters())
    auc, iou = check(model, batch)
    return auc, iou, losses, moved


def test_lfdl_and_mitl_fit_eight_samples():
    t0, c0 = time.perf_counter(), time.process_time()
    results = {}
    for name in ("lfdl", "mitl"):
        w0, p0 = time.perf_counter(), time.process_time()
        auc, iou, losses, moved = fit(name, LR, STEPS[name])
        results[name] = (auc, iou, time.perf_counter() - w0, time.process_time() - p0)
        print(f"\n{name}: {STEPS[name]} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, train AUC {auc:.3f}, "
              f"pixel IoU {iou:.3f}, {results[name][2]:.0f} s wall / {results[name][3]:.0f} s CPU")
        assert moved
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"both: {wall:.0f} s wall, {cpu:.0f} s CPU (one thread)")
    for name, (auc, iou, _, _) in results.items():
        assert auc == 1.0, (name, auc)
        assert iou >= 0.7, (name, iou)
    assert cpu <= CPU_BUDGET_S, f"the two fits took {cpu:.0f} s of CPU (budget {CPU_BUDGET_S} s)"


@pytest.mark.parametrize("name", ["lfdl", "mitl"])
def test_learning_rate_zero_does_not_fit(name):
    auc, iou, _, moved = fit(name, 0.0, 1)
    print(f"\n{name} with lr 0: train AUC {auc:.3f}, pixel IoU {iou:.3f}")
    assert not moved  # every weight is still the initial one
    assert not (auc == 1.0 and iou >= 0.7), (auc, iou)
    assert iou < 0.5
