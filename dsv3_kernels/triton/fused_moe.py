"""fused_moe on the Triton backend: the expert layer composed of the Triton kernels of its parts,
moe_permute -> grouped_gemm -> silu_mul -> grouped_gemm -> moe_unpermute.

Semantics: dsv3_kernels/reference/moe.py. Importing this module registers the custom op
`dsv3_kernels::fused_moe_triton` (registration.py).
"""

from typing import Optional

import torch

from .grouped_gemm import grouped_gemm
from .moe_permute import moe_permute
from .moe_unpermute import moe_unpermute
from .. import ops
from .registration import custom_op, refuse
from .silu_mul import silu_mul

FP8_DTYPE = torch.float8_e4m3fn


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv, w2_scale_inv):
    """permute (quantized with FP8 experts) -> grouped_gemm(w13) -> silu_mul -> grouped_gemm(w2)
    -> unpermute, all Triton; the rounding points of reference.moe.fused_moe (none in float32)."""
    fp8 = w13.dtype == FP8_DTYPE
    permuted, scale, offsets, inverse = moe_permute(hidden, topk_ids, w13.shape[0], 1, fp8)
    gate_up = grouped_gemm(permuted, w13, offsets, scale, w13_scale_inv)
    h, h_scale = silu_mul(gate_up, fp8)
    down = grouped_gemm(h, w2, offsets, h_scale, w2_scale_inv)
    return moe_unpermute(down, topk_weights, inverse)


@custom_op("dsv3_kernels::fused_moe_triton")
def _fused_moe_op(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale_inv: Optional[torch.Tensor],
                  w2_scale_inv: Optional[torch.Tensor]) -> torch.Tensor:
    refuse("fused_moe_triton", ops.check_fused_moe, hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv,
           w2_scale_inv)
    return fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv, w2_scale_inv)
