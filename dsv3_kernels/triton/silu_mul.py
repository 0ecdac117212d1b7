"""Triton kernel of silu_mul: silu(gate) * up of the expert layer's gate_up rows, in fp32,
optionally quantized to FP8 per 1x128 block (act_quant's format) as it is stored.

Semantics are those of dsv3_kernels/reference/moe.py. Importing this module registers the custom
op `dsv3_kernels::silu_mul_triton` with the schema arguments of csrc/registration.cpp through
triton/registration.py.
"""

import torch
import triton
import triton.language as tl

from ..utils import GEMM_BLOCK, cdiv
from .fp8 import _amax, _block_scale, _kernel_dtype
from .. import ops
from .registration import custom_op, refuse, wrap_triton


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, s_ptr, M, I, NB,
                     ROWS: tl.constexpr, BLOCK_I: tl.constexpr, QUANT: tl.constexpr):
    """y [M, I] = silu(x[:, :I]) * x[:, I:] in fp32 for x [M, 2I], ROWS x BLOCK_I per program.
    QUANT: y gets the act_quant quotient for its element type, s [M, NB] the scales
    (BLOCK_I == 128); else y gets the value in its element type."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < I)[None, :]
    gate_ptrs = x_ptr + rows.to(tl.int64)[:, None] * (2 * I) + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g / (1 + exp(-g)), as torch computes it; div_rn: `/` is approximate on GPUs.
    h = tl.div_rn(gate, 1.0 + tl.exp(-gate)) * up
    out = rows.to(tl.int64)[:, None] * I + cols[None, :]
    if QUANT:
        scale = _block_scale(_amax(h, 1), False)
        tl.store(y_ptr + out, tl.div_rn(h, scale[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows.to(tl.int64) * NB + tl.program_id(1), scale, mask=row_ok)
    else:
        tl.store(y_ptr + out, h.to(y_ptr.dtype.element_ty), mask=mask)


ROW_TILE = (16, 128)  # (rows, columns) per program; 128 = one quant block
ELEMENTWISE_WARPS = 4


# The plain function, so that fused_moe_triton launches the same kernel.
def silu_mul(x, quant):
    """x [M, 2I] fp32/bf16/fp16 -> (y [M, I] x's dtype or e4m3, scale fp32 [M, I/128] or [0])."""
    m, i = x.shape[0], x.shape[1] // 2
    out_dtype = torch.float8_e4m3fn if quant else x.dtype
    y = torch.empty((m, i), dtype=_kernel_dtype(out_dtype), device=x.device)
    nb = i // GEMM_BLOCK if quant else 0
    scale = torch.empty((m, nb) if quant else (0,), dtype=torch.float32, device=x.device)
    rows, block_i = ROW_TILE
    if m > 0 and i > 0:
        wrap_triton(_silu_mul_kernel)[(cdiv(m, rows), cdiv(i, block_i))](
            x, y, scale, m, i, nb, ROWS=rows, BLOCK_I=block_i, QUANT=quant, num_warps=ELEMENTWISE_WARPS)
    return y.to(out_dtype), scale


@custom_op("dsv3_kernels::silu_mul_triton")
def _silu_mul_op(x: torch.Tensor, quant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    refuse("silu_mul_triton", ops.check_silu_mul, x, quant)
    return silu_mul(x, quant)
