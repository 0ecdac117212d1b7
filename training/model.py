"""The trainable DeepSeek-V3 of training/: TrainableTransformer, a plain differentiable PyTorch
module with Hugging Face's parameter names (dense MLA with causal SDPA, a sparse expert loop), and
PRESETS, the sizes training builds. dsv3.model is the inference model its checkpoints are loaded
into (tests/model/test_train.py checks both give the same logits).

Routing is dsv3_kernels.reference.moe_route (the kernels' reference), so training and inference
choose experts the same way. Load balance is DeepSeek-V3's auxiliary-loss-free rule (MoE.update_bias).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelArgs
from dsv3.rope import Rope, apply_rope
from dsv3_kernels.reference.moe import moe_route

# The shipped model: widths are multiples of 128 (real FP8 blocks), the latent is the kernels'
# 512 + 64; 4.7M parameters, 3 layers (1 dense + 2 MoE of 8 experts in 4 groups, top-2 of 2 groups).
PRESETS = {
    "default": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                    num_hidden_layers=3, num_attention_heads=4, q_lora_rank=128, qk_nope_head_dim=32,
                    v_head_dim=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                    topk_group=2, first_k_dense_replace=1, max_position_embeddings=2048,
                    rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                      mscale_all_dim=1.0, original_max_position_embeddings=512)),
    # for tests: seconds, not minutes
    "test": dict(vocab_size=384, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=2, q_lora_rank=128, qk_nope_head_dim=32, v_head_dim=32,
                 n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                 first_k_dense_replace=1, max_position_embeddings=256,
                 rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                   mscale_all_dim=1.0, original_max_position_embeddings=64)),
}


def _norm(n, args):
    return nn.RMSNorm(n, eps=args.rms_norm_eps)


def _linear(k, n):
    return nn.Linear(k, n, bias=False)


class Attention(nn.Module):
    """MLA written out: q and kv through their low-rank projections, keys and values materialized
    per head, the RoPE part of the key shared by all heads."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        h = a.num_attention_heads
        self.q_a_proj = _linear(a.hidden_size, a.q_lora_rank)
        self.q_a_layernorm = _norm(a.q_lora_rank, a)
        self.q_b_proj = _linear(a.q_lora_rank, h * a.qk_head_dim)
        self.kv_a_proj_with_mqa = _linear(a.hidden_size, a.kv_lora_rank + a.qk_rope_head_dim)
        self.kv_a_layernorm = _norm(a.kv_lora_rank, a)
        self.kv_b_proj = _linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim))
        self.o_proj = _linear(h * a.v_head_dim, a.hidden_size)

    def forward(self, x, cos, sin):
        a, (b, t, _) = self.a, x.shape
        h, nope, rope, vd = a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, t, h, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, rope], dim=-1)
        k_nope, v = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(b, t, h, nope + vd).split([nope, vd], dim=-1)
        # apply_rope takes positions first: [T, B, ...]
        q_pe = apply_rope(q_pe.transpose(0, 1), cos, sin).transpose(0, 1)
        k_pe = apply_rope(k_pe.transpose(0, 1), cos, sin).transpose(0, 1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, t, h, rope)], dim=-1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=a.softmax_scale())
        return self.o_proj(o.transpose(1, 2).reshape(b, t, h * vd))


