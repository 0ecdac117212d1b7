"""Multi-head Latent Attention (DeepSeek-V2/V3) with Hugging Face's parameter names.

q: q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x) when q_lora_rank is null) -> per head
qk_nope | qk_rope. kv_a_proj_with_mqa(x) -> c_kv (512) | k_pe (64, one key shared by all heads).
The cache stores kv_a_layernorm(c_kv) | rope(k_pe) (dsv3_kernels.mla_cache_write fuses both), in
the activations' dtype or, in the FP8 cache (uint8), quantized; with the FP8 cache prefill attends
to the latent read back from it, so that a prompt sees the same keys prefilled or decoded.
- prefill: keys and values materialized per head with kv_b_proj, causal softmax over the new tokens;
- decode: the absorbed form. W_UK (kv_b_proj's first qk_nope rows of each head) folds into
  q_nope, so scores = q_lat . c_kv + q_pe . k_pe over the 576-wide cache (dsv3_kernels.mla_decode),
  and the latent output goes through W_UV (the other v_head_dim rows) afterwards.
Both give the same result up to rounding. Heads are split over tensor-parallel ranks; o_proj is
row-parallel (the caller sums the ranks).
"""

import functools

import torch
import torch.nn.functional as F

import dsv3_kernels as dk
from dsv3_kernels.reference.mla import FP8_TOKEN_BYTES, dequantize_tokens

from .config import KV_LORA_RANK, ROPE_DIM, ModelArgs
from .layers import FusedLinear, Linear, Module, RMSNorm, grouped_gemm_on_cpu
from .parallel import Parallel
from .rope import apply_rope


