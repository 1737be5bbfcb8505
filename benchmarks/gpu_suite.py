"""One prepared GPU check: LFDL and MITL training and inference throughput, peak GPU memory and the input
pipeline's images/s per core, in one run of ≤ 4 minutes on an H100 / H200, compared with the goals and the release.

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out DIR             # on the GPU machine (benchmarks/gpu_check.sh)
    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out DIR --profile   # + the top kernels/ops of one step
    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out DIR --smoke     # the same code paths on the CPU, tiny

What is measured (everything through the project's own code; nothing here re-implements a step):

- **training images/s** through the engine's training step (:meth:`morphfuse.training.engine._Run.train_step`,
  the one ``morphfuse train`` runs, set up by :func:`~morphfuse.training.engine.step_runner`): the streaming
  dataset over feature shards + the model's training augmentation in DataLoader workers, pinned memory,
  ``finish_batch`` on the device, bf16 autocast, the network's own loss (LFDL: mixup p 0.5 as configured),
  backward, fused Adam (LFDL) / AdamW (MITL) and the LR schedule. LFDL at 299 px, batch 64; MITL at 512 px,
  batch 16. Configurations: ``fp32`` (reference), ``bf16``, ``bf16_cl`` (+ channels_last network and batches)
  and ``bf16_cl_compile`` (+ torch.compile; ``--compile-scope regional`` by default: the repeated blocks, each
  distinct block compiled once). Also per configuration: median step time,
  the share of the time the step waited for data, the first (compile / autotune) step, peak GPU memory.
- **inference images/s**: the protocol's ``predict_proba`` under ``no_grad`` (MITL with its AMW folded by
  ``fuse_for_inference``, as ``morphfuse predict`` does; predict itself runs fp32) on device-resident batches,
  fp32 / bf16 / bf16 + channels_last / + compile, on the network just trained in the matching configuration.
- **loader images/s per core**: :class:`~morphfuse.training.data.FeatureDataset` + augmentation + collate, one
  process, one thread, CPU time, rows read from disk (the shard dropped from the page cache before each pass),
  as ``benchmarks/bench_loader.py`` measures it.
- ``--profile``: one extra training step of the ``bf16_cl`` and compiled configurations under torch.profiler:
  the top ops/kernels by device time (CPU time on the CPU), the device's busy share of the step, tables in DIR.

Synthetic data: feature shards in the exact ``morphfuse features`` format (``ShardWriter``), pixels cropped from
procedural pictures (the demo photos do not travel), in a temporary folder on the local disk (``--work``).
Imports only what the models, the training step and the loader need (no dlib, diffusers, snakemake,
matplotlib: ``forbidden_imported`` in the JSON). Budget: ``--budget-s`` (default 200 s, counted from the start);
eager measurements first, compiled ones last, each compile under a time limit from what is left; the JSON and
the Markdown table are rewritten after every measurement, so a run cut short still leaves its numbers.

Writes ``DIR/gpu_suite.json`` (keys ``lfdl_train_img_s``, ``mitl_train_img_s``, ``lfdl_infer_img_s``,
``mitl_infer_img_s``: the best configuration of each; ``loader_img_s_per_core``: the lower of the two models';
per-configuration details under ``train``, ``infer``, ``loader``; ``env``: device, torch, CUDA, versions) and
``DIR/gpu_suite.md`` (the tables, with the goals: LFDL ≥ 720 train / ≥ 1,500 infer, MITL ≥ 180 / ≥ 500 images/s).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: the suite's clock counts them

import argparse
import collections
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lfdl import forward_gflops as lfdl_forward_gflops  # noqa: E402
from bench_loader import drop_cache, one_pass  # noqa: E402
from bench_mitl import count_gflops as mitl_gflops  # noqa: E402
from synth_shards import synthetic_photos, write_shards  # noqa: E402

from morphfuse.config import default  # noqa: E402
from morphfuse.training import engine  # noqa: E402
from morphfuse.training.data import FeatureDataset, SplitRows, open_shards  # noqa: E402

MODELS = ("lfdl", "mitl")
FORBIDDEN = ("dlib", "diffusers", "snakemake", "matplotlib")
# The issue's goals and the authors' release (one H100, its own code): training / inference images per second.
GOALS = {"lfdl": {"train": 720, "train_moonshot": 1500, "infer": 1500},
         "mitl": {"train": 180, "train_moonshot": 270, "infer": 500}}
RELEASE = {"lfdl": {"train": {"bf16": 206, "bf16_cl": 312, "bf16_cl_compile": 584}, "infer": {"bf16": 781}},
           "mitl": {"train": {"bf16": 89, "bf16_cl_compile": 135}, "infer": {"bf16": 253}}}
CONFIGS = {  # name -> (bf16, channels_last, compile)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16_cl": (True, True, False),
    "bf16_cl_compile": (True, True, True),
}
FULL = {"lfdl": {"size": 299, "batch": 64}, "mitl": {"size": 512, "batch": 16}}
SMOKE = {"lfdl": {"size": 40, "batch": 2}, "mitl": {"size": 32, "batch": 2}}
# --smoke compiles one small piece of one network (CPU inductor builds C++ per kernel: a whole network takes
# minutes on 2 cores); the GPU run compiles what --compile-scope says.
SMOKE_COMPILE = {"lfdl": "module:cmce.0", "mitl": None}
# --smoke runs each code path once: on the CPU "bf16" is fp32 (autocast is CUDA-only in the engine) and the
# memory-format paths are the same for both networks, so MITL runs its channels_last configuration only.
SMOKE_CONFIGS = {"lfdl": ("fp32", "bf16_cl", "bf16_cl_compile"), "mitl": ("bf16_cl",)}
PROFILED = ("bf16_cl", "bf16_cl_compile")
BF16_DENSE_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # SXM datasheets; the share below is a lead, not a ceiling


def forward_gflops(kind: str, size: int) -> dict:
    """Forward GFLOPs per image (meta device; 2 per multiply-add), as bench_lfdl.py / bench_mitl.py count them;
    MITL also with its AMW folded (what inference runs). Training is taken as 3x forward."""
    if kind == "lfdl":
        g = lfdl_forward_gflops(size)
        return {"train": g, "infer": g}
    return {"train": mitl_gflops(size)["total"], "infer": mitl_gflops(size, fused=True)["total"]}
BALANCED_SAMPLES_PER_ROW = 1.2  # resample_real on a third reals, 90 % train: ~1.2 samples per shard row


class TimeLimit(Exception):
    pass


# ------------------------------------------------------------------------------------------------ helpers
class Clock:
    def __init__(self):
        self.t0 = T0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


CLOCK = Clock()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{CLOCK.elapsed():6.1f}s] {msg}", flush=True)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_compiler() -> None:
    reset = getattr(getattr(torch, "compiler", None), "reset", None)
    if reset is not None:
        reset()
    else:  # pragma: no cover - torch < 2.1
        from torch import _dynamo

        _dynamo.reset()


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`TimeLimit` in this (main) thread after ``seconds`` (SIGALRM); a no-op without a limit."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeLimit(f"stopped at its time limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fs_type(path: Path) -> str:
    """File system type of ``path`` from /proc/mounts ('tmpfs' means the page-cache drop does nothing)."""
    best, kind = "", "unknown"
    try:
        real = str(Path(path).resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def versions() -> dict:
    import timm
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "timm": timm.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
           "opencv": cv2.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return env


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- compiling
def repeated_blocks(model: torch.nn.Module, min_count: int = 2) -> list[str]:
    """Names of the modules to compile one by one for regional compilation: every module with parameters and
    children whose class and parameter shapes recur at least ``min_count`` times (Xception's blocks, ConvNeXt's
    and MiT's layers, LFGA), outermost first. Instances alike share one compiled graph, so the compile time
    grows with the distinct blocks, not with the depth."""
    sig = {}
    for name, m in model.named_modules():
        params = tuple((n, tuple(p.shape)) for n, p in m.named_parameters())
        if name and params and next(m.children(), None) is not None:
            sig[name] = (type(m), params)
    count = collections.Counter(sig.values())
    chosen: list[str] = []
    for name in sig:
        if count[sig[name]] >= min_count and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return chosen


def _compile_in_place(model: torch.nn.Module, name: str) -> None:
    sub = model.get_submodule(name)
    if hasattr(sub, "compile"):  # torch >= 2.2: compiles __call__, parameters and state-dict keys unchanged
        sub.compile()
    else:  # pragma: no cover
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, torch.compile(sub))


def compile_network(raw: torch.nn.Module, scope: str) -> tuple[torch.nn.Module, str]:
    """``(forward module, description)``: ``model`` = ``torch.compile(raw)`` (the whole forward, one graph);
    ``regional`` = :func:`repeated_blocks` compiled in place; ``module:NAME`` = that sub-module in place."""
    if scope == "model":
        return torch.compile(raw), "torch.compile(network)"
    if scope == "regional":
        names = repeated_blocks(raw)
        for n in names:
            _compile_in_place(raw, n)
        return raw, f"regional: {len(names)} repeated blocks compiled in place"
    if scope.startswith("module:"):
        name = scope.split(":", 1)[1]
        _compile_in_place(raw, name)
        return raw, f"one module compiled in place: {name}"
    raise SystemExit(f"--compile-scope {scope!r}: expected model, regional or module:NAME")


def compile_for_inference(raw: torch.nn.Module, scope: str) -> str:
    """Compile what ``predict_proba`` runs: its forward (scope ``model``); blocks compiled in place for training
    (the other scopes) stay compiled and are recompiled for eval mode on the first call."""
    if scope == "model":
        raw.forward = torch.compile(raw.forward)  # predict_proba calls self.forward
        return "torch.compile(network.forward)"
    return f"{scope}: compiled in place for training, recompiled for eval"


# ---------------------------------------------------------------------------------------------- the data
def make_shards(work: Path, kind: str, size: int, rows: int, pics) -> list[Path]:
    t = time.perf_counter()
    paths = write_shards(work / f"{kind}{size}", kind, size, rows, 1, pics=pics)
    mb = sum(p.stat().st_size for p in paths) / 2**20
    log(f"{kind}: {rows} synthetic rows at {size} px written ({mb:.0f} MiB, {time.perf_counter() - t:.1f} s)")
    return paths


def loader_per_core(kind: str, size: int, paths: list[Path], images: int, rounds: int, batch: int) -> dict:
    """The streamed dataset + training augmentation + collate, one process, one thread, CPU time per image."""
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        rows = SplitRows(open_shards(paths, kind, size), kind, "train", precomputed=False)
        ds = FeatureDataset(rows, kind, augment=True, seed=0)
        n = min(images, len(rows))
        per_round = []
        for r in range(rounds):
            keys = [(r, int(i), 0) for i in np.random.default_rng(r).permutation(len(rows))[:n]]
            drop_cache(paths)
            per_round.append(one_pass(ds, keys, batch, finish=False))
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    fs = fs_type(paths[0])
    return {"img_s_per_core": round(statistics.median(per_round), 1), "rounds": [round(v, 1) for v in per_round],
            "images_per_round": n, "batch": batch, "from_disk": fs != "tmpfs", "filesystem": fs}


class Batches:
    """The run's training loader, epoch after epoch (each epoch's loader is the engine's), timing the waits."""

    def __init__(self, run):
        self.run, self.epoch, self.wait, self.epochs = run, 0, 0.0, 1
        self.it = iter(run.train_loader(0))

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            b = next(self.it)
        except StopIteration:
            self.close()
            self.epoch += 1
            self.epochs += 1
            self.it = iter(self.run.train_loader(self.epoch))
            b = next(self.it)
        self.wait += time.perf_counter() - t
        return b

    def close(self) -> None:
        shutdown = getattr(self.it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def model_cfg(kind: str, size: int, batch: int, bf16: bool, workers: int) -> dict:
    """The config slice ``morphfuse train`` would get: the schema's defaults, size / batch / bf16 / workers set."""
    block = copy.deepcopy(default(kind))
    block["size"] = size
    block["train"] = {**block["train"], "batch_size": batch, "bf16": bf16, "num_workers": workers,
                      "tensorboard": False}
    return {"seed": 0, kind: block}


# ---------------------------------------------------------------------------------------- measurements
def profile_step(run, fwd, batches: Batches, dev: torch.device, out: Path, tag: str, top: int = 15) -> dict:
    """One training step under torch.profiler: the top ops/kernels by self device time (CPU time on the CPU)
    and the share of the step's wall time some kernel ran (the union of the kernel intervals)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        run.train_step(fwd, batches, run.s.accumulate)
        sync(dev)
    wall = time.perf_counter() - t
    avgs = prof.key_averages()

    def device_us(e) -> float:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            v = getattr(e, attr, None)
            if v is not None:
                return float(v)
        return 0.0

    on_gpu = dev.type == "cuda"
    key = device_us if on_gpu else (lambda e: float(e.self_cpu_time_total))
    rows = sorted(avgs, key=key, reverse=True)[:top]
    res = {"wall_ms": round(wall * 1e3, 1), "sorted_by": "self device time" if on_gpu else "self CPU time",
           "top": [{"name": e.key[:100], "calls": int(e.count), "self_device_ms": round(device_us(e) / 1e3, 3),
                    "self_cpu_ms": round(float(e.self_cpu_time_total) / 1e3, 3)} for e in rows]}
    if on_gpu:
        try:
            from torch.autograd import DeviceType

            spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                           if getattr(e, "device_type", None) == DeviceType.CUDA)
            busy, end = 0.0, -math.inf
            for a, b in spans:
                if b > end:
                    busy += b - max(a, end)
                    end = b
            res["kernels"] = len(spans)
            res["device_busy_ms"] = round(busy / 1e3, 1)
            res["device_busy_share"] = round(busy / 1e6 / wall, 3) if wall > 0 else None
        except Exception as e:  # the event API moves between torch versions: keep the table anyway
            res["device_busy_error"] = f"{type(e).__name__}: {e}"
    table = None
    for sort_by in (("self_device_time_total", "self_cuda_time_total") if on_gpu else ("self_cpu_time_total",)):
        try:
            table = avgs.table(sort_by=sort_by, row_limit=30)
            break
        except Exception as e:  # the key's name moved between torch versions
            table = f"(table unavailable: {type(e).__name__}: {e})"
    name = f"profile_{tag}.txt"
    write_atomic(out / name, table + "\n")
    res["table"] = name
    return res


def measure_train(kind: str, config: str, paths: list[Path], a, work: Path, scope: str | None) -> tuple[dict, object]:
    """Training images/s of one configuration through the engine's step. Returns (result, run)."""
    bf16, cl, comp = CONFIGS[config]
    size, batch = a.sizes[kind]["size"], a.sizes[kind]["batch"]
    res: dict = {"model": kind, "config": config, "size": size, "batch": batch}
    t = time.perf_counter()
    run = engine.step_runner(kind, model_cfg(kind, size, batch, bf16, a.workers), paths, work / "run",
                             memory_format=torch.channels_last if cl else None)
    dev = run.ctx.device
    res.update(device=str(dev), autocast_bf16=dev.type == "cuda" and run.s.bf16, channels_last=cl,
               optimizer=type(run.optimizer).__name__ + (" (fused)" if run.optimizer.defaults.get("fused") else ""),
               workers=run.s.num_workers, accumulate=run.s.accumulate, mixup=run.s.mixup if kind == "lfdl" else None,
               augment=run.s.augment, balance=run.s.balance, build_s=round(time.perf_counter() - t, 2))
    fwd = run.raw
    if comp:
        fwd, res["compile"] = compile_network(run.raw, scope)
    batches = Batches(run)
    try:
        reset_peak(dev)
        t = time.perf_counter()
        run.train_step(fwd, batches, run.s.accumulate)
        sync(dev)
        res["first_step_s"] = round(time.perf_counter() - t, 2)
        for _ in range(a.warmup - 1):
            run.train_step(fwd, batches, run.s.accumulate)
        sync(dev)
        res["warmup_s"] = round(time.perf_counter() - t, 2)
        batches.wait, images, steps = 0.0, 0, []
        t = time.perf_counter()
        for _ in range(a.steps):
            ts = time.perf_counter()
            loss, _parts, n = run.train_step(fwd, batches, run.s.accumulate)
            images += n
            steps.append(time.perf_counter() - ts)
        sync(dev)
        dt = time.perf_counter() - t
        res.update(img_s=round(images / dt, 1), tflop_s=round(3 * a.gflops[kind]["train"] * images / dt / 1e3, 2),
                   steps=a.steps, images=images, seconds=round(dt, 3),
                   step_ms_median=round(statistics.median(steps) * 1e3, 1), data_wait_share=round(batches.wait / dt, 3),
                   loss=round(float(loss), 4), loss_finite=math.isfinite(loss), peak_gib=peak_gib(dev),
                   loader_epochs=batches.epochs)
        if a.profile and config in PROFILED:
            try:
                res["profile"] = profile_step(run, fwd, batches, dev, a.out, f"{kind}_{config}_train")
            except Exception as e:
                res["profile_error"] = f"{type(e).__name__}: {e}"
    finally:
        batches.close()
    return res, run


def measure_infer(kind: str, config: str, run, a, scope: str | None) -> dict:
    """Inference images/s of ``predict_proba`` (no_grad; bf16 autocast on CUDA) on the network of ``run``."""
    bf16, cl, comp = CONFIGS[config]
    raw, dev = run.raw, run.ctx.device
    size, batch = a.sizes[kind]["size"], a.infer_batch.get(kind) or a.sizes[kind]["batch"]
    raw.eval()
    if kind == "mitl":
        raw.fuse_for_inference()
    res = {"model": kind, "config": config, "size": size, "batch": batch, "autocast_bf16": dev.type == "cuda" and bf16,
           "channels_last": cl, "amw_folded": kind == "mitl"}
    if comp:
        res["compile"] = compile_for_inference(raw, scope)
    rgb = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    if cl:
        rgb = rgb.contiguous(memory_format=torch.channels_last)
    data = {"rgb": rgb}
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if res["autocast_bf16"] else contextlib.nullcontext

    def once():
        with torch.no_grad(), amp():
            return raw.predict_proba(data)

    reset_peak(dev)
    t = time.perf_counter()
    once()
    sync(dev)
    res["first_call_s"] = round(time.perf_counter() - t, 2)
    for _ in range(a.warmup - 1):
        once()
    sync(dev)
    t = time.perf_counter()
    for _ in range(a.steps):
        score, _mask = once()
    sync(dev)
    dt = time.perf_counter() - t
    res.update(
        img_s=round(batch * a.steps / dt, 1),
        tflop_s=round(a.gflops[kind]["infer"] * batch * a.steps / dt / 1e3, 2),
        steps=a.steps,
        seconds=round(dt, 3),
        peak_gib=peak_gib(dev),
        score_finite=bool(torch.isfinite(score.float()).all()),
    )
    return res


# ----------------------------------------------------------------------------------------------- report
def summarise(R: dict) -> None:
    """The headline keys: best configuration per model and kind of measurement."""
    for kind in MODELS:
        for what in ("train", "infer"):
            ok = {c: r for c, r in R[what].get(kind, {}).items() if isinstance(r.get("img_s"), (int, float))}
            if ok:
                best = max(ok, key=lambda c: ok[c]["img_s"])
                R[f"{kind}_{what}_img_s"], R[f"{kind}_{what}_config"] = ok[best]["img_s"], best
        lo = R["loader"].get(kind, {}).get("img_s_per_core")
        if lo:
            R[f"{kind}_loader_img_s_per_core"] = lo
    per_core = [R[f"{k}_loader_img_s_per_core"] for k in MODELS if f"{k}_loader_img_s_per_core" in R]
    if per_core:
        R["loader_img_s_per_core"] = min(per_core)
    R["forbidden_imported"] = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
    R["elapsed_s"] = round(CLOCK.elapsed(), 1)
    R["cpu_s"] = round(cpu_seconds(), 1)
    R["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _num(v, fmt="{:,.1f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "—"


def markdown(R: dict) -> str:
    env, smoke = R["env"], R["mode"] == "smoke"
    lines = [f"# morphfuse GPU suite: {env.get('device')}", "",
             f"{R['started']} · mode **{R['mode']}** · torch {env['torch']} · CUDA {env.get('cuda')} · cuDNN "
             f"{env.get('cudnn')} · timm {env['timm']} · transformers {env['transformers']} · Python {env['python']} · "
             f"{env['cpu_count']} CPU cores · {R['elapsed_s']} s wall, {R['cpu_s']} s CPU"
             f"{'' if R.get('complete') else ' · **incomplete** (see skipped / errors)'}", ""]
    if smoke:
        lines += ["Smoke mode: tiny sizes on the CPU (no autocast there: the engine uses bf16 on CUDA only); the "
                  "numbers only show that every path runs.", ""]
    lines += ["## Training (the engine's step: streaming loader → finish_batch → forward → loss → backward → "
              "fused Adam/AdamW)", "",
              "| model | size | batch | config | images/s | goal | release | TFLOP/s (3× fwd) | step ms | data wait | "
              "peak GiB | first step s |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in MODELS:
        g, rel = GOALS[kind], RELEASE[kind]
        for c, r in R["train"].get(kind, {}).items():
            if "img_s" not in r:
                lines.append(f"| {kind} | | | {c} | {r.get('error') or r.get('skipped') or '—'} | | | | | | | |")
                continue
            release = rel["train"].get(c)
            name = f"{c} ({r['compile']})" if r.get("compile") else c
            lines.append(
                f"| {kind} | {r['size']} | {r['batch']} | {name} | **{_num(r['img_s'])}** | {g['train']:,} | "
                f"{_num(release, '{:,}')} | {_num(r.get('tflop_s'), '{:.1f}')} | {_num(r['step_ms_median'])} | "
                f"{_num(100 * r['data_wait_share'], '{:.0f} %')} | {_num(r['peak_gib'], '{:.1f}')} | "
                f"{_num(r['first_step_s'], '{:.1f}')} |"
            )
    lines += [
        "",
        "## Inference (`predict_proba`, no_grad; MITL with its AMW folded)",
        "",
        "| model | size | batch | config | images/s | goal | release (bf16) | TFLOP/s | peak GiB | first call s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in MODELS:
        for c, r in R["infer"].get(kind, {}).items():
            if "img_s" not in r:
                lines.append(f"| {kind} | | | {c} | {r.get('error') or r.get('skipped') or '—'} | | | | | |")
                continue
            lines.append(f"| {kind} | {r['size']} | {r['batch']} | {c} | **{_num(r['img_s'])}** | "
                         f"{GOALS[kind]['infer']:,} | {_num(RELEASE[kind]['infer'].get(c), '{:,}')} | "
                         f"{_num(r.get('tflop_s'), '{:.1f}')} | {_num(r['peak_gib'], '{:.1f}')} | "
                         f"{_num(r['first_call_s'], '{:.1f}')} |")
    lines += ["", "## Input pipeline (dataset + augmentation + collate, 1 process, 1 thread, CPU time)", "",
              "| model | images/s per core | rounds | from disk | cores to feed the best training rate |",
              "|---|---:|---|---|---:|"]
    for kind in MODELS:
        lo = R["loader"].get(kind)
        if lo and "img_s_per_core" in lo:
            best = R.get(f"{kind}_train_img_s")
            need = f"{best / lo['img_s_per_core']:.2f}" if best else "—"
            lines.append(
                f"| {kind} | **{_num(lo['img_s_per_core'])}** | {', '.join(f'{v:.0f}' for v in lo['rounds'])} | "
                f"{'yes' if lo['from_disk'] else 'no (' + lo['filesystem'] + ')'} | {need} |"
            )
    lines += ["", "## Against the goals", "", "| | measured (best config) | goal | moonshot | release | met |",
              "|---|---:|---:|---:|---:|---|"]
    for kind in MODELS:
        rt, ri = RELEASE[kind]["train"], RELEASE[kind]["infer"]
        for what, goal, moon, rel in (("train", GOALS[kind]["train"], GOALS[kind]["train_moonshot"],
                                       f"{rt['bf16']} bf16, {rt['bf16_cl_compile']} + levers"),
                                      ("infer", GOALS[kind]["infer"], None, f"{ri['bf16']} bf16")):
            v = R.get(f"{kind}_{what}_img_s")
            met = "—" if v is None or smoke else ("**yes**" if v >= goal else "no")
            lines.append(f"| {kind} {what} images/s | {_num(v)} ({R.get(f'{kind}_{what}_config', '—')}) | {goal:,} | "
                         f"{_num(moon, '{:,}')} | {rel} | {met} |")
    for kind in MODELS:
        for c, r in R["train"].get(kind, {}).items():
            p = r.get("profile")
            if not p:
                continue
            busy = (f", device busy {100 * p['device_busy_share']:.0f} % of the step ({p.get('kernels')} kernels)"
                    if p.get("device_busy_share") is not None else "")
            lines += [
                "",
                f"### Profile: {kind} {c}, one training step ({p['wall_ms']:.0f} ms under the profiler{busy})",
                "",
                "| op / kernel | calls | self device ms | self CPU ms |",
                "|---|---:|---:|---:|",
            ]
            lines += [f"| `{e['name']}` | {e['calls']} | {e['self_device_ms']:.2f} | {e['self_cpu_ms']:.2f} |"
                      for e in p["top"][:10]]
    if R["skipped"] or R["errors"]:
        lines += ["", "## Skipped / errors", ""] + [f"- skipped: {s}" for s in R["skipped"]] + \
                 [f"- error: {e}" for e in R["errors"]]
    return "\n".join(lines) + "\n"


def write_report(R: dict, out: Path) -> None:
    summarise(R)
    write_atomic(out / "gpu_suite.json", json.dumps(R, indent=2) + "\n")
    write_atomic(out / "gpu_suite.md", markdown(R))


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json, gpu_suite.md, profiles")
    ap.add_argument("--smoke", action="store_true", help="the same paths on the CPU at tiny sizes (< 90 s)")
    ap.add_argument("--profile", action="store_true", help="profile one step of the bf16_cl and compiled configs")
    ap.add_argument("--only", choices=MODELS, default=None, help="one model only")
    ap.add_argument("--configs", default=None,
                    help=f"comma-separated, of {', '.join(CONFIGS)} (default all; smoke: LFDL fp32, bf16_cl, "
                         "bf16_cl_compile, MITL bf16_cl)")
    ap.add_argument("--compile-scope", default="regional",
                    help="regional (default: the repeated blocks, one compile per distinct block, ~11 graphs for "
                         "MITL, 7 for LFDL), model (torch.compile of the whole forward: minutes per network) or "
                         "module:NAME (one sub-module)")
    ap.add_argument("--sizes", default=None,
                    help="override sizes and batches, e.g. lfdl=299:64,mitl=512:16 (default; smoke "
                         "lfdl=40:2,mitl=32:2)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per configuration (15; smoke 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per configuration (3; smoke 1)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers (default min(8, cores - 2); smoke 1)")
    ap.add_argument("--infer-batch", default=None, help="e.g. lfdl=128,mitl=32 (default: the training batch)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for the whole run from its start (default 200; smoke: none); compiles are time-limited",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's; smoke 1)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the synthetic shards (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic shards")
    a = ap.parse_args(argv)
    a.sizes_text = a.sizes
    a.sizes = copy.deepcopy(SMOKE if a.smoke else FULL)
    for item in (a.sizes_text or "").split(","):
        if item:
            k, _, v = item.partition("=")
            size, _, batch = v.partition(":")
            if k not in MODELS or not size.isdigit() or not batch.isdigit():
                ap.error(f"--sizes {item!r}: expected MODEL=SIZE:BATCH")
            a.sizes[k] = {"size": int(size), "batch": int(batch)}
    a.steps = a.steps or (1 if a.smoke else 15)
    a.warmup = max(1, a.warmup or (1 if a.smoke else 3))
    a.workers = a.workers if a.workers is not None else (1 if a.smoke else max(0, min(8, (os.cpu_count() or 2) - 2)))
    a.budget_s = a.budget_s if a.budget_s is not None else (None if a.smoke else 200.0)
    if a.configs:
        given = [c.strip() for c in a.configs.split(",") if c.strip()]
        bad = [c for c in given if c not in CONFIGS]
        if bad:
            ap.error(f"--configs: unknown {', '.join(bad)} (known: {', '.join(CONFIGS)})")
        a.configs = {k: [c for c in CONFIGS if c in given] for k in MODELS}
    else:
        a.configs = {k: list(SMOKE_CONFIGS[k] if a.smoke else CONFIGS) for k in MODELS}
    a.infer_batch = {k: int(v) for k, v in (item.split("=") for item in (a.infer_batch or "").split(",") if item)}
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.threads or a.smoke:
        torch.set_num_threads(a.threads or 1)
    if a.smoke and torch.cuda.is_available():
        os.environ["MORPHFUSE_DEVICE"] = "cpu"  # the smoke test is the CPU path, GPU or not
    elif not a.smoke and not torch.cuda.is_available():
        log("no CUDA device: this is the GPU run; use --smoke on a CPU machine (continuing on the CPU)")
    models = [a.only] if a.only else list(MODELS)
    deadline = None if a.budget_s is None else CLOCK.t0 + a.budget_s
    left = (lambda: math.inf) if deadline is None else (lambda: deadline - time.perf_counter())
    R: dict = {"suite": "morphfuse benchmarks/gpu_suite.py", "version": 1, "mode": "smoke" if a.smoke else "full",
               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv[1:],
               "env": versions(), "goals": GOALS, "release": RELEASE,
               "compile_scope": SMOKE_COMPILE if a.smoke else a.compile_scope,
               "steps": a.steps, "warmup": a.warmup, "budget_s": a.budget_s,
               "train": {k: {} for k in models}, "infer": {k: {} for k in models}, "loader": {},
               "skipped": [], "errors": [], "complete": False}
    log(f"{R['env']['device']}; torch {torch.__version__}, CUDA {torch.version.cuda}; mode {R['mode']}; "
        f"budget {a.budget_s or 'none'} s")
    work = a.work or Path(tempfile.mkdtemp(prefix="morphfuse_gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    R["work"] = str(work)
    prev_det = torch.are_deterministic_algorithms_enabled()
    try:
        # ---- data: enough rows that one epoch covers every step of a configuration
        pics = synthetic_photos(16, 640 if not a.smoke else 96)
        need = a.warmup + a.steps + (1 if a.profile else 0)
        paths = {}
        for kind in models:
            batch = a.sizes[kind]["batch"]
            rows = max(16, math.ceil(batch * need / BALANCED_SAMPLES_PER_ROW * 1.15) + batch)
            paths[kind] = make_shards(work, kind, a.sizes[kind]["size"], rows, pics)
        a.gflops = {k: forward_gflops(k, a.sizes[k]["size"]) for k in models}
        R["forward_gflops"] = a.gflops
        peak = next((v for k, v in BF16_DENSE_PEAK_TFLOPS.items() if k in str(R["env"].get("device"))), None)
        R["bf16_dense_peak_tflops"] = peak
        for kind in models:
            lo = loader_per_core(kind, a.sizes[kind]["size"], paths[kind], images=32 if a.smoke else 256,
                                 rounds=2, batch=a.sizes[kind]["batch"] if a.smoke else 16)
            R["loader"][kind] = lo
            log(f"{kind}: loader {lo['img_s_per_core']:.1f} images/s per core (rounds {lo['rounds']}, "
                f"{'from disk' if lo['from_disk'] else 'page cache: ' + lo['filesystem']})")
        write_report(R, a.out)

        # ---- eager configurations first, compiled ones last (their compile time is the unknown)
        plan = [(k, c) for k in models for c in a.configs[k] if not CONFIGS[c][2]] + \
               [(k, c) for k in models for c in a.configs[k] if CONFIGS[c][2]]
        # as train() does: cuDNN autotuning on CUDA (train.deterministic null), deterministic algorithms on the CPU
        s0 = engine.Settings.from_config(models[0], model_cfg(models[0], 64, 2, True, 0))
        engine.set_determinism(s0, engine.init_distributed(s0.device).device)
        for i, (kind, config) in enumerate(plan):
            comp = CONFIGS[config][2]
            scope = (SMOKE_COMPILE[kind] if a.smoke else a.compile_scope) if comp else None
            if comp and scope is None:
                R["skipped"].append(f"{kind} {config}: --smoke compiles one small piece of LFDL only")
                continue
            remaining = left()
            if remaining < (20 if comp else 8):
                R["skipped"].append(f"{kind} {config}: budget spent ({max(0.0, remaining):.0f} s left)")
                log(R["skipped"][-1])
                continue
            n_compiled_left = sum(1 for k, c in plan[i:] if CONFIGS[c][2])
            limit = None if deadline is None else (remaining - 5) / max(1, n_compiled_left) if comp else remaining - 5
            run = None
            try:
                with time_limit(limit):
                    res, run = measure_train(kind, config, paths[kind], a, work, scope)
                R["train"][kind][config] = res
                log(
                    f"{kind} {config} train: {res['img_s']:.1f} images/s (step {res['step_ms_median']:.0f} ms, "
                    f"data wait "
                    f"{100 * res['data_wait_share']:.0f} %, first step {res['first_step_s']:.1f} s, peak "
                    f"{res['peak_gib']} GiB)"
                )
                remaining = left()
                if remaining < 8:
                    R["skipped"].append(f"{kind} {config} inference: budget spent")
                else:
                    with time_limit(None if deadline is None else remaining - 3):
                        r2 = measure_infer(kind, config, run, a, scope)
                    R["infer"][kind][config] = r2
                    log(
                        f"{kind} {config} inference: {r2['img_s']:.1f} images/s (first call {r2['first_call_s']:.1f} s)"
                    )
            except (Exception, TimeLimit) as e:
                text = str(e).splitlines()[0][:300] if str(e) else ""
                msg = (
                    f"{kind} {config}: time limit: {text.split('TimeLimit: ')[-1]}"
                    if "TimeLimit" in f"{type(e)}{text}"
                    else f"{kind} {config}: {type(e).__name__}: {text}"
                )
                R["errors"].append(msg)
                R["train"][kind].setdefault(config, {"error": msg})
                log(msg)
            finally:
                del run
                if comp:
                    reset_compiler()
                release_memory()
            write_report(R, a.out)
        R["complete"] = not R["skipped"] and not R["errors"] or (a.smoke and not R["errors"])
    finally:
        torch.use_deterministic_algorithms(prev_det)
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)
        write_report(R, a.out)
    log(f"done: {a.out / 'gpu_suite.json'}, {a.out / 'gpu_suite.md'} ({R['elapsed_s']} s wall, {R['cpu_s']} s CPU)")
    headline = [k for k in ("lfdl_train_img_s", "mitl_train_img_s", "lfdl_infer_img_s", "mitl_infer_img_s",
                            "loader_img_s_per_core") if k in R]
    print(json.dumps({k: R[k] for k in headline}))
    return 0 if any(k.endswith("train_img_s") for k in headline) else 1


if __name__ == "__main__":
    sys.exit(main())
