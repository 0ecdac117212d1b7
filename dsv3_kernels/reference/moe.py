"""Reference DeepSeekMoE ops in fp32 PyTorch: the routing (DeepSeek-V3's official gate semantics)
and the routed experts (a per-expert loop), with the exact semantics every backend follows.

moe_route, for router logits [T, E]:
1. scores = sigmoid(logits) (or softmax over the experts), fp32.
2. biased = scores + e_score_correction_bias (the bias only steers the choice).
3. With n_group > 1, the experts form n_group equal groups; a group's score is the sum of its two
   highest biased scores (the max when there is no bias); the topk_group best groups stay
   eligible and every other expert's biased score becomes -inf.
4. topk_ids = the topk highest biased scores, best first; topk_weights = the unbiased scores of
   those experts, divided by their sum when renormalize, times routed_scaling_factor.
Ties (groups or experts of equal score) go to the lower index, so every backend picks the same
experts. NaN / inf: every ranking is torch's descending sort, where NaN ranks above every number
(NaNs among themselves by index), so the ids are always topk distinct experts in [0, E). A NaN
logit (sigmoid) makes that expert's score NaN: it is chosen first (its group too) and, with
renormalize, all of the token's weights are NaN (without, its own weight). Softmax spreads a NaN,
a +inf or a row of -inf logits over the whole row (inf - inf): every score is NaN, the picks are
experts 0 .. topk-1, all weights NaN. A +-inf bias steers the choice as +-inf; sigmoid maps
+-inf logits to 1 and 0.

The expert layers (FP8 is float8_e4m3fn with 1x128 activation / 128x128 weight scales, fp8.py):
- moe_permute groups the T*topk (token, choice) pairs by expert into a contiguous layout: expert
  e's rows are [expert_offsets[e], expert_offsets[e] + count_e), in order of t * topk + j; with
  align > 1 each segment is padded to a multiple of align rows. The buffer has a size fixed by the
  shapes, P = T*topk + (min(T*topk, E) * (align - 1) if align > 1 else 0); padding rows are zero
  (quantized: e4m3 0 with the scale of a zero block). inverse[t, j] is the row of choice (t, j);
  a choice whose id is outside [0, E) is not placed: the id -1 means "no expert" (expert
  parallelism marks the choices another rank owns with it) and gets inverse -1; any other gets
  inverse -2.
- grouped_gemm: rows [offsets[e], offsets[e+1]) of `a` times b[e].T (offsets clamped to [0, M];
  a segment with hi <= lo is empty); rows no segment covers are 0; bf16 out, fp32 accumulation.
  Where offsets that decrease make segments overlap, a row gets the last expert's product here
  and on the CPU; the GPU kernels (CUDA, Triton) do not order the experts' tiles and leave such
  rows unspecified (the public op refuses such offsets where they are on the CPU).
- silu_mul: silu(gate) * up in fp32, then rounded to x's dtype or quantized (act_quant); NaN and
  inf follow that formula in IEEE arithmetic (silu(-inf) = -inf / inf = NaN, silu(inf) = inf),
  quantized blocks act_quant's rule (a NaN / inf makes its block's scale NaN / inf).
- moe_unpermute: out[t] = sum over j (in order) of topk_weights[t, j] * expert_out[inverse[t, j]],
  fp32, rounded once; an entry -1 adds nothing, whatever its weight (a NaN / inf weight too); a
  token with another entry outside [0, P) gets NaN. Otherwise NaN / inf follow the sum (0 * inf =
  NaN). moe_permute and ep_dispatch copy the rows bit for bit (quantized: act_quant's rule).
- fused_moe = permute -> grouped_gemm(w13) -> rounded to bf16 -> silu_mul (bf16, or quantized with
  FP8 weights) -> grouped_gemm(w2) -> rounded to bf16 -> moe_unpermute. FP8 weights quantize the
  hidden rows with act_quant first. The id -1 costs nothing and adds nothing; a token with an id
  outside [-1, E) gets NaN.
"""

import torch
import torch.nn.functional as F

