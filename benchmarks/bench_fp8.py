"""FP8 block-scaled family on DeepSeek-V3's GEMM shapes, every backend side by side with peers.

Providers: the dsv3_kernels backends that run natively on the device (the Triton interpreter on
the CPU is a correctness tool, not timed; on the CPU the provider is named with the ISA level its
C++ kernels use, e.g. cpu-avx2: DSV3_KERNELS_CPU_ISA picks it), plus peers:
  bf16_linear     F.linear on the weight dequantized to bf16 beforehand (reads 2x the bytes)
  fp32_linear     F.linear on the weight dequantized to fp32 beforehand, x in fp32 (4x the bytes;
                  on a CPU without fast bf16 the better of the two)
  dequant_linear  weight_dequant + F.linear on every call (what a naive FP8 path does)
  scaled_mm       torch._scaled_mm with DeepSeek's blockwise scales (CUDA, where supported)
The CPU decode goal: M = 1..4 at every shape, the "of copy" column (one thread: OMP_NUM_THREADS=1).
There the calls rotate through copies of the weights that add up to twice the last-level cache
(as bench_moe's fused_moe), so that they come from DRAM as a model's do between two layers.
Run: pytest benchmarks/bench_fp8.py [--device cpu|cuda] (the CPU suite takes a few minutes).
"""

import pytest
import torch
import torch.nn.functional as F

import dsv3_kernels as dk
import roofline
from dsv3_kernels import _native
from conftest import device_of
from dsv3_kernels.reference import fp8 as ref

# (N, K) of DeepSeek-V3's linears: q_a/kv_a fused, q_b, kv_b, o_proj, ..., MoE down
SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
GPU_M = [1, 16, 64, 128, 4096]
CPU_M = [1, 4, 16]
CPU_DECODE_SHAPE = (2112, 7168)  # M = 2, 8, 12 added here


def _backends(device, op):
    return [b for b in dk.available_backends(op, device) if not (b == "triton" and device == "cpu")]


def _cases(device):
    cases = []
    ms = GPU_M if device == "cuda" else CPU_M
    for n, k in SHAPES:
        for m in ms:
            providers = _backends(device, "fp8_linear")
            if device == "cpu" and (m > 1 or (n, k) != CPU_DECODE_SHAPE):
                providers = [p for p in providers if p != "torch"]  # the fp32 reference is slow
            providers += ["bf16_linear", "dequant_linear"] + (["scaled_mm"] if device == "cuda" else ["fp32_linear"])
            cases += [(m, n, k, p) for p in providers]
    if device == "cpu":
        cases += [(m, *CPU_DECODE_SHAPE, p) for m in (2, 8, 12)
                  for p in _backends(device, "fp8_linear")[:1] + ["bf16_linear", "fp32_linear"]]
    return cases


def _label(provider, device):
    """The C++ CPU backend's results carry the ISA level its kernels ran with."""
    return f"cpu-{_native.cpu_isa()}" if provider == "cpu" and device == "cpu" else provider


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(device_of(metafunc.config))
        metafunc.parametrize("case", cases, ids=[f"M{m}-N{n}-K{k}-{p}" for m, n, k, p in cases])
    if "quant_case" in metafunc.fixturenames:
        cases = _quant_cases(device_of(metafunc.config))
        metafunc.parametrize("quant_case", cases, ids=[f"{op}-{m}x{k}-{p}" for op, m, k, p in cases])


def _weights(n, k, device):
    w = torch.randn(n, k, device=device) / k**0.5
    return dk.weight_quant(w)


def _scaled_mm(a, a_s, b, b_s):
    # cuBLASLt's blockwise mode wants the 1x128 activation scales M-major (outer-dim-major).
    return torch._scaled_mm(a, b.t(), scale_a=a_s.t().contiguous().t(), scale_b=b_s.t(), out_dtype=torch.bfloat16)


