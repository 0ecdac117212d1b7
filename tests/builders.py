"""Inputs that more than one test module builds: routing ids, expert weights, MLA caches, the
cases several ops' tests share (tests/op_samples.py builds the opcheck samples from these too).
A builder that one module alone uses stays in that module.

    from builders import make_cache, make_experts, make_ids

(pytest puts this folder on sys.path, as it does for conftest.py.)"""

import math

import pytest
import torch

from dsv3_kernels import dispatch
from dsv3_kernels.reference import fp8 as ref_fp8
from dsv3_kernels.reference import mla as ref_mla
from helpers import native_only

FP8 = torch.float8_e4m3fn


# ---- MoE: routes, experts, comparisons ----

def make_ids(t, topk, e, kind="random", generator=None):
    """int32 [T, topk] expert ids, distinct per token (as moe_route gives)."""
    if kind == "one_expert":  # every token's first choice is expert e-1; the rest spread out
        ids = torch.stack([torch.randperm(e - 1)[: topk - 1] for _ in range(t)]) if t else torch.empty(0, topk - 1)
        return torch.cat([torch.full((t, 1), e - 1), ids.long()], 1).to(torch.int32)
    if kind == "few_experts":  # most experts empty: every token picks among the first topk+1 experts
        return torch.stack([torch.randperm(topk + 1)[:topk] for _ in range(t)]).to(torch.int32) if t else \
            torch.empty(t, topk, dtype=torch.int32)
    return torch.rand(t, e).argsort(1)[:, :topk].to(torch.int32)


def drop_choices(ids, generator=None):
    """ids with about a third of the choices replaced by -1, and one token with all of them."""
    ids = ids.clone()
    ids[torch.rand(ids.shape, generator=generator) < 0.35] = -1
    if ids.shape[0] > 2:
        ids[2] = -1
    return ids


def make_routes(t, topk, e, generator=None):
    """ids (distinct per token, some -1, one token entirely -1) and positive weights."""
    ids = make_ids(t, topk, e)
    ids[torch.rand(ids.shape) < 0.15] = -1
    if t > 3:
        ids[3] = -1
    return ids, torch.rand(t, topk)


# moe_permute's routings, which moe_unpermute's tests reuse.
PERMUTE_CASES = [  # (T, topk, E, kind)
    (0, 8, 256, "random"), (1, 8, 256, "random"), (7, 8, 256, "random"), native_only((1000, 8, 256, "random")),
    native_only((300, 8, 256, "one_expert")), native_only((300, 8, 256, "few_experts")),
    (37, 6, 64, "random"), (5, 1, 3, "random"),
    (100, 8, 32, "random"), (40, 8, 32, "one_expert"), (40, 8, 32, "few_experts"),
]


def quant_experts(w):
    """[E, N, K] -> (e4m3 [E, N, K], weight_scale_inv fp32 [E, N/128, K/128])."""
    pairs = [ref_fp8.weight_quant(x) for x in w]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def make_experts(e, d, i, fp8):
    w13 = torch.randn(e, 2 * i, d, dtype=torch.bfloat16) / d ** 0.5
    w2 = torch.randn(e, d, i, dtype=torch.bfloat16) / i ** 0.5
    if not fp8:
        return w13, w2, None, None
    (w13, s13), (w2, s2) = quant_experts(w13), quant_experts(w2)
    return w13, w2, s13, s2


def poison(t, index):
    """t[index] = NaN (for e4m3fn through its bits: 0xFF is NaN, and masked_fill has no fp8 kernel)."""
    (t.view(torch.uint8) if t.dtype == FP8 else t)[index] = 0xFF if t.dtype == FP8 else float("nan")


def _bits(x):
    return x.view(torch.uint8) if x.dtype == FP8 else x


def assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(_bits(got.cpu()), _bits(want.cpu()))


# ---- MLA: paged caches and cache writes ----

# DeepSeek-V3: 192**-0.5 * mscale**2 with mscale = 0.1 * ln(40) + 1.
SCALE = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
HUGE_BLOCK = 2 ** 30

# s_q x H for every row count 1-18 and 33: a request's s_q * H rows share the key head, and the
# CPU kernels take them in work items of 16, scores in blocks of 4 rows (the last 1-3 apart), the
# softmax in vectors of 8 (avx2) or 16 rows; the GPU kernels in tiles of 64.
ROW_SHAPES = [(1, 1), (2, 1), (3, 1), (4, 1), (1, 5), (2, 3), (1, 7), (4, 2), (3, 3), (2, 5), (1, 11), (4, 3),
              (1, 13), (2, 7), (3, 5), (4, 4), (1, 17), (2, 9), (3, 11)]
# The row-count tests' keys, in blocks of ROW_BLOCK_SIZE: tiny and odd lengths (the tails of key
# tiles and blocks; causal rows that see no key).
ROW_SEQLENS, ROW_BLOCK_SIZE = [0, 1, 2, 3, 9, 17, 70], 16


def row_dtype(s_q, h):
    """The q dtype of a ROW_SHAPES case: it cycles with the row count, so each dtype meets many."""
    return (torch.bfloat16, torch.float16, torch.float32)[(s_q * h) % 3]


def cache_write_cases(test):
    """Parametrizes an mla_cache_write test (of the bf16 or the FP8 cache) with token counts, input
    dtypes and the fused norm + rope."""
    test = pytest.mark.parametrize("t", [1, 37])(test)
    test = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])(test)
    test = pytest.mark.parametrize("fused", [False, True], ids=["plain", "norm+rope"])(test)
    return pytest.mark.ops("mla_cache_write")(test)


