"""Reference RMSNorm in fp32 PyTorch, optionally fused with the residual add: the exact semantics
every backend of dsv3_kernels::rms_norm follows.

For x [..., D] of dtype T (float32/bfloat16/float16), weight [D] of T and residual None or x's
shape and dtype:
1. h = x, or with a residual h = x + residual rounded to T (torch's T add: fp32 sum, one rounding).
2. normed = h_fp32 * rsqrt(mean(h_fp32^2) + eps), rounded to T: Hugging Face's DeepseekV3RMSNorm,
   what `F.rms_norm(h.float(), (D,), eps=eps).to(T)` gives.
3. out = weight * normed, the product in fp32 and rounded to T (torch's T multiply).
Returns (out, residual_out): residual_out is h with a residual (the next layer's residual stream),
else an empty [0] tensor of T (a new tensor either way: the schema aliases nothing).

What non-finite values do (IEEE arithmetic, nothing special-cased): a NaN in a row of h makes the
whole row of out NaN; an inf in a row of h (and no NaN) makes mean(h^2) inf and the rsqrt 0, so
that row of out is NaN where h is +-inf and +-0 elsewhere; the same zeros come from finite values
whose squares overflow fp32 (|h| > ~1.8e19, possible in bf16). NaN/inf in weight make out NaN/inf
in their column only (inf * 0 is NaN).
"""

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-6, residual=None):
    h = x if residual is None else x + residual
    normed = F.rms_norm(h.float(), (h.shape[-1],), eps=eps).to(x.dtype)
    out = (weight.float() * normed.float()).to(x.dtype)
    return out, (h if residual is not None else x.new_empty(0))
