"""Triton kernels of moe_permute: group the (token, choice) pairs by expert, optionally
quantizing the rows to FP8 (the expert layer's first step; ep_dispatch packs by rank with it).

Semantics are those of dsv3_kernels/reference/moe.py. Importing this module registers the custom
op `dsv3_kernels::moe_permute_triton` with the schema arguments of csrc/registration.cpp through
triton/registration.py.

moe_permute is deterministic (no atomics): the N = T*topk flat choices i = t*topk + j are cut
into blocks of PERMUTE_BLOCK;
1. histogram: counts[b, e] = the choices of block b that picked expert e;
2. prefix (one program): counts[b, e] becomes the choices of expert e in blocks before b, and
   expert_offsets the cumulative align-padded expert totals;
3. index: a choice's row is offsets[e] + that prefix + its rank among the block's earlier
   choices of e (so each expert's rows are in order of i); it writes inverse and src[row] = t;
4. copy: every one of the P output rows gathers hidden[src[row]] (zeros for padding rows,
   src = -1), quantized per 1x128 block with quant.
Every buffer has a size fixed by the shapes and nothing is read back on the host, so the op is
CUDA-graph capturable.
"""

import torch
import triton
import triton.language as tl

from .. import ops
from ..utils import GEMM_BLOCK, cdiv
from .fp8 import _amax, _block_scale, _kernel_dtype
from .registration import custom_op, refuse, wrap_triton


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _permute_histogram_kernel(ids_ptr, counts_ptr, N, E, BLOCK: tl.constexpr, CHUNK_E: tl.constexpr):
    """counts [NB, E] int32: counts[b, e] = how many of the flat ids [b*BLOCK, (b+1)*BLOCK) of
    ids [N] are e (ids outside [0, E) count nowhere). CHUNK_E experts at a time bound the
    [BLOCK, CHUNK_E] comparison tile."""
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + i, mask=i < N, other=-1)
    for e0 in range(0, E, CHUNK_E):
        e = e0 + tl.arange(0, CHUNK_E)
        cnt = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)
        tl.store(counts_ptr + b * E + e, cnt, mask=e < E)


