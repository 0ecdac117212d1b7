"""rms_norm (optionally fused with the residual add) on DeepSeek-V3's sizes, every backend side by side.

D = 7168 (the hidden size: input/post-attention/final norms) and 256 (a small model's hidden
size), bf16, decode (1 and 8 rows) and prefill (4096 rows), with and without the residual add.
The baseline ("compose") is what the model computes today, eager ATen ops:
`weight * F.rms_norm(h.float(), (D,), eps).to(dtype)` with h = x or x + residual. Bytes: x (and
residual) read, out (and residual_out) written, the weight read once (roofline.rms_norm_cost).
At decode sizes the time is the per-call overhead (Python, the dispatcher, allocations), not the
bytes. The Triton interpreter on the CPU is a correctness tool and is not timed.
Run: pytest benchmarks/bench_norm.py [--device cpu|cuda]
"""

import torch
import torch.nn.functional as F

import dsv3_kernels as dk
import roofline
from conftest import device_of

ROWS = [1, 8, 4096]
DIMS = [7168, 256]
EPS = 1e-6


def _providers(device):
    return [b for b in dk.available_backends("rms_norm", device) if not (b == "triton" and device == "cpu")] + \
        ["compose"]


def pytest_generate_tests(metafunc):
    if "norm_case" in metafunc.fixturenames:
        device = device_of(metafunc.config)
        cases = [(rows, d, res, p) for rows in ROWS for d in DIMS for res in (False, True) for p in _providers(device)]
        metafunc.parametrize("norm_case", cases, ids=[f"R{r}-D{d}-{'res' if res else 'plain'}-{p}"
                                                      for r, d, res, p in cases])


def _compose(x, weight, residual):
    h = x if residual is None else x + residual
    return weight * F.rms_norm(h.float(), (h.shape[-1],), eps=EPS).to(x.dtype), h


def test_rms_norm(bench, device, norm_case):
    rows, d, residual, provider = norm_case
    flops, nbytes = roofline.rms_norm_cost(rows, d, 2, residual)
    weight = torch.randn(d, device=device).bfloat16()

    def make_args():
        x = torch.randn(rows, d, device=device).bfloat16()
        return x, torch.randn_like(x) if residual else None

    def fn(x, r):
        if provider == "compose":
            return _compose(x, weight, r)
        return dk.rms_norm(x, weight, EPS, r, backend=provider)

    bench(fn, make_args, op="rms_norm", shape=f"R={rows} D={d} bf16{' +residual' if residual else ''}",
          provider=provider, flops=flops, nbytes=nbytes, precision="fp32", baseline="compose")
