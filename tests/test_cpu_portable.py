"""The portable (non-AVX-512) C++ CPU kernels pass the same tests as the AVX-512 ones. They are what a
CPU without AVX-512 runs; DSV3_KERNELS_CPU_ISA=scalar forces them, =avx2 the AVX2 loops of the ops
that have them (read once per process, hence a subprocess)."""

import os
import subprocess
import sys

import pytest

from dsv3_kernels import _native


@pytest.mark.parametrize("test_file, op, isa", [
    ("test_fp8.py", "fp8_gemm", "scalar"), ("test_mla.py", "mla_decode", "scalar"),
    ("test_mla_fp8_cache.py", "mla_decode", "scalar"), ("test_moe_experts.py", "fused_moe", "scalar"),
    ("test_rms_norm.py", "rms_norm", "scalar"), ("test_rms_norm.py", "rms_norm", "avx2"),
])
def test_portable_cpu_kernels_pass(test_file, op, isa):
    if not _native.has_kernel(op, "CPU"):
        pytest.skip("the C++ CPU kernels are not built")
    env = {**os.environ, "DSV3_KERNELS_CPU_ISA": isa, "TRITON_INTERPRET": "0"}
    tests = os.path.join(os.path.dirname(__file__), test_file)
    proc = subprocess.run([sys.executable, "-m", "pytest", tests, "-q", "-p", "no:cacheprovider", "-k", "cpu-cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