def cache_write_results(backend, args):
    """(got, want) of a cache-write case: the cache (args[2]) as `backend`'s mla_cache_write leaves
    it, and as the reference leaves a CPU copy of it."""
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    want = cpu_args[2].clone()
    ref_mla.mla_cache_write(*cpu_args[:2], want, *cpu_args[3:])
    dispatch.implementation("mla_cache_write", backend)(*args)
    return args[2].cpu(), want


def row_count_cases(test):
    """Parametrizes an mla_decode row-count test (over the bf16 or the FP8 cache) with every
    ROW_SHAPES (s_q, h) and causal."""
    test = pytest.mark.parametrize("s_q, h", [native_only(*shape) for shape in ROW_SHAPES])(test)
    test = pytest.mark.parametrize("causal", [False, True])(test)
    return pytest.mark.ops("mla_decode")(test)


def make_cache(seqlens, block_size, dtype, device, s_q=1, h=16, extra_blocks=3, extra_table=2):
    """Random q and a paged cache for the given lengths, built the way a serving engine leaves it:
    shuffled block tables, unused slots and padding blocks full of NaN (a read past a sequence's
    end shows), unused block-table entries set to a huge index (reading one would fault or show)."""
    b = len(seqlens)
    need = [-(-n // block_size) for n in seqlens]
    max_blocks = max(need + [1]) + extra_table
    num_blocks = sum(need) + extra_blocks
    kv_cache = torch.full((num_blocks, block_size, ref_mla.HEAD_DIM), float("nan"), dtype=dtype)
    block_table = torch.full((b, max_blocks), HUGE_BLOCK, dtype=torch.int32)
    perm = torch.randperm(num_blocks).tolist()
    for i, n in enumerate(seqlens):
        ids = [perm.pop() for _ in range(need[i])]
        block_table[i, : need[i]] = torch.tensor(ids, dtype=torch.int32)
        if n:
            flat = torch.randn(need[i] * block_size, ref_mla.HEAD_DIM).to(dtype)
            flat[n:] = float("nan")  # the tail of the last block is unused
            kv_cache[ids] = flat.view(need[i], block_size, ref_mla.HEAD_DIM)
    q = torch.randn(b, s_q, h, ref_mla.HEAD_DIM).to(dtype)
    seqlens_t = torch.tensor(seqlens, dtype=torch.int32)
    return [t.to(device) for t in (q, kv_cache, block_table, seqlens_t)]


def make_cache_write_case(t, dtype, device, fused):
    """mla_cache_write's arguments: t tokens into a NaN cache of kv_c's dtype, every fourth slot -1
    (a padding token, skipped); fused adds the norm weight and the RoPE tables."""
    num_blocks, block_size = 5, 16
    kv_cache = torch.full((num_blocks, block_size, 576), float("nan"), dtype=dtype)
    slots = torch.randperm(num_blocks * block_size)[:t]
    slots[::4] = -1  # padding tokens are skipped
    kv_c, k_pe = torch.randn(t, 512).to(dtype), torch.randn(t, 64).to(dtype)
    extra = [None, 1e-6, None, None]
    if fused:
        angle = torch.rand(t, 32) * 6.3
        extra = [torch.rand(512).to(dtype) + 0.5, 1e-6, torch.cos(angle), torch.sin(angle)]
    tensors = [kv_c, k_pe, kv_cache, slots]
    return [x.to(device) if isinstance(x, torch.Tensor) else x for x in tensors + extra]


def make_fp8_cache(seqlens, block_size, dtype, device, s_q=1, h=16):
    """q, the FP8 cache (uint8), block_table, seqlens, and the bf16 cache the FP8 one quantizes:
    make_cache's cache, each token scaled by 1..4 (varied tile scales), unused slots 0xFF."""
    q, bf16, block_table, seqlens_t = make_cache(seqlens, block_size, torch.bfloat16, "cpu", s_q=s_q, h=h)
    bf16 = (bf16.float() * torch.rand(*bf16.shape[:2], 1).mul(2).exp2()).bfloat16()
    cache = ref_mla.quantize_tokens(bf16[..., :512], bf16[..., 512:])
    cache[bf16[..., 0].isnan()] = 0xFF
    return [t.to(device) for t in (q.to(dtype), cache, block_table, seqlens_t, bf16)]


def make_fp8_cache_write_case(t, dtype, device, fused):
    """make_cache_write_case's write (padding slots, optional norm weight and RoPE) into a poisoned
    FP8 cache, kv_c's tokens scaled by 1..64 so that the tiles' scales differ."""
    kv_c, k_pe, _, slots, *extra = make_cache_write_case(t, dtype, "cpu", fused)
    kv_c = (kv_c.float() * torch.rand(t, 1).mul(6).exp2()).to(dtype)
    cache = torch.full((5, 16, ref_mla.FP8_TOKEN_BYTES), 0xFF, dtype=torch.uint8)
    return [x.to(device) if isinstance(x, torch.Tensor) else x for x in [kv_c, k_pe, cache, slots] + extra]


# ---- rms_norm ----

def make_rms_norm_inputs(shape, dtype, residual, device="cpu", scale=3.0):
    """(x, weight, residual or None) of rms_norm, x and residual of `shape`."""
    x = ((torch.randn(shape) + 0.5) * scale).to(dtype)
    weight = (torch.randn(shape[-1]) * 0.5 + 1).to(dtype)
    res = (torch.randn(shape) * scale).to(dtype) if residual else None
    return x.to(device), weight.to(device), None if res is None else res.to(device)
