"""Reference MLA (Multi-head Latent Attention) decode over a paged latent cache, in fp32 PyTorch.

The conventions every backend follows (FlashMLA's formats, DeepSeek-V3's absorbed attention):
- kv_cache [num_blocks, block_size, 576]: per token the normalized latent c_kv (512 values, also
  the value) then the RoPE'd key k_pe (64). Token t of request b lives in block
  block_table[b, t // block_size] at offset t % block_size.
- q [B, s_q, H, 576]: the absorbed query (q_nope @ W_UK: 512 | q_pe: 64). The s_q new tokens are
  the last s_q of each sequence of cache_seqlens[b] tokens. With `causal`, new token i sees the
  keys 0 .. seqlen - s_q + i; otherwise every new token sees all seqlen keys.
- out [B, s_q, H, 512] = softmax(softmax_scale * q . k) @ c_kv, in q's dtype;
  lse [B, H, s_q] fp32 = natural-log logsumexp of softmax_scale * q . k.
  A query that sees no key (seqlen 0) gets out = 0 and lse = -inf.
- Non-finite values: a query that sees a key whose score is not finite (NaN or +-inf: a NaN or
  inf in the query, in the key's c_kv or k_pe, in an FP8 tile's scale, an e4m3 NaN code, or a
  product past fp32's range) gets out = NaN and lse = NaN for that query (its head and new token)
  only. The IEEE reading: softmax over a NaN score is NaN, and an inf score gives inf - inf. A
  softmax that quietly dropped the key (out 0 / lse -inf, "no key") or kept a finite lse would hide
  the corruption from the layers after it. Since c_kv is also the value, a NaN or inf value always
  comes with a non-finite score for every query that sees it, so no other rule is needed for the
  values. Keys a query does not see (the causal mask; slots past the sequence) never affect it,
  whatever they hold: 0 * NaN never reaches an output. A query that sees no key gets 0 / -inf
  whatever q holds (it multiplies nothing).
- Invalid metadata never makes a kernel read out of bounds: a request whose seqlen is negative or
  longer than max_blocks * block_size, or that needs a block_table entry outside
  [0, num_blocks), gets out = NaN and lse = NaN. Entries of block_table past a request's last
  block are never read. (ops.mla_decode raises an error instead where the metadata is on the CPU.)
- mla_cache_write stores RMSNorm(kv_c) (optional, fused kv_a_layernorm) and RoPE(k_pe) (optional,
  interleaved pairs: (x0, x1) -> (x0 c - x1 s, x0 s + x1 c), DeepSeek-V3's complex form).
- The FP8 cache (a uint8 cache [num_blocks, block_size, 656]) is FlashMLA's 656-byte token
  ("V32_FP8Sparse", the one its sparse decode reads), bytes of one token:
    [0, 512)    c_kv in float8_e4m3fn, tile i = values [128 i, 128 i + 128)
    [512, 528)  4 float32 scales, one per tile: c_kv = e4m3 * scale
    [528, 656)  k_pe in bfloat16 (64 values, not quantized)
  The write quantizes each tile as FlashMLA does: scale = amax / 448 (clamped to >= 1e-4) rounded
  up to a power of two, e4m3 = round_to_nearest_even(c_kv / scale) (exact division: |x| <= 448).
  A NaN in a tile makes its scale NaN (and every code x / NaN NaN), an inf makes it inf (the inf's
  code NaN, the others 0), as act_quant's default format: the tile dequantizes to NaN (e4m3 * NaN,
  0 * inf), so the corruption shows in decode. (Rounding the bits of a NaN or inf scale up would
  wrap them to -0.0 and zero the tile.)
  Decode dequantizes to fp32 and does the math above; with power-of-two scales every backend's
  dequantized values are exact, so only the attention's own rounding differs.
"""

import torch

KV_LORA_RANK = 512  # c_kv, the value
ROPE_DIM = 64  # k_pe
HEAD_DIM = KV_LORA_RANK + ROPE_DIM  # 576 values per cached token
FP8_TILE = 128  # c_kv values per fp32 scale in the FP8 cache
FP8_SCALES = KV_LORA_RANK // FP8_TILE
FP8_SCALE_OFFSET = KV_LORA_RANK  # bytes
FP8_ROPE_OFFSET = FP8_SCALE_OFFSET + 4 * FP8_SCALES  # 528
FP8_TOKEN_BYTES = FP8_ROPE_OFFSET + 2 * ROPE_DIM  # 656


