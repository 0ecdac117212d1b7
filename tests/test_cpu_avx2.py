"""The AVX2 C++ CPU kernels (what AMD Zen 2/3 and Intel client CPUs run) pass the same tests as the
others, also on an AVX-512 host: DSV3_KERNELS_CPU_ISA=avx2 forces them (read once per process, hence
a subprocess)."""

import os
import subprocess
import sys

import pytest

from dsv3_kernels import _native

LEVELS = ["scalar", "avx2", "avx512", "avx512_bf16"]


@pytest.mark.parametrize("test_file, op", [("test_fp8.py", "fp8_gemm"), ("test_moe_experts.py", "fused_moe"),
                                           ("test_ep_dispatch.py", "ep_dispatch")])
def test_avx2_cpu_kernels_pass(test_file, op):
    if not _native.has_kernel(op, "CPU"):
        pytest.skip("the C++ CPU kernels are not built")
    from dsv3_kernels import _C

    if LEVELS.index(_C.cpu_isa()[1]) < LEVELS.index("avx2"):
        pytest.skip("the host has no AVX2 + FMA + F16C")
    env = {**os.environ, "DSV3_KERNELS_CPU_ISA": "avx2", "TRITON_INTERPRET": "0"}
    tests = os.path.join(os.path.dirname(__file__), test_file)
    proc = subprocess.run([sys.executable, "-m", "pytest", tests, "-q", "-p", "no:cacheprovider", "-k", "cpu-cpu"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
