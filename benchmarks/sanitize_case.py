"""One small case of every CUDA op, for `compute-sanitizer --tool memcheck` (gpu_check.sh)."""

import torch

import dsv3_kernels as dk

x = torch.randn(67, 384, device="cuda", dtype=torch.bfloat16)
w = torch.randn(2112 + 5, 384, device="cuda")
for backend in dk.available_backends("fp8_gemm", "cuda"):
    if backend == "torch":
        continue
    a, a_s = dk.act_quant(x, backend=backend)
    b, b_s = dk.weight_quant(w, backend=backend)
    dk.weight_dequant(b, b_s, backend=backend)
    for m in (1, 67):
        dk.fp8_gemm(a[:m].contiguous(), a_s[:m].contiguous(), b, b_s, backend=backend)
    torch.cuda.synchronize()
    print(f"{backend}: ok")

# MLA decode: varlen with empty and partial blocks, causal s_q = 2, several splits.
import math  # noqa: E402

seqlens = torch.tensor([0, 1, 65, 700], dtype=torch.int32, device="cuda")
block_table = torch.randperm(4 * 11, dtype=torch.int32, device="cuda").view(4, 11)
kv_cache = torch.randn(4 * 11, 64, 576, device="cuda", dtype=torch.bfloat16)
q = torch.randn(4, 2, 16, 576, device="cuda", dtype=torch.bfloat16)
for backend in dk.available_backends("mla_decode", "cuda"):
    if backend == "torch":
        continue
    for splits in (0, 1, 5):
        dk.mla_decode(q, kv_cache, block_table, seqlens, 192 ** -0.5, True, splits, backend=backend)
    slots = torch.tensor([3, -1, 64 * 43 + 63], device="cuda")
    dk.mla_cache_write(q[0, 0, :3, :512].contiguous(), q[0, 0, :3, 512:].contiguous(), kv_cache, slots,
                       backend=backend)
    torch.cuda.synchronize()
    print(f"mla {backend}: ok")

# MoE routing: DeepSeek-V3's gate and a non-power-of-two expert count.
for backend in dk.available_backends("moe_route", "cuda"):
    if backend == "torch":
        continue
    dk.moe_route(torch.randn(37, 256, device="cuda"), torch.randn(256, device="cuda"), 8, 4, 8, 2.5, backend=backend)
    dk.moe_route(torch.randn(5, 72, device="cuda"), None, 3, 2, 6, 1.0, "softmax", False, backend=backend)
    torch.cuda.synchronize()
    print(f"moe_route {backend}: ok")

# The routed experts: E=256 with most experts empty, odd sizes, padding (align 16), FP8 and bf16.
from dsv3_kernels.reference import fp8 as ref_fp8  # noqa: E402

ids = torch.stack([torch.randperm(9, device="cuda")[:8] for _ in range(37)]).to(torch.int32)
ids[5, 3] = 256  # a bad id: not routed, never an out-of-bounds access
weights = torch.rand(37, 8, device="cuda")
hidden = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
w13 = torch.randn(256, 256, 256, device="cuda", dtype=torch.bfloat16) / 16
w2 = torch.randn(256, 256, 128, device="cuda", dtype=torch.bfloat16) / 12
q13, s13 = (torch.stack(t) for t in zip(*(ref_fp8.weight_quant(w) for w in w13)))
q2, s2 = (torch.stack(t) for t in zip(*(ref_fp8.weight_quant(w) for w in w2)))
for backend in dk.available_backends("fused_moe", "cuda"):
    if backend == "torch":
        continue
    for align, quant in ((1, False), (16, True)):
        permuted, scale, offsets, inverse = dk.moe_permute(hidden, ids, 256, align, quant, backend=backend)
    gate_up = dk.grouped_gemm(permuted, q13, offsets, scale, s13, backend=backend)
    h = dk.silu_mul(gate_up, backend=backend)
    dk.moe_unpermute(dk.grouped_gemm(h, w2, offsets, backend=backend), weights, inverse, backend=backend)
    dk.fused_moe(hidden, w13, w2, weights, ids, backend=backend)
    dk.fused_moe(hidden, q13, q2, weights, ids, s13, s2, backend=backend)
    torch.cuda.synchronize()
    print(f"moe experts {backend}: ok")

# rms_norm: a block per row (D = 7168) and a warp per row (D = 257: scalar loads, D = 512: vectors),
# with and without the residual, and an unaligned view (the scalar path).
for backend in dk.available_backends("rms_norm", "cuda"):
    if backend == "torch":
        continue
    for d in (7168, 257, 512):
        x = torch.randn(5, d, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d, device="cuda", dtype=torch.bfloat16)
        dk.rms_norm(x, w, backend=backend)
        dk.rms_norm(x, w, 1e-6, torch.randn_like(x), backend=backend)
    flat = torch.randn(2 * 512 + 1, device="cuda")
    dk.rms_norm(flat[1:].view(2, 512), flat[:512], backend=backend)
    torch.cuda.synchronize()
    print(f"rms_norm {backend}: ok")
