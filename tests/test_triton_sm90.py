"""The Triton kernels compile for Hopper (sm_90) without a GPU, in every configuration the ops can
launch: fp8 (e4m3) wgmma in each fp8_gemm config, in-kernel saturating fp8 conversion in the
quantizers, tensor-core mma.sync in the bf16/fp16 MLA decode kernels, moe_route's expert layouts,
rms_norm at DeepSeek-V3's sizes, exact fp32 division, shared memory within bounds, and no register
spills
(dsv3_kernels/triton/aot_check.py)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = """
from dsv3_kernels.triton import aot_check
results = aot_check.check_sm90()
gemm = [a for label, a in results.items() if label.startswith("fp8_gemm")]
mla = [a for label, a in results.items() if label.startswith("mla_")]
moe = [a for label, a in results.items() if label.startswith("moe_route")]
norm = [a for label, a in results.items() if label.startswith("rms_norm")]
print(len(results), len(gemm), len(mla), len(moe), len(norm), max(a["n_regs"] for a in results.values()))
"""


def test_triton_kernels_compile_for_sm90():
    # The real compiler is needed: the interpreter's kernels are plain Python.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    n_all, n_gemm, n_mla, n_moe, n_norm, max_regs = map(int, proc.stdout.split())
    assert n_gemm >= 3 and n_mla >= 9 and n_moe >= 2 and n_norm == 24 and n_all > n_gemm + n_mla + n_moe + n_norm
    assert max_regs <= 255
