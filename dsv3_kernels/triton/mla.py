"""Triton kernels of MLA decode and the latent-cache write.

Semantics are those of dsv3_kernels/reference/mla.py (causal rule, empty requests, invalid
metadata -> NaN without out-of-bounds reads). Importing this module registers the custom ops
`dsv3_kernels::mla_decode_triton` and `dsv3_kernels::mla_cache_write_triton` with the schema
arguments of csrc/registration.cpp through triton/registration.py (triton_op on a GPU, an opaque
custom op under TRITON_INTERPRET=1, where the kernels also take INTERPRET to round to bf16
correctly and to do their dots in fp32).

mla_decode runs in two stages (split-KV, like FlashMLA and the Triton MLA decodes of vLLM/SGLang):
1. `_mla_decode_split_kernel`, grid (row blocks, splits, B): the s_q * H query rows of a request
   are the M rows of the tile (one latent key serves every head: MQA), BLOCK_R of them per
   program; each program walks one split of the request's key tiles, gathering every key's page
   through block_table, with an fp32 online softmax in base 2, and writes its normalized partial
   output and log2-sum-exp to an fp32 workspace.
2. `_mla_decode_merge_kernel`, grid (row blocks, B): merges the splits by their LSE and writes
   out (q's dtype) and lse ([B, H, s_q], natural log).

The FP8 cache (uint8 [num_blocks, block_size, 656], FlashMLA's layout: reference/mla.py) is read
by the same split kernel (FP8=True, own configs: FP8_DECODE_CONFIGS): each key tile's e4m3 bytes
are converted to fp32 (the hardware conversion on a GPU; decoded on the bits in the interpreter,
whose fp8 casts are unreliable; both exact) and multiplied by their tile's scale; the dots then
take them in q's dtype (exact for bf16, the scales being powers of two) or in fp32 (fp16/fp32 q).
The cache write quantizes on the bits (round to nearest even), so its bytes equal the reference's
on the GPU and in the interpreter.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.mla import KV_LORA_RANK
from ..utils import cdiv
from .registration import INTERPRETED, custom_op, wrap_triton

LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x cast to DTYPE, rounding to nearest even. The interpreter's fp32 -> bf16 cast
    truncates, so there the rounding is done on the bits first (the cast is then exact)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000 as int32
        return bits.to(tl.float32, bitcast=True).to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b with an fp32 result, a cast to b's dtype. FP32_DOT: exact fp32 products instead (fp32
    inputs must not go through tf32; the interpreter's bf16 dot is wrong, so there every dot is
    done in fp32)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _e4m3_to_f32(b):
    """uint8 e4m3 bits -> their value in fp32, exactly (normal: the bits moved into fp32's
    exponent and mantissa; subnormal: m * 2^-9)."""
    x = b.to(tl.int32)
    e = (x >> 3) & 15
    m = x & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((x & 0x80) != 0, -v, v)


@triton.jit
def _f32_to_e4m3(v):
    """fp32 v with |v| <= 448 -> uint8 e4m3 bits, rounded to nearest even. Normal results round the
    fp32 mantissa to 3 bits (a carry moves into the exponent); below 2^-6 the subnormal code is
    round(|v| * 2^9), by the 2^23 trick."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    return (code | ((v.to(tl.int32, bitcast=True) >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _mla_decode_split_kernel(q_ptr, kv_ptr, bt_ptr, seqlens_ptr, o_part_ptr, lse_part_ptr,
                             qk_scale, S_Q, H, NUM_BLOCKS, MAX_BLOCKS, NUM_SPLITS, BLOCK_SIZE,
                             CAUSAL, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                             FP32_DOT: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """Partial attention of BLOCK_R query rows (row = s * H + h) of request b over split `split`
    of its keys. qk_scale = softmax_scale * log2(e). The page size and `causal` are runtime
    arguments (a division and a select per key tile), so one compiled kernel per dtype serves them
    all.

    Writes o_part [B, NUM_SPLITS, S_Q * H, 512] (the split's softmax-normalized output, 0 where
    the rows see none of its keys) and lse_part [B, NUM_SPLITS, S_Q * H] (log2-sum-exp, -inf for
    no key, NaN when the request's metadata is invalid).
    """
    DV: tl.constexpr = 512
    DR: tl.constexpr = 64
    D: tl.constexpr = DV + DR
    # Grid (row blocks, splits, B): the row blocks that read the same key tiles run together.
    b = tl.program_id(2)
    split = tl.program_id(1)
    n_rows = S_Q * H
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    dv = tl.arange(0, DV)
    dr = tl.arange(0, DR)

    q_row = (b * n_rows + rows).to(tl.int64) * D
    q_nope = tl.load(q_ptr + q_row[:, None] + dv[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_ptr + q_row[:, None] + DV + dr[None, :], mask=row_ok[:, None], other=0.0)

    seqlen = tl.load(seqlens_ptr + b)
    len_ok = (seqlen >= 0) & (seqlen <= MAX_BLOCKS * BLOCK_SIZE)
    kv_len = tl.where(len_ok, seqlen, 0)  # an invalid length reads nothing
    # causal: new token s sees keys 0 .. seqlen - s_q + s; else all of them
    last_key = tl.where(CAUSAL, kv_len - S_Q + rows // H, kv_len - 1)

    # Split `split` takes an equal share of the request's own key tiles (its length is read
    # here, so the host never needs it).
    tiles_per_split = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, kv_len)

    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, DV], dtype=tl.float32)
    n_bad = tl.zeros([BLOCK_N], dtype=tl.int32)  # per lane: keys whose block is outside the cache
    bt_row = bt_ptr + b.to(tl.int64) * MAX_BLOCKS
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        in_len = keys < kv_len
        # Per-key page gather: a tile may span several pages (block_size < BLOCK_N) or part of one.
        blk = tl.load(bt_row + keys // BLOCK_SIZE, mask=in_len, other=0)
        blk_ok = (blk >= 0) & (blk < NUM_BLOCKS)
        n_bad += (in_len & ~blk_ok).to(tl.int32)
        kv_ok = in_len & blk_ok
        slot = blk.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE
        # other=0: slots past the length hold garbage (NaN in the tests), and 0 * NaN = NaN.
        if FP8:
            row = kv_ptr + slot * 656  # bytes: e4m3 [512] | fp32 scales [4] | bf16 k_pe [64]
            e4m3 = tl.load(row[:, None] + dv[None, :], mask=kv_ok[:, None], other=0)
            if INTERPRET:
                k_nope = _e4m3_to_f32(e4m3)
            else:  # the hardware conversion (exact)
                k_nope = e4m3.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            # Each column's tile scale by selects: a gather or a reshape of the tile costs registers.
            scales = (row + DV).to(tl.pointer_type(tl.float32))
            s0 = tl.load(scales, mask=kv_ok, other=0.0)[:, None]
            s1 = tl.load(scales + 1, mask=kv_ok, other=0.0)[:, None]
            s2 = tl.load(scales + 2, mask=kv_ok, other=0.0)[:, None]
            s3 = tl.load(scales + 3, mask=kv_ok, other=0.0)[:, None]
            col = dv[None, :]
            k_nope *= tl.where(col < 256, tl.where(col < 128, s0, s1), tl.where(col < 384, s2, s3))
            k_pe = tl.load((row + DV + 16).to(tl.pointer_type(tl.bfloat16))[:, None] + dr[None, :],
                           mask=kv_ok[:, None], other=0.0)
            if not FP32_DOT:  # bf16 q: exact (e4m3 times a power of two)
                k_nope = k_nope.to(q_nope.dtype)
        else:
            kv_row = slot * D
            k_nope = tl.load(kv_ptr + kv_row[:, None] + dv[None, :], mask=kv_ok[:, None], other=0.0)
            k_pe = tl.load(kv_ptr + kv_row[:, None] + DV + dr[None, :], mask=kv_ok[:, None], other=0.0)

        s = (_dot(q_nope, tl.trans(k_nope), FP32_DOT) + _dot(q_pe, tl.trans(k_pe), FP32_DOT)) * qk_scale
        visible = kv_ok[None, :] & (keys[None, :] <= last_key[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Rows that have seen no key yet keep m = -inf: subtract 0 so that p = 0, not NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_base)
        p = tl.exp2(s - m_base[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, k_nope, FP32_DOT)
        m = m_new

    seen = l > 0
    o = tl.div_rn(acc, tl.where(seen, l, 1.0)[:, None])
    lse2 = tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("-inf"))
    # A needed block outside the cache is caught by the split holding it; the merge spreads
    # the NaN to the whole request.
    lse2 = tl.where(len_ok & (tl.max(n_bad, axis=0) == 0), lse2, float("nan"))
    part = (b * NUM_SPLITS + split) * n_rows + rows
    tl.store(o_part_ptr + part.to(tl.int64)[:, None] * DV + dv[None, :], o, mask=row_ok[:, None])
    tl.store(lse_part_ptr + part, lse2, mask=row_ok)


@triton.jit
def _mla_decode_merge_kernel(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, S_Q, H, NUM_SPLITS,
                             BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    """out [B, S_Q, H, 512] and lse [B, H, S_Q] of BLOCK_R rows of request b from the splits'
    partials: weights 2^(lse_i - lse), NaN if any split saw invalid metadata."""
    DV: tl.constexpr = 512
    b = tl.program_id(1)
    n_rows = S_Q * H
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    dv = tl.arange(0, DV)

    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, DV], dtype=tl.float32)
    n_bad = tl.zeros([BLOCK_R], dtype=tl.int32)
    for i in range(NUM_SPLITS):
        part = (b * NUM_SPLITS + i) * n_rows + rows
        lse_i = tl.load(lse_part_ptr + part, mask=row_ok, other=float("-inf"))
        is_nan = lse_i != lse_i
        n_bad += is_nan.to(tl.int32)
        lse_i = tl.where(is_nan, float("-inf"), lse_i)
        o_i = tl.load(o_part_ptr + part.to(tl.int64)[:, None] * DV + dv[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m, lse_i)
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_base)
        w = tl.exp2(lse_i - m_base)
        l = l * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_i
        m = m_new

    seen = l > 0
    bad = n_bad > 0
    o = tl.where(bad[:, None], float("nan"), tl.div_rn(acc, tl.where(seen, l, 1.0)[:, None]))
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, l, 1.0))) * 0.6931471805599453, float("-inf"))
    lse = tl.where(bad, float("nan"), lse)
    out_row = (b * n_rows + rows).to(tl.int64) * DV
    tl.store(out_ptr + out_row[:, None] + dv[None, :], _to(o, out_ptr.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None])
    # row = s * H + h goes to lse[b, h, s]
    tl.store(lse_ptr + b * n_rows + (rows % H) * S_Q + rows // H, lse, mask=row_ok)


@triton.jit
def _mla_cache_write_kernel(kv_c_ptr, k_pe_ptr, cache_ptr, slot_ptr, w_ptr, cos_ptr, sin_ptr,
                            eps, CAPACITY, NORM: tl.constexpr, ROPE: tl.constexpr,
                            INTERPRET: tl.constexpr, FP8: tl.constexpr):
    """Token t: cache[slot] = (RMSNorm(kv_c[t]) * w if NORM else kv_c[t]) | (RoPE(k_pe[t]) if ROPE
    else k_pe[t]); slots < 0 (padding) and past the cache are skipped. The roundings are the
    reference's: normed to kv_c's dtype, the product to torch's promoted dtype, then the cache's.
    FP8: the 656-byte token instead (reference.mla.quantize_tokens)."""
    DV: tl.constexpr = 512
    HALF_R: tl.constexpr = 32
    D: tl.constexpr = 656 if FP8 else 576
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    ok = (slot >= 0) & (slot < CAPACITY)
    row = cache_ptr + tl.where(ok, slot, 0) * D

    kv_ty = kv_c_ptr.dtype.element_ty
    cache_ty = cache_ptr.dtype.element_ty
    dv = tl.arange(0, DV)
    x = tl.load(kv_c_ptr + t * DV + dv).to(tl.float32)
    if NORM:
        inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=0) * (1.0 / DV) + eps)  # / 512 is exact
        normed = _to(x * inv_rms, kv_ty, INTERPRET).to(tl.float32)
        x = normed * tl.load(w_ptr + dv).to(tl.float32)
        if w_ptr.dtype.element_ty == kv_ty:  # else torch promotes the product to fp32
            x = _to(x, kv_ty, INTERPRET).to(tl.float32)
    if FP8:
        # Per 128-value tile: scale = max(amax / 448, 1e-4) rounded up to a power of two on the
        # bits; x / scale is then exact (div_rn: IEEE division on the GPU too).
        tiles = tl.reshape(x, (4, 128))
        s = tl.maximum(tl.div_rn(tl.max(tl.abs(tiles), axis=1), 448.0), 1e-4)
        scale = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & -8388608).to(tl.float32, bitcast=True)
        e4m3 = _f32_to_e4m3(tl.reshape(tl.div_rn(tiles, scale[:, None]), (DV,)))
        tl.store(row + dv, e4m3, mask=ok)
        tl.store((row + DV).to(tl.pointer_type(tl.float32)) + tl.arange(0, 4), scale, mask=ok)
        pe_row = (row + DV + 16).to(tl.pointer_type(tl.bfloat16))
        pe_ty = tl.bfloat16
    else:
        tl.store(row + dv, _to(x, cache_ty, INTERPRET), mask=ok)
        pe_row = row + DV
        pe_ty = cache_ty

    i = tl.arange(0, HALF_R)
    x0 = tl.load(k_pe_ptr + t * (2 * HALF_R) + 2 * i).to(tl.float32)
    x1 = tl.load(k_pe_ptr + t * (2 * HALF_R) + 2 * i + 1).to(tl.float32)
    if ROPE:  # interleaved pairs: (x0, x1) -> (x0 c - x1 s, x0 s + x1 c)
        c = tl.load(cos_ptr + t * HALF_R + i)
        s = tl.load(sin_ptr + t * HALF_R + i)
        x0, x1 = x0 * c - x1 * s, x0 * s + x1 * c
    tl.store(pe_row + 2 * i, _to(x0, pe_ty, INTERPRET), mask=ok)
    tl.store(pe_row + 2 * i + 1, _to(x1, pe_ty, INTERPRET), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# Decode configs by dtype and number of query rows (s_q * H):
# (max rows, BLOCK_R, BLOCK_N, num_warps, num_stages). Why:
# - The query rows of a request are the M rows of the tile. Up to 16 rows (DeepSeek-V3's 128
#   heads at TP 8, s_q 1): 16-row tiles. More rows: 32-row tiles (128 heads read each key tile
#   4 times, the row blocks of a split running side by side so that the repeats come from L2).
#   Triton emits mma.sync (m16n8k16) for both. 64-row tiles would get Hopper's wgmma, but q
#   (64 x 576) and the 64 x 512 fp32 accumulator leave no room: they spill (fp16, 8 or 16 warps)
#   or sit at 248 of 255 registers (bf16), so that is left to the CUDA kernel.
# - 64-key tiles, 8 warps (4 spill at 16 rows), 3 stages of asynchronous loads, 95-115 KiB of
#   shared memory; no spills: 128 registers at 16 rows and 173-188 at 32 with triton 3.8, 194 and
#   225 with triton 3.6.
# - fp32 has no tensor-core path with fp32 accuracy (no tf32): exact fp32 dots on 16-key tiles,
#   8 warps (128 registers; 4 warps take 220-250).
# Every key is gathered through block_table, so one tile size serves every page size.
_HALF_CONFIGS = ((16, 16, 64, 8, 3), (None, 32, 64, 8, 3))
DECODE_CONFIGS = {
    torch.bfloat16: _HALF_CONFIGS,
    torch.float16: _HALF_CONFIGS,
    torch.float32: ((None, 16, 16, 8, 2),),
}
# Over the FP8 cache, keyed by the dots' dtype (bf16 for bf16 q, fp32 for fp16/fp32 q). 16-row
# tiles only: with 32 rows the dequantized tile pushes the bf16 kernel to 255 registers and spills
# (triton 3.8, sm_90a: 234 registers at 16 rows). The fp32-dot one runs without software
# pipelining: two stages of the byte loads spill (5 KB, ptxas at 32 registers), one takes 128.
FP8_DECODE_CONFIGS = {
    torch.bfloat16: ((None, 16, 64, 8, 3),),
    torch.float32: ((None, 16, 16, 8, 1),),
}
MERGE_BLOCK_R = 16
MERGE_WARPS = 4
CACHE_WRITE_WARPS = 4
# num_splits = 0: enough splits for about one wave of programs on an H100/H200 (132 SMs, each
# holding one or two stage-1 programs by registers and shared memory), but at least
# MIN_TILES_PER_SPLIT key tiles of the longest possible request per split (the block table's
# capacity: a shape, never device data, so the choice is graph-capturable), at most MAX_SPLITS.
TARGET_PROGRAMS = 132
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 32


def decode_config(dtype, n_rows, fp8_cache=False):
    """(BLOCK_R, BLOCK_N, num_warps, num_stages) of the split kernel; dtype: the dots' dtype."""
    for max_rows, *config in (FP8_DECODE_CONFIGS if fp8_cache else DECODE_CONFIGS)[dtype]:
        if max_rows is None or n_rows <= max_rows:
            return tuple(config)
    raise AssertionError("the last config of each dtype takes any number of rows")


def decode_splits(batch, row_blocks, max_tiles):
    """The split count that num_splits = 0 means, from shapes only."""
    want = cdiv(TARGET_PROGRAMS, max(1, batch * row_blocks))
    return max(1, min(want, cdiv(max_tiles, MIN_TILES_PER_SPLIT), MAX_SPLITS))


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------

@custom_op("dsv3_kernels::mla_decode_triton")
def _mla_decode_op(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, softmax_scale: float, causal: bool,
                   num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h, _ = q.shape
    num_blocks, block_size, _ = kv_cache.shape
    n_rows = s_q * h
    fp8 = kv_cache.dtype == torch.uint8
    # The FP8 cache's keys go to the dots in bf16 (exact) or fp32: fp16 q takes the fp32 path
    # (e4m3 * scale may not fit fp16).
    dot_dtype = torch.float32 if fp8 and q.dtype == torch.float16 else q.dtype
    block_r, block_n, num_warps, num_stages = decode_config(dot_dtype, n_rows, fp8)
    row_blocks = cdiv(n_rows, block_r)
    max_blocks = block_table.shape[1]
    max_tiles = max(1, cdiv(max_blocks * block_size, block_n))  # of the longest possible request
    # More splits than max_tiles give the same partition (one tile per split) plus empty splits.
    splits = min(num_splits, max_tiles) if num_splits else decode_splits(b, row_blocks, max_tiles)
    o_part = torch.empty((b, splits, n_rows, KV_LORA_RANK), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((b, splits, n_rows), dtype=torch.float32, device=q.device)
    out = torch.empty((b, s_q, h, KV_LORA_RANK), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    if b > 0:
        fp32_dot = INTERPRETED or dot_dtype == torch.float32
        wrap_triton(_mla_decode_split_kernel)[(row_blocks, splits, b)](
            q, kv_cache, block_table, cache_seqlens, o_part, lse_part, softmax_scale * LOG2E,
            s_q, h, num_blocks, max_blocks, splits, block_size, causal,
            BLOCK_R=block_r, BLOCK_N=block_n, FP32_DOT=fp32_dot, FP8=fp8, INTERPRET=INTERPRETED, num_warps=num_warps,
            num_stages=num_stages)
        wrap_triton(_mla_decode_merge_kernel)[(cdiv(n_rows, MERGE_BLOCK_R), b)](
            o_part, lse_part, out, lse, s_q, h, splits, BLOCK_R=MERGE_BLOCK_R,
            INTERPRET=INTERPRETED, num_warps=MERGE_WARPS)
    return out, lse


@custom_op("dsv3_kernels::mla_cache_write_triton", mutates_args={"kv_cache"})
def _mla_cache_write_op(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, kv_norm_weight: Optional[torch.Tensor], eps: float,
                        rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor]) -> None:
    t = kv_c.shape[0]
    if t == 0:
        return
    norm, rope = kv_norm_weight is not None, rope_cos is not None
    # Unused pointer arguments get kv_c (never read: NORM/ROPE are compile-time switches).
    wrap_triton(_mla_cache_write_kernel)[(t,)](
        kv_c, k_pe, kv_cache, slot_mapping, kv_norm_weight if norm else kv_c,
        rope_cos if rope else kv_c, rope_sin if rope else kv_c, eps,
        kv_cache.shape[0] * kv_cache.shape[1], NORM=norm, ROPE=rope, INTERPRET=INTERPRETED,
        FP8=kv_cache.dtype == torch.uint8, num_warps=CACHE_WRITE_WARPS)
