"""Triton kernels of the FP8 block-scaled family (DeepSeek-V3's recipe).

Semantics are exactly those of dsv3_kernels/reference/fp8.py (bit-identical quantized values and
scales). Each op is a custom op `dsv3_kernels::<name>_triton` taking the schema arguments of
csrc/registration.cpp; importing this module registers them (dispatch does it when triton is chosen).

On a GPU the ops are `torch.library.triton_op`s, so torch.compile traces into them and sees the
kernels. Under TRITON_INTERPRET=1 (CPU tests) see registration.py and `_kernel_dtype` for what
differs and why.
"""

import torch
import triton
import triton.language as tl

from ..utils import GEMM_BLOCK, cdiv
from .registration import INTERPRETED, custom_op, wrap_triton

FP8_MAX = 448.0
AMAX_MIN = 1e-4


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _max_nan(a, b):
    # Elementwise maximum that propagates NaN like torch.amax (tl.maximum would drop it).
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(x, axis: tl.constexpr):
    """max |x| along `axis`, NaN where that slice holds a NaN (torch.amax's rule; tl.max alone may
    drop it). Two built-in reductions (max and sum of |x|) instead of tl.reduce with a NaN-propagating combine: the
    same work on a GPU, and ~35x faster in Triton's interpreter, which runs a custom combine
    function in Python (the quantizing kernels' tests spent most of their time there)."""
    a = tl.abs(x)
    total = tl.sum(a, axis)  # NaN iff the slice holds a NaN: its terms are >= 0, so no inf - inf
    return tl.where(total != total, float("nan"), tl.max(a, axis))


