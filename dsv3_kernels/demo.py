"""A short demo of the kernels on DeepSeek-V3's shapes, on every backend that runs natively here:
- FP8: the fused q_a/kv_a projection (2112 x 7168), its error against the fp32 product, and its
  speed against bf16 F.linear on the same weight;
- MLA decode: 16 heads (a tensor-parallel shard of 128) over a paged latent cache of requests of
  different lengths, its error against the fp32 reference and its speed against plain PyTorch;
- MoE: DeepSeek-V3's routing (256 experts, 8 groups, top-8) and the routed experts with FP8
  weights on a layer reduced to fit a small machine (D=1024, I=256 on the CPU), against the
  fp32 per-expert loop and the plain bf16 loop.
Run: python -m dsv3_kernels.demo [--device cpu|cuda]. The model built on these kernels has its own
demo: python -m dsv3.demo.
"""

import math

import argparse
import time

import torch
import torch.nn.functional as F

import dsv3_kernels as dk
from dsv3_kernels.reference import mla as ref_mla
from dsv3_kernels.reference import moe as ref_moe
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

    mla_demo(dev)
    moe_demo(dev)


def mla_demo(dev, heads=16, seqlens=(4096, 1000, 3000, 37, 2048, 4096, 1, 512), block_size=64):
    b = len(seqlens)
    scale = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2  # DeepSeek-V3: 192^-0.5 * mscale^2
    nblk = [-(-n // block_size) for n in seqlens]
    kv_cache = torch.randn(sum(nblk), block_size, ref_mla.HEAD_DIM, device=dev, dtype=torch.bfloat16)
    block_table = torch.zeros(b, max(nblk), dtype=torch.int32, device=dev)
    perm = torch.randperm(sum(nblk), dtype=torch.int32, device=dev).split(nblk)
    for i, ids in enumerate(perm):
        block_table[i, : len(ids)] = ids
    lens = torch.tensor(seqlens, dtype=torch.int32, device=dev)
    q = torch.randn(b, 1, heads, ref_mla.HEAD_DIM, device=dev, dtype=torch.bfloat16)
    print(f"\nMLA decode: {b} requests of lengths {list(seqlens)}, {heads} heads, pages of {block_size}; "
          f"cache {ref_mla.HEAD_DIM * 2} B/token/layer in bf16 (per-head K and V would be {128 * 320 * 2})")
    exact, _ = ref_mla.mla_decode(q.float(), kv_cache.float(), block_table, lens, scale)
    rows = [("naive bf16", lambda: ref_mla.naive_absorbed_decode(q, kv_cache, block_table, lens, scale)[0], 3)]
    for backend in dk.available_backends("mla_decode", dev):
        if backend in ("torch", "triton") and dev == "cpu":
            continue
        rows.append((backend, lambda b=backend: dk.mla_decode(q, kv_cache, block_table, lens, scale, backend=b)[0], 5))
    nbytes = sum(seqlens) * ref_mla.HEAD_DIM * 2
    t_naive = None
    print(f"{'provider':>14s} {'time ms':>9s} {'cache GB/s':>11s} {'max err vs fp32':>16s} {'vs naive':>9s}")
    for name, fn, reps in rows:
        t = _time(fn, dev, reps)
        t_naive = t_naive or t
        err = (fn().float() - exact).abs().max().item()
        print(f"{name:>14s} {t * 1e3:9.2f} {nbytes / t / 1e9:11.1f} {err:16.2e} {t_naive / t:8.2f}x")


def moe_demo(dev, tokens=64, experts=256):
    d, inter = (7168, 2048) if dev == "cuda" else (1024, 256)
    hidden = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16)
    logits = torch.randn(tokens, experts, device=dev)
    bias = torch.randn(experts, device=dev) * 0.1
    w13 = torch.randn(experts, 2 * inter, d, device=dev) / d ** 0.5
    w2 = torch.randn(experts, d, inter, device=dev) / inter ** 0.5
    q13, s13 = (torch.stack(t) for t in zip(*(dk.weight_quant(w) for w in w13)))
    q2, s2 = (torch.stack(t) for t in zip(*(dk.weight_quant(w) for w in w2)))
    weights, ids = dk.moe_route(logits, bias, 8, 4, 8, 2.5)
    touched = ids.unique().numel()
    print(f"\nMoE: {tokens} tokens routed to 8 of {experts} experts (8 groups, 4 kept; {touched} experts used), "
          f"SwiGLU experts D={d}, I={inter}, FP8 weights with 128x128 scales")
    b13, b2 = w13.bfloat16(), w2.bfloat16()
    exact = ref_moe.fused_moe(hidden, b13, b2, weights, ids)
    rows = [("bf16 loop", lambda: ref_moe.naive_fused_moe(hidden, b13, b2, weights, ids), 3),
            ("fp32 reference", lambda: ref_moe.fused_moe(hidden, q13, q2, weights, ids, s13, s2), 1)]
    for backend in dk.available_backends("fused_moe", dev):
        if backend in ("torch", "triton") and dev == "cpu":
            continue
        rows.append((f"fp8 {backend}", lambda b=backend: dk.fused_moe(hidden, q13, q2, weights, ids, s13, s2, backend=b), 5))
    nbytes = touched * 3 * d * inter
    print(f"{'provider':>14s} {'time ms':>9s} {'fp8 weight GB/s':>16s} {'calc_diff vs bf16':>18s} {'vs bf16 loop':>13s}")
    t_loop = None
    for name, fn, reps in rows:
        t = _time(fn, dev, reps)
        t_loop = t_loop or t
        print(f"{name:>14s} {t * 1e3:9.2f} {nbytes / t / 1e9:16.1f} {calc_diff(fn(), exact):18.2e} {t_loop / t:12.2f}x")


if __name__ == "__main__":
    main()