def is_fp8_cache(kv_cache) -> bool:
    """The cache's dtype decides its format: uint8 is the 656-byte FP8 one."""
    return kv_cache.dtype == torch.uint8


def fp8_tile_scale(amax: torch.Tensor) -> torch.Tensor:
    """FlashMLA's scale of a 128-value tile: max(amax / 448, 1e-4) rounded up to a power of two
    (on the bits, so no log2 rounding can pick the wrong power); a NaN or inf amax stays NaN / inf."""
    s = torch.clamp_min(amax.float() / 448.0, 1e-4)
    bits = s.view(torch.int32)
    return torch.where(s.isfinite(), ((bits + 0x7FFFFF) & ~0x7FFFFF).view(torch.float32), s)


def quantize_tokens(c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """c_kv [..., 512], k_pe [..., 64] (any float dtype) -> the FP8 cache bytes uint8 [..., 656]."""
    x = c_kv.float().unflatten(-1, (FP8_SCALES, FP8_TILE))
    scale = fp8_tile_scale(x.abs().amax(-1))
    e4m3 = (x / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).flatten(-2)
    return torch.cat([e4m3.view(torch.uint8), scale.contiguous().view(torch.uint8),
                      k_pe.to(torch.bfloat16).contiguous().view(torch.uint8)], dim=-1)


def dequantize_tokens(raw: torch.Tensor) -> torch.Tensor:
    """FP8 cache bytes uint8 [..., 656] -> fp32 [..., 576] (c_kv = e4m3 * scale | k_pe)."""
    e4m3 = raw[..., :FP8_SCALE_OFFSET].contiguous().view(torch.float8_e4m3fn).float()
    scale = raw[..., FP8_SCALE_OFFSET:FP8_ROPE_OFFSET].contiguous().view(torch.float32)
    c_kv = (e4m3.unflatten(-1, (FP8_SCALES, FP8_TILE)) * scale.unsqueeze(-1)).flatten(-2)
    k_pe = raw[..., FP8_ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()
    return torch.cat([c_kv, k_pe], dim=-1)


def _request_keys(kv_cache, block_row, seqlen):
    """The seqlen cached tokens [seqlen, 576] of one request (fp32), or None if its metadata is
    invalid (see the module docstring)."""
    num_blocks, block_size, width = kv_cache.shape
    if seqlen < 0 or seqlen > block_row.numel() * block_size:
        return None
    blocks = block_row[: -(-seqlen // block_size)].long()
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= num_blocks):
        return None
    tokens = kv_cache[blocks].reshape(-1, width)[:seqlen]
    return dequantize_tokens(tokens) if is_fp8_cache(kv_cache) else tokens.float()


def causal_mask(s_q: int, seqlen: int, causal: bool, device=None) -> torch.Tensor:
    """[s_q, seqlen] bool, True where new token i may attend key j."""
    keys = torch.arange(seqlen, device=device)
    if not causal:
        return torch.ones(s_q, seqlen, dtype=torch.bool, device=device)
    last = seqlen - s_q + torch.arange(s_q, device=device)
    return keys[None, :] <= last[:, None]


def mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal=False, num_splits=0):
    """fp32 reference of dsv3_kernels::mla_decode (num_splits is ignored: the math is exact)."""
    b, s_q, h, _ = q.shape
    out = torch.zeros(b, s_q, h, KV_LORA_RANK, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, s_q), float("-inf"), dtype=torch.float32, device=q.device)
    for i, seqlen in enumerate(cache_seqlens.tolist()):
        kv = _request_keys(kv_cache, block_table[i], seqlen)
        if kv is None:
            out[i], lse[i] = float("nan"), float("nan")
            continue
        scores = torch.einsum("shd,td->hst", q[i].float(), kv) * softmax_scale
        visible = causal_mask(s_q, seqlen, causal, q.device)
        bad = (~scores.isfinite() & visible).any(-1)  # [h, s]: a query that sees a non-finite score
        scores = scores.masked_fill(~visible, float("-inf"))
        lse[i] = torch.logsumexp(scores, dim=-1)
        # Hidden keys weigh exactly 0 (also for a query with no key, whose lse is -inf).
        p = torch.exp(scores - lse[i].unsqueeze(-1)).masked_fill(~visible, 0.0)
        # Non-finite values to 0: they reach only the bad queries (set to NaN below) through their
        # scores, and must not reach the others as 0 * NaN.
        values = kv[:, :KV_LORA_RANK].nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        out[i] = torch.einsum("hst,td->shd", p, values)
        out[i].masked_fill_(bad.T[..., None], float("nan"))
        lse[i].masked_fill_(bad, float("nan"))
    return out.to(q.dtype), lse


def naive_absorbed_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal=False):
    """The plain PyTorch absorbed decode in q's dtype (no fp32 upcast): gathers every request's
    blocks up to the longest sequence, masks, softmaxes. The peer in the benchmarks and the
    yardstick of the low-precision tolerances in the tests. Assumes valid metadata."""
    b, s_q, h, _ = q.shape
    _, block_size, _ = kv_cache.shape
    lens = cache_seqlens.long()
    max_len = max(int(lens.max()), 1) if b else 1
    nblk = -(-max_len // block_size)
    kv = kv_cache[block_table[:, :nblk].long().clamp(0, kv_cache.shape[0] - 1)]
    kv = kv.reshape(b, nblk * block_size, HEAD_DIM)[:, :max_len]
    keys = torch.arange(max_len, device=q.device)
    kv = kv.masked_fill((keys[None, :] >= lens[:, None])[..., None], 0)  # slots past the end: 0 * NaN
    scores = torch.einsum("bshd,btd->bhst", q, kv) * softmax_scale
    last = lens[:, None] - 1  # [b, 1]: last visible key of every new token without causal
    if causal:
        last = lens[:, None] - s_q + torch.arange(s_q, device=q.device)[None, :]
    visible = keys[None, None, :] <= last[:, :, None]  # [b, s_q, t]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhst,btd->bshd", p, kv[..., :KV_LORA_RANK])
    return out, lse


def mla_cache_write(kv_c, k_pe, kv_cache, slot_mapping, kv_norm_weight=None, eps=1e-6,
                    rope_cos=None, rope_sin=None):
    """Reference of dsv3_kernels::mla_cache_write (writes kv_cache in place)."""
    if kv_norm_weight is not None:
        # Hugging Face's DeepseekV3RMSNorm: normalize in fp32, round to the input dtype, scale.
        x = kv_c.float()
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(kv_c.dtype)
        kv_c = kv_norm_weight * normed
    if rope_cos is not None:
        x0, x1 = k_pe.float().unflatten(-1, (-1, 2)).unbind(-1)
        c, s = rope_cos.float(), rope_sin.float()
        k_pe = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if is_fp8_cache(kv_cache):
        kv_cache.view(-1, FP8_TOKEN_BYTES)[slots] = quantize_tokens(kv_c[keep], k_pe[keep])
        return
    flat = kv_cache.view(-1, HEAD_DIM)
    flat[slots, :KV_LORA_RANK] = kv_c[keep].to(kv_cache.dtype)
    flat[slots, KV_LORA_RANK:] = k_pe[keep].to(kv_cache.dtype)


def naive_mla_attention(hidden_q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, softmax_scale, causal=False):
    """Non-absorbed MLA attention of one request, fp32: keys and values expanded per head.

    hidden_q_nope [s_q, H, d_nope], q_pe [s_q, H, 64], c_kv [T, 512], k_pe [T, 64],
    w_uk [H, d_nope, 512], w_uv [H, d_v, 512] (kv_b_proj's rows per head). Returns [s_q, H, d_v].
    The absorbed form computes the same thing as W_UV @ mla_decode(q_nope @ W_UK | q_pe).
    """
    k_nope = torch.einsum("tc,hnc->thn", c_kv, w_uk)
    v = torch.einsum("tc,hvc->thv", c_kv, w_uv)
    scores = (torch.einsum("shn,thn->hst", hidden_q_nope, k_nope)
              + torch.einsum("shr,tr->hst", q_pe, k_pe)) * softmax_scale
    s_q, t = hidden_q_nope.shape[0], c_kv.shape[0]
    scores = scores.masked_fill(~causal_mask(s_q, t, causal, c_kv.device), float("-inf"))
    return torch.einsum("hst,thv->shv", torch.softmax(scores, dim=-1), v)
