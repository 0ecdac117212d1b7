"""Random weights for a model without a checkpoint: dsv3.demo, the tests and the benchmarks.

In the package (not in tests/) because dsv3.demo, which ships, uses it; benchmarks/ and scripts/
import it from here too.
"""

import torch

import dsv3_kernels as dk

from .layers import Linear, RMSNorm, VocabEmbedding
from .model import Transformer
from .moe import Experts, Gate


@torch.no_grad()
def init_random_(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """Random weights (benchmarks, tests): normal(0, std) linears (FP8 ones quantized), unit norms,
    a small positive e_score_correction_bias; drawn on the model's device."""
    device = model.device
    g = torch.Generator(device).manual_seed(seed)  # on the model's device: a 671B slice is tens of GB

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device) * std

    for name, mod in model.named_modules():
        if isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, (Linear, VocabEmbedding)):
            w = randn(*mod.weight.shape)
            if getattr(mod, "fp8", False):
                q, s = dk.weight_quant(w)
                mod.weight.copy_(q)
                mod.weight_scale_inv.copy_(s)
            else:
                mod.weight.copy_(w)
        elif isinstance(mod, Gate):
            mod.weight.copy_(randn(*mod.weight.shape))
            mod.e_score_correction_bias.copy_(torch.rand(mod.e_score_correction_bias.shape, generator=g,
                                                         device=device) * 0.05)
        elif isinstance(mod, Experts):
            for w, s in ((mod.w13, mod.w13_scale_inv), (mod.w2, mod.w2_scale_inv)):
                for e in range(w.shape[0]):
                    x = randn(*w.shape[1:])
                    if s is None:
                        w[e].copy_(x)
                    else:
                        q, qs = dk.weight_quant(x)
                        w[e].copy_(q)
                        s[e].copy_(qs)
    model.reset_absorbed()
    return model
