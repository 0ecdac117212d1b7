"""dsv3_kernels: fast, verified kernels for DeepSeek-V3 inference.

Every op has up to four backends (cuda, triton, cpu, torch) chosen by one rule
(see dsv3_kernels.dispatch); `available_backends(op)` tells which are there.
"""

from . import _native, fake  # noqa: F401  (loads _C and registers its fake kernels)
from .dispatch import BACKENDS, BackendUnavailableError, ENV_VAR
from .ops import (NO_EXPERT, act_quant, available_backends, ep_combine, ep_dispatch, fp8_gemm, fp8_linear, fused_moe,
                  grouped_gemm, mla_cache_write, mla_decode, moe_permute, moe_route, moe_unpermute, rms_norm,
                  silu_mul, weight_dequant, weight_quant)

__all__ = [
    "BACKENDS", "BackendUnavailableError", "ENV_VAR", "NO_EXPERT", "act_quant", "available_backends",
    "ep_combine", "ep_dispatch", "fp8_gemm", "fp8_linear", "fused_moe", "grouped_gemm", "mla_cache_write",
    "mla_decode", "moe_permute", "moe_route", "moe_unpermute", "rms_norm", "silu_mul", "weight_dequant",
    "weight_quant",
]
__version__ = "0.1.0"
