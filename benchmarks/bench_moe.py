"""DeepSeekMoE kernels on DeepSeek-V3's shapes, every backend side by side.

moe_route: E=256 experts in 8 groups (4 kept), top-8, sigmoid with the correction bias; the
`torch` provider is the reference (sort-based, eager PyTorch), the baseline.
Run: pytest benchmarks/bench_moe.py [--device cpu|cuda]
"""

import torch

import dsv3_kernels as dk
import roofline
from conftest import device_of

TOKENS = {"cuda": [1, 16, 128, 1024, 8192], "cpu": [1, 16, 128, 1024, 8192]}


def pytest_generate_tests(metafunc):
    if "route_case" in metafunc.fixturenames:
        device = device_of(metafunc.config)
        cases = [(t, p) for t in TOKENS[device] for p in dk.available_backends("moe_route", device)
                 if not (p == "triton" and device == "cpu")]
        metafunc.parametrize("route_case", cases, ids=[f"T{t}-{p}" for t, p in cases])


def test_moe_route(bench, device, route_case):
    tokens, provider = route_case
    flops, nbytes = roofline.moe_route_cost(tokens, 256, 8)

    def make_args():
        return torch.randn(tokens, 256, device=device), torch.randn(256, device=device) * 0.1

    def fn(logits, bias):
        return dk.moe_route(logits, bias, 8, 4, 8, 2.5, backend=provider)

    bench(fn, make_args, op="moe_route", shape=f"T={tokens} E=256", provider=provider, flops=flops,
          nbytes=nbytes, precision="fp32", baseline="torch")
