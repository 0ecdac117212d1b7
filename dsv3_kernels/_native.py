"""Loads the compiled extension dsv3_kernels._C (warns, never fails) and reports what it holds."""

import functools
import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers the dsv3_kernels:: ops)

    _ERROR = None
except ImportError as e:  # not built, or built against another torch
    _ERROR = e
    warnings.warn(f"dsv3_kernels._C could not be loaded ({e}); only the triton and torch backends "
                  "are available. Rebuild with `pip install --no-build-isolation -e .`.", stacklevel=2)


def loaded() -> bool:
    return _ERROR is None


# Cached: _C registers its kernels once, when it loads, and the dispatcher's lookup costs ~2.5 us,
# paid by every op call that picks its backend.
@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether _C registered a kernel for dsv3_kernels::op under dispatch_key ("CPU"/"CUDA")."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"dsv3_kernels::{op}", dispatch_key)


def cpu_isa() -> str | None:
    """The instruction-set level the C++ CPU kernels use: "scalar", "avx2", "avx512" or "avx512_bf16"
    (the host's best, capped by DSV3_KERNELS_CPU_ISA); None without _C. Raises ValueError when
    DSV3_KERNELS_CPU_ISA names no level."""
    return _C.cpu_isa()[0] if loaded() else None


def status() -> str:
    if not loaded():
        return f"dsv3_kernels._C not loaded: {_ERROR}"
    cuda = has_kernel("fp8_gemm", "CUDA")
    used, host = _C.cpu_isa()
    isa = f"CPU kernels: {used}" + ("" if used == host else f" (host: {host}, capped by DSV3_KERNELS_CPU_ISA)")
    return ("_C built with CPU and CUDA kernels" if cuda else "_C built with CPU kernels only") + f"; {isa}"
