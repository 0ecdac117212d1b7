"""Reference FP8 block-scaled quantization and GEMM (DeepSeek-V3's recipe), in fp32 PyTorch.

Conventions shared by every backend (they must agree bit for bit on the quantized values):
- scale = max(amax, 1e-4) / 448 per block; with ue8m0 the scale is rounded *up* to a power of
  two by incrementing the fp32 exponent when the mantissa is non-zero (exact, no log2).
- quantized = e4m3(x / scale), an IEEE fp32 division, round-to-nearest-even, saturating to +-448.
- dequantized = e4m3 value * scale (checkpoints call the weight scale `weight_scale_inv`).
"""

import torch
import torch.nn.functional as F

from ..utils import GEMM_BLOCK, cdiv

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_MIN = 1e-4


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (positive, finite fp32), by exponent increment."""
    bits = scale.view(torch.int32)
    up = (bits + 0x7FFFFF) & ~0x7FFFFF  # carries into the exponent unless the mantissa is 0
    return up.view(torch.float32)


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
    k = a.shape[1]
    a_deq = a.float() * a_scale.float().repeat_interleave(128, 1)[:, :k]
    b_deq = weight_dequant(b, b_scale_inv, 128, torch.float32)
    return (a_deq @ b_deq.T).to(out_dtype)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2): 0 for equal tensors, ~1 - cosine similarity otherwise
    (DeepGEMM's check of an FP8 result against the unquantized product; < 1e-3 passes)."""
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()
