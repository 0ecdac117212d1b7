"""Fake (meta) kernels of the _C ops, so torch.compile and CUDA-graph capture can trace them."""

import torch

from . import _native
from .utils import cdiv


if _native.loaded():

    @torch.library.register_fake("dsv3_kernels::act_quant")
    def _(x, block_size, ue8m0):
        scale = x.new_empty((*x.shape[:-1], cdiv(x.shape[-1], block_size)), dtype=torch.float32)
        return torch.empty_like(x, dtype=torch.float8_e4m3fn), scale

    @torch.library.register_fake("dsv3_kernels::weight_quant")
    def _(w, block_size):
        n, k = w.shape
        scale = w.new_empty((cdiv(n, block_size), cdiv(k, block_size)), dtype=torch.float32)
        return torch.empty_like(w, dtype=torch.float8_e4m3fn), scale

    @torch.library.register_fake("dsv3_kernels::weight_dequant")
    def _(w, scale_inv, block_size, dtype):
        return torch.empty_like(w, dtype=dtype)

    @torch.library.register_fake("dsv3_kernels::fp8_gemm")
    def _(a, a_scale, b, b_scale_inv, out_dtype):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("dsv3_kernels::mla_decode")
    def _(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, num_splits):
        b, s_q, h, _ = q.shape
        return q.new_empty((b, s_q, h, 512)), q.new_empty((b, h, s_q), dtype=torch.float32)

    @torch.library.register_fake("dsv3_kernels::mla_cache_write")
    def _(kv_c, k_pe, kv_cache, slot_mapping, kv_norm_weight, eps, rope_cos, rope_sin):
        return None

    @torch.library.register_fake("dsv3_kernels::moe_route")
    def _(router_logits, bias, n_group, topk_group, topk, routed_scaling_factor, score_func, renormalize):
        t = router_logits.shape[0]
        return (router_logits.new_empty((t, topk), dtype=torch.float32),
                router_logits.new_empty((t, topk), dtype=torch.int32))

    @torch.library.register_fake("dsv3_kernels::moe_permute")
    def _(hidden, topk_ids, num_experts, align, quant):
        t, topk = topk_ids.shape
        n = t * topk
        rows = n + (min(n, num_experts) * (align - 1) if align > 1 else 0)
        d = hidden.shape[1]
        permuted = hidden.new_empty((rows, d), dtype=torch.float8_e4m3fn if quant else hidden.dtype)
        scale = hidden.new_empty((rows, d // 128) if quant else (0,), dtype=torch.float32)
        return (permuted, scale, topk_ids.new_empty((num_experts + 1,)), topk_ids.new_empty((t, topk)))

    @torch.library.register_fake("dsv3_kernels::grouped_gemm")
    def _(a, b, expert_offsets, a_scale, b_scale_inv):
        return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)

    @torch.library.register_fake("dsv3_kernels::silu_mul")
    def _(x, quant):
        m, i = x.shape[0], x.shape[1] // 2
        y = x.new_empty((m, i), dtype=torch.float8_e4m3fn if quant else x.dtype)
        return y, x.new_empty((m, i // 128) if quant else (0,), dtype=torch.float32)

    @torch.library.register_fake("dsv3_kernels::moe_unpermute")
    def _(expert_out, topk_weights, inverse):
        return expert_out.new_empty((inverse.shape[0], expert_out.shape[1]))

    @torch.library.register_fake("dsv3_kernels::ep_dispatch")
    def _(hidden, topk_ids, topk_weights, num_experts, world_size, quant):
        t, k = topk_ids.shape
        slots = min(k, world_size)
        send, scale, rank_offsets, inverse = torch.ops.dsv3_kernels.moe_permute.default(
            hidden, topk_ids.new_empty((t, slots)), world_size, 1, quant)
        return (send, scale, topk_ids.new_empty((t * slots, k)), topk_weights.new_empty((t * slots, k)),
                rank_offsets, inverse)

    @torch.library.register_fake("dsv3_kernels::fused_moe")
    def _(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv, w2_scale_inv):
        return torch.empty_like(hidden)

    @torch.library.register_fake("dsv3_kernels::rms_norm")
    def _(x, weight, eps, residual):
        return torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty((0,))