@triton.jit
def _permute_prefix_kernel(counts_ptr, offsets_ptr, NB, E, ALIGN,
                           BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program. In place, counts [NB, E] becomes the exclusive prefix over blocks
    (sum of counts[b', e] for b' < b); offsets [E+1] int32 = 0, then the cumulative sum of each
    expert's total rounded up to a multiple of ALIGN. BLOCK_E >= E."""
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    running = tl.zeros((BLOCK_E,), tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        ptrs = counts_ptr + b[:, None] * E + e[None, :]
        mask = (b < NB)[:, None] & e_ok[None, :]
        c = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, running[None, :] + tl.cumsum(c, 0) - c, mask=mask)
        running += tl.sum(c, 0)
    padded = (running + ALIGN - 1) // ALIGN * ALIGN
    tl.store(offsets_ptr + 1 + e, tl.cumsum(padded, 0), mask=e_ok)
    tl.store(offsets_ptr + e, tl.zeros_like(e), mask=e == 0)


@triton.jit
def _permute_index_kernel(ids_ptr, prefix_ptr, offsets_ptr, inverse_ptr, src_ptr, N, E, TOPK,
                          BLOCK: tl.constexpr):
    """For the flat choices of block b: inverse [N] int32 = the choice's row (-1 for the id -1, no
    expert; -2 for another id outside [0, E)), src [P] int32 at that row = its token. prefix
    [NB, E] is the prefix kernel's."""
    b = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    i = b * BLOCK + k
    in_range = i < N
    ids = tl.load(ids_ptr + i, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < E)
    # The rank among the block's earlier choices of the same expert keeps each expert's rows in
    # order of the flat index, whatever order the programs run in.
    earlier_same = (ids[:, None] == ids[None, :]) & (k[None, :] < k[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), 1)
    e = tl.where(valid, ids, 0)
    row = (tl.load(offsets_ptr + e, mask=valid, other=0)
           + tl.load(prefix_ptr + b * E + e, mask=valid, other=0) + rank)
    tl.store(inverse_ptr + i, tl.where(valid, row, tl.where(ids == -1, -1, -2)), mask=in_range)
    tl.store(src_ptr + row, i // TOPK, mask=valid)


@triton.jit
def _permute_copy_kernel(x_ptr, src_ptr, y_ptr, s_ptr, P, D, NB_D,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    """y [P, D] row r = x [T, D] row src[r] (0 where src[r] < 0), ROWS rows x BLOCK_D columns per
    program. QUANT: y gets x / scale for y's element type (fp8 on a GPU) and s [P, NB_D] the
    1x128 block scales (act_quant; BLOCK_D == 128); else an exact copy in x's dtype."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < P
    col_ok = cols < D
    src = tl.load(src_ptr + rows, mask=row_ok, other=-1)
    x = tl.load(x_ptr + src.to(tl.int64)[:, None] * D + cols[None, :],
                mask=(src >= 0)[:, None] & col_ok[None, :], other=0.0)
    out = rows.to(tl.int64)[:, None] * D + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if QUANT:
        xf = x.to(tl.float32)
        scale = _block_scale(_amax(xf, 1), False)
        # div_rn: the reference divides exactly (`/` is approximate on GPUs).
        tl.store(y_ptr + out, tl.div_rn(xf, scale[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows.to(tl.int64) * NB_D + tl.program_id(1), scale, mask=row_ok)
    else:
        tl.store(y_ptr + out, x, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

PERMUTE_BLOCK = 128       # choices per histogram/index program (the index kernel's rank tile is BLOCK^2)
HISTOGRAM_CHUNK_E = 64    # experts per histogram comparison tile [PERMUTE_BLOCK, 64]
PREFIX_BLOCK_B = 16       # blocks per step of the prefix scan ([16, BLOCK_E] tiles)
PREFIX_WARPS = 8
INDEX_WARPS = 4
ROW_TILE = (16, 128)      # (rows, columns) per copy program; 128 = one quant block
ELEMENTWISE_WARPS = 4


# ---------------------------------------------------------------------------------------------
# Implementation (a plain function, so fused_moe_triton and ep_dispatch_triton launch the same kernels)
# ---------------------------------------------------------------------------------------------

def moe_permute(hidden, topk_ids, num_experts, align, quant):
    """hidden [T, D] fp32/bf16/fp16, topk_ids int32 [T, topk] -> (permuted [P, D] hidden's dtype or
    e4m3, scale fp32 [P, D/128] or [0], expert_offsets int32 [E+1], inverse int32 [T, topk])."""
    t, topk = topk_ids.shape
    d = hidden.shape[1]
    n = t * topk
    p = n + (min(n, num_experts) * (align - 1) if align > 1 else 0)
    dev = hidden.device
    nb = cdiv(n, PERMUTE_BLOCK)
    offsets = torch.empty((num_experts + 1,), dtype=torch.int32, device=dev)
    inverse = torch.empty((t, topk), dtype=torch.int32, device=dev)
    src = torch.full((p,), -1, dtype=torch.int32, device=dev)  # -1: a padding row
    counts = torch.empty((nb, num_experts), dtype=torch.int32, device=dev)
    if nb > 0:
        wrap_triton(_permute_histogram_kernel)[(nb,)](
            topk_ids, counts, n, num_experts, BLOCK=PERMUTE_BLOCK, CHUNK_E=HISTOGRAM_CHUNK_E,
            num_warps=INDEX_WARPS)
    wrap_triton(_permute_prefix_kernel)[(1,)](
        counts, offsets, nb, num_experts, align, BLOCK_B=PREFIX_BLOCK_B,
        BLOCK_E=triton.next_power_of_2(num_experts), num_warps=PREFIX_WARPS)
    if nb > 0:
        wrap_triton(_permute_index_kernel)[(nb,)](
            topk_ids, counts, offsets, inverse, src, n, num_experts, topk, BLOCK=PERMUTE_BLOCK,
            num_warps=INDEX_WARPS)
    out_dtype = torch.float8_e4m3fn if quant else hidden.dtype
    permuted = torch.empty((p, d), dtype=_kernel_dtype(out_dtype), device=dev)
    nb_d = d // GEMM_BLOCK if quant else 0
    scale = torch.empty((p, nb_d) if quant else (0,), dtype=torch.float32, device=dev)
    rows, block_d = ROW_TILE
    if p > 0 and d > 0:
        wrap_triton(_permute_copy_kernel)[(cdiv(p, rows), cdiv(d, block_d))](
            hidden, src, permuted, scale, p, d, nb_d, ROWS=rows, BLOCK_D=block_d, QUANT=quant,
            num_warps=ELEMENTWISE_WARPS)
    return permuted.to(out_dtype), scale, offsets, inverse


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------

@custom_op("dsv3_kernels::moe_permute_triton")
def _moe_permute_op(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: int,
                    quant: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    refuse("moe_permute_triton", ops.check_moe_permute, hidden, topk_ids, num_experts, align, quant)
    return moe_permute(hidden, topk_ids, num_experts, align, quant)
