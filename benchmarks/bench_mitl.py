"""MITL cost and speed on the CPU: GFLOPs per image and forward time (optionally with the folded AMW block).

    .venv/bin/python benchmarks/bench_mitl.py                       # CPU forward at 512, batch 1
    .venv/bin/python benchmarks/bench_mitl.py --threads 1 --repeats 2
    .venv/bin/python benchmarks/bench_mitl.py --size 256 --threads 1 --fused  # + MITL.fuse_for_inference, same run

GFLOPs are counted with torch.utils.flop_counter on the meta device (where SDPA runs as its bmm decomposition and
is counted; the fused CPU SDPA kernel has no FLOP formula) plus the DCT bands counted on CPU (``count_gflops`` is
also what ``benchmarks/gpu_suite.py`` turns its images/s into TFLOP/s with). Training FLOPs are taken as 3x forward.
GPU training and inference throughput (the release's measurement: batch 16 at 512, bf16, here through the engine's
real step with channels_last, fused AdamW, torch.compile and the streaming loader) are measured by
``benchmarks/gpu_suite.py`` (``benchmarks/gpu_check.sh`` on a GPU machine), which replaced this script's former
GPU section. Prints one Markdown section; paste it into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from morphfuse.dct import dct_bands
from morphfuse.models.mitl import MITL

RELEASE = {"params_M": 85.75, "gflops": 244.6, "train_img_s_bf16": 89, "train_img_s_cl_compile_fused": 135,
           "infer_img_s_bf16": 253}


def count_gflops(size: int, fused: bool = False) -> dict[str, float]:
    """Forward GFLOPs per image at ``size`` by part (meta device: no memory, no compute); ``fused``: after
    ``MITL.fuse_for_inference()``."""
    with torch.device("meta"):
        model = MITL(size=size).eval()
    if fused:
        model.fuse_for_inference()
    z = lambda: torch.zeros(1, 3, size, size, device="meta")  # noqa: E731
    counter = FlopCounterMode(display=False, depth=3)
    with counter, torch.no_grad():
        model({"rgb": z(), "dct_high": z(), "dct_low": z()})
    per = {k: sum(v.values()) / 1e9 for k, v in counter.get_flop_counts().items()}
    dct_counter = FlopCounterMode(display=False)
    with dct_counter:
        dct_bands(torch.rand(1, 3, size, size))
    parts = {name: per.get(f"MITL.{name}", 0.0) for name in ("convnext", "mit", "weighting")}
    parts["decoders+heads"] = per["MITL"] - sum(parts.values())
    parts["dct"] = dct_counter.get_total_flops() / 1e9
    parts["total"] = per["MITL"] + parts["dct"]
    return parts


def bench_cpu_fused(size: int, repeats: int) -> dict[str, dict[str, float]]:
    """CPU forward time of one model unfused and after ``fuse_for_inference()``, alternated (ABAB...) in one run
    so that load on a shared machine hits both alike; also the largest logit difference between the two."""
    torch.manual_seed(0)
    model = MITL(size=size).eval()
    batch = {"rgb": torch.rand(1, 3, size, size)}
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    with torch.no_grad():
        ref = model(batch)["logits"]  # warm-up, unfused
        model.fuse_for_inference()
        diff = (model(batch)["logits"] - ref).abs().max().item()  # warm-up, fused
        for _ in range(repeats):
            for name in ("unfused", "fused"):
                if name == "unfused":
                    model.weighting.unfuse()
                else:
                    model.fuse_for_inference()
                t = time.perf_counter()
                model(batch)
                times[name].append(time.perf_counter() - t)
    out = {k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in times.items()}
    out["fused"]["max_abs_logit_diff"] = diff
    return out


def bench_cpu(size: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = MITL(size=size).eval()
    batch = {"rgb": torch.rand(1, 3, size, size)}
    times = []
    with torch.no_grad():
        model(batch)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed CPU forwards (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument("--fused", action="store_true",
                   help="also count and time (CPU, same run, alternated) MITL.fuse_for_inference()")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    flops = count_gflops(args.size)
    print(f"## MITL (models/mitl.py), {args.size}x{args.size}, random init\n")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| part | GFLOPs/image (forward) |\n|---|---|")
    for k, v in flops.items():
        print(f"| {k} | {v:.2f} |")
    print(f"\nRelease: {RELEASE['gflops']} GFLOPs (its DCT: 6.4 as full transforms).\n")

    cpu = bench_cpu(args.size, args.repeats)
    print(f"CPU forward, batch 1, fp32, {cpu['threads']} thread(s): median {cpu['median_s']:.2f} s/image "
          f"(min {cpu['min_s']:.2f} s) -> {flops['total'] / cpu['median_s']:.1f} GFLOP/s implied "
          f"(best {flops['total'] / cpu['min_s']:.1f}).\n")
    if args.fused:
        fused_flops = count_gflops(args.size, fused=True)
        print(f"Fused AMW block (MITL.fuse_for_inference): weighting {flops['weighting']:.2f} -> "
              f"{fused_flops['weighting']:.2f} GFLOPs, total {flops['total']:.2f} -> {fused_flops['total']:.2f} "
              f"({flops['total'] - fused_flops['total']:.2f} fewer).\n")
        t = bench_cpu_fused(args.size, args.repeats)
        u, f = t["unfused"], t["fused"]
        print(f"CPU forward, batch 1, fp32, {torch.get_num_threads()} thread(s), {args.repeats} alternated "
              f"pairs: unfused median {u['median_s']:.3f} s (min {u['min_s']:.3f}), fused median "
              f"{f['median_s']:.3f} s (min {f['min_s']:.3f}): fused/unfused {f['median_s'] / u['median_s']:.3f} "
              f"(min {f['min_s'] / u['min_s']:.3f}); max |logit difference| {f['max_abs_logit_diff']:.2e}.\n")
    print("GPU: benchmarks/gpu_check.sh (benchmarks/gpu_suite.py) measures training and inference throughput.")


if __name__ == "__main__":
    main()
