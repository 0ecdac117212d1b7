"""Train the shipped default model: a small DeepSeek-V3-architecture model on the Python standard
library's own source (dsv3/corpus.py), then export it as a DeepSeek-V3-format checkpoint.

    python -m dsv3.train --out runs/default            # ~55 min on one CPU thread (--threads 1)
    python -m dsv3.train --out runs/default --resume   # continues from runs/default/train_state.pt
                                                       # (same settings; --stop-at N stops after step N)

The model here is a plain differentiable PyTorch module with Hugging Face's parameter names
(dense MLA with causal SDPA, a sparse expert loop); dsv3.model is the inference model the export
is loaded into. Routing is dsv3_kernels.reference.moe_route (the kernels' reference), so training
and inference choose experts the same way. Load balance is DeepSeek-V3's auxiliary-loss-free
rule: after every step each MoE layer's e_score_correction_bias moves by bias_update_rate towards
the mean load (+ for an underloaded expert, - for an overloaded one); no balance loss.

Determinism: --seed fixes the initialization and every step's batch (drawn from a generator
seeded by (seed, step)), so a resumed run continues exactly as an uninterrupted one.
Outputs in --out: tokenizer.json, train_state.pt (resumable), bf16/ (the trained weights in
bf16), fp8/ (e4m3 + weight_scale_inv, 128x128 blocks: what dsv3/default_model ships) with
metrics.json (held-out nats/byte of both, expert load, the training record).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_kernels.reference.moe import moe_route

from . import corpus
from .config import ModelArgs
from .load import load, load_tokenizer
from .rope import Rope, apply_rope

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


# ---- the differentiable model (Hugging Face names) ----

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


class TrainModel(nn.Module):
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

        from .load import checkpoint_files
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


# ---- data ----

def batch_at(stream: torch.Tensor, step: int, seed: int, batch_size: int, seq_len: int, bos: int):
    """The batch of `step`: batch_size windows at random offsets (a generator seeded by (seed, step)),
    each BOS + seq_len - 1 tokens -> (inputs, targets) int64 [B, seq_len]; every window's first
    target is predicted from BOS alone, as at evaluation and generation."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=g)
    win = torch.stack([stream[s:s + seq_len] for s in starts.tolist()]).long()
    inputs = torch.cat([torch.full((batch_size, 1), bos), win[:, :-1]], dim=1)
    return inputs, win


def eval_windows(stream: torch.Tensor, seq_len: int, count: int, bos: int):
    """The first `count` consecutive windows of the held-out stream (BOS + seq_len - 1 tokens each)."""
    n = min(count, stream.numel() // seq_len)
    win = stream[:n * seq_len].view(n, seq_len).long()
    return torch.cat([torch.full((n, 1), bos), win[:, :-1]], dim=1), win


def losses(model, inputs, targets, mtp_lambda: float):
    """(total, main, [mtp depth 1, ...]): cross entropies in nats per token (0-d tensors); total =
    main + mtp_lambda * mean over the depths (DeepSeek-V3's MTP objective)."""
    logits, mtp = model(inputs, targets)
    main = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    extra = [F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten()) for k, lg in enumerate(mtp, start=1)]
    total = main + mtp_lambda * torch.stack(extra).mean() if extra else main
    return total, main, extra


@torch.no_grad()
def heldout_nats_per_byte(model, inputs, targets, nbytes: torch.Tensor, chunk: int = 16) -> list:
    """[main head, MTP depth 1, ...] in nats per byte of the tokens each head predicts."""
    nll = None
    for i in range(0, inputs.shape[0], chunk):
        tg = targets[i:i + chunk]
        logits, mtp = model(inputs[i:i + chunk], tg)
        part = [F.cross_entropy(lg.flatten(0, 1), tg[:, k:].flatten(), reduction="sum").item()
                for k, lg in enumerate([logits, *mtp])]
        nll = part if nll is None else [x + y for x, y in zip(nll, part)]
    return [x / nbytes[targets[:, k:]].sum().item() for k, x in enumerate(nll)]


# ---- training ----

