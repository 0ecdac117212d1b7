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


CPU_ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")  # lowest first (csrc/common/cpu_isa.h)


def host_cpu_isa_levels() -> tuple:
    """The levels this host can run, lowest first (() without _C)."""
    return CPU_ISA_LEVELS[:CPU_ISA_LEVELS.index(_C.cpu_isa()[1]) + 1] if loaded() else ()


def set_cpu_isa(level: str) -> str:
    """Run the C++ CPU kernels at `level` from now on (capped at the host's best); returns the level
    in use. Tests and benchmarks use it to run every level in one process; users set
    DSV3_KERNELS_CPU_ISA instead. Raises ValueError for a name that is not a level."""
    if not isinstance(level, str):
        raise TypeError(f"level must be one of {CPU_ISA_LEVELS}, got {level!r}")
    return _C.set_cpu_isa(level)


def set_cpu_bf16_gemm(choice) -> bool:
    """Whether the avx512_bf16 level's compute-bound GEMMs (fp8_gemm above its few-rows path)
    multiply with vdpbf16ps (True) or in fp32: choice True / False, or None for the host's rule
    (fp32 on Intel cores, where vdpbf16ps has half the FMA's product rate; csrc/common/cpu_isa.h).
    Returns the setting now in effect. Tests run both paths this way."""
    if choice not in (True, False, None):
        raise TypeError(f"choice must be True, False or None, got {choice!r}")
    return _C.set_cpu_bf16_gemm(-1 if choice is None else int(choice))


def status() -> str:
    if not loaded():
        return f"dsv3_kernels._C not loaded: {_ERROR}"
    cuda = has_kernel("fp8_gemm", "CUDA")
    used, host = _C.cpu_isa()
    isa = f"CPU kernels: {used}" + ("" if used == host else f" (the host's best: {host})")
    return ("_C built with CPU and CUDA kernels" if cuda else "_C built with CPU kernels only") + f"; {isa}"
