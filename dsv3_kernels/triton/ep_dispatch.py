"""Triton version of ep_dispatch (semantics: dsv3_kernels/reference/moe.py): the destination
ranks of each token (one program per ROWS tokens), moe_permute's Triton kernels with the ranks
as experts (rows grouped by rank, the FP8 quantization fused into the copy), then each packed
row's local choices. Importing this module registers `dsv3_kernels::ep_dispatch_triton`."""

import torch
import triton
import triton.language as tl

from ..utils import cdiv
from .moe_permute import moe_permute
from .. import ops
from .registration import custom_op, refuse, wrap_triton


@triton.jit
def _ep_dest_kernel(ids_ptr, dest_ptr, T, K, S, E, PER_RANK, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """dest [T, S] int32: the distinct owner ranks of each token's ids [T, K], in order of first
    choice, -1 after the last. A choice is a rank's first when no earlier choice has its owner;
    its slot is the number of first choices before it."""
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_K)
    t_ok = t < T
    ids = tl.load(ids_ptr + t[:, None] * K + j[None, :], mask=t_ok[:, None] & (j < K)[None, :], other=-1)
    owner = tl.where((ids >= 0) & (ids < E), ids // PER_RANK, -1)
    earlier_same = (owner[:, :, None] == owner[:, None, :]) & (j[None, None, :] < j[None, :, None])
    first = (owner >= 0) & (tl.sum(earlier_same.to(tl.int32), 2) == 0)
    slot = tl.cumsum(first.to(tl.int32), 1) - 1
    n = tl.sum(first.to(tl.int32), 1)
    tl.store(dest_ptr + t[:, None] * S + slot, owner, mask=t_ok[:, None] & first)
    tl.store(dest_ptr + t[:, None] * S + j[None, :], tl.full((ROWS, BLOCK_K), -1, tl.int32),
             mask=t_ok[:, None] & (j[None, :] >= n[:, None]) & (j < S)[None, :])


@triton.jit
def _ep_meta_kernel(ids_ptr, w_ptr, dest_ptr, inv_ptr, out_ids_ptr, out_w_ptr, N, K, S, PER_RANK,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """For the (token, slot) pairs i = t * S + s with a row (inverse[i] >= 0): out_ids [P, K] at
    that row = the token's ids local to rank dest[i] (-1 for other ranks' choices), out_w the
    weights (0 for those)."""
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_K)
    row = tl.load(inv_ptr + i, mask=i < N, other=-1)
    rank = tl.load(dest_ptr + i, mask=i < N, other=-1)
    has_row = row >= 0
    tok = i // S
    mask = has_row[:, None] & (j < K)[None, :]
    ids = tl.load(ids_ptr + tok[:, None] * K + j[None, :], mask=mask, other=-1)
    w = tl.load(w_ptr + tok[:, None] * K + j[None, :], mask=mask, other=0.0)
    local = ids - rank[:, None] * PER_RANK
    mine = (ids >= 0) & (local >= 0) & (local < PER_RANK)
    out = row.to(tl.int64)[:, None] * K + j[None, :]
    tl.store(out_ids_ptr + out, tl.where(mine, local, -1), mask=mask)
    tl.store(out_w_ptr + out, tl.where(mine, w, 0.0), mask=mask)


ROWS = 16  # tokens (dest) or (token, slot) pairs (meta) per program
WARPS = 4


def ep_dispatch(hidden, topk_ids, topk_weights, num_experts, world_size, quant):
    t, k = topk_ids.shape
    s = min(k, world_size)
    per_rank = num_experts // world_size
    dev = hidden.device
    block_k = triton.next_power_of_2(k)
    dest = torch.empty((t, s), dtype=torch.int32, device=dev)
    if t > 0:
        wrap_triton(_ep_dest_kernel)[(cdiv(t, ROWS),)](
            topk_ids, dest, t, k, s, num_experts, per_rank, ROWS=ROWS, BLOCK_K=block_k, num_warps=WARPS)
    send, scale, rank_offsets, inverse = moe_permute(hidden, dest, world_size, 1, quant)
    send_ids = torch.full((t * s, k), -1, dtype=torch.int32, device=dev)
    send_weights = torch.zeros((t * s, k), dtype=torch.float32, device=dev)
    if t > 0:
        wrap_triton(_ep_meta_kernel)[(cdiv(t * s, ROWS),)](
            topk_ids, topk_weights, dest, inverse, send_ids, send_weights, t * s, k, s, per_rank,
            ROWS=ROWS, BLOCK_K=block_k, num_warps=WARPS)
    return send, scale, send_ids, send_weights, rank_offsets, inverse


@custom_op("dsv3_kernels::ep_dispatch_triton")
def _ep_dispatch_op(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                    world_size: int, quant: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor]:
    refuse("ep_dispatch_triton", ops.check_ep_dispatch, hidden, topk_ids, topk_weights, num_experts, world_size,
           quant)
    return ep_dispatch(hidden, topk_ids, topk_weights, num_experts, world_size, quant)