def lr_at(step, steps, lr, warmup):
    """Linear warmup, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _parser():
    p = argparse.ArgumentParser(prog="python -m dsv3.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (tokenizer, resumable state, exported checkpoints)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="DeepSeek-V3's gamma")
    p.add_argument("--mtp-layers", type=int, default=1, help="multi-token-prediction depth (0: none)")
    p.add_argument("--mtp-lambda", type=float, default=0.3, help="weight of the mean MTP loss")
    p.add_argument("--init-from", default=None, help="start from this checkpoint's weights and tokenizer (its "
                                                     "config must be the preset's; see TrainModel.load_hf)")
    p.add_argument("--train-only", choices=["all", "mtp"], default="all",
                   help="mtp: freeze the main model (embedding, decoder layers, head) and train the MTP layers")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of the periodic evaluation")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--heldout-every", type=int, default=20, help="one stdlib file in N is held out")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N stdlib files (tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (continue later with --resume)")
    p.add_argument("--no-export", action="store_true", help="stop after training (no checkpoints, no evaluation)")
    return p


def _settings(a):
    """The arguments that define the run (a resumed run must have the same)."""
    return {k: v for k, v in vars(a).items() if k not in ("out", "resume", "stop_at", "threads", "no_export",
                                                          "eval_every", "save_every")}


def _save_state(path, model, opt, step, a, history, seconds):
    tmp = path + ".tmp"
    torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, settings=_settings(a),
                    history=history, seconds=seconds), tmp)  # no expert loads: update_bias just zeroed them
    os.replace(tmp, path)  # a run killed while saving keeps the previous state


def _check(a, margs: ModelArgs):
    """ValueError naming the option that cannot run."""
    for name in ("steps", "batch_size", "eval_every", "eval_windows", "save_every", "heldout_every"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 2 <= a.seq_len <= margs.max_position_embeddings:
        raise ValueError(f"--seq-len must be in [2, max_position_embeddings = {margs.max_position_embeddings}], "
                         f"got {a.seq_len}")
    if not a.lr > 0:
        raise ValueError(f"--lr must be > 0, got {a.lr}")
    if a.mtp_layers < 0 or a.mtp_layers > a.seq_len - 2:
        raise ValueError(f"--mtp-layers must be in [0, seq_len - 2 = {a.seq_len - 2}], got {a.mtp_layers}")
    if not a.mtp_lambda >= 0:
        raise ValueError(f"--mtp-lambda must be >= 0, got {a.mtp_lambda}")
    if a.train_only == "mtp" and not (a.mtp_layers and a.mtp_lambda):
        raise ValueError("--train-only mtp needs --mtp-layers >= 1 and --mtp-lambda > 0")
    if a.init_from is not None:
        init = dataclasses.asdict(ModelArgs.from_json(a.init_from))
        want = dataclasses.asdict(margs)
        diff = sorted(k for k in want if k not in ("num_nextn_predict_layers", "quantization_config")
                      and init[k] != want[k])
        if diff:
            raise ValueError(f"--init-from {a.init_from}: its config differs from the preset's in {diff}")


def train(a) -> dict:
    from tqdm import tqdm
    margs = ModelArgs(**PRESETS[a.preset])
    _check(a, margs)
    margs.num_nextn_predict_layers = a.mtp_layers
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    state_path = os.path.join(a.out, "train_state.pt")
    state = None
    if a.resume:
        if not os.path.exists(state_path):
            raise FileNotFoundError(f"--resume: no {state_path}")
        state = torch.load(state_path, weights_only=False)
        given = _settings(a)
        if state["settings"] != given:
            diff = {k: (v, given.get(k)) for k, v in state["settings"].items() if given.get(k) != v}
            raise ValueError(f"--resume: the saved run has other settings (saved, given): {diff}")

    files = corpus.stdlib_files()[:a.max_files]
    train_texts, heldout_texts = corpus.split(files, a.heldout_every)
    if not heldout_texts or not train_texts:
        raise ValueError("the corpus split left no training or no held-out file (raise --max-files)")
    tok_path = os.path.join(a.out, "tokenizer.json")
    if state is None:
        if a.init_from is not None:  # its embedding's rows are that tokenizer's ids
            tokenizer = load_tokenizer(a.init_from)
        else:
            tokenizer = corpus.train_tokenizer(train_texts, PRESETS[a.preset]["vocab_size"])
        tokenizer.save(tok_path)
    tokenizer = load_tokenizer(a.out)  # the saved file, also on resume
    bos, eos = margs.bos_token_id, margs.eos_token_ids[0]
    stream = corpus.encode_documents(tokenizer, train_texts, bos, eos)
    heldout = corpus.encode_documents(tokenizer, heldout_texts, bos, eos)
    if stream.numel() <= a.seq_len or heldout.numel() < a.seq_len:
        raise ValueError(f"--seq-len {a.seq_len} is longer than the training or held-out tokens "
                         f"({stream.numel()}, {heldout.numel()}; raise --max-files)")
    nbytes = corpus.token_bytes(tokenizer)
    ev_in, ev_tg = eval_windows(heldout, a.seq_len, a.eval_windows, bos)

    torch.manual_seed(a.seed)
    model = TrainModel(margs)
    model.init_weights()
    if a.init_from is not None:
        absent = model.load_hf(a.init_from)
        print(f"--init-from {a.init_from}: {len(absent)} tensors not in it (MTP layers: from the last "
              f"decoder layer, or initialized)", file=sys.stderr)
    balanced = model.moe_layers()
    if a.train_only == "mtp":
        mine = {id(p) for layer in model.mtp_layers() for p in layer.parameters()} - {id(model.lm_head.weight)}
        for p in model.parameters():
            p.requires_grad_(id(p) in mine)
        balanced = [m for layer in model.mtp_layers() for m in layer.modules() if isinstance(m, MoE)]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "norm" not in n]
    other = [p for n, p in trainable if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=a.weight_decay), dict(params=other, weight_decay=0.0)],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    step, history, seconds = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, history, seconds = state["step"], state["history"], state["seconds"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"corpus: {len(train_texts)} training files ({stream.numel():,} tokens), {len(heldout_texts)} held out "
          f"({heldout.numel():,} tokens); model: {n_params / 1e6:.2f}M parameters", file=sys.stderr)

    bar = tqdm(total=a.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - seconds
    last_eval = history[-1]["heldout_nats_per_byte"] if history else None
    last = a.steps if a.stop_at is None else min(a.steps, a.stop_at)
    while step < last:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        inputs, targets = batch_at(stream, step, a.seed, a.batch_size, a.seq_len, bos)
        loss, main, mtp = losses(model, inputs, targets, a.mtp_lambda)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for m in balanced:  # a frozen layer's bias stays (its loads are still counted, and dropped)
            m.update_bias(a.bias_update_rate)
        for m in model.moe_layers():
            m.load.zero_()
        step += 1
        record = dict(step=step, loss=main.item())  # the main head's, comparable with runs without MTP
        if mtp:
            record["mtp_loss"] = [m.item() for m in mtp]
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            last_eval, *mtp_eval = heldout_nats_per_byte(model, ev_in, ev_tg, nbytes)
            record["heldout_nats_per_byte"] = last_eval
            if mtp_eval:
                record["heldout_mtp_nats_per_byte"] = mtp_eval
            model.train()
        history.append(record)
        post = dict(loss=f"{record['loss']:.3f}", heldout=f"{last_eval:.4f} nats/B" if last_eval else "-")
        if mtp:
            post["mtp"] = f"{record['mtp_loss'][0]:.3f}"
        bar.set_postfix(**post, refresh=False)
        bar.update(1)
        if step % a.save_every == 0 or step == last:
            _save_state(state_path, model, opt, step, a, history, time.perf_counter() - t0)
    bar.close()
    seconds = time.perf_counter() - t0
    result = dict(steps=step, seconds=round(seconds, 1), tokens=step * a.batch_size * a.seq_len,
                  parameters=n_params, final_loss=history[-1]["loss"] if history else None,
                  heldout_nats_per_byte_subset=last_eval, history=history)
    if step == a.steps and not a.no_export:
        record = {k: result[k] for k in ("seconds", "tokens", "parameters", "final_loss")}
        result.update(export(model, margs, tokenizer, heldout_texts, a, record))
    return result


def export(model, margs: ModelArgs, tokenizer, heldout_texts, a, record: dict) -> dict:
    """bf16 and FP8 checkpoints in OUT/bf16, OUT/fp8, evaluated through dsv3 (the kernels) on the
    whole held-out set; OUT/fp8/metrics.json records the numbers, OUT/heldout_sample.txt is the
    fixed sample the tests check the shipped model on."""
    from safetensors.torch import save_file

    from .evaluate import evaluate
    from .quantize import quantize_checkpoint
    bf16_dir, fp8_dir = os.path.join(a.out, "bf16"), os.path.join(a.out, "fp8")
    os.makedirs(bf16_dir, exist_ok=True)
    save_file(model.hf_state_dict(), os.path.join(bf16_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = margs.to_hf()
    cfg["torch_dtype"] = "bfloat16"
    with open(os.path.join(bf16_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tokenizer.save(os.path.join(bf16_dir, "tokenizer.json"))
    with open(os.path.join(bf16_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=corpus.BOS, eos_token=corpus.EOS,
                       model_max_length=margs.max_position_embeddings), f, indent=2)
    quantize_checkpoint(bf16_dir, fp8_dir)

    heldout = "".join(heldout_texts)
    sample = heldout_sample(heldout_texts)
    with open(os.path.join(a.out, "heldout_sample.txt"), "w", encoding="utf-8") as f:
        f.write(sample)
    metrics = dict(window=a.seq_len, heldout=dict(files=len(heldout_texts), bytes=len(heldout.encode())),
                   heldout_sample=dict(bytes=len(sample.encode()),
                                       sha256=hashlib.sha256(sample.encode()).hexdigest()))
    for name, path in (("bf16", bf16_dir), ("fp8", fp8_dir)):
        m = load(path, dtype=torch.bfloat16, device="cpu", backend="cpu", progress=False)
        full, part = evaluate(m, tokenizer, heldout, a.seq_len), evaluate(m, tokenizer, sample, a.seq_len)
        metrics["heldout"][name] = full["nats_per_byte"]
        metrics["heldout_sample"][name] = part["nats_per_byte"]
        if "mtp_nats_per_byte" in full:  # the MTP head (second next token)
            for r, key in ((full, "heldout"), (part, "heldout_sample")):
                metrics[key][f"mtp_{name}"] = {k[4:]: r[k] for k in ("mtp_nats_per_byte", "mtp_nats_per_token",
                                                                     "mtp_agreement")}
        metrics.setdefault("expert_load", {})[name] = full["expert_load"]
        print(f"{name}: held-out {full['nats_per_byte']:.4f} nats/byte", file=sys.stderr)
    metrics["fp8_vs_bf16"] = metrics["heldout"]["fp8"] / metrics["heldout"]["bf16"] - 1
    metrics["train"] = dict(preset=a.preset, seed=a.seed, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                            lr=a.lr, bias_update_rate=a.bias_update_rate, mtp_layers=a.mtp_layers,
                            mtp_lambda=a.mtp_lambda, python=sys.version.split()[0],
                            torch=torch.__version__, threads=torch.get_num_threads(), **record)
    with open(os.path.join(fp8_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return dict(metrics=metrics)


def heldout_sample(heldout_texts, max_bytes: int = 16384) -> str:
    """The held-out files from the first on, cut at the last whole line that fits in max_bytes."""
    out, size = [], 0
    for text in heldout_texts:
        for line in text.splitlines(keepends=True):
            n = len(line.encode())
            if size + n > max_bytes and out:
                return "".join(out)
            out.append(line)
            size += n
    return "".join(out)


def main(argv=None):
    a = _parser().parse_args(argv)
    try:
        r = train(a)
    except (FileNotFoundError, ValueError) as e:
        _parser().exit(2, f"python -m dsv3.train: error: {e}\n")
    print(json.dumps({k: v for k, v in r.items() if k not in ("history", "metrics")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
