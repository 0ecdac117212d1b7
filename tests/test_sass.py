"""Static checks of the compiled CUDA kernels in dsv3_kernels/_C.so (no GPU needed).

Reads the module's SASS and resource usage with cuobjdump (the one shipped in the triton wheel)
and checks that (a) every FP8 GEMM kernel runs on wgmma FP8 (QGMMA) in its sm_90a code, (b) no
kernel spills registers or otherwise uses local memory / a stack frame, (c) the quantisation
kernels are there. Skipped only when _C was built without CUDA kernels.
"""

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

import dsv3_kernels
from dsv3_kernels import _native

# The CUTLASS GEMMs are wrapped in dsv3::fp8::Sm90aOnly<...> (see fp8_gemm_cutlass.cu).
GEMM_PATTERN = re.compile(r"Sm90aOnly")
GEMM_INSTANTIATIONS = 4  # {bf16, fp32} x {128x128 direct, 128x64 swap-AB}
QUANT_KERNELS = ("act_quant_vec_kernel", "act_quant_scalar_kernel", "weight_quant_kernel",
                 "weight_dequant_kernel", "transpose_scales_kernel")

_ARCH = re.compile(r"^\s*(?:arch = |code for )(sm_\w+)")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_USAGE_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE_FIELDS = re.compile(r"\b([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_sass(text):
    """{(arch, function): number of QGMMA instructions} from `cuobjdump -sass`."""
    counts, arch, function = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _SASS_FUNCTION.match(line):
            function = m.group(1)
            counts.setdefault((arch, function), 0)
        elif function is not None and "QGMMA" in line:
            counts[(arch, function)] += 1
    return counts


def parse_resource_usage(text):
    """{(arch, function): {"REG": n, "STACK": n, "LOCAL": n, ...}} from `cuobjdump --dump-resource-usage`."""
    usage, arch, function = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _USAGE_FUNCTION.match(line):
            function = m.group(1)
        elif function is not None and (fields := _USAGE_FIELDS.findall(line)):
            usage[(arch, function)] = {k: int(v) for k, v in fields}
            function = None
    return usage


def spilling(usage):
    """Functions with a local-memory footprint (register spills, local arrays) or a stack frame."""
    return sorted(f"{arch} {fn}: {u}" for (arch, fn), u in usage.items()
                  if u.get("LOCAL", 0) or u.get("STACK", 0))


def gemm_functions(counts, pattern=GEMM_PATTERN):
    return {key: n for key, n in counts.items() if key[0] == "sm_90a" and pattern.search(key[1])}


# ---- the parsers and checks themselves must be able to fail ----

_FAKE_USAGE = """
arch = sm_90a
Resource usage:
 Function _Z4goodv:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z6spillsv:
  REG:255 STACK:16 SHARED:0 LOCAL:16 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

_FAKE_SASS = """
\tcode for sm_90a
\t\tFunction : _Z9Sm90aOnlyA
        /*0100*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24, gsb0 ;
\t\tFunction : _Z9Sm90aOnlyB
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
"""


def test_checks_detect_spills_and_missing_qgmma():
    assert spilling(parse_resource_usage(_FAKE_USAGE)) == [
        "sm_90a _Z6spillsv: {'REG': 255, 'STACK': 16, 'SHARED': 0, 'LOCAL': 16, 'CONSTANT[0]': 584, "
        "'TEXTURE': 0, 'SURFACE': 0, 'SAMPLER': 0}"]
    gemms = gemm_functions(parse_sass(_FAKE_SASS))
    assert gemms == {("sm_90a", "_Z9Sm90aOnlyA"): 1, ("sm_90a", "_Z9Sm90aOnlyB"): 0}
    assert gemm_functions(parse_sass(_FAKE_SASS), re.compile("NoSuchKernel")) == {}


# ---- the real module ----

def _cuobjdump():
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(path):
            return path
    path = shutil.which("cuobjdump")
    assert path, "cuobjdump not found (neither in the triton wheel nor on PATH)"
    return path


@pytest.fixture(scope="module")
def module_so():
    # has_kernel is torch._C._dispatch_has_kernel_for_dispatch_key("dsv3_kernels::fp8_gemm", "CUDA"),
    # False (not an error) when _C itself did not load.
    if not _native.has_kernel("fp8_gemm", "CUDA"):
        pytest.skip(f"dsv3_kernels._C has no CUDA kernels ({_native.status()})")
    return dsv3_kernels._C.__file__


def _run(*args):
    return subprocess.run([_cuobjdump(), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def sass(module_so):
    return parse_sass(_run("-sass", module_so))


def test_gemm_kernels_use_qgmma(sass):
    gemms = gemm_functions(sass)
    assert len(gemms) == GEMM_INSTANTIATIONS, f"expected {GEMM_INSTANTIATIONS} sm_90a GEMM kernels, got {sorted(gemms)}"
    without = [fn for (_, fn), n in gemms.items() if n == 0]
    assert not without, f"GEMM kernels without QGMMA in their sm_90a SASS: {without}"


def test_no_kernel_spills(module_so):
    usage = parse_resource_usage(_run("--dump-resource-usage", module_so))
    assert len(usage) > GEMM_INSTANTIATIONS, "no resource usage parsed: has cuobjdump's format changed?"
    assert not spilling(usage), "kernels with local memory or a stack frame:\n" + "\n".join(spilling(usage))


def test_quant_kernels_present(sass):
    functions = [fn for (_, fn) in sass]
    missing = [k for k in QUANT_KERNELS if not any(k in fn for fn in functions)]
    assert not missing, f"kernels missing from _C.so: {missing}"
