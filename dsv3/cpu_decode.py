"""A decode step on the CPU in one C++ call (csrc/model/decode_step_cpu.cpp).

On a small model a decode step is bound by calls, not kernels: Transformer.forward makes ~240
Python-dispatched calls per step of the shipped model (~1.6 ms on one core), against ~0.4 ms of
kernel work. DecodeStep runs the same dsv3_kernels CPU kernels in the same order from C++, so the
per-op cost drops from microseconds to a dispatcher call. Transformer.forward takes this path by
itself for the batches and models `of` accepts; everything else runs the Python forward.

The result is the Python forward's: every kernel gets the same arguments, except that RoPE of q_pe
is computed by a plain loop (fp32 products, rounded to bf16) instead of a complex multiply, which
can move a bf16 rounding by an ulp (tests/model/test_cpu_decode.py compares the two paths).
"""

import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch

from .cache import Batch, LatentCache
from .config import ROPE_DIM
from .moe import MoE

# The ops a step runs: each must resolve to its C++ CPU kernel (dispatch's rule, read per step:
# DSV3_KERNELS_BACKEND can change between steps).
OPS = ("rms_norm", "act_quant", "fp8_gemm", "grouped_gemm", "mla_cache_write", "mla_decode", "silu_mul",
       "moe_route", "fused_moe")
_NONE = torch.empty(0)  # an absent weight or scale (the C++ side tests numel() > 0)


def _given(t):
    return _NONE if t is None else t


def _linear(w, scale):
    return [w, _given(scale)]


def _dense(mlp):
    """The layer's SwiGLU MLP: the dense one, or a MoE layer's shared experts (None: none)."""
    return mlp.shared_experts if isinstance(mlp, MoE) else mlp


def _layer_weights(layer) -> list:
    """The 22 tensors of one decoder layer, in DecodeStep's order (decode_step_cpu.cpp Layer)."""
    attn, mlp = layer.self_attn, layer.mlp
    w_uk_t, w_uv = attn.absorbed_weights()
    dense = _dense(mlp)
    out = [layer.input_layernorm.weight, *_linear(attn.qkv_a.weight, attn.qkv_a.weight_scale_inv),
           attn.q_a_layernorm.weight, *_linear(attn.q_b_proj.weight, attn.q_b_proj.weight_scale_inv),
           attn.kv_a_layernorm.weight, w_uk_t, w_uv, *_linear(attn.o_proj.weight, attn.o_proj.weight_scale_inv),
           layer.post_attention_layernorm.weight]
    if dense is None:
        out += [_NONE] * 4
    else:
        out += [*_linear(dense.gate_up.weight, dense.gate_up.weight_scale_inv),
                *_linear(dense.down_proj.weight, dense.down_proj.weight_scale_inv)]
    if isinstance(mlp, MoE):
        e = mlp.experts
        out += [mlp.gate.weight, mlp.gate.e_score_correction_bias, e.w13, _given(e.w13_scale_inv), e.w2,
                _given(e.w2_scale_inv)]
    else:
        out += [_NONE] * 6
    return out


def _registered() -> bool:
    try:
        torch.classes.dsv3_model.DecodeStep  # raises where _C did not register it
    except RuntimeError:
        return False
    return True


def _why_not(model) -> str | None:
    """None where DecodeStep can run `model`'s decode steps, else why not."""
    args = model.args
    if not dk._native.has_kernel("fp8_gemm", "CPU"):
        return "the C++ CPU kernels were not built"
    if not _registered():
        return "_C has no dsv3_model::DecodeStep (built from older sources: rebuild it)"
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return "it runs bfloat16 models on the CPU"
    if model.parallel.world != 1:
        return "it runs one process"
    if args.q_lora_rank is None or args.qk_rope_head_dim != ROPE_DIM:
        return "it needs q_lora_rank and 64 RoPE dims"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        dense = _dense(mlp)
        if attn.qkv_a is None or (dense is not None and dense.gate_up is None):
            return "q_a/kv_a and gate/up must each run as one GEMM (layers.FusedLinear)"
        if isinstance(mlp, MoE) and mlp.experts.w13.dtype not in (torch.bfloat16, torch.float8_e4m3fn):
            return "the experts must be bfloat16 or FP8"
    return None


class DecodeStep:
    """The C++ decode step of one model (its weights as they are now: Transformer drops it when
    they change, see Transformer.reset_absorbed)."""

    def __init__(self, model):
        a = model.args
        weights = [model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight]
        for layer in model.model.layers:
            weights += _layer_weights(layer)
        attn = model.model.layers[0].self_attn
        ints = [attn.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.q_lora_rank, a.n_group,
                a.topk_group, a.num_experts_per_tok, int(a.norm_topk_prob)]
        floats = [attn.softmax_scale, a.routed_scaling_factor, a.rms_norm_eps, attn.q_a_layernorm.eps,
                  attn.kv_a_layernorm.eps]
        self._step = torch.classes.dsv3_model.DecodeStep(weights, model.rope.cos, model.rope.sin, ints, floats,
                                                         a.scoring_func)

    @staticmethod
    def of(model):
        """A DecodeStep for `model`, or None where it cannot run it (see _why_not)."""
        return None if _why_not(model) else DecodeStep(model)

    @staticmethod
    def takes(model, batch: Batch, cache: LatentCache) -> bool:
        """Whether this step (with `model`'s backend) runs `batch` over `cache`."""
        return not batch.prefill and batch.query_rows is None and DecodeStep.runs(model, cache)

    @staticmethod
    def runs(model, cache: LatentCache) -> bool:
        """Whether this step (with `model`'s backend) runs decode batches over `cache`."""
        return cache.kv.dtype in (torch.bfloat16, torch.uint8) and DecodeStep.dispatches(model, cache.kv.device)

    @staticmethod
    def dispatches(model, device) -> bool:
        """Whether dispatch's rule, with `model`'s backend, picks the C++ CPU kernel of every op the
        step calls on `device`."""
        return not torch.compiler.is_compiling() and dispatch.all_resolve_to(OPS, device, model.backend, "cpu")

    def __call__(self, input_ids, batch: Batch, cache: LatentCache):
        """-> (logits fp32 [len(batch.logits_index) or N, vocab], final normed hidden [N, hidden])."""
        index = _NONE if batch.logits_index is None else batch.logits_index
        return self._step.forward(input_ids, batch.positions, cache.kv, batch.slot_mapping, batch.block_table,
                                  batch.cache_seqlens, index)

    def decode(self, tokens: list, cached: list, cache: LatentCache):
        """A plain decode step from the host's numbers: tokens [B] ints (each request's newest token),
        cached [(cached_tokens, block_ids)] (as dsv3.cache.decode_batch takes them) -> (logits
        float32 [B, vocab], the greedy tokens: a list of B ints, each row's argmax). The batch
        decode_batch would build is built in C++: in Python its ~10 small tensor calls cost ~0.1 ms
        per step of the shipped model, next to a ~0.6 ms step."""
        blocks = [b for _, ids in cached for b in ids]
        return self._step.decode(tokens, [n for n, _ in cached], blocks, [len(ids) for _, ids in cached], cache.kv)
