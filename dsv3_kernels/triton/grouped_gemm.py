"""Triton grouped (per-expert) GEMM over moe_permute's contiguous layout.

Semantics: dsv3_kernels/reference/moe.py. Importing this module registers the custom op
`dsv3_kernels::grouped_gemm_triton` (registration.py).

Tile schedule: one segment per expert, [offsets[e], offsets[e+1]) with the offsets clamped to
[0, M] (empty where hi <= lo); the output starts as zeros, so rows no segment covers stay 0 however
the offsets are placed (zero segments before offsets[0] and past offsets[E] would overwrite the
rows of an expert whose offsets are out of order). Each segment has cdiv(rows, BLOCK_M) M tiles;
their exclusive prefix (computed on the device by torch, no host sync) maps a program to its
segment. The grid is the shape-only bound cdiv(M, BLOCK_M) + E M tiles (enough for segments that
do not overlap: offsets that decrease into an earlier segment are refused where they are on the
CPU), programs past the last tile run no K step, and an expert with no rows has no tile: it costs
nothing and its weights are never read. Segments need no padding (align 1 works).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ..utils import GEMM_BLOCK, cdiv
from .fp8 import _kernel_dtype
from .. import ops
from .registration import INTERPRETED, custom_op, refuse, wrap_triton

FP8_DTYPE = torch.float8_e4m3fn


@triton.jit
def _grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, seg_lo_ptr, seg_rows_ptr, tile_start_ptr,
                         N, K, E,
                         FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr,
                         IEEE: tl.constexpr):
    """c rows of expert e's segment = a rows @ b[e].T.

    a [M, K] bf16 or e4m3 (as [M, K/128] fp32), b [E, N, K] (bs [E, ceil(N/128), K/128] fp32),
    c [M, N]; float32 a and b (the fp32 fused_moe) multiply in IEEE fp32 (IEEE), not TF32; seg_lo/seg_rows int32 [E], tile_start int32 [E + 1] (exclusive prefix
    of the segments' M tiles). With FP8 each 128-wide K block's product is scaled into the fp32
    total (DeepSeek-V3's promotion).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    idx = tl.arange(0, BLOCK_S)
    starts = tl.load(tile_start_ptr + idx, mask=idx <= E, other=2147483647)
    # No branches around the K loop (Triton pipelines only a loop it sees whole): a program past
    # the last tile lands past the last segment's rows, so all its rows are masked, and runs the
    # loop zero times.
    live = pid_m < tl.load(tile_start_ptr + E)
    seg = tl.minimum(tl.sum((starts <= pid_m).to(tl.int32), 0) - 1, E - 1)
    lo = tl.load(seg_lo_ptr + seg)
    rows = tl.load(seg_rows_ptr + seg)
    local = (pid_m - tl.load(tile_start_ptr + seg)) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = local < rows
    rm = (lo + local).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    expert = seg.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + expert * N * K + rn.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FP8:
        KB = K // BLOCK_K
        as_ptrs = as_ptr + rm * KB
        bs_row = bs_ptr + (expert * tl.cdiv(N, BLOCK_K) + pid_n * BLOCK_N // BLOCK_K) * KB
        for kb in range(0, tl.where(live, KB, 0)):
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=m_mask[:, None], other=0.0)
            b = tl.load(b_ptrs + kb * BLOCK_K, mask=n_mask[:, None], other=0.0)
            a_s = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)
            b_s = tl.load(bs_row + kb)
            # b stays K-major through the transposed view (fp8 wgmma needs both K-major).
            acc += tl.dot(a, tl.trans(b)) * (a_s * b_s)[:, None]
    else:
        for k0 in range(0, tl.where(live, K, 0), BLOCK_K):
            k_mask = (k0 + rk) < K
            a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT_FP32:  # the interpreter's bf16 dot is wrong
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(b))
    c_ptrs = c_ptr + rm[:, None] * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Configs by the mean rows per expert, M / min(E, M) (known from the shapes alone):
# (max mean rows, BLOCK_M, BLOCK_N, num_warps, num_stages). Why:
# - decode (a few rows per expert): bound by reading the experts' weights; 16-row tiles waste no
#   tensor-core work on masked rows and BLOCK_N = 64 doubles the programs over N (mma.sync, fp8
#   widened in registers).
# - up to 64 rows: 64 x 128 tiles, one warpgroup (wgmma).
# - more: 128 x 128 tiles on two warpgroups, 3 stages.
# BLOCK_N <= 128 keeps an FP8 tile inside one 128-row scale block of b.
GEMM_CONFIGS = (
    (16, 16, 64, 4, 4),
    (64, 64, 128, 4, 4),
    (None, 128, 128, 8, 3),
)


def gemm_config(m, num_experts):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for m rows over num_experts experts."""
    mean_rows = m / max(1, min(num_experts, m))
    for max_rows, block_m, block_n, num_warps, num_stages in GEMM_CONFIGS:
        if max_rows is None or mean_rows <= max_rows:
            return block_m, block_n, num_warps, num_stages


def _segments(expert_offsets, m, block_m):
    """(seg_lo, seg_rows, tile_start) int32 on the device, one segment per expert."""
    off = expert_offsets.to(torch.int64).clamp(0, m)
    lo = off[:-1]
    rows = (off[1:] - lo).clamp_min(0)
    tiles = (rows + block_m - 1) // block_m
    tile_start = torch.cat([off.new_zeros(1), tiles.cumsum(0)])
    return lo.to(torch.int32), rows.to(torch.int32), tile_start.to(torch.int32)


def grouped_gemm(a, b, expert_offsets, a_scale, b_scale_inv):
    m, k = a.shape
    e, n, _ = b.shape
    fp8, fp32 = a.dtype == FP8_DTYPE, a.dtype == torch.float32
    out_dtype = torch.float32 if fp32 else torch.bfloat16  # float32 only inside the fp32 fused_moe
    c = torch.zeros((m, n), dtype=_kernel_dtype(out_dtype), device=a.device)
    if m > 0 and e > 0:
        block_m, block_n, num_warps, num_stages = gemm_config(m, e)
        seg_lo, seg_rows, tile_start = _segments(expert_offsets, m, block_m)
        grid = (cdiv(m, block_m) + e, cdiv(n, block_n))
        wrap_triton(_grouped_gemm_kernel)[grid](
            a, a_scale if fp8 else a, b, b_scale_inv if fp8 else b, c, seg_lo, seg_rows, tile_start,
            n, k, e, FP8=fp8, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=GEMM_BLOCK if fp8 else 64, BLOCK_S=triton.next_power_of_2(e + 1),
            DOT_FP32=INTERPRETED, IEEE=fp32, num_warps=num_warps, num_stages=num_stages)
    return c.to(out_dtype)


@custom_op("dsv3_kernels::grouped_gemm_triton")
def _grouped_gemm_op(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor,
                     a_scale: Optional[torch.Tensor], b_scale_inv: Optional[torch.Tensor]) -> torch.Tensor:
    refuse("grouped_gemm_triton", ops.check_grouped_gemm, a, b, expert_offsets, a_scale, b_scale_inv)
    return grouped_gemm(a, b, expert_offsets, a_scale, b_scale_inv)
