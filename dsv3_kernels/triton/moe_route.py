"""Triton kernel of DeepSeekMoE routing (the group-limited expert choice).

Semantics are those of dsv3_kernels/reference/moe.py (fp32 scores, bias for the choice only,
top-2-sum group scores, ties to the lower index). Importing this module registers the custom op
`dsv3_kernels::moe_route_triton` with the schema arguments of csrc/registration.cpp through
triton/registration.py (triton_op on a GPU, an opaque custom op under TRITON_INTERPRET=1).

One program routes BLOCK_T tokens, each a row of BLOCK_E >= E expert columns held in registers.
Every top-k (top-2 within a group, the kept groups, the chosen experts) is an iterative argmax
over the columns not taken yet: k is small (<= 8 in DeepSeek-V3), and "max, then the lowest index
attaining it" breaks ties toward the lower index exactly, which a sort-based top-k on a GPU would
not guarantee. NaN ranks above every number, as in the reference's descending sort, so a token's
picks are distinct existing experts whatever its scores.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import ops
from ..utils import cdiv
from .registration import custom_op, refuse, wrap_triton


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _argmax_low(x, cand, cols, BLOCK_E: tl.constexpr):
    """(the best of each row of x [BLOCK_T, BLOCK_E] among its candidate columns `cand`, the lowest
    column attaining it), NaN above every number. Rows need a candidate. NaN is handled apart:
    x == max never holds for it, and tl.max may skip it (the interpreter does)."""
    nan_col = tl.min(tl.where(cand & (x != x), cols[None, :], BLOCK_E), 1)
    m = tl.max(tl.where(cand & (x == x), x, float("-inf")), 1)
    col = tl.min(tl.where(cand & (x == m[:, None]), cols[None, :], BLOCK_E), 1)
    has_nan = nan_col < BLOCK_E
    return tl.where(has_nan, float("nan"), m), tl.where(has_nan, nan_col, col)


@triton.jit
def _moe_route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, scale,
                      E: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      TOPK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Routes the tokens of logits [T, E]: w [T, TOPK] fp32 weights, ids [T, TOPK] int32, best first."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    # div_rn: `/` is an approximate division on GPUs; the reference divides exactly.
    if SOFTMAX:
        x = tl.where(col_ok[None, :], x, float("-inf"))
        p = tl.exp(x - tl.max(x, 1)[:, None])
        scores = tl.div_rn(p, tl.sum(p, 1)[:, None])
    else:
        scores = tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))
    biased = scores
    if HAS_BIAS:
        biased += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    # Padding columns are never candidates; the op checks that there are topk experts.
    real = col_ok[None, :]

    if N_GROUP > 1:
        GROUP_SIZE: tl.constexpr = E // N_GROUP
        group = cols // GROUP_SIZE  # >= N_GROUP on padding columns: in no group
        # Each expert's column gets its group's score, so the group choice is an argmax over
        # columns: groups are contiguous, so the lowest column of the best score is in the
        # lowest group of that score.
        group_score = tl.full(biased.shape, float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (group == g)[None, :]
            top1, top1_col = _argmax_low(biased, in_g, cols, BLOCK_E)
            s = top1
            if HAS_BIAS:  # the op checks that a group has a second expert
                s += _argmax_low(biased, in_g & (cols[None, :] != top1_col[:, None]), cols, BLOCK_E)[0]
            group_score = tl.where(in_g, s[:, None], group_score)
        kept = tl.zeros(biased.shape, tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            _, best_col = _argmax_low(group_score, real & ~kept, cols, BLOCK_E)
            kept |= group[None, :] == (best_col // GROUP_SIZE)[:, None]
        # The reference's mask: the other groups' experts stay candidates at -inf.
        biased = tl.where(kept, biased, float("-inf"))

    k_cols = tl.arange(0, BLOCK_K)
    w = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    taken = tl.zeros(biased.shape, tl.int1)
    for k in tl.static_range(TOPK):
        _, best = _argmax_low(biased, real & ~taken, cols, BLOCK_E)
        hit = cols[None, :] == best[:, None]
        # The chosen expert's unbiased score: one term plus zeros, exact.
        score = tl.sum(tl.where(hit, scores, 0.0), 1)
        w = tl.where(k_cols[None, :] == k, score[:, None], w)
        ids = tl.where(k_cols[None, :] == k, best[:, None], ids)
        taken |= hit
    if RENORMALIZE:
        w = tl.div_rn(w, tl.sum(w, 1)[:, None] + 1e-20)  # padding columns of w are 0
    out = rows.to(tl.int64)[:, None] * TOPK + k_cols[None, :]
    out_mask = row_ok[:, None] & (k_cols < TOPK)[None, :]
    tl.store(w_ptr + out, w * scale, mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

ROUTE_WARPS = 4
ROUTE_TILE = 2048  # logits per program: BLOCK_T = ROUTE_TILE // BLOCK_E rows (8 for E = 256)


def route_config(e, topk):
    """(BLOCK_T, BLOCK_E, BLOCK_K) for E experts and topk choices."""
    block_e = triton.next_power_of_2(e)
    return max(1, ROUTE_TILE // block_e), block_e, triton.next_power_of_2(topk)


# ---------------------------------------------------------------------------------------------
# Op
# ---------------------------------------------------------------------------------------------

@custom_op("dsv3_kernels::moe_route_triton")
def _moe_route_op(router_logits: torch.Tensor, e_score_correction_bias: Optional[torch.Tensor], n_group: int,
                  topk_group: int, topk: int, routed_scaling_factor: float, score_func: str,
                  renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    refuse("moe_route_triton", ops.check_moe_route, router_logits, e_score_correction_bias, n_group, topk_group,
           topk, score_func)
    t, e = router_logits.shape
    weights = torch.empty((t, topk), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((t, topk), dtype=torch.int32, device=router_logits.device)
    if t > 0:
        has_bias = e_score_correction_bias is not None
        block_t, block_e, block_k = route_config(e, topk)
        # Without a bias, bias_ptr gets the logits (never read: HAS_BIAS is a compile-time switch).
        wrap_triton(_moe_route_kernel)[(cdiv(t, block_t),)](
            router_logits, e_score_correction_bias if has_bias else router_logits, weights, ids, t,
            routed_scaling_factor, E=e, N_GROUP=n_group, TOPK_GROUP=topk_group, TOPK=topk,
            SOFTMAX=score_func == "softmax", HAS_BIAS=has_bias, RENORMALIZE=renormalize,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=ROUTE_WARPS)
    return weights, ids
