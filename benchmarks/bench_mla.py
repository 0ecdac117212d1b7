"""MLA absorbed-attention decode over a paged latent cache: every backend side by side with peers.

Providers: the dsv3_kernels backends that run natively on the device (the Triton interpreter on
the CPU is a correctness tool, not timed), each over the bf16 cache and ("<backend>-fp8") over the
FP8 cache (FlashMLA's 656-byte token), plus peers, all in bf16:
  naive  the plain PyTorch absorbed decode: gather the blocks, einsum, softmax, einsum
         (dsv3_kernels.reference.mla.naive_absorbed_decode); "naive-fp8" over the FP8 cache
         gathers the blocks, dequantizes them to bf16 (reference.mla.dequantize_tokens), then the same
  sdpa   F.scaled_dot_product_attention on the gathered cache (one shared 576-wide key head)
Bytes and FLOPs as FlashMLA counts them (roofline.mla_decode_cost: the FP8 rows count 656 cache
bytes per token); page size 64, equal lengths. Baselines: naive in the provider's cache format;
naive-fp8, the FP8 kernels on the GPU and at CPU_FP8_GOAL: the same code over the bf16 cache.
Run: pytest benchmarks/bench_mla.py [--device cpu|cuda]
"""

import math

import pytest
import torch
import torch.nn.functional as F

import dsv3_kernels as dk
import roofline
from conftest import device_of
from dsv3_kernels.reference import mla as ref

SCALE = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2  # DeepSeek-V3's softmax scale
BLOCK = 64
# (batch, s_q, heads, seqlen): FlashMLA's memory-bound (s_q 1, H 16..64) and compute-bound
# (H 128, s_q 2) regimes, plus a long single sequence where only split-KV fills the GPU.
GPU_SHAPES = [(128, 1, h, 4096) for h in (16, 32, 64, 128)] + [
    (128, 2, 128, 4096), (32, 2, 128, 8192), (32, 1, 64, 16384), (1, 1, 128, 32768), (1, 2, 16, 32768)]
CPU_SHAPES = [(8, 1, 16, 4096), (1, 1, 128, 16384), (4, 2, 16, 2048)]
CPU_GOAL = (8, 1, 16, 4096)  # the CPU goal: the C++ kernel >= 3x naive here
# Issue 15's CPU goal: the FP8 cache >= 1.4x the bf16 cache with the cpu kernel (kernels only:
# the peers take seconds at this length).
CPU_FP8_GOAL = (8, 1, 16, 16384)


def _providers(device):
    kernels = [b for b in dk.available_backends("mla_decode", device)
               if b != "torch" and not (b == "triton" and device == "cpu")]
    return kernels + [k + "-fp8" for k in kernels] + ["naive", "naive-fp8", "sdpa"]


def _cases(device):
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    cases = [(*s, p) for s in shapes for p in _providers(device)
             # the CPU's SDPA takes its math path here: seconds per call
             if not (device == "cpu" and p == "sdpa" and s[2] * s[3] > 16 * 4096)]
    if device == "cpu":
        cases.append((*CPU_GOAL, "torch"))  # the fp32 reference, for scale
        cases += [(*CPU_FP8_GOAL, p) for p in ("cpu", "cpu-fp8") if p.split("-")[0] in _providers(device)]
    return cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(device_of(metafunc.config))
        metafunc.parametrize("case", cases, ids=[f"B{b}-sq{s}-H{h}-L{n}-{p}" for b, s, h, n, p in cases])


def _make_args(batch, s_q, heads, seqlen, device, fp8=False):
    nblk = -(-seqlen // BLOCK)
    kv_cache = torch.randn(batch * nblk, BLOCK, 576, device=device, dtype=torch.bfloat16)
    if fp8:
        kv_cache = ref.quantize_tokens(kv_cache[..., :512], kv_cache[..., 512:])
    block_table = torch.randperm(batch * nblk, device=device, dtype=torch.int32).view(batch, nblk)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    q = torch.randn(batch, s_q, heads, 576, device=device, dtype=torch.bfloat16)
    return q, kv_cache, block_table, seqlens


def _sdpa(q, kv_cache, block_table, seqlens):
    b, s_q, h, _ = q.shape
    kv = kv_cache[block_table].view(b, 1, -1, 576)[:, :, : int(seqlens[0])]  # equal lengths here
    mask = None
    if s_q > 1:  # causal among the new tokens, as mla_decode(causal=True)
        mask = ref.causal_mask(s_q, kv.shape[2], True, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kv, kv[..., :512], attn_mask=mask,
                                         scale=SCALE, enable_gqa=True)
    return out.transpose(1, 2)


def test_mla_decode(bench, device, case):
    batch, s_q, heads, seqlen, provider = case
    fp8 = provider.endswith("-fp8")
    flops, nbytes = roofline.mla_decode_cost(batch, s_q, heads, seqlen, token_bytes=ref.FP8_TOKEN_BYTES if fp8 else None)
    causal = s_q > 1
    if provider == "naive":
        def fn(q, c, t, n):
            return ref.naive_absorbed_decode(q, c, t, n, SCALE, causal)
    elif provider == "naive-fp8":
        def fn(q, c, t, n):
            blocks = t[:, : -(-int(n.max()) // BLOCK)]  # the used blocks, in table order
            deq = ref.dequantize_tokens(c[blocks]).to(q.dtype)
            table = torch.arange(blocks.numel(), device=q.device, dtype=torch.int32).view(blocks.shape)
            return ref.naive_absorbed_decode(q, deq.flatten(0, 1), table, n, SCALE, causal)
    elif provider == "sdpa":
        fn = _sdpa
    else:
        backend = provider.split("-")[0]

        def fn(q, c, t, n):
            return dk.mla_decode(q, c, t, n, SCALE, causal, backend=backend)
    shape = (batch, s_q, heads, seqlen)
    if fp8 and (provider == "naive-fp8" or device == "cuda" or shape == CPU_FP8_GOAL):
        baseline = provider.split("-")[0]  # the same code over the bf16 cache
    else:
        baseline = None if shape == CPU_FP8_GOAL else "naive-fp8" if fp8 else "naive"
    bench(fn, lambda: _make_args(batch, s_q, heads, seqlen, device, fp8), op="mla_decode",
          shape=f"B={batch} s_q={s_q} H={heads} L={seqlen}", provider=provider, flops=flops, nbytes=nbytes,
          precision="bf16", baseline=baseline)
