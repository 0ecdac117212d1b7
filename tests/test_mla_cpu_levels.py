"""The MLA tests at the vector levels of the C++ CPU kernels below the host's best: the default run
covers the best one and tests/test_cpu_portable.py the scalar one, but a CPU without AVX-512 (most
users' machines) runs the avx2 loop, and one without avx512_bf16 the fp32 avx512 loop.
DSV3_KERNELS_CPU_ISA is read once per process, hence a subprocess per level."""

import os
import subprocess
import sys

import pytest

from dsv3_kernels import _native

LEVELS = ["scalar", "avx2", "avx512", "avx512_bf16"]  # common/cpu_isa.h's order


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_mla_cpu_kernels_pass_at_level(level):
    if not _native.has_kernel("mla_decode", "CPU"):
        pytest.skip("the C++ CPU kernels are not built")
    host = _native._C.cpu_isa()[1]
    if LEVELS.index(host) <= LEVELS.index(level):
        pytest.skip(f"the host's best level is {host}: the default run covers it (or the host lacks {level})")
    env = {**os.environ, "DSV3_KERNELS_CPU_ISA": level, "TRITON_INTERPRET": "0"}
    tests = [os.path.join(os.path.dirname(__file__), f) for f in ("test_mla.py", "test_mla_fp8_cache.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-k", "cpu-cpu"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
