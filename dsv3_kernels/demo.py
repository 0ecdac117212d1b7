"""A short FP8 GEMM demo: DeepSeek-V3's fused q_a/kv_a projection (2112 x 7168) in FP8 on every
backend that runs natively here, its error against the fp32 product, and its speed against bf16
F.linear on the same weight.  Run: python -m dsv3_kernels.demo [--device cpu|cuda]
"""

import argparse
import time

import torch
import torch.nn.functional as F

import dsv3_kernels as dk
from dsv3_kernels.reference.fp8 import calc_diff


def _time(fn, device, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=2112)
    parser.add_argument("--k", type=int, default=7168)
    args = parser.parse_args(argv)
    dev, n, k = args.device, args.n, args.k
    torch.manual_seed(0)

    w = torch.randn(n, k, device=dev) / k**0.5
    wq, ws = dk.weight_quant(w)
    w_bf16 = w.to(torch.bfloat16)
    print(f"dsv3_kernels {dk.__version__}: {dk._native.status()}; torch {torch.__version__}, device {dev}")
    print(f"weight {n}x{k}: e4m3 + 128x128 scales {wq.numel() / 1e6 + ws.numel() * 4e-6:.1f} MB "
          f"(bf16 {w_bf16.numel() * 2e-6:.1f} MB)")
    backends = [b for b in dk.available_backends("fp8_linear", dev) if not (b == "triton" and dev == "cpu")]
    print(f"backends: {backends} (auto picks {dk.dispatch.resolve('fp8_linear', torch.device(dev))!r})")
    print("best of 5 calls on one weight, which may stay in cache; benchmarks/bench_fp8.py reads it from memory\n")
    print(f"{'provider':>14s} {'M':>4s} {'time ms':>9s} {'weight GB/s':>12s} {'calc_diff vs fp32':>18s} {'vs bf16 F.linear':>17s}")
    for m in (1, 16):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        exact = x.float() @ w.T
        t_bf16 = _time(lambda: F.linear(x, w_bf16), dev, 5)
        rows = [("bf16 F.linear", t_bf16, F.linear(x, w_bf16), w_bf16.numel() * 2)]
        for b in backends:
            y = dk.fp8_linear(x, wq, ws, backend=b)
            reps = 1 if b == "torch" else 5
            rows.append((f"fp8 {b}", _time(lambda: dk.fp8_linear(x, wq, ws, backend=b), dev, reps), y, wq.numel()))
        for name, t, y, nbytes in rows:
            print(f"{name:>14s} {m:4d} {t * 1e3:9.2f} {nbytes / t / 1e9:12.1f} {calc_diff(y, exact):18.2e} "
                  f"{t_bf16 / t:16.2f}x")


if __name__ == "__main__":
    main()
