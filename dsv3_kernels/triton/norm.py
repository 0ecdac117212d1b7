"""Triton kernel of rms_norm (optionally fused with the residual add).

Semantics are those of dsv3_kernels/reference/norm.py. Importing this module registers the custom
op `dsv3_kernels::rms_norm_triton` with the schema arguments of csrc/registration.cpp through
triton/registration.py. One program per row, in chunks of BLOCK columns: the first pass forms h
(stored as residual_out with a residual) and sums h^2 in fp32, the second forms h again from the
inputs (still in L1/L2) and writes weight * round(h * inv_rms). The conversions to and from bf16
go through mla._to and mla._f32 (the interpreter's own ones truncate and mangle subnormals);
inv_rms uses IEEE sqrt and division (`/` and tl.sqrt are approximate on GPUs).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .mla import _f32, _to
from .. import ops
from .registration import INTERPRETED, custom_op, refuse, wrap_triton


@triton.jit
def _h(x_ptr, res_ptr, res_out_ptr, offs, ok, STORE: tl.constexpr, RESIDUAL: tl.constexpr,
       INTERPRET: tl.constexpr):
    """h of the elements offs (fp32): x, or with RESIDUAL x + res rounded to x's dtype (STORE: also
    stored to res_out)."""
    h = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if RESIDUAL:
        h = _to(_f32(h, INTERPRET) + _f32(tl.load(res_ptr + offs, mask=ok, other=0.0), INTERPRET),
                x_ptr.dtype.element_ty, INTERPRET)
        if STORE:
            tl.store(res_out_ptr + offs, h, mask=ok)
    return _f32(h, INTERPRET)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, D, eps,
                     RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """Row r of x [R, D]: h = x (RESIDUAL: round(x + res), stored to res_out); out = round(w *
    round(h * rsqrt(mean(h^2) + eps))), all in x's dtype with fp32 math."""
    base = tl.program_id(0).to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, D, BLOCK):
        c = c0 + cols
        h = _h(x_ptr, res_ptr, res_out_ptr, base + c, c < D, True, RESIDUAL, INTERPRET)
        acc += h * h
    inv = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(acc, axis=0), D + 0.0) + eps))
    # h again from the inputs, not from res_out: the program's global stores are not ordered
    # before the loads of its other threads.
    for c0 in range(0, D, BLOCK):
        c = c0 + cols
        ok = c < D
        normed = _to(_h(x_ptr, res_ptr, res_out_ptr, base + c, ok, False, RESIDUAL, INTERPRET) * inv,
                     x_ptr.dtype.element_ty, INTERPRET)
        w = _f32(tl.load(w_ptr + c, mask=ok, other=0.0), INTERPRET)
        tl.store(out_ptr + base + c, _to(w * _f32(normed, INTERPRET), x_ptr.dtype.element_ty, INTERPRET), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

MAX_BLOCK = 4096  # columns per chunk: DeepSeek-V3's 7168 in two, the 512/1536 latent norms in one
WARPS = 4         # up to BLOCK = 1024 (8 fp32 values per thread and chunk)
WIDE_WARPS = 8    # above it


def block_and_warps(d):
    block = min(triton.next_power_of_2(d), MAX_BLOCK)
    return block, WARPS if block <= 1024 else WIDE_WARPS


@custom_op("dsv3_kernels::rms_norm_triton")
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    refuse("rms_norm_triton", ops.check_rms_norm, x, weight, eps, residual)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    d = x.shape[-1]
    rows = x.numel() // d
    if rows > 0:
        block, warps = block_and_warps(d)
        # Without a residual, its pointers get x and out (never touched: RESIDUAL is a compile-time switch).
        wrap_triton(_rms_norm_kernel)[(rows,)](
            x, residual if residual is not None else x, weight, out, res_out if residual is not None else out,
            d, eps, RESIDUAL=residual is not None, BLOCK=block, INTERPRET=INTERPRETED, num_warps=warps)
    return out, res_out