class MLP(nn.Module):
    def __init__(self, d, i):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _linear(d, i), _linear(d, i), _linear(i, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(a.n_routed_experts, a.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(a.n_routed_experts))


class Experts(nn.Module):
    """The routed experts stacked: gate_proj/up_proj [E, I, D], down_proj [E, D, I] (exported
    as mlp.experts.{e}.gate_proj.weight etc.)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        e, d, i = a.n_routed_experts, a.hidden_size, a.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))


class MoE(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.gate = Gate(a)
        self.experts = Experts(a)
        self.shared_experts = MLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts)
        self.load = torch.zeros(a.n_routed_experts, dtype=torch.int64)  # training (token, choice) pairs this step

    def forward(self, x):
        a, shape = self.a, x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = moe_route(F.linear(x.float(), self.gate.weight), self.gate.e_score_correction_bias,
                                 a.n_group, a.topk_group, a.num_experts_per_tok, a.routed_scaling_factor,
                                 a.scoring_func, a.norm_topk_prob)
        flat = ids.flatten().long()
        counts = torch.bincount(flat, minlength=a.n_routed_experts)
        if self.training:  # evaluation does not count towards the balancing
            self.load += counts
        order = flat.argsort(stable=True)
        token = order // a.num_experts_per_tok
        ex, parts = self.experts, []
        for e, xe in enumerate(x[token].split(counts.tolist())):
            parts.append((F.silu(xe @ ex.gate_proj[e].T) * (xe @ ex.up_proj[e].T)) @ ex.down_proj[e].T)
        routed = torch.cat(parts) * weights.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add(0, token, routed) + self.shared_experts(x)
        return out.view(shape)

    @torch.no_grad()
    def update_bias(self, rate: float):
        """DeepSeek-V3's auxiliary-loss-free balancing: bias += rate * sign(mean load - load)."""
        load = self.load.float()
        self.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        self.load.zero_()


class Layer(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.input_layernorm = _norm(a.hidden_size, a)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = _norm(a.hidden_size, a)
        self.mlp = MoE(a) if a.is_moe_layer(i) else MLP(a.hidden_size, a.intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(Layer):
    """DeepSeek-V3's multi-token-prediction module k (checkpoint: model.layers.{num_hidden_layers + k - 1}):
    at position i it combines the previous depth's hidden state h_i with the embedding of token
    t_{i+k}, eh_proj([enorm(emb); hnorm(h)]) (the embedding first, as in the inference engines that
    run DeepSeek's released weights), runs one decoder layer (causal, RoPE position i) and predicts
    t_{i+k+1} through shared_head.norm and shared_head.head. The embedding and the output head are
    the main model's (DeepSeek-V3's shared embedding and output head)."""

    def __init__(self, a: ModelArgs, i: int, head: nn.Linear):
        super().__init__(a, i)
        self.enorm = _norm(a.hidden_size, a)
        self.hnorm = _norm(a.hidden_size, a)
        self.eh_proj = _linear(2 * a.hidden_size, a.hidden_size)
        self.shared_head = nn.Module()
        self.shared_head.norm = _norm(a.hidden_size, a)
        self.shared_head.head = head  # the same Parameter: exported under both names, trained once

    def forward(self, h, emb, cos, sin):
        """h, emb [B, L, D] -> the layer's output [B, L, D] (the next depth's h; before shared_head.norm)."""
        return super().forward(self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1)), cos, sin)


class TrainableTransformer(nn.Module):
    """DeepSeek-V3 as a plain differentiable PyTorch module with the checkpoint's parameter names
    (the layers above; MTP layers after the decoder layers, as in DeepSeek's checkpoint). dsv3.model
    is the inference model its export (hf_state_dict) is loaded into."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        n = a.num_hidden_layers
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.lm_head = _linear(a.hidden_size, a.vocab_size)
        # the MTP modules follow the decoder layers, as in DeepSeek's checkpoint (model.layers.61)
        self.model.layers = nn.ModuleList([Layer(a, i) for i in range(n)] + [
            MTPLayer(a, n + k, self.lm_head) for k in range(a.num_nextn_predict_layers)])
        self.model.norm = _norm(a.hidden_size, a)
        self.rope = Rope(a)

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """normal(0, std), output projections scaled by 1/sqrt(2 layers) (GPT-2's residual scaling)."""
        out_std = std / math.sqrt(2 * self.args.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, out_std if ("o_proj" in name or "down_proj" in name) else std)

    def forward(self, ids, targets=None):
        """ids int64 [B, T] (positions 0..T-1) -> logits float32 [B, T, vocab].

        With targets (int64 [B, T], targets[:, i] = t_{i+1}, the token after ids[:, i]) it returns
        (logits, [mtp_logits_1, ...]): MTP depth k's logits float32 [B, T - k, vocab] at positions
        0..T-k-1 predict t_{i+k+1} = targets[:, k:]. Depth 1 takes the main model's final
        (normalized) hidden state, depth k > 1 the output of depth k - 1."""
        a, t = self.args, ids.shape[1]
        cos, sin = self.rope.cos[:t], self.rope.sin[:t]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers[:a.num_hidden_layers]:
            x = layer(x, cos, sin)
        h = self.model.norm(x)
        logits = self.lm_head(h).float()
        if targets is None:
            return logits
        mtp = []
        for k, layer in enumerate(self.model.layers[a.num_hidden_layers:], start=1):
            n = t - k
            h = layer(h[:, :n], self.model.embed_tokens(targets[:, k - 1:k - 1 + n]), cos[:n], sin[:n])
            mtp.append(layer.shared_head.head(layer.shared_head.norm(h)).float())
        return logits, mtp

    def mtp_layers(self):
        return list(self.model.layers[self.args.num_hidden_layers:])

    @torch.no_grad()
    def load_hf(self, model_dir) -> list:
        """Copy a DeepSeek-V3 checkpoint's weights (FP8 ones dequantized, experts stacked) into the
        parameters of the same names. A parameter of an MTP layer that the checkpoint lacks starts
        as a copy of the last decoder layer's tensor of that name (attention, experts, layer
        norms); the MTP-only ones (enorm, hnorm, eh_proj, shared_head.norm) keep their
        initialization. Returns the names of the parameters the checkpoint lacks."""
        from safetensors import safe_open

        import dsv3_kernels as dk

        from dsv3.load import checkpoint_files
        files, n = checkpoint_files(model_dir), self.args.num_hidden_layers

        def read(name):
            with safe_open(files[name], framework="pt") as f:
                t = f.get_tensor(name)
            if t.dtype == torch.float8_e4m3fn:
                with safe_open(files[name + "_scale_inv"], framework="pt") as f:
                    t = dk.weight_dequant(t, f.get_tensor(name + "_scale_inv"), torch.float32)
            return t.float()

        def stored(name, shape):
            if ".mlp.experts." in name:  # stacked here, one tensor per expert in the checkpoint
                prefix, proj = name.rsplit(".", 1)
                keys = [f"{prefix}.{e}.{proj}.weight" for e in range(shape[0])]
                return torch.stack([read(k) for k in keys]) if all(k in files for k in keys) else None
            return read(name) if name in files else None

        absent = []
        for name, t in self.state_dict().items():
            w = stored(name, t.shape)
            if w is None:
                absent.append(name)
                parts = name.split(".", 3)  # model, layers, index, rest
                if parts[:2] == ["model", "layers"] and int(parts[2]) >= n:
                    w = stored(f"model.layers.{n - 1}.{parts[3]}", t.shape)
            if w is not None and w.shape == t.shape:
                t.copy_(w)
        return absent

    def hf_state_dict(self, dtype=torch.bfloat16) -> dict:
        """The checkpoint's tensors: weights in dtype, e_score_correction_bias float32, routed
        experts split per expert as in DeepSeek's release."""
        out = {}
        for name, t in self.state_dict().items():
            t = t.detach()
            if name.endswith("e_score_correction_bias"):
                out[name] = t.float().clone()
            elif ".mlp.experts." in name:
                prefix, proj = name.rsplit(".", 1)
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.{proj}.weight"] = t[e].to(dtype).contiguous()
            else:
                out[name] = t.to(dtype).clone(memory_format=torch.contiguous_format)  # the tied MTP head: its own copy
        return out
