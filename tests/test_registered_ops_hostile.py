"""Every registered op torch.ops.dsv3_kernels.<op> (the C++ kernels on CPU tensors) and
<op>_triton (Triton's interpreter here, a GPU there) called directly with malformed arguments:
each call returns or raises a Python exception, never a signal (a kernel run out of bounds), and
a wrong dtype is always refused. A non-contiguous input either is refused or gives what its
contiguous copy gives. The calls run in a subprocess, so that a crash fails this test with the
case that caused it instead of taking pytest down."""

import os
import subprocess
import sys

import pytest

_CHILD = r'''
import math, sys, traceback, warnings
import torch
import dsv3_kernels
from dsv3_kernels import dispatch
from dsv3_kernels.reference import fp8 as ref_fp8, mla as ref_mla

warnings.filterwarnings("ignore")
torch.manual_seed(0)
F8 = torch.float8_e4m3fn


def valid(op):
    """One set of valid arguments of `op`, in its schema's order (csrc/registration.cpp): odd
    sizes, tensors with random values."""
    if op == "act_quant":
        return [torch.randn(3, 200), 128, False]
    if op == "weight_quant":
        return [torch.randn(130, 200), 128]
    if op == "weight_dequant":
        w, s = ref_fp8.weight_quant(torch.randn(130, 200))
        return [w, s, 128, torch.bfloat16]
    if op == "fp8_gemm":
        a, a_s = ref_fp8.act_quant(torch.randn(3, 256))
        b, b_s = ref_fp8.weight_quant(torch.randn(130, 256))
        return [a, a_s, b, b_s, torch.float32]
    if op == "mla_decode":
        cache = torch.randn(3, 16, 576)
        return [torch.randn(2, 1, 3, 576), cache, torch.tensor([[0, 2], [1, 0]], dtype=torch.int32),
                torch.tensor([20, 5], dtype=torch.int32), 0.1, True, 0]
    if op == "mla_cache_write":
        return [torch.randn(3, 512), torch.randn(3, 64), torch.zeros(2, 16, 576), torch.tensor([0, 5, 31]),
                torch.rand(512) + 0.5, 1e-6, torch.rand(3, 32), torch.rand(3, 32)]
    if op == "moe_route":
        return [torch.randn(5, 16), torch.randn(16), 4, 2, 3, 2.5, "sigmoid", True]
    if op == "moe_permute":
        return [torch.randn(5, 256), torch.randint(0, 8, (5, 3), dtype=torch.int32), 8, 4, True]
    if op == "grouped_gemm":
        return [torch.randn(7, 128).bfloat16(), torch.randn(3, 40, 128).bfloat16(),
                torch.tensor([0, 2, 2, 7], dtype=torch.int32), None, None]
    if op == "silu_mul":
        return [torch.randn(4, 512), True]
    if op == "moe_unpermute":
        return [torch.randn(6, 100), torch.rand(3, 2), torch.tensor([[0, 3], [5, 1], [2, -1]], dtype=torch.int32)]
    if op == "fused_moe":
        return [torch.randn(3, 128).bfloat16(), torch.randn(4, 256, 128).bfloat16() * 0.1,
                torch.randn(4, 128, 128).bfloat16() * 0.1, torch.rand(3, 2),
                torch.randint(0, 4, (3, 2), dtype=torch.int32), None, None]
    if op == "ep_dispatch":
        return [torch.randn(5, 256), torch.randint(0, 8, (5, 3), dtype=torch.int32), torch.rand(5, 3), 8, 2, True]
    if op == "rms_norm":
        return [torch.randn(3, 100), torch.rand(100), 1e-6, torch.randn(3, 100)]
    raise KeyError(op)


def noncontiguous(t):
    """t's values with other strides: every other element of a buffer twice as large."""
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), 7, dtype=t.dtype) if t.dim() else None
    if buf is None:
        return None
    buf[..., ::2] = t
    return buf[..., ::2]


def mutations(args):
    """(label, args, must_raise) variants: one argument changed at a time."""
    for i, a in enumerate(args):
        def put(v, i=i):
            return args[:i] + [v] + args[i + 1:]
        if isinstance(a, torch.Tensor):
            yield f"arg{i}:int16", put(a.to(torch.int16) if a.dtype != F8 else a.view(torch.uint8).to(torch.int16)), True
            yield f"arg{i}:unsqueeze", put(a.unsqueeze(0)), False
            yield f"arg{i}:squeeze", put(a.reshape(-1)), False
            yield f"arg{i}:0-d", put(a.reshape(-1)[0].clone()), False
            if a.dim():
                yield f"arg{i}:last-1", put(a[..., :-1].contiguous()), False
                yield f"arg{i}:last+1", put(torch.cat([a, a[..., :1]], -1)), False
                yield f"arg{i}:first-1", put(a[:-1].contiguous()), False
                yield f"arg{i}:first+3", put(torch.cat([a, a[:1], a[:1], a[:1]])), False
                yield f"arg{i}:empty", put(a[:0]), False
                yield f"arg{i}:noncontiguous", put(noncontiguous(a)), "same"
                if a.dtype in (torch.int32, torch.int64):
                    yield f"arg{i}:huge-values", put(torch.full_like(a, 2 ** 30)), False
                    yield f"arg{i}:negative-values", put(torch.full_like(a, -7)), False
        elif isinstance(a, bool):
            yield f"arg{i}:flipped", put(not a), False
        elif isinstance(a, int):
            for v in (-1, 0, 3, 2 ** 31, 2 ** 62):
                yield f"arg{i}:{v}", put(v), False
        elif isinstance(a, float):
            for v in (math.nan, -1.0, math.inf):
                yield f"arg{i}:{v}", put(v), False
        elif isinstance(a, str):
            yield f"arg{i}:bogus", put("bogus"), False
        elif isinstance(a, torch.dtype):
            yield f"arg{i}:int8", put(torch.int8), False
        if a is None or isinstance(a, torch.Tensor):
            yield f"arg{i}:None", put(None), False


def outputs(r):
    return [t for t in (r if isinstance(r, (tuple, list)) else [r]) if isinstance(t, torch.Tensor)]


def same(r, base):
    return all(x.shape == y.shape and torch.equal(x.view(torch.uint8) if x.dtype == F8 else x,
                                                 y.view(torch.uint8) if y.dtype == F8 else y) or
               (x.is_floating_point() and x.dtype != F8 and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True))
               for x, y in zip(outputs(r), outputs(base)))


failures = []
calls = 0
for op in sys.argv[1].split(","):
    for suffix in sys.argv[2].split(","):
        name = op + suffix
        if not hasattr(torch.ops.dsv3_kernels, name):
            continue
        fn = getattr(torch.ops.dsv3_kernels, name)
        base = fn(*valid(op))
        for label, args, expect in mutations(valid(op)):
            print(f"CASE {name} {label}", flush=True)
            calls += 1
            try:
                r = fn(*args)
            except Exception:
                continue
            if expect is True:
                failures.append(f"{name} {label}: not refused")
            elif expect == "same" and not same(r, base):
                failures.append(f"{name} {label}: a result unlike the contiguous input's")
print("\n".join(failures))
print(f"DONE {calls} calls, {len(failures)} failures", flush=True)
sys.exit(1 if failures else 0)
'''