@triton.jit
def _block_scale(amax, UE8M0: tl.constexpr):
    """scale = max(amax, 1e-4) / 448 (IEEE division), optionally rounded up to a power of two."""
    scale = tl.div_rn(tl.maximum(amax, 1e-4, propagate_nan=tl.PropagateNan.ALL), 448.0)
    if UE8M0:
        # Increment the exponent unless the mantissa is zero: exact ceil to a power of two.
        bits = scale.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFFF) & -0x800000  # -0x800000 == ~0x7FFFFF as int32
        scale = bits.to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, R, K, NB,
                      ROWS: tl.constexpr, BS: tl.constexpr, UE8M0: tl.constexpr):
    """One program quantizes ROWS rows x one BS-wide block of x [R, K].

    y [R, K] gets x / scale cast to y's element type (fp8 on GPU), s [R, NB] the scales.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BS + tl.arange(0, BS)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = _block_scale(_amax(x, 1), UE8M0)
    # div_rn: `/` is an approximate division on GPUs; the reference does an IEEE one.
    # The fp32 -> e4m3 conversion rounds to nearest even and saturates (cvt.rn.satfinite).
    y = tl.div_rn(x, scale[:, None])
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * NB + tl.program_id(1), scale, mask=rows < R)


@triton.jit
def _weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, NBK,
                         BS: tl.constexpr, CHUNK: tl.constexpr):
    """One program quantizes one BS x BS block of w [N, K], CHUNK rows at a time (two passes:
    amax, then quantize), so registers hold CHUNK x BS values whatever BS is."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_k * BS + tl.arange(0, BS)
    col_mask = (cols < K)[None, :]
    amax = tl.zeros((CHUNK, BS), dtype=tl.float32)
    for r in range(0, BS, CHUNK):
        rows = pid_n * BS + r + tl.arange(0, CHUNK)
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        w = tl.load(w_ptr + offs, mask=(rows < N)[:, None] & col_mask, other=0.0).to(tl.float32)
        amax = _max_nan(amax, tl.abs(w))
    scale = _block_scale(_amax(_amax(amax, 1), 0), False)
    for r in range(0, BS, CHUNK):
        rows = pid_n * BS + r + tl.arange(0, CHUNK)
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        mask = (rows < N)[:, None] & col_mask
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, tl.div_rn(w, scale).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * NBK + pid_k, scale)


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, NBK, BS: tl.constexpr,
                           TILE_N: tl.constexpr, TILE_K: tl.constexpr):
    """y [N, K] = float(w [N, K] fp8) * s[n // BS, k // BS], one TILE_N x TILE_K tile per program.
    The scale is gathered per element so the tile shape does not depend on BS."""
    rows = tl.program_id(0) * TILE_N + tl.arange(0, TILE_N)
    cols = tl.program_id(1) * TILE_K + tl.arange(0, TILE_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (rows // BS)[:, None] * NBK + (cols // BS)[None, :], mask=mask, other=0.0)
    tl.store(y_ptr + offs, (w * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, KB_PER_SPLIT,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """c[pid_k] [M, N] = sum over the K blocks of split pid_k of (a_kb @ b_kb.T) * a_s * b_s.

    a [M, K] e4m3, as [M, K/128] fp32, b [N, K] e4m3, bs [ceil(N/128), K/128] fp32. Each 128-wide
    K block's product starts from a fresh fp32 accumulator and is scaled into the fp32 total
    (DeepSeek-V3's promotion: Hopper's fp8 MMA accumulates with reduced precision).
    """
    tl.static_assert(BLOCK_K == 128, "one K step is one scale block")
    tl.static_assert(128 % BLOCK_N == 0, "a BLOCK_N tile must lie in one 128-row scale block of b")
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped tile order: GROUP_M consecutive M tiles sweep N together, so their b tiles are
    # reused from L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_m
    pid_n = (pid % tiles_per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    KB = K // BLOCK_K
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    as_ptrs = as_ptr + rm.to(tl.int64) * KB
    bs_row = bs_ptr + (pid_n * BLOCK_N // 128) * KB

    kb_start = pid_k * KB_PER_SPLIT
    kb_end = min(kb_start + KB_PER_SPLIT, KB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        a = tl.load(a_ptrs + kb * BLOCK_K, mask=m_mask[:, None], other=0.0)
        b = tl.load(b_ptrs + kb * BLOCK_K, mask=n_mask[:, None], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)
        b_s = tl.load(bs_row + kb)
        # b is loaded [BLOCK_N, BLOCK_K] with K contiguous; the transposed view keeps it
        # K-major, which Hopper's fp8 wgmma requires of both operands.
        acc += tl.dot(a, tl.trans(b)) * (a_s * b_s)[:, None]

    c_ptrs = c_ptr + pid_k.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

ELEMENTWISE_WARPS = 4
ACT_QUANT_TILE = 2048      # elements per act_quant program: ROWS = ACT_QUANT_TILE // block_size
WEIGHT_QUANT_CHUNK = 4096  # elements per weight_quant pass: CHUNK = that // block_size rows
DEQUANT_TILE = (32, 128)   # weight_dequant tile (TILE_N, TILE_K)

# fp8_gemm configs by M: (max M, BLOCK_M, BLOCK_N, num_warps, num_stages). Why:
# - BLOCK_M >= 64 always: Hopper's fp8 wgmma works on 64-row warpgroup tiles, and with a
#   smaller BLOCK_M Triton falls back to mma.sync on fp16 (fp8 converted in registers).
# - M <= 64 (decode): bound by reading b (N x K bytes); the masked rows of a cost no memory
#   traffic, and BLOCK_N = 64 doubles the number of programs over N (plus split-K below);
#   4 stages of 16 KiB keep b loads in flight.
# - M <= 256: 64 x 128 tiles, one warpgroup.
# - larger M: 128 x 128 tiles on two warpgroups (8 warps: the two fp32 accumulators, the
#   block's partial product and the total, fit without spills), 3 stages of 32 KiB.
GEMM_CONFIGS = (
    (64, 64, 64, 4, 4),
    (256, 64, 128, 4, 4),
    (None, 128, 128, 8, 3),
)
GROUP_M = 8
# Split-K (decode config only, M <= 64): when the output has fewer tiles than about one wave
# of programs on an H100/H200 (132 SMs), K is split in chunks of at least SPLIT_K_MIN_BLOCKS
# blocks; the fp32 partials are summed by torch in a fixed order (deterministic).
SPLIT_K_MAX_M = 64
SPLIT_K_TARGET_PROGRAMS = 132
SPLIT_K_MIN_BLOCKS = 4
SPLIT_K_MAX = 16


def gemm_config(m, n, k):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, split_k) for an [m, k] x [n, k]^T fp8_gemm."""
    for max_m, block_m, block_n, num_warps, num_stages in GEMM_CONFIGS:
        if max_m is None or m <= max_m:
            break
    split_k = 1
    k_blocks = k // GEMM_BLOCK
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    if 0 < m <= SPLIT_K_MAX_M and tiles < SPLIT_K_TARGET_PROGRAMS:
        split_k = max(1, min(SPLIT_K_MAX, SPLIT_K_TARGET_PROGRAMS // tiles,
                             k_blocks // SPLIT_K_MIN_BLOCKS))
        split_k = cdiv(k_blocks, cdiv(k_blocks, split_k))  # no empty split
    return block_m, block_n, num_warps, num_stages, split_k


# ---------------------------------------------------------------------------------------------
# Interpreter mode
# ---------------------------------------------------------------------------------------------

# Under Triton's CPU interpreter (INTERPRETED; see registration.py) the fp32 -> fp8 e4m3 cast is
# wrong (it rounds e.g. 7.99 to 4 and 125.5 to 64) and the fp32 -> bf16 cast truncates, so the
# kernels store fp32 into a staging buffer and torch does the final cast (RNE, saturating, as in
# the reference); on a GPU the cast happens in-kernel.


def _kernel_dtype(dtype):
    """The dtype a kernel stores for a final `dtype` output (see INTERPRETED)."""
    if INTERPRETED and dtype in (torch.float8_e4m3fn, torch.bfloat16):
        return torch.float32
    return dtype


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------

@custom_op("dsv3_kernels::act_quant_triton")
def _act_quant_op(x: torch.Tensor, block_size: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    nb = cdiv(k, block_size)
    r = x.numel() // k if k > 0 else 0  # x is contiguous: the kernel sees it as [r, k]
    y = torch.empty(x.shape, dtype=_kernel_dtype(torch.float8_e4m3fn), device=x.device)
    scale = torch.empty((*x.shape[:-1], nb), dtype=torch.float32, device=x.device)
    if r > 0 and nb > 0:
        rows = max(1, ACT_QUANT_TILE // block_size)
        wrap_triton(_act_quant_kernel)[(cdiv(r, rows), nb)](
            x, y, scale, r, k, nb, ROWS=rows, BS=block_size, UE8M0=ue8m0,
            num_warps=ELEMENTWISE_WARPS)
    return y.to(torch.float8_e4m3fn), scale


@custom_op("dsv3_kernels::weight_quant_triton")
def _weight_quant_op(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    nbn, nbk = cdiv(n, block_size), cdiv(k, block_size)
    y = torch.empty((n, k), dtype=_kernel_dtype(torch.float8_e4m3fn), device=w.device)
    scale_inv = torch.empty((nbn, nbk), dtype=torch.float32, device=w.device)
    if nbn > 0 and nbk > 0:
        chunk = max(1, min(block_size, WEIGHT_QUANT_CHUNK // block_size))
        wrap_triton(_weight_quant_kernel)[(nbn, nbk)](
            w, y, scale_inv, n, k, nbk, BS=block_size, CHUNK=chunk, num_warps=ELEMENTWISE_WARPS)
    return y.to(torch.float8_e4m3fn), scale_inv


@custom_op("dsv3_kernels::weight_dequant_triton")
def _weight_dequant_op(w: torch.Tensor, scale_inv: torch.Tensor, block_size: int,
                       dtype: torch.dtype) -> torch.Tensor:
    n, k = w.shape
    y = torch.empty((n, k), dtype=_kernel_dtype(dtype), device=w.device)
    if n > 0 and k > 0:
        tile_n, tile_k = DEQUANT_TILE
        wrap_triton(_weight_dequant_kernel)[(cdiv(n, tile_n), cdiv(k, tile_k))](
            w, scale_inv, y, n, k, scale_inv.shape[1], BS=block_size, TILE_N=tile_n,
            TILE_K=tile_k, num_warps=ELEMENTWISE_WARPS)
    return y.to(dtype)


@custom_op("dsv3_kernels::fp8_gemm_triton")
def _fp8_gemm_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype, device=a.device)
    block_m, block_n, num_warps, num_stages, split_k = gemm_config(m, n, k)
    if split_k > 1:  # fp32 partials [split_k, M, N], summed below
        c = torch.empty((split_k, m, n), dtype=torch.float32, device=a.device)
    else:
        c = torch.empty((m, n), dtype=_kernel_dtype(out_dtype), device=a.device)
    grid = (cdiv(m, block_m) * cdiv(n, block_n), split_k)
    wrap_triton(_fp8_gemm_kernel)[grid](
        a, a_scale, b, b_scale_inv, c, m, n, k, cdiv(k // GEMM_BLOCK, split_k),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GEMM_BLOCK, GROUP_M=GROUP_M,
        num_warps=num_warps, num_stages=num_stages)
    return (c.sum(0) if split_k > 1 else c).to(out_dtype)
