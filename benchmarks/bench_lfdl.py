"""LFDL on the CPU: forward time per S×S face (eval, no_grad, fp32) and the implied GFLOP/s, FLOPs counted on the
meta device by ``morphfuse.models.info`` (2 FLOPs per multiply-add; ``forward_gflops`` is also what
``benchmarks/gpu_suite.py`` turns its images/s into TFLOP/s with).

    .venv/bin/python benchmarks/bench_lfdl.py
    .venv/bin/python benchmarks/bench_lfdl.py --size 160 --cpu-batch 4 --threads 1

GPU training and inference throughput (the engine's real step, bf16, channels_last, torch.compile, fused Adam,
the streaming loader) are measured by ``benchmarks/gpu_suite.py`` (run on a GPU machine by
``benchmarks/gpu_check.sh``), which replaced this script's former GPU section. The reference (LFDL.md, release code
on one H100, batch 64): 206 training images/s bf16, 312 with channels_last, 584 with channels_last + torch.compile
+ fused Adam; 781 inference images/s bf16.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--cpu-batch", type=int, default=1)
    ap.add_argument("--cpu-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [cpu_forward(args.size, args.cpu_batch, args.cpu_reps)]
    print(json.dumps(results[-1]), flush=True)
    if torch.cuda.is_available():
        print("GPU: run benchmarks/gpu_check.sh (benchmarks/gpu_suite.py) for training and inference throughput",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