FP8_MLA_NORM = ["act_quant", "weight_quant", "weight_dequant", "fp8_gemm", "mla_decode", "mla_cache_write",
                "rms_norm"]
MOE = ["moe_route", "moe_permute", "grouped_gemm", "silu_mul", "moe_unpermute", "fused_moe", "ep_dispatch"]


def _run_child(ops, suffixes):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if "_triton" in suffixes:  # importing the modules registers the Triton ops
        pytest.importorskip("triton")
    code = ("import importlib\nfrom dsv3_kernels import dispatch\n"
            "[importlib.import_module(dispatch._OPS[o].triton_module) for o in dispatch.ops() "
            "if dispatch._OPS[o].triton_module]\n" if "_triton" in suffixes else "") + _CHILD
    proc = subprocess.run([sys.executable, "-c", code, ",".join(ops), ",".join(suffixes)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    cases = [line for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode} at {cases[-1] if cases else '(start)'}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DONE" in proc.stdout and len(cases) > 50


def test_every_registered_op_is_covered():
    """The lists here name every op that _C registers (a new op must be added to them)."""
    import torch
    import dsv3_kernels  # noqa: F401  (loads _C)
    from dsv3_kernels import _native, dispatch
    if not _native.loaded():
        pytest.skip("the C++ ops are not built")
    native = [op for op in dispatch.ops() if hasattr(torch.ops.dsv3_kernels, op)]
    assert sorted(native) == sorted(FP8_MLA_NORM + MOE)


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpu", "triton"])
@pytest.mark.parametrize("ops", [FP8_MLA_NORM, MOE], ids=["fp8-mla-norm", "moe"])
def test_malformed_arguments_raise(ops, suffix):
    _run_child(ops, [suffix])
