"""One training engine for LFDL and MITL: DDP-ready, checkpointed, and exactly resumable on CPU.

The model follows the protocol of docs/CONTRACTS.md (``forward(batch)``, ``loss(out, batch)``,
``predict_proba(batch)``); the engine knows nothing else about it. The recipe comes from the model's block of
``config.yaml`` (``lfdl.train`` / ``mitl.train``):

- LFDL (release): Adam (β 0.9/0.999), L2 weight decay except biases and 1-D parameters, StepLR (``step_size``
  epochs, ``gamma``), mixup with probability ``mixup`` and λ ~ Beta(1, 1) (the loss is λ·L(targets) +
  (1−λ)·L(permuted targets), the release's ``mixup_criterion``: images, labels and masks move together).
- MITL (release): AdamW, weight decay except biases and norms (all 1-D parameters), linear warm-up over
  ``warmup_epochs`` then half-cosine to ``min_lr``, per optimizer step.
Both: joint augmentation (``augment.py``), gradient accumulation (``accumulate`` micro-batches per optimizer
step), bf16 autocast on CUDA only, DDP under torchrun (gloo on CPU, NCCL on CUDA; rank 0 writes).

Exact resume: the data order of an epoch is ``DistributedSampler(seed, epoch)``'s and every sample's augmentation
(and every micro-batch's mixup draw) is seeded by its position, so nothing about the data needs to be replayed; a
checkpoint (every ``checkpoint_every`` optimizer steps, at each epoch end, when ``--max-steps`` stops the run and
when SIGTERM / SIGUSR1 asks it to stop) stores the weights, optimizer, scheduler, step / epoch / micro-batches
done, the epoch's data order, and every rank's torch, CUDA, numpy and python RNG states (dropout and any other
global randomness). A CPU run interrupted and resumed therefore ends with bitwise the same weights as an
uninterrupted one (on CUDA, as far as its kernels are deterministic).

Best on val: after each epoch's validation, a model better on ``train.best_metric`` (``val_loss``: lowest;
``val_auc``: highest; ties keep the earlier epoch) is saved as ``OUT/checkpoints/best-<step>.pt`` (a model record)
and named in the next training checkpoint, which is written right after it; older best files go only once that
checkpoint is on disk, so a kill at any point leaves the checkpoint's best file in place. At the end,
``OUT/model_best.pt`` is that record with ``selected`` = {metric, value, epoch, step} (without val rows, or when
no epoch has ended: the last model, ``selected.value`` null and the reason), beside ``OUT/model.pt`` (the last
model). Which one predict and export use is the workflow's ``export.checkpoint``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, default_collate

from ..errors import UserError
from ..imageio import write_csv
from .. import metrics
from ..models import RECIPES, WORKFLOW_KEYS, recipe
from . import checkpoint as ckpt
from .data import (BALANCE, EpochSamples, FeatureDataset, SplitRows, batches_of, epoch_order, eval_batches,
                   feature_paths, finish_batch, open_shards)

log = logging.getLogger("morphfuse.train")

# Signals that ask for a checkpoint and a clean stop at the next optimizer step (SLURM sends SIGTERM before a
# time-limit kill, and SIGUSR1 when a job asks for it with --signal).
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class TrainingInterrupted(UserError):
    """A stop signal arrived; a checkpoint was written and the run can be resumed."""


# --------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """A model's ``train:`` block, checked. Defaults come from the config schema (``config.schema.yaml``) only."""

    epochs: int
    batch_size: int
    lr: float
    accumulate: int
    weight_decay: float
    augment: bool
    num_workers: int
    checkpoint_every: int         # optimizer steps; 0 = epoch ends only
    bf16: bool                    # autocast on CUDA only
    seed: int                     # null in the config: the top-level seed
    device: str                   # auto | cpu | cuda (env MORPHFUSE_DEVICE overrides)
    deterministic: bool | None    # None: on for CPU, off for CUDA
    find_unused_parameters: bool
    tensorboard: bool
    balance: str                  # none | resample_real (the releases' class balance, per epoch)
    max_steps: int | None         # stop after this many optimizer steps (model.pt marked unfinished)
    step_size: int = 5            # LFDL StepLR, in epochs (not a MITL key: a neutral value)
    gamma: float = 0.5
    mixup: float = 0.0            # LFDL: probability per micro-batch
    warmup_epochs: float = 0.0    # MITL
    min_lr: float = 0.0           # MITL
    best_metric: str = "val_loss"  # the val metric that picks model_best.pt: val_loss (lowest) or val_auc (highest)

    @classmethod
    def from_config(cls, model_name: str, cfg: dict) -> "Settings":
        from ..config import default

        block = cfg[model_name] if model_name in cfg else None
        if not isinstance(block, dict):
            raise UserError(f"config has no '{model_name}:' block")
        train = block["train"] if "train" in block else None
        if not isinstance(train, dict):
            raise UserError(f"config has no '{model_name}.train:' block")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(train) - known)
        if unknown:
            raise UserError(
                f"{model_name}.train: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(known))})"
            )
        values = {**default(f"{model_name}.train"), **dict(train)}
        if values["seed"] is None:
            values["seed"] = cfg["seed"] if "seed" in cfg else default("seed")
        s = cls(**values)
        s._check(model_name)
        env_dev = os.environ.get("MORPHFUSE_DEVICE")
        if env_dev:
            s.device = env_dev
        return s

    def _check(self, m: str) -> None:
        def bad(key, why):
            raise UserError(f"{m}.train.{key} = {getattr(self, key)!r}: {why}")

        for k in ("epochs", "batch_size", "accumulate", "step_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(k, "must be an integer ≥ 1")
        for k in ("num_workers", "checkpoint_every", "seed"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(k, "must be an integer ≥ 0")
        for k in ("lr", "weight_decay", "gamma", "warmup_epochs", "min_lr", "mixup"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(k, "must be a number ≥ 0")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if self.mixup > 1:
            bad("mixup", "is a probability: must be in [0, 1]")
        if self.min_lr > self.lr:
            bad("min_lr", f"must not exceed lr = {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "must be auto, cpu or cuda")
        if self.balance not in BALANCE:
            bad("balance", f"must be one of {', '.join(BALANCE)}")
        if self.best_metric not in BEST_METRICS:
            bad("best_metric", f"must be one of {', '.join(BEST_METRICS)}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool)
                                           or self.max_steps < 1):
            bad("max_steps", "must be an integer ≥ 1 or null (the whole schedule)")


def model_options(model_name: str, cfg: dict) -> tuple[int, dict]:
    """``(size, options)`` of a model from its config block: options = the block minus train, size, gpus, paper."""
    block = cfg[model_name]
    size = block.get("size")
    if not isinstance(size, int) or size < 16:
        raise UserError(f"{model_name}.size = {size!r}: must be an integer ≥ 16")
    return size, ckpt.primitive({k: v for k, v in block.items() if k not in WORKFLOW_KEYS})


def config_digest(model_name: str, cfg: dict, settings: Settings) -> str:
    from ..config import config_hash

    return config_hash({"model": model_name, "block": cfg[model_name], "seed": settings.seed})


# Validation metrics that can choose model_best.pt, and whether lower is better.
BEST_METRICS = {"val_loss": True, "val_auc": False}


def improves(metric: str, value: float | None, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (None: nothing yet); NaN never does, ties keep the earlier."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if BEST_METRICS[metric] else value > best


# Settings that do not change the weights up to a checkpoint's step: a resume may differ in them.
FREE_SETTINGS = frozenset({"num_workers", "checkpoint_every", "tensorboard", "device", "deterministic",
                           "find_unused_parameters", "max_steps"})


def trajectory(model_name: str, size: int, options: dict, s: Settings, data_fp: str, code: str) -> dict:
    """What defines a training run's weights at every step: the network, the recipe, the data and the code.
    A checkpoint is resumed only when its trajectory equals the current run's."""
    train = {k: v for k, v in dataclasses.asdict(s).items() if k not in FREE_SETTINGS}
    if recipe(model_name).schedule == "step":  # StepLR: the number of epochs does not shape it; more continue a run
        train.pop("epochs")
    return ckpt.primitive({"model": model_name, "size": int(size), "options": options, "train": train,
                           "data": data_fp, "code": code})


def trajectory_diff(old: dict | None, new: dict) -> list[str]:
    """The dotted keys in which two trajectories differ (``["train.lr", "data"]``)."""
    if not isinstance(old, dict):
        return ["(checkpoint written by an older morphfuse)"]
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{j}" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
        elif a != b:
            out.append(k)
    return out


# ------------------------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def gather_objects(self, obj) -> list:
        if not self.initialized:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values: list[float]) -> list[float]:
        if not self.initialized or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world_size).tolist()


def init_distributed(device_pref: str) -> DistContext:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), pick the device and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda_ok = torch.cuda.is_available()
    if device_pref == "cuda" and not cuda_ok:
        raise UserError("train.device = cuda but torch finds no CUDA device (set it to auto or cpu)")
    use_cuda = cuda_ok and device_pref in ("auto", "cuda")
    if use_cuda:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, device=device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        ctx.initialized = True
    return ctx


# ------------------------------------------------------------------------------------- optimizer, schedule
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on ≥2-D weights only: none on biases, norms, LFGA's γ and other 1-D / scalar parameters."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model_name: str, model: torch.nn.Module, s: Settings, device: torch.device):
    groups = param_groups(model, s.weight_decay)
    if not groups:
        raise UserError(f"the {model_name} network has no trainable parameters")
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[recipe(model_name).optimizer]
    return optimizer(groups, lr=s.lr, betas=(0.9, 0.999), **fused)


def lr_factor_fn(model_name: str, s: Settings, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier before optimizer step ``k`` (0-based): a pure function of the step, by the model's
    recipe (``step`` or ``warmup_cosine``)."""
    if recipe(model_name).schedule == "step":
        period = s.step_size * steps_per_epoch

        def step_lr(k: int) -> float:
            return s.gamma ** (k // period)

        return step_lr
    warm = int(round(s.warmup_epochs * steps_per_epoch))

    def warmup_cosine(k: int) -> float:
        if k < warm:
            return (k + 1) / warm
        span = max(1, total_steps - warm)
        progress = min(1.0, (k - warm) / span)
        lr = s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr / s.lr

    return warmup_cosine


# ------------------------------------------------------------------------------------------- small pieces
def val_auc(labels, scores) -> float:
    """Validation AUC by :func:`morphfuse.metrics.roc_auc` (same argument order; ties counted half) as a float:
    NaN without both classes (the training log's and the best checkpoint's number)."""
    auc, _reason = metrics.roc_auc(np.asarray(labels) > 0.5, np.asarray(scores, dtype=np.float64))
    return float("nan") if auc is None else float(auc)


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


PRECOMPUTED_KEYS = tuple(k for r in RECIPES.values() for k in r.precomputed)  # not mixed: recomputed per image


def mixup(batch: dict, p: float, rng: np.random.Generator):
    """With probability ``p``: ``(mixed, permuted_targets, λ)``; else ``(batch, None, 1.0)``.

    ``mixed`` has images λ·x + (1−λ)·x[perm] and the original targets; ``permuted_targets`` the same images with
    the targets (label, mask, has_mask, ref_box) of x[perm]. Precomputed SRM/DCT are dropped: the model recomputes
    them from the mixed pixels."""
    if p <= 0 or rng.random() >= p:
        return batch, None, 1.0
    lam = float(rng.beta(1.0, 1.0))
    n = batch["rgb"].shape[0]
    perm = torch.from_numpy(rng.permutation(n))
    dev = batch["rgb"].device
    # pinned + non_blocking on CUDA: a plain .to(cuda) of a CPU tensor waits for every queued kernel
    perm = perm.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else perm.to(dev)
    mixed = {k: v for k, v in batch.items() if k not in PRECOMPUTED_KEYS}
    mixed["rgb"] = lam * batch["rgb"] + (1.0 - lam) * batch["rgb"][perm]
    other = dict(mixed)
    for k in ("label", "mask", "has_mask", "ref_box"):
        if k in batch:
            other[k] = batch[k][perm]
    return mixed, other, lam


RESERVED = ("phase", "step", "epoch", "loss", "lr", "images_per_s")


def _float_parts(parts) -> dict[str, float]:
    """A model's named loss parts as floats; a part named like an engine column (e.g. its own total ``loss``) is
    left out: the engine logs the total itself."""
    out = {}
    for k, v in (parts or {}).items():
        if str(k) in RESERVED:
            continue
        out[str(k)] = float(v.detach().float().item()) if torch.is_tensor(v) else float(v)
    return out


class MetricsLog:
    """Rows of metrics.csv (rank 0): kept in memory, stored in every checkpoint and rewritten atomically with it,
    so that the file always matches the last checkpoint; a resume takes the rows up to it from the checkpoint
    (rows past it are recomputed). The file is never written without a row."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def write(self) -> None:
        import pandas as pd

        if not self.rows:
            return
        cols: list[str] = []
        for r in self.rows:
            cols.extend(k for k in r if k not in cols)
        lead = [c for c in RESERVED if c in cols]
        write_csv(self.path, pd.DataFrame(self.rows, columns=lead + [c for c in cols if c not in lead]))


class _TB:
    """TensorBoard scalars under OUT/tb (rank 0); a missing tensorboard install only loses the curves."""

    def __init__(self, logdir: Path, enabled: bool, purge_step: int | None):
        self.w = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # pragma: no cover - tensorboard is a pinned dependency
            log.warning("TensorBoard unavailable (%s); metrics.csv only", e)
            return
        self.w = SummaryWriter(str(logdir), purge_step=purge_step)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.w is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.w.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


# ------------------------------------------------------------------------------------------------ engine
@dataclass
class TrainResult:
    step: int
    epoch: int
    total_steps: int
    finished: bool
    model_path: Path
    metrics_path: Path
    last_val: dict


def train(model_name: str, cfg: dict, features, out_dir, resume: str = "auto", max_steps: int | None = None,
          factory=None, progress: bool = True) -> TrainResult:
    """Train ``model_name`` on the ``train`` rows of the feature shards; validate on the ``val`` rows each epoch.

    ``factory(name, size, options) -> nn.Module`` builds the network (default ``morphfuse.models.build_model``).
    Run under torchrun for several processes. Returns what was done; rank 0 has written OUT/model.pt,
    OUT/metrics.csv, OUT/checkpoints/last.pt and OUT/tb/.
    """
    if model_name not in RECIPES:
        raise UserError(f"unknown model {model_name!r}: expected one of {', '.join(RECIPES)}")
    if resume not in ("auto", "never"):
        raise UserError(f"--resume {resume!r}: expected auto or never")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps {max_steps}: must be ≥ 1")
    s = Settings.from_config(model_name, cfg)
    if max_steps is None:
        max_steps = s.max_steps  # the config's {model}.train.max_steps; --max-steps wins
    size, options = model_options(model_name, cfg)
    paths = feature_paths(features)
    factory = factory or ckpt.resolve_factory(None)
    out = Path(out_dir)

    ctx = init_distributed(s.device)
    prev_det = set_determinism(s, ctx.device)
    try:
        return _Run(model_name, cfg, s, size, options, paths, factory, out, resume, max_steps, ctx,
                    progress).run()
    finally:
        torch.use_deterministic_algorithms(prev_det)
        if ctx.initialized and dist.is_initialized():
            dist.destroy_process_group()


def set_determinism(s: Settings, device: torch.device) -> bool:
    """``train.deterministic`` (None: on for CPU, off for CUDA) for this process; off on CUDA turns on cuDNN's
    autotuner (``cudnn.benchmark``). Returns the previous ``torch.are_deterministic_algorithms_enabled()``."""
    deterministic = s.deterministic if s.deterministic is not None else device.type == "cpu"
    prev_det = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return prev_det


def step_runner(model_name: str, cfg: dict, features, out_dir, factory=None,
                memory_format: torch.memory_format | None = None) -> _Run:
    """What :func:`train` runs, set up but not started, for driving single training steps (one process; used by
    ``benchmarks/gpu_suite.py``): the training rows indexed, the network, optimizer and scheduler built, at step 0
    of epoch 0. Drive it with ``it = iter(run.train_loader(epoch))`` and ``run.train_step(run.raw, it,
    run.s.accumulate)``; nothing is written to ``out_dir``. ``memory_format`` (e.g. ``torch.channels_last``)
    converts the network and every training batch's ``rgb``. The caller sets the determinism
    (:func:`set_determinism`)."""
    s = Settings.from_config(model_name, cfg)
    size, options = model_options(model_name, cfg)
    run = _Run(model_name, cfg, s, size, options, feature_paths(features), factory or ckpt.resolve_factory(None),
               Path(out_dir), "never", s.max_steps, init_distributed(s.device), False, memory_format)
    run._data()
    run._model()
    return run


class _Run:
    def __init__(self, model_name, cfg, s: Settings, size, options, paths, factory, out: Path, resume, max_steps,
                 ctx: DistContext, progress: bool, memory_format: torch.memory_format | None = None):
        self.name, self.cfg, self.s, self.size, self.options = model_name, cfg, s, size, options
        self.recipe = recipe(model_name)
        self.paths, self.factory, self.out, self.resume, self.max_steps = paths, factory, out, resume, max_steps
        self.ctx, self.progress, self.memory_format = ctx, progress, memory_format
        self.step, self.epoch, self.mb_done = 0, 0, 0  # _resume() sets them from a checkpoint
        self.ckpt_path = out / "checkpoints" / "last.pt"
        self.model_path = out / "model.pt"
        self.best_path = out / "model_best.pt"
        self.best: dict | None = None  # {"metric", "value", "epoch", "step", "file"} of the best epoch so far
        self.config_hash = config_digest(model_name, cfg, s)
        # Filled by the setup steps that _run() calls in order: _data(), _model(), _resume().
        self.n_train = self.n_batches = self.steps_per_epoch = self.total_steps = 0
        self.train_ds: FeatureDataset | None = None
        self.val_ds: FeatureDataset | None = None
        self.epochs: EpochSamples | None = None
        self.order: np.ndarray | None = None
        self.order_epoch: int | None = None
        self.data_fp = ""
        self.raw: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.trajectory: dict | None = None
        self.metrics: MetricsLog | None = None
        self.resumed = False
        self.stop_signal: int | None = None  # set by the signal handler of run()

    # ----------------------------------------------------------------------------------------- setup
    def _data(self) -> None:
        """Index the train and val rows of the shards (headers and per-row labels only; pixels are read per
        sample by the loaders), the epoch's samples (balance) and the schedule's length."""
        s, ctx = self.s, self.ctx
        pool = open_shards(self.paths, self.name, self.size)
        train_rows = SplitRows(pool, self.name, "train", precomputed=not s.augment)
        n = len(train_rows)
        if n == 0:
            raise UserError(f"no rows with split 'train' in {len(self.paths)} feature shard(s) "
                            f"({', '.join(str(p) for p in self.paths[:3])}{' ...' if len(self.paths) > 3 else ''})")
        self.n_train = n
        self.train_ds = FeatureDataset(train_rows, self.name, augment=s.augment, seed=s.seed)
        val_rows = SplitRows(pool, self.name, "val", precomputed=True)
        self.val_ds = FeatureDataset(val_rows, self.name, augment=False, seed=s.seed) if len(val_rows) else None
        self.epochs = EpochSamples(train_rows.label, s.balance, s.seed)
        self.order, self.order_epoch = None, None
        self.n_batches = len(batches_of(self._order(0)[ctx.rank], s.batch_size))
        self.steps_per_epoch = math.ceil(self.n_batches / s.accumulate)
        self.total_steps = s.epochs * self.steps_per_epoch
        self.data_fp = train_rows.fingerprint()
        if ctx.main:
            fakes = int(np.sum(train_rows.label == 1))
            log.info("%s: %d train rows (%d fake, %d real), balance %s: %d samples per epoch", self.name, n, fakes,
                     n - fakes, s.balance, self.epochs.length(0))

    def _order(self, epoch: int) -> np.ndarray:
        """All ranks' sample indices of ``epoch`` (cached for the current epoch; restored from a checkpoint)."""
        if self.order_epoch != epoch:
            self.order = epoch_order(self.epochs.length(epoch), self.s.seed, epoch, self.ctx.world_size)
            self.order_epoch = epoch
        return self.order

    def _model(self) -> None:
        s, ctx = self.s, self.ctx
        torch.manual_seed(s.seed)
        np.random.seed(s.seed)
        random.seed(s.seed)
        model = self.factory(self.name, self.size, dict(self.options))
        got = getattr(model, "name", self.name)
        if got != self.name:
            raise UserError(f"the model factory built a '{got}' network for '{self.name}'")
        self.raw = model.to(ctx.device) if self.memory_format is None else \
            model.to(ctx.device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.name, self.raw, s, ctx.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor_fn(self.name, s, self.steps_per_epoch, self.total_steps))
        # Each rank its own stream of global randomness (dropout etc.), restored from checkpoints.
        seed_r = s.seed + 1_000_003 * ctx.rank
        torch.manual_seed(seed_r)
        np.random.seed(seed_r % 2**32)
        random.seed(seed_r)

    def _resumable_checkpoint(self) -> dict | None:
        """The checkpoint to continue from, or None: a checkpoint of another run (other trajectory: network,
        recipe, data or code) is not continued; training starts from scratch and says why in one line."""
        if self.resume != "auto" or not self.ckpt_path.exists():
            return None
        ck = ckpt.load_checkpoint(self.ckpt_path, self.name)
        diff = trajectory_diff(ck.get("trajectory"), self.trajectory)
        if diff:
            if self.ctx.main:
                log.info("%s is of another run (%s differ%s); training %s from scratch", self.ckpt_path,
                         ", ".join(diff), "s" if len(diff) == 1 else "", self.name)
            return None
        return ck

    def _resume(self) -> None:
        from ..hashing import stage_code

        s, ctx = self.s, self.ctx
        self.trajectory = trajectory(self.name, self.size, self.options, s, self.data_fp, stage_code("train"))
        self.step, self.epoch, self.mb_done = 0, 0, 0
        self.metrics = MetricsLog(self.out / "metrics.csv")
        ck = self._resumable_checkpoint()
        ctx.barrier()  # every rank decided (they decide alike) before rank 0 removes a stale checkpoint
        if ck is not None:
            self.raw.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.step, self.epoch, self.mb_done = int(ck["step"]), int(ck["epoch"]), int(ck["batch_in_epoch"])
            self.best = dict(ck["best"]) if ck.get("best") else None
            if self.best is not None and not (self.ckpt_path.parent / self.best["file"]).is_file():
                if ctx.main:
                    log.warning("%s names the best-on-val model %s, which is gone: model_best.pt will be the best "
                                "of the epochs from here on", self.ckpt_path, self.best["file"])
                self.best = None
            rngs = ck["rng"]
            old_world = int(ck.get("world_size", 1))
            if old_world == ctx.world_size and len(rngs) == ctx.world_size:
                ckpt.restore_rng(rngs[ctx.rank], ctx.device)
            else:
                if ctx.main:
                    log.warning("%s: written by %d process(es), resumed by %d: data position mapped by samples "
                                "seen; RNG streams reseeded (not an exact replay)", self.ckpt_path, old_world,
                                ctx.world_size)
                self.mb_done = (self.mb_done * old_world) // ctx.world_size // s.accumulate * s.accumulate
                seed_r = s.seed + 1_000_003 * ctx.rank + self.step
                torch.manual_seed(seed_r)
                np.random.seed(seed_r % 2**32)
                random.seed(seed_r)
            stored = ck.get("order")
            if stored and int(stored.get("epoch", -1)) == self.epoch and \
                    tuple(stored["indices"].shape) == (ctx.world_size, self._order(self.epoch).shape[1]):
                saved = stored["indices"].numpy().astype(np.int64)
                if not np.array_equal(saved, self._order(self.epoch)) and ctx.main:
                    log.warning("%s: the sampler deals this epoch differently from when the checkpoint was written "
                                "(another torch version?); continuing with the checkpoint's order", self.ckpt_path)
                self.order, self.order_epoch = saved, self.epoch
            if self.mb_done >= self.n_batches:  # a checkpoint at the very end of an epoch's batches
                self.mb_done = self.n_batches
            if ctx.main:
                # The log travels inside the checkpoint: metrics.csv may have been deleted (Snakemake removes a
                # rerun job's outputs) and is never rewritten with fewer rows than the run has.
                self.metrics.rows = [dict(r) for r in ck.get("metrics", []) if int(r.get("step", 0)) <= self.step]
                log.info("resuming %s from %s: step %d/%d, epoch %d, batch %d", self.name, self.ckpt_path,
                         self.step, self.total_steps, self.epoch, self.mb_done)
        elif ctx.main:
            # A fresh run: stale outputs of an earlier one would be mistaken for this run's (and with --resume never,
            # an old checkpoint would be resumed by the next --resume auto if this run died before its first one).
            shutil.rmtree(self.out / "tb", ignore_errors=True)
            for stale in (self.model_path, self.best_path, self.out / "metrics.csv", self.ckpt_path,
                          *self.ckpt_path.parent.glob("best-*.pt")):
                stale.unlink(missing_ok=True)
        ctx.barrier()
        self.resumed = ck is not None

    # -------------------------------------------------------------------------------------- writing
    def _save_checkpoint(self) -> None:
        """Collective: every rank contributes its RNG state; rank 0 writes last.pt and metrics.csv."""
        rngs = self.ctx.gather_objects(ckpt.capture_rng(self.ctx.device))
        if self.ctx.main:
            obj = {
                "format": ckpt.CHECKPOINT_FORMAT, "version": ckpt.VERSION,
                "model_name": self.name, "size": self.size, "options": self.options, "config_hash": self.config_hash,
                "model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.mb_done,
                "world_size": self.ctx.world_size,
                "data": {"n": self.n_train, "fingerprint": self.data_fp, "seed": self.s.seed},
                "order": {"epoch": self.epoch, "indices": torch.from_numpy(self._order(self.epoch).astype(np.int32))},
                "rng": rngs, "torch_version": str(torch.__version__),
                "trajectory": self.trajectory, "metrics": ckpt.primitive(self.metrics.rows),
                "best": ckpt.primitive(self.best),
            }
            ckpt.save_atomic(obj, self.ckpt_path)
            self.metrics.write()
            keep = self.best["file"] if self.best else None
            for old in self.ckpt_path.parent.glob(
                "best-*.pt"
            ):  # only once the checkpoint naming the new one is written
                if old.name != keep:
                    old.unlink(missing_ok=True)
        self.ctx.barrier()

    def _update_best(self, val: dict) -> None:
        """After an epoch's validation (every rank sees the same gathered values): save the model if it is the best
        on ``best_metric`` so far. Rank 0 writes checkpoints/best-<step>.pt; the checkpoint that follows names it."""
        metric = self.s.best_metric
        value = val.get(metric)
        value = None if value is None else float(value)
        if not improves(metric, value, self.best["value"] if self.best else None):
            return
        name = f"best-{self.step:09d}.pt"
        self.best = {"metric": metric, "value": value, "epoch": self.epoch + 1, "step": self.step, "file": name}
        if self.ctx.main:
            rec = ckpt.model_record(self.name, self.size, self.options, self.config_hash,
                                    ckpt.cpu_state_dict(self.raw), train=ckpt.primitive(dataclasses.asdict(self.s)),
                                    step=self.step, epoch=self.epoch + 1, finished=False)
            ckpt.save_atomic(rec, self.ckpt_path.parent / name)
            log.info("epoch %d: best %s so far (%.6g): %s", self.epoch + 1, metric, value, name)

    def _write_model(self, finished: bool) -> None:
        if self.ctx.main:
            rec = ckpt.model_record(self.name, self.size, self.options, self.config_hash,
                                    ckpt.cpu_state_dict(self.raw), train=ckpt.primitive(dataclasses.asdict(self.s)),
                                    step=self.step, epoch=self.epoch, finished=finished)
            ckpt.save_atomic(rec, self.model_path)
            if self.best is not None:
                best = ckpt.load_model_file(self.ckpt_path.parent / self.best["file"], self.name)
                best["selected"] = {k: self.best[k] for k in ("metric", "value", "epoch", "step")}
            else:
                why = "no validation rows" if self.val_ds is None or len(self.val_ds) == 0 else \
                    f"no epoch ended with a finite {self.s.best_metric}"
                best = dict(rec, selected={"metric": self.s.best_metric, "value": None, "epoch": self.epoch,
                                           "step": self.step, "reason": f"{why}: the last model"})
            best["finished"] = finished  # of the training run it was chosen from
            ckpt.save_atomic(best, self.best_path)
            self.metrics.write()
        self.ctx.barrier()

    # ------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self, amp) -> dict:
        ctx, s = self.ctx, self.s
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        self.raw.eval()
        loss_sum, count, parts_sum, scores, labels = 0.0, 0, {}, [], []
        loader = DataLoader(self.val_ds, batch_sampler=eval_batches(len(self.val_ds), s.batch_size, ctx.world_size,
                                                                    ctx.rank),
                            num_workers=s.num_workers, collate_fn=default_collate,
                            pin_memory=ctx.device.type == "cuda", generator=torch.Generator().manual_seed(s.seed))
        for batch in loader:
            b = batch["row"]
            batch = finish_batch(_to_device(batch, ctx.device))
            with amp():
                out = self.raw(batch)
                loss, parts = self.raw.loss(out, batch)
                score, _ = self.raw.predict_proba(batch)
            loss_sum += float(loss.float().item()) * len(b)
            for k, v in _float_parts(parts).items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * len(b)
            count += len(b)
            scores.extend(score.float().cpu().reshape(-1).tolist())
            labels.extend(batch["label"].float().cpu().reshape(-1).tolist())
        self.raw.train()
        gathered = ctx.gather_objects((loss_sum, count, parts_sum, scores, labels))
        tot = sum(g[1] for g in gathered)
        res = {"val_loss": sum(g[0] for g in gathered) / max(1, tot)}
        keys = sorted({k for g in gathered for k in g[2]})
        for k in keys:
            res[f"val_{k}"] = sum(g[2].get(k, 0.0) for g in gathered) / max(1, tot)
        res["val_auc"] = val_auc([x for g in gathered for x in g[4]], [x for g in gathered for x in g[3]])
        return res

    # ------------------------------------------------------------------------------------ one training step
    def autocast(self):
        """A fresh bf16 autocast context on CUDA with ``train.bf16``, else a no-op context."""
        if self.ctx.device.type == "cuda" and self.s.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_loader(self, epoch: int, start: int = 0) -> DataLoader:
        """This rank's training loader over ``epoch``'s micro-batches from number ``start`` on."""
        s, ctx = self.s, self.ctx
        batches = batches_of(self._order(epoch)[ctx.rank], s.batch_size)
        todo = [self.epochs.keys(epoch, b) for b in batches[start:]]
        return DataLoader(self.train_ds, batch_sampler=todo, num_workers=s.num_workers, collate_fn=default_collate,
                          pin_memory=ctx.device.type == "cuda",
                          generator=torch.Generator().manual_seed(s.seed))  # keeps the global RNG untouched

    def device_batch(self, batch: dict) -> dict:
        """A collated loader batch as model inputs on the device (:func:`finish_batch` there; ``rgb`` in the
        run's memory format)."""
        batch = finish_batch(_to_device(batch, self.ctx.device))
        if self.memory_format is not None:
            batch["rgb"] = batch["rgb"].contiguous(memory_format=self.memory_format)
        return batch

    def train_step(self, model, it, group: int) -> tuple[float, dict[str, float], int]:
        """One optimizer step over ``group`` micro-batches drawn from the loader iterator ``it``: forward (by
        ``model``: the network, its DDP wrapper or a compiled form of it), the network's own loss (LFDL: mixed up
        with probability ``train.mixup``, seeded by epoch and micro-batch), backward (gradients accumulated;
        DDP all-reduces on the last micro-batch only), then the optimizer and scheduler steps. Advances
        ``step`` and ``mb_done``. Returns the micro-batch mean of the loss and of its parts, and the images seen.
        The losses come to the host once, after the optimizer step is queued."""
        s, ctx = self.s, self.ctx
        losses, parts_sum, n_img = [], {}, 0
        for j in range(group):
            batch = self.device_batch(next(it))
            mb_index = self.mb_done + j
            sync = contextlib.nullcontext() if (j == group - 1 or not ctx.initialized) else model.no_sync()
            with sync:
                with self.autocast():
                    if self.recipe.mixup and s.mixup > 0:
                        rng = np.random.default_rng([s.seed, 0x6D6978, self.epoch, mb_index, ctx.rank])
                        a, b, lam = mixup(batch, s.mixup, rng)
                    else:
                        a, b, lam = batch, None, 1.0
                    out = model(a)
                    loss, parts = self.raw.loss(out, a)
                    parts = _float_parts(parts)
                    if b is not None:
                        loss_b, parts_b = self.raw.loss(out, b)
                        parts_b = _float_parts(parts_b)
                        loss = lam * loss + (1.0 - lam) * loss_b
                        parts = {k: lam * v + (1.0 - lam) * parts_b.get(k, v) for k, v in parts.items()}
                (loss / group).backward()
            losses.append(loss.detach().float())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / group
            n_img += int(batch["rgb"].shape[0])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.mb_done += group
        loss_sum = 0.0
        for v in torch.stack(losses).tolist():  # one host synchronisation; summed as before, in order
            loss_sum += v / group
        return loss_sum, parts_sum, n_img

    # ---------------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        self.stop_signal = None
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    previous[sig] = signal.signal(sig, self._on_stop_signal)
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_stop_signal(self, signum, frame) -> None:
        if self.stop_signal is None and self.ctx.main:
            log.warning("%s received: checkpoint at the end of this optimizer step, then stop",
                        signal.Signals(signum).name)
        self.stop_signal = signum

    def _run(self) -> TrainResult:
        s, ctx = self.s, self.ctx
        self._data()
        self._model()
        self._resume()
        model = self.raw
        if ctx.initialized:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(self.raw, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                        find_unused_parameters=s.find_unused_parameters)
        amp = self.autocast
        stop_at = self.total_steps if self.max_steps is None else min(self.total_steps, self.max_steps)
        if ctx.main:
            self.out.mkdir(parents=True, exist_ok=True)
            log.info(
                "%s: %d train rows, %d val rows, %d process(es) on %s, %d micro-batches of %d per epoch and "
                "process, %d optimizer steps per epoch, %d in all",
                self.name,
                self.n_train,
                len(self.val_ds or []),
                ctx.world_size,
                ctx.device,
                self.n_batches,
                s.batch_size,
                self.steps_per_epoch,
                self.total_steps,
            )
        tb = _TB(self.out / "tb", s.tensorboard and ctx.main, self.step + 1 if self.resumed else None)
        bar = None
        if ctx.main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=stop_at, initial=min(self.step, stop_at), file=sys.stderr, desc=f"train {self.name}",
                       unit="step", dynamic_ncols=True, mininterval=1.0)
        last_val: dict = {}
        model.train()
        try:
            while self.epoch < s.epochs and self.step < stop_at:
                stopped = self._epoch(model, amp, stop_at, tb, bar)
                if stopped:
                    break
                # Epoch end: validate, then checkpoint (the checkpoint marks the start of the next epoch).
                last_val = self._validate(amp)
                if last_val and ctx.main:
                    self.metrics.add({"phase": "val", "step": self.step, "epoch": self.epoch, **last_val})
                    tb.scalars("val", last_val, self.step)
                    log.info("epoch %d: %s", self.epoch + 1,
                             ", ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
                if last_val:
                    self._update_best(last_val)
                self.epoch += 1
                self.mb_done = 0
                self._save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            tb.close()
        finished = self.step >= self.total_steps
        if not finished and ctx.main:
            log.warning("stopped at step %d of %d (--max-steps); run again with --resume auto to finish",
                        self.step, self.total_steps)
        self._write_model(finished)
        return TrainResult(self.step, self.epoch, self.total_steps, finished, self.model_path,
                           self.out / "metrics.csv", last_val)

    def _epoch(self, model, amp, stop_at: int, tb: _TB, bar) -> bool:
        """Run the rest of the current epoch; True when ``--max-steps`` stopped it (after a checkpoint)."""
        s, ctx = self.s, self.ctx
        it = iter(self.train_loader(self.epoch, self.mb_done))
        t0 = time.perf_counter()
        while self.mb_done < self.n_batches:
            group = min(s.accumulate, self.n_batches - self.mb_done)
            lr = self.optimizer.param_groups[0]["lr"]
            loss_sum, parts_sum, n_img = self.train_step(model, it, group)

            keys = sorted(parts_sum)
            stop_flag = 1.0 if self.stop_signal is not None else 0.0
            reduced = ctx.mean([loss_sum, float(n_img), stop_flag] + [parts_sum[k] for k in keys])
            loss_val, stop_any = reduced[0], reduced[2] > 0
            if not math.isfinite(loss_val):
                raise UserError(f"training diverged: loss is {loss_val} at step {self.step} (epoch {self.epoch + 1}); "
                                f"lower {self.name}.train.lr or check the feature shards")
            if ctx.main:
                now = time.perf_counter()
                ips = reduced[1] * ctx.world_size / max(now - t0, 1e-9)
                t0 = now
                row = {"phase": "train", "step": self.step, "epoch": self.epoch, "loss": loss_val, "lr": lr,
                       "images_per_s": ips, **{k: v for k, v in zip(keys, reduced[3:])}}
                self.metrics.add(row)
                tb.scalars("train", {k: v for k, v in row.items() if k not in ("phase", "step", "epoch")}, self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", refresh=False)
            else:
                t0 = time.perf_counter()
            if stop_any:
                self._save_checkpoint()
                name = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "a stop signal"
                raise TrainingInterrupted(f"stopped by {name} (on some process) at step {self.step} of "
                                          f"{self.total_steps}; checkpoint {self.ckpt_path} written, rerun to resume")
            if self.mb_done >= self.n_batches:
                return False  # the epoch end (validation + checkpoint) is the caller's
            if self.step >= stop_at:
                self._save_checkpoint()
                return True
            if s.checkpoint_every and self.step % s.checkpoint_every == 0:
                self._save_checkpoint()
        return False