def test_fp8_linear(bench, device, case):
    """x (bf16) -> y (bf16): act_quant + fp8_gemm for the kernels; the peers start from bf16 x too."""
    m, n, k, provider = case
    b_bytes = {"bf16_linear": 2, "fp32_linear": 4}.get(provider, 1)
    flops, nbytes = roofline.gemm_cost(m, n, k, a_bytes=2, b_bytes=b_bytes)

    def make_args():
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b, b_s = _weights(n, k, device)
        if provider in ("bf16_linear", "fp32_linear"):
            return x, ref.weight_dequant(b, b_s, dtype=torch.bfloat16 if b_bytes == 2 else torch.float32)
        return x, b, b_s

    if provider == "bf16_linear":
        fn = F.linear
    elif provider == "fp32_linear":
        def fn(x, w):
            return F.linear(x.float(), w)
    elif provider == "dequant_linear":
        def fn(x, b, b_s):
            return F.linear(x, dk.weight_dequant(b, b_s))
    elif provider == "scaled_mm":
        def fn(x, b, b_s):
            a, a_s = dk.act_quant(x)
            return _scaled_mm(a, a_s, b, b_s)
        try:
            fn(*make_args())
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._scaled_mm has no blockwise FP8 here: {str(e).splitlines()[0]}")
    else:
        def fn(x, b, b_s):
            return dk.fp8_linear(x, b, b_s, backend=provider)

    precision = {"bf16_linear": "bf16", "dequant_linear": "bf16", "fp32_linear": "fp32"}.get(provider, "fp8")
    decode = device == "cpu" and m <= 4 and provider != "torch"
    bench(fn, make_args, op="fp8_linear", shape=f"M={m} N={n} K={k}", provider=_label(provider, device), flops=flops,
          nbytes=nbytes, precision=precision, baseline="bf16_linear",
          rotate_bytes=max(128 << 20, 2 * roofline.last_level_cache_bytes()) if decode else None)


QUANT_SHAPES = {  # act_quant: [M, K] bf16 activations; weight ops: [N, K] weights
    "act_quant": {"cuda": [(4096, 7168), (64, 7168)], "cpu": [(64, 7168), (16, 2048)]},
    "weight_dequant": {"cuda": [(7168, 2048), (2112, 7168)], "cpu": [(7168, 2048), (2112, 7168)]},
    "weight_quant": {"cuda": [(7168, 2048), (2112, 7168)], "cpu": [(7168, 2048), (2112, 7168)]},
}


def _quant_cases(device):
    return [(op, m, k, p) for op, shapes in QUANT_SHAPES.items() for m, k in shapes[device]
            for p in dk.available_backends(op, device) if not (p == "triton" and device == "cpu")]


def test_quant_ops(bench, device, quant_case):
    op, m, k, provider = quant_case
    if op == "act_quant":
        flops, nbytes = roofline.act_quant_cost(m, k)
        fn = lambda x: dk.act_quant(x, backend=provider)  # noqa: E731
        make_args = lambda: (torch.randn(m, k, device=device, dtype=torch.bfloat16),)  # noqa: E731
    elif op == "weight_dequant":
        flops, nbytes = roofline.weight_dequant_cost(m, k)
        fn = lambda w, s: dk.weight_dequant(w, s, backend=provider)  # noqa: E731
        make_args = lambda: _weights(m, k, device)  # noqa: E731
    else:  # weight_quant reads bf16 and writes fp8 + scales: the bytes of a dequant
        flops, nbytes = roofline.weight_dequant_cost(m, k)
        fn = lambda w: dk.weight_quant(w, backend=provider)  # noqa: E731
        make_args = lambda: (torch.randn(m, k, device=device, dtype=torch.bfloat16),)  # noqa: E731
    bench(fn, make_args, op=op, shape=f"{m}x{k}", provider=_label(provider, device), flops=flops, nbytes=nbytes,
          precision="bf16", baseline="torch")
