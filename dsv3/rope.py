"""Decoupled RoPE of MLA (qk_rope_head_dim = 64 dims, rotated in interleaved pairs) with YaRN.

YaRN follows transformers' DeepseekV3 (which matches DeepSeek's release): frequencies blend the
interpolated (theta / factor) and extrapolated ones with a linear ramp between the beta_fast and
beta_slow correction dims, and cos/sin are scaled by attention_factor = mscale(factor, mscale) /
mscale(factor, mscale_all_dim) (1 for DeepSeek-V3). The softmax scale's mscale**2 is in
config.ModelArgs.softmax_scale.
"""

import math

import torch

from .config import ModelArgs, yarn_mscale


def inv_freq_and_factor(args: ModelArgs):
    """(inv_freq float32 [dim/2], attention_factor)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = args.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = rs["factor"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    original = rs["original_max_position_embeddings"]

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class Rope:
    """cos/sin tables for positions [0, max_position_embeddings), built once per device."""

    def __init__(self, args: ModelArgs, device=None):
        inv_freq, factor = inv_freq_and_factor(args)
        self.max_positions = args.max_position_embeddings
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        self.cos = (freqs.cos() * factor).to(device)
        self.sin = (freqs.sin() * factor).to(device)

    def __call__(self, positions: torch.Tensor):
        """positions: int64 [T] -> (cos, sin) float32 [T, 32] (the layout mla_cache_write takes)."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, ..., 64] in interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos);
    cos/sin [T, 32] float32. Computed in fp32, returned in x's dtype."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    # (x0 + i x1)(cos + i sin): the same products as the pairs spelled out, in 7 tensor ops instead of 13
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * torch.complex(cos, sin).view(shape)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
