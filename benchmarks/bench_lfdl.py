"""LFDL throughput.

CPU (always): forward time per S×S face (eval, no_grad, fp32) and the implied GFLOP/s, FLOPs counted on the meta
device by ``morphfuse.models.info`` (2 FLOPs per multiply-add).
GPU (when CUDA exists): training images/s at S = 299, batch 64 (one Adam step = forward + loss + backward + step,
bf16 autocast, channels_last, fused Adam; ``--compile`` adds a torch.compile'd forward), and inference images/s.

    .venv/bin/python benchmarks/bench_lfdl.py                     # CPU section, then GPU if available
    .venv/bin/python benchmarks/bench_lfdl.py --compile --fp32    # also the compiled and the fp32 variants
    .venv/bin/python benchmarks/bench_lfdl.py --train-device cpu --size 40 --batch 2 --steps 1   # smoke test

The reference (LFDL.md, release code on one H100, batch 64): 206 training images/s bf16, 312 with channels_last,
584 with channels_last + torch.compile + fused Adam; 781 inference images/s bf16.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from morphfuse.models.info import generic_model_info
from morphfuse.models.lfdl import LFDL


def forward_gflops(size: int) -> float:
    return generic_model_info("lfdl", size)["forward_gflops"]


def cpu_forward(size: int, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = LFDL(size).eval()
    rgb = torch.rand(batch, 3, size, size)
    times = []
    with torch.no_grad():
        model({"rgb": rgb})  # warm-up (allocator, oneDNN primitives)
        for _ in range(reps):
            t = time.perf_counter()
            model({"rgb": rgb})
            times.append(time.perf_counter() - t)
    per_face = statistics.median(times) / batch
    gflops = forward_gflops(size)
    return {"section": "cpu_forward", "size": size, "batch": batch, "reps": reps, "threads": torch.get_num_threads(),
            "s_per_face": round(per_face, 3), "s_per_face_min": round(min(times) / batch, 3),
            "gflops_per_face": gflops, "gflop_per_s": round(gflops / per_face, 1)}


def synthetic_batch(size: int, batch: int, device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    """Half reals, a quarter fakes with masks, a quarter fakes for SSPSL (reference box in the middle)."""
    g = torch.Generator().manual_seed(0)
    label = (torch.arange(batch) >= batch // 2).float()
    has_mask = torch.arange(batch) < batch * 3 // 4
    mask = torch.zeros(batch, 1, size, size)
    mask[batch // 2:, :, size // 4: size // 2, size // 4: size * 3 // 4] = 1
    q = size / 3
    box = torch.tensor([q, q, 2 * q, 2 * q]).repeat(batch, 1)
    rgb = torch.rand(batch, 3, size, size, generator=g)
    if channels_last:
        rgb = rgb.contiguous(memory_format=torch.channels_last)
    out = {"rgb": rgb, "label": label, "mask": mask, "has_mask": has_mask, "ref_box": box}
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def train_throughput(device: str, size: int, batch: int, steps: int, warmup: int, bf16: bool, channels_last: bool,
                     compile: bool, fused: bool = True) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = LFDL(size).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=0.0, fused=fused)
    fwd = torch.compile(model) if compile else model
    data = synthetic_batch(size, batch, dev, channels_last)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(data)
            loss, parts = model.loss(out, data)  # parts: one host sync, as in the training engine
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return parts["loss"]

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    t_warm = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train_s = (time.perf_counter() - t) / steps

    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(max(1, warmup // 2)):
            fwd(data)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            fwd(data)
        sync()
    infer_s = (time.perf_counter() - t) / steps
    gflops = forward_gflops(size)
    res = {"section": "train", "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "size": size, "batch": batch, "steps": steps, "bf16": bf16, "channels_last": channels_last,
           "compile": compile, "fused_adam": fused, "warmup_s": round(t_warm, 1),
           "train_images_per_s": round(batch / train_s, 1), "infer_images_per_s": round(batch / infer_s, 1),
           "train_tflop_per_s_3x_fwd": round(3 * gflops * batch / train_s / 1e3, 1)}
    if dev.type == "cuda":
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--cpu-batch", type=int, default=1)
    ap.add_argument("--cpu-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the CPU section")
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--batch", type=int, default=64, help="training batch (GPU section)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also measure a torch.compile'd forward")
    ap.add_argument("--fp32", action="store_true", help="also measure without bf16 autocast")
    ap.add_argument("--no-channels-last", action="store_true", help="also measure with the default memory format")
    ap.add_argument("--train-device", default=None, help="run the training section here (default: cuda if any)")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    if not args.no_cpu:
        results.append(cpu_forward(args.size, args.cpu_batch, args.cpu_reps))
        print(json.dumps(results[-1]), flush=True)
    device = args.train_device or ("cuda" if torch.cuda.is_available() else None)
    if device:
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        variants = [dict(bf16=True, channels_last=True, compile=False)]
        if args.no_channels_last:
            variants.append(dict(bf16=True, channels_last=False, compile=False))
        if args.fp32:
            variants.append(dict(bf16=False, channels_last=True, compile=False))
        if args.compile:
            variants.append(dict(bf16=True, channels_last=True, compile=True))
        for v in variants:
            results.append(train_throughput(device, args.size, args.batch, args.steps, args.warmup, **v))
            print(json.dumps(results[-1]), flush=True)
    else:
        print("no CUDA device: GPU section skipped", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