from ..utils import GEMM_BLOCK
from . import fp8 as _fp8


def _top(x: torch.Tensor, k: int):
    """topk along the last dim with ties broken toward the lower index (torch.topk leaves it open)."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def moe_route(router_logits, e_score_correction_bias, n_group, topk_group, topk, routed_scaling_factor,
              score_func="sigmoid", renormalize=True):
    t, e = router_logits.shape
    logits = router_logits.float()
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)
    biased = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if n_group > 1:
        grouped = biased.view(t, n_group, e // n_group)
        if e_score_correction_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = _top(grouped, 2)[0].sum(dim=-1)
        _, keep = _top(group_scores, topk_group)
        eligible = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        biased = biased.masked_fill(~eligible.repeat_interleave(e // n_group, dim=1), float("-inf"))
    _, ids = _top(biased, topk)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


# ---- the routed experts ----

def permuted_rows(num_tokens: int, topk: int, num_experts: int, align: int) -> int:
    """The fixed row count P of moe_permute's output (enough for the worst-case padding)."""
    n = num_tokens * topk
    return n + (min(n, num_experts) * (align - 1) if align > 1 else 0)


def moe_permute(hidden, topk_ids, num_experts, align=1, quant=False):
    t, topk = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    starts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    starts[1:] = torch.cumsum((counts + align - 1) // align * align, 0)
    order = torch.sort(torch.where(valid, flat, num_experts), stable=True).indices[: int(valid.sum())]
    experts = flat[order]
    first = torch.cumsum(counts, 0) - counts  # each expert's first position in `order`
    rows = starts[experts] + torch.arange(order.numel(), device=flat.device) - first[experts]
    inverse = torch.where(flat == -1, -1, -2)
    inverse[order] = rows
    permuted = hidden.new_zeros(permuted_rows(t, topk, num_experts, align), hidden.shape[1])
    permuted[rows] = hidden[order // topk]
    if quant:
        permuted, scale = _fp8.act_quant(permuted, GEMM_BLOCK)
    else:
        scale = hidden.new_empty(0, dtype=torch.float32)
    return permuted, scale, starts.to(torch.int32), inverse.view(t, topk).to(torch.int32)


def grouped_gemm(a, b, expert_offsets, a_scale=None, b_scale_inv=None):
    m, n = a.shape[0], b.shape[1]
    out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    bounds = expert_offsets.long().clamp(0, m).tolist()
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        if a_scale is None:
            out[lo:hi] = a[lo:hi].float() @ b[e].float().T
        else:
            out[lo:hi] = _fp8.fp8_gemm(a[lo:hi], a_scale[lo:hi], b[e], b_scale_inv[e], torch.float32)
    return out.to(torch.bfloat16)


def silu_mul(x, quant=False):
    i = x.shape[1] // 2
    xf = x.float()
    h = F.silu(xf[:, :i]) * xf[:, i:]
    if quant:
        return _fp8.act_quant(h, GEMM_BLOCK)
    return h.to(x.dtype), x.new_empty(0, dtype=torch.float32)


def moe_unpermute(expert_out, topk_weights, inverse):
    p = expert_out.shape[0]
    inv = inverse.long()
    skip = inv == -1
    valid = skip | ((inv >= 0) & (inv < p))
    rows = expert_out.float()[inv.clamp(0, max(p - 1, 0))] if p else \
        expert_out.new_zeros(*inv.shape, expert_out.shape[1], dtype=torch.float32)
    out = torch.zeros(inv.shape[0], expert_out.shape[1], dtype=torch.float32, device=expert_out.device)
    for j in range(inv.shape[1]):
        out += torch.where(skip[:, j, None], 0.0, topk_weights[:, j, None].float() * rows[:, j])
    out[~valid.all(1)] = float("nan")
    return out.to(expert_out.dtype)


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv=None, w2_scale_inv=None):
    """The per-expert loop: each expert's tokens through its SwiGLU MLP, weighted, summed in fp32."""
    fp8 = w13_scale_inv is not None
    x = _fp8.act_quant(hidden, GEMM_BLOCK) if fp8 else None
    ids = topk_ids.long()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in range(w13.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        if fp8:
            gate_up = _fp8.fp8_gemm(x[0][tok], x[1][tok], w13[e], w13_scale_inv[e], torch.float32)
            h, h_scale = silu_mul(gate_up.to(hidden.dtype), quant=True)
            y = _fp8.fp8_gemm(h, h_scale, w2[e], w2_scale_inv[e], torch.float32)
        else:
            gate_up = hidden[tok].float() @ w13[e].float().T
            h = silu_mul(gate_up.to(hidden.dtype))[0]
            y = h.float() @ w2[e].float().T
        out.index_put_((tok,), topk_weights[tok, slot, None].float() * y.to(hidden.dtype).float(), accumulate=True)
    out[((ids < -1) | (ids >= w13.shape[0])).any(1)] = float("nan")
    return out.to(hidden.dtype)


def naive_fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv=None, w2_scale_inv=None):
    """The benchmark peer: the plain per-expert loop in bf16 (FP8 weights dequantized per call)."""
    ids = topk_ids.long()
    out = torch.zeros_like(hidden)
    for e in range(w13.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        a, b = w13[e], w2[e]
        if w13_scale_inv is not None:
            a = _fp8.weight_dequant(a, w13_scale_inv[e], GEMM_BLOCK, hidden.dtype)
            b = _fp8.weight_dequant(b, w2_scale_inv[e], GEMM_BLOCK, hidden.dtype)
        gate, up = (hidden[tok] @ a.T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ b.T
        out.index_add_(0, tok, y * topk_weights[tok, slot, None].to(hidden.dtype))
    return out


# ---- expert parallelism: the tokens packed by destination rank ----

def ep_destinations(topk_ids, num_experts, world_size):
    """int64 [T, min(topk, W)]: the ranks that own each token's chosen experts (rank r owns experts
    [r * E/W, (r+1) * E/W)), each once, in order of the token's first choice of it; -1 after the
    last (and for ids outside [0, E), such as the id -1)."""
    t, k = topk_ids.shape
    ids = topk_ids.long()
    owner = torch.where((ids >= 0) & (ids < num_experts), ids // (num_experts // world_size), -1)
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)  # [j, i]: i < j
    first = (owner >= 0) & ~((owner[:, :, None] == owner[:, None, :]) & earlier).any(2)
    slot = torch.cumsum(first, 1) - 1
    dest = torch.full((t, min(k, world_size)), -1, dtype=torch.long, device=ids.device)
    tok, j = first.nonzero(as_tuple=True)
    dest[tok, slot[tok, j]] = owner[tok, j]
    return dest


def ep_dispatch(hidden, topk_ids, topk_weights, num_experts, world_size, quant=False):
    """moe_permute of the tokens over their destination ranks (as if ranks were experts), plus
    each row's choices as its destination sees them: the ids of that rank's experts made local
    (id - r * E/W), -1 (no expert) and weight 0 for choices other ranks own."""
    t, k = topk_ids.shape
    per_rank = num_experts // world_size
    dest = ep_destinations(topk_ids, num_experts, world_size)
    send, scale, rank_offsets, inverse = moe_permute(hidden, dest.to(torch.int32), world_size, 1, quant)
    send_ids = torch.full((send.shape[0], k), -1, dtype=torch.long, device=hidden.device)
    send_weights = torch.zeros(send.shape[0], k, dtype=torch.float32, device=hidden.device)
    tok, s = (inverse >= 0).nonzero(as_tuple=True)
    rows, rank = inverse[tok, s].long(), dest[tok, s]
    ids = topk_ids[tok].long()
    mine = (ids >= rank[:, None] * per_rank) & (ids < (rank[:, None] + 1) * per_rank)
    send_ids[rows] = torch.where(mine, ids - rank[:, None] * per_rank, -1)
    send_weights[rows] = torch.where(mine, topk_weights[tok].float(), 0.0)
    return send, scale, send_ids.to(torch.int32), send_weights, rank_offsets, inverse