class MLA(Module):
    """The attention of one layer: this rank's heads (`parallel`'s tensor-parallel split)."""

    def __init__(self, args: ModelArgs, dtype, fp8=False, device=None, *, parallel: Parallel):
        super().__init__()
        h, qk, d = args.num_attention_heads, args.qk_head_dim, args.hidden_size
        self.nope, self.v_dim = args.qk_nope_head_dim, args.v_head_dim
        # whole heads per rank: the column splits below could otherwise cut a head in two
        lo, hi = parallel.shard_range(h, "num_attention_heads")
        self.num_heads = hi - lo
        column, row = dict(split="column", parallel=parallel), dict(split="row", parallel=parallel)
        if args.q_lora_rank is None:
            self.q_proj = Linear(d, h * qk, dtype, fp8, device, **column)
        else:
            self.q_a_proj = Linear(d, args.q_lora_rank, dtype, fp8, device)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, 1e-6, dtype, device)
            self.q_b_proj = Linear(args.q_lora_rank, h * qk, dtype, fp8, device, **column)
        self.kv_a_proj_with_mqa = Linear(d, KV_LORA_RANK + ROPE_DIM, dtype, fp8, device)
        # q_a_proj and kv_a_proj_with_mqa read the same x: one GEMM where they can share a weight
        self.qkv_a = None if args.q_lora_rank is None else FusedLinear.of(self.q_a_proj, self.kv_a_proj_with_mqa)
        self.kv_a_layernorm = RMSNorm(KV_LORA_RANK, 1e-6, dtype, device)
        self.kv_b_proj = Linear(KV_LORA_RANK, h * (self.nope + self.v_dim), dtype, fp8, device, **column)
        self.o_proj = Linear(h * self.v_dim, d, dtype, fp8, device, **row)
        self.softmax_scale = args.softmax_scale()
        self.dtype = dtype
        self._absorbed = None

    def _projections(self, x, rows):
        """(q_nope [n, H, nope], q_pe [n, H, 64], c_kv [N, 512], k_pe [N, 64]) of x [N, hidden]; the
        queries of `rows` only (None: all N)."""
        if self.qkv_a is not None:
            q, c_kv, k_pe = self.qkv_a(x).split_with_sizes([self.qkv_a.sizes[0], KV_LORA_RANK, ROPE_DIM], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q if rows is None else q[rows]))
        else:
            c_kv, k_pe = self.kv_a_proj_with_mqa(x).split_with_sizes([KV_LORA_RANK, ROPE_DIM], dim=-1)
            xq = x if rows is None else x[rows]
            q = self.q_proj(xq) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(xq)))
        q_nope, q_pe = q.view(q.shape[0], self.num_heads, -1).split_with_sizes([self.nope, ROPE_DIM], dim=-1)
        return q_nope, q_pe, c_kv.contiguous(), k_pe.contiguous()

    def absorbed_weights(self):
        """(W_UK^T [H, 512, qk_nope], W_UV [H, v_head_dim, 512]), per head [N, K] for x @ W.T, in the
        activations' dtype; built on first use (FP8 kv_b_proj dequantized once). Call
        reset_absorbed() after changing kv_b_proj."""
        if self._absorbed is None:
            w = self.kv_b_proj.dequantized(self.dtype)
            w = w.view(self.num_heads, self.nope + self.v_dim, KV_LORA_RANK)
            self._absorbed = (w[:, :self.nope].transpose(1, 2).contiguous(), w[:, self.nope:].contiguous())
        return self._absorbed

    def reset_absorbed(self):
        self._absorbed = None

    def forward(self, x, batch, kv_cache, rope):
        """x: [N, hidden], rope: the (cos, sin) fp32 [N, 32] of batch.positions -> this rank's
        partial o_proj output [N, hidden]; writes the N tokens
        into kv_cache [num_blocks, block_size, 576] (or the FP8 cache, uint8 [.., FP8_TOKEN_BYTES]) at
        batch.slot_mapping. With batch.query_rows (decode), the output covers those rows only."""
        cos, sin = rope
        rows = batch.query_rows
        q_nope, q_pe, c_kv, k_pe = self._projections(x, rows)
        q_pe = apply_rope(q_pe, cos, sin) if rows is None else apply_rope(q_pe, cos[rows], sin[rows])
        n = q_nope.shape[0]
        fp8 = kv_cache.dtype == torch.uint8
        if not fp8 and kv_cache.dtype != self.dtype:  # the write takes the cache's dtype (FP8: it quantizes)
            c_kv, k_pe = c_kv.to(kv_cache.dtype), k_pe.to(kv_cache.dtype)
        dk.mla_cache_write(c_kv, k_pe, kv_cache, batch.slot_mapping,
                           self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin, backend=self.backend)
        if batch.prefill and fp8:
            latent = dequantize_tokens(kv_cache.view(-1, FP8_TOKEN_BYTES)[batch.slot_mapping]).to(self.dtype)
            out = self._prefill(q_nope, q_pe, *latent.split([KV_LORA_RANK, ROPE_DIM], dim=-1), batch.seq_lens)
        elif batch.prefill:
            out = self._prefill(q_nope, q_pe, self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin), batch.seq_lens)
        else:
            out = self._decode(q_nope, q_pe, kv_cache, batch)
        return self.o_proj(out.reshape(n, -1))

    def _prefill(self, q_nope, q_pe, c_kv, k_pe, seq_lens):
        kv = self.kv_b_proj(c_kv).view(c_kv.shape[0], self.num_heads, -1)
        k_nope, v = kv.split_with_sizes([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, N, 192]
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1).transpose(0, 1)
        v = v.transpose(0, 1)
        out, start = [], 0
        for length in seq_lens:  # each request attends to its own tokens only
            s = slice(start, start + length)
            out.append(F.scaled_dot_product_attention(q[:, s], k[:, s], v[:, s], is_causal=True,
                                                      scale=self.softmax_scale))
            start += length
        return torch.cat(out, dim=1).transpose(0, 1)  # [N, H, v]

    def _decode(self, q_nope, q_pe, kv_cache, batch):
        # q_nope, q_pe and the absorbed weights are all in the activations' dtype (self.dtype)
        w_uk_t, w_uv = self.absorbed_weights()
        b = batch.cache_seqlens.shape[0]
        q = torch.cat([self._per_head(q_nope, w_uk_t), q_pe], dim=-1)
        if kv_cache.dtype not in (torch.uint8, q.dtype):  # q in the cache's dtype (FP8 cache: the activations')
            q = q.to(kv_cache.dtype)
        q = q.view(b, -1, self.num_heads, KV_LORA_RANK + ROPE_DIM)
        out, _ = dk.mla_decode(q, kv_cache, batch.block_table, batch.cache_seqlens, self.softmax_scale,
                               causal=True, backend=self.backend)
        return self._per_head(out.reshape(-1, self.num_heads, KV_LORA_RANK).to(self.dtype), w_uv)

    def _per_head(self, x, w):
        """x [n, H, K] @ w[h].T per head -> [n, H, N] (w [H, N, K]). bf16 on the CPU
        (layers.grouped_gemm_on_cpu): dsv3_kernels.grouped_gemm with one group per head (bf16 bmm
        takes ~3x longer there at decode sizes); else bmm."""
        n, h, k = x.shape
        if not grouped_gemm_on_cpu(x, self.backend):
            return torch.einsum("nhk,hjk->nhj", x, w)
        out = dk.grouped_gemm(x.transpose(0, 1).reshape(h * n, k).contiguous(), w, _head_offsets(h, n),
                              backend=self.backend)
        return out.view(h, n, -1).transpose(0, 1)


@functools.lru_cache(maxsize=64)
def _head_offsets(heads, rows):
    """The grouped GEMM's offsets of `heads` groups of `rows` rows (a decode step's, reused)."""
    return torch.arange(0, (heads + 1) * rows, rows, dtype=torch.int32)
