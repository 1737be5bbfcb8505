"""FEIR DCT bands at 512×512×3: full matrix-product DCT vs scipy's FFT DCT vs our low-rank projector form.

All three compute both bands (high and the released l_shape low band) WITHOUT the min-max normalisation, which is
the same for all of them; one extra row times ``dct_bands`` as the model calls it (normalised). Methods run
interleaved, round after round, in one process with the same thread count, so their ratios are comparable even on
a shared machine; the table gives the median and the minimum over rounds. The goal is judged on the minimum (the
least-disturbed round, timeit's convention): on a machine whose other jobs oversubscribe the cores, a 2-thread
torch op waits for a descheduled worker thread and medians measure the neighbours, not the code. The load average
is printed with the table; rerun on a quiet machine for medians that mean something.

    python benchmarks/bench_dct.py [--size 512] [--channels 3] [--threads 2] [--rounds 30]

Goal (MITL.md): ours ≥ 8× faster than the full matrix DCT, equal to scipy's within 1e-6 (float64) and 1e-3 of
the band's range (float32).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy
import torch
from scipy import fft

from morphfuse import dct


def full_matrix(x: torch.Tensor, d_h: torch.Tensor, d_w: torch.Tensor, keep_h: torch.Tensor, keep_l: torch.Tensor):
    """X = D_H x D_Wᵀ, mask, x' = D_Hᵀ X' D_W for each band."""
    X = d_h @ x @ d_w.T
    return d_h.T @ (X * keep_h) @ d_w, d_h.T @ (X * keep_l) @ d_w


def scipy_fft(x: np.ndarray, keep_h: np.ndarray, keep_l: np.ndarray, workers: int):
    X = fft.dctn(x, type=2, norm="ortho", axes=(-2, -1), workers=workers)
    return (fft.idctn(X * keep_h, type=2, norm="ortho", axes=(-2, -1), workers=workers),
            fft.idctn(X * keep_l, type=2, norm="ortho", axes=(-2, -1), workers=workers))


def masks(h: int, w: int, low_band: str) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    keep_h = ~((rows < dct.high_cut(h)) & (cols < dct.high_cut(w)))
    r, c = rows < dct.low_cut(h), cols < dct.low_cut(w)
    keep_l = (r | c) if low_band == "l_shape" else (r & c)
    return keep_h.astype(np.float64), keep_l.astype(np.float64)


def bench(size: int, channels: int, threads: int, rounds: int, low_band: str, seed: int = 0) -> list[dict]:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    x64 = rng.standard_normal((1, channels, size, size)) + np.linspace(-1, 1, size)  # ~ an ImageNet-normalised image
    keep_h64, keep_l64 = masks(size, size, low_band)
    ref_h, ref_l = scipy_fft(x64, keep_h64, keep_l64, threads)  # float64 reference
    rows = []
    for dtype in (torch.float64, torch.float32):
        npd = np.float64 if dtype == torch.float64 else np.float32
        xt = torch.from_numpy(x64.astype(npd))
        xn = x64.astype(npd)
        d = torch.tensor(dct.dct_matrix(size), dtype=dtype)
        kh, kl = torch.tensor(keep_h64, dtype=dtype), torch.tensor(keep_l64, dtype=dtype)
        kh_n, kl_n = keep_h64.astype(npd), keep_l64.astype(npd)
        methods = {
            "full matrix DCT (torch)": lambda: full_matrix(xt, d, d, kh, kl),
            "scipy FFT DCT": lambda: scipy_fft(xn, kh_n, kl_n, threads),
            "low-rank, ours (torch)": lambda: dct.dct_bands(xt, low_band, normalize=False),
            "low-rank, ours (numpy)": lambda: dct.dct_bands_np(xn, low_band, normalize=False),
            "ours + min-max (dct_bands as called)": lambda: dct.dct_bands(xt, low_band),
        }
        errors = {}
        for name, f in methods.items():
            h, lo = (np.asarray(v) for v in f())
            if "min-max" in name:
                errors[name] = float("nan")
                continue
            err = max(np.abs(h - ref_h).max(), np.abs(lo - ref_l).max())
            errors[name] = err if dtype == torch.float64 else err / max(np.abs(ref_h).max(), np.abs(ref_l).max())
        times = {name: [] for name in methods}
        for _ in range(rounds):
            for name, f in methods.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        full_med = np.median(times["full matrix DCT (torch)"])
        full_min = np.min(times["full matrix DCT (torch)"])
        for name in methods:
            t = np.asarray(times[name])
            rows.append({"dtype": str(dtype).replace("torch.", ""), "method": name, "median_ms": 1e3 * np.median(t),
                         "min_ms": 1e3 * t.min(), "x_full_median": full_med / np.median(t),
                         "x_full_min": full_min / t.min(), "error": errors[name]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--low-band", choices=dct.LOW_BANDS, default="l_shape")
    args = ap.parse_args()
    rows = bench(args.size, args.channels, args.threads, args.rounds, args.low_band)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"DCT bands, {args.size}×{args.size}×{args.channels}, both bands (low = {args.low_band}), "
          f"{args.threads} threads, {args.rounds} interleaved rounds; torch {torch.__version__}, scipy "
          f"{scipy.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at the end\n")
    print("| dtype | method | median ms | min ms | speed-up vs full (median) | (min) | max error vs scipy float64 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        err = "–" if np.isnan(r["error"]) else (f"{r['error']:.1e} abs" if r["dtype"] == "float64"
                                                 else f"{r['error']:.1e} rel")
        print(f"| {r['dtype']} | {r['method']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
              f"{r['x_full_median']:.1f}× | {r['x_full_min']:.1f}× | {err} |")
    print()
    ok = True
    for dt, tol in (("float64", 1e-6), ("float32", 1e-3)):
        ours = next(r for r in rows if r["dtype"] == dt and r["method"] == "low-rank, ours (torch)")
        fast = ours["x_full_min"] >= 8
        exact = ours["error"] <= tol
        ok &= fast and exact
        print(f"{dt}: ours {ours['x_full_min']:.1f}× faster than the full matrix DCT on the minimum "
              f"({ours['x_full_median']:.1f}× on the median) (goal ≥ 8×: {'met' if fast else 'NOT met'}), "
              f"error {ours['error']:.1e} (goal ≤ {tol:g}: {'met' if exact else 'NOT met'})")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
