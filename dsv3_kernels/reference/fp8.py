"""Reference FP8 block-scaled quantization and GEMM (DeepSeek-V3's recipe), in fp32 PyTorch.

Conventions shared by every backend (they must agree bit for bit on the quantized values):
- scale = max(amax, 1e-4) / 448 per block; with ue8m0 the scale is rounded *up* to a power of
  two by incrementing the fp32 exponent when the mantissa is non-zero (exact, no log2).
- quantized = e4m3(x / scale), an IEEE fp32 division, round-to-nearest-even, saturating to +-448.
- dequantized = e4m3 value * scale (checkpoints call the weight scale `weight_scale_inv`).
- fp8_gemm: per 128-wide K block the e4m3 products are summed in fp32, that partial sum is
  multiplied by a_scale * b_scale_inv, and the blocks' results are summed in fp32 (DeepSeek-V3's
  and DeepGEMM's promotion; every backend's kernel computes this, up to the summation order).

Non-finite values (IEEE arithmetic on those formulas, the same on every backend):
- A NaN in a block makes its amax, hence its scale, NaN (torch.amax keeps NaN), and every code of
  the block x / NaN = NaN (0x7F or 0xFF: the sign of a NaN is not specified); an inf makes the
  scale inf, the inf's code NaN (inf / inf) and the block's other codes 0. ue8m0 leaves a NaN or
  inf scale as it is (rounding the bits of an inf or NaN up would wrap them to -0.0, which turned
  the whole block into zeros and hid the NaN).
- The e4m3 codes 0x7F / 0xFF are NaN: weight_dequant gives NaN there, and fp8_gemm's partial sum
  of a block holding one is NaN, so a NaN code in row i of a makes out[i, :] NaN and one in row j
  of b makes out[:, j] NaN.
- fp8_gemm's scales multiply the block's partial sum: a NaN scale makes the outputs it touches
  NaN; an inf one makes them +-inf, or NaN where that partial sum is 0 or +inf and -inf blocks
  meet. Products past fp32's range are not pinned down (where the scales are multiplied in differs).
"""

import torch
import torch.nn.functional as F

from ..utils import GEMM_BLOCK, cdiv

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_MIN = 1e-4


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (positive fp32), by exponent increment; inf and NaN stay."""
    bits = scale.view(torch.int32)
    up = (bits + 0x7FFFFF) & ~0x7FFFFF  # carries into the exponent unless the mantissa is 0
    return torch.where(scale.isfinite(), up.view(torch.float32), scale)


def _block_scale(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    scale = amax.clamp_min(AMAX_MIN) / FP8_MAX
    return round_scale_ue8m0(scale) if ue8m0 else scale


def act_quant(x: torch.Tensor, block_size: int = GEMM_BLOCK, ue8m0: bool = False):
    k = x.shape[-1]
    nb = cdiv(k, block_size)
    xf = F.pad(x.float(), (0, nb * block_size - k)).unflatten(-1, (nb, block_size))
    scale = _block_scale(xf.abs().amax(-1), ue8m0)
    y = (xf / scale.unsqueeze(-1)).flatten(-2)[..., :k]
    return y.to(FP8_DTYPE), scale


def _expand_2d(scale: torch.Tensor, block_size: int, n: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]


def weight_quant(w: torch.Tensor, block_size: int = GEMM_BLOCK):
    n, k = w.shape
    nb, kb = cdiv(n, block_size), cdiv(k, block_size)
    wf = F.pad(w.float(), (0, kb * block_size - k, 0, nb * block_size - n))
    blocks = wf.view(nb, block_size, kb, block_size)
    scale_inv = _block_scale(blocks.abs().amax(dim=(1, 3)), False)
    y = w.float() / _expand_2d(scale_inv, block_size, n, k)
    return y.to(FP8_DTYPE), scale_inv


def weight_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block_size: int = GEMM_BLOCK,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    n, k = w.shape
    return (w.float() * _expand_2d(scale_inv.float(), block_size, n, k)).to(dtype)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[0]
    a_f, b_f = a.float(), b.float()
    b_scale = b_scale_inv.float().repeat_interleave(128, 0)[:n]  # [N, K/128]
    out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for kb in range(k // 128):  # one 128-wide K block at a time: memory stays O(M N)
        blk = slice(kb * 128, (kb + 1) * 128)
        out += (a_f[:, blk] @ b_f[:, blk].T) * (a_scale[:, kb, None].float() * b_scale[None, :, kb])
    return out.to(out_dtype)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2): 0 for equal tensors, ~1 - cosine similarity otherwise
    (DeepGEMM's check of an FP8 result against the unquantized product; < 1e-3 passes)."""
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()
