"""Triton kernel of moe_unpermute: each token's expert rows, weighted and summed in fp32 (the
expert layer's combine step, and ep_combine's).

Semantics are those of dsv3_kernels/reference/moe.py. Importing this module registers the custom
op `dsv3_kernels::moe_unpermute_triton` with the schema arguments of csrc/registration.cpp through
triton/registration.py.
"""

import torch
import triton
import triton.language as tl

from ..utils import cdiv
from .fp8 import _kernel_dtype
from .. import ops
from .registration import custom_op, refuse, wrap_triton


@triton.jit
def _moe_unpermute_kernel(x_ptr, w_ptr, inv_ptr, out_ptr, T, P, D, TOPK,
                          ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out [T, D] = sum over j in order of w[t, j] * x[inv[t, j]] in fp32, for x [P, D],
    w [T, TOPK] fp32, inv [T, TOPK] int32; an entry -1 adds nothing (no row), a token with another
    entry outside [0, P) gets NaN."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < D
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    n_bad = tl.zeros((ROWS,), tl.int32)
    for j in range(TOPK):
        inv = tl.load(inv_ptr + rows * TOPK + j, mask=row_ok, other=0)
        w = tl.load(w_ptr + rows * TOPK + j, mask=row_ok, other=0.0)
        ok = (inv >= 0) & (inv < P)
        n_bad += ((~ok) & (inv != -1)).to(tl.int32)
        w = tl.where(ok, w, 0.0)  # a choice with no row adds nothing, whatever its weight (NaN too)
        x = tl.load(x_ptr + inv.to(tl.int64)[:, None] * D + cols[None, :],
                    mask=(row_ok & ok)[:, None] & col_ok[None, :], other=0.0)
        acc += w[:, None] * x.to(tl.float32)
    acc = tl.where((n_bad > 0)[:, None], float("nan"), acc)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


UNPERMUTE_TILE = (4, 256)  # (tokens, columns) per program
ELEMENTWISE_WARPS = 4


# The plain function, so that fused_moe_triton launches the same kernel.
def moe_unpermute(expert_out, topk_weights, inverse):
    """expert_out [P, D] fp32/bf16/fp16, topk_weights fp32 / inverse int32 [T, topk] -> [T, D]."""
    p, d = expert_out.shape
    t, topk = inverse.shape
    out = torch.empty((t, d), dtype=_kernel_dtype(expert_out.dtype), device=expert_out.device)
    rows, block_d = UNPERMUTE_TILE
    if t > 0 and d > 0:
        wrap_triton(_moe_unpermute_kernel)[(cdiv(t, rows), cdiv(d, block_d))](
            expert_out, topk_weights, inverse, out, t, p, d, topk, ROWS=rows, BLOCK_D=block_d,
            num_warps=ELEMENTWISE_WARPS)
    return out.to(expert_out.dtype)


@custom_op("dsv3_kernels::moe_unpermute_triton")
def _moe_unpermute_op(expert_out: torch.Tensor, topk_weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    refuse("moe_unpermute_triton", ops.check_moe_unpermute, expert_out, topk_weights, inverse)
    return moe_unpermute(expert_out, topk_weights, inverse)
