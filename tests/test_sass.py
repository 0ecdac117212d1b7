"""Static checks of the compiled CUDA kernels in dsv3_kernels/_C.so (no GPU needed).

Reads the module's SASS and resource usage with cuobjdump (the one shipped in the triton wheel)
and checks that (a) every FP8 GEMM kernel runs on wgmma FP8 (QGMMA) in its sm_90a code, (b) no
kernel spills registers or otherwise uses local memory / a stack frame, (c) the quantisation
kernels are there, (d) the MLA decode kernels run S = Q K^T and O = P V on wgmma (HGMMA 64x32 and
64x256) and the MLA combine / cache-write kernels are there, (f) the MoE routing kernel is there
and keeps its per-lane expert arrays in registers (no local memory), (g) the grouped expert GEMMs
run on wgmma (QGMMA in the FP8 one, HGMMA in the bf16 one) and the other expert-layer kernels are
there (ep_dispatch's too), (h) the rms_norm kernels are there in every instantiation without local
memory. Skipped only when _C was built without CUDA kernels. (e) The layout facts the MLA decode kernel relies on are checked with CuTe on the
host (tests/cuda/mla_layouts_check.cu; needs nvcc and the CUTLASS headers, not a GPU).
"""

import collections
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

import dsv3_kernels
from dsv3_kernels import _native

# The CUTLASS GEMMs are wrapped in dsv3::Sm90aOnly<...> (common/sm90a_only.cuh); fp8_gemm_cutlass.cu's
# are the ones that are not grouped, i.e. whose kernel does not take a cutlass::gemm::GroupProblemShape.
GEMM_PATTERN = re.compile(r"^(?!.*GroupProblemShape).*Sm90aOnly")
GEMM_INSTANTIATIONS = 4  # {bf16, fp32} x {128x128 direct, 128x64 swap-AB}
QUANT_KERNELS = ("act_quant_vec_kernel", "act_quant_scalar_kernel", "weight_quant_kernel",
                 "weight_dequant_kernel", "transpose_scales_kernel")

_ARCH = re.compile(r"^\s*(?:arch = |code for )(sm_\w+)")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_USAGE_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE_FIELDS = re.compile(r"\b([A-Z]+(?:\[\d+\])?):(\d+)")


def _function_lines(text, function_header):
    """(arch, function, line) for each function of cuobjdump output: once with line None at its
    header (matched by `function_header`, the name in group 1), then once per line that follows."""
    arch, key = None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := function_header.match(line):
            key = (arch, m.group(1))
            yield *key, None
        elif key is not None:
            yield *key, line


def parse_sass(text, mnemonic="QGMMA"):
    """{(arch, function): number of `mnemonic` instructions} from `cuobjdump -sass`."""
    counts = {}
    for arch, function, line in _function_lines(text, _SASS_FUNCTION):
        counts.setdefault((arch, function), 0)
        if line is not None and mnemonic in line:
            counts[(arch, function)] += 1
    return counts


_GMMA_SHAPE = re.compile(r"\b([HQ]GMMA\.\d+x\d+x\d+)")


def gmma_shapes(text, pattern):
    """{function: Counter of "HGMMA.MxNxK" shapes} of the sm_90a functions whose name matches."""
    shapes = {}
    for arch, function, line in _function_lines(text, _SASS_FUNCTION):
        if arch != "sm_90a" or not pattern.search(function):
            continue
        counts = shapes.setdefault(function, collections.Counter())
        if line is not None and (m := _GMMA_SHAPE.search(line)):
            counts[m.group(1)] += 1
    return shapes


def parse_resource_usage(text):
    """{(arch, function): {"REG": n, "STACK": n, "LOCAL": n, ...}} from `cuobjdump --dump-resource-usage`."""
    usage = {}
    for arch, function, line in _function_lines(text, _USAGE_FUNCTION):
        # A function's first line of fields is its own; later ones (a "Common:" block) are not.
        if line is not None and (arch, function) not in usage and (fields := _USAGE_FIELDS.findall(line)):
            usage[(arch, function)] = {k: int(v) for k, v in fields}
    return usage


def spilling(usage):
    """Functions with a local-memory footprint (register spills, local arrays) or a stack frame."""
    return sorted(f"{arch} {fn}: {u}" for (arch, fn), u in usage.items()
                  if u.get("LOCAL", 0) or u.get("STACK", 0))


def gemm_functions(counts, pattern=GEMM_PATTERN):
    return {key: n for key, n in counts.items() if key[0] == "sm_90a" and pattern.search(key[1])}


# The MLA decode kernels (mla_decode_sm90.cu): one per dtype and one reading the FP8 cache (bf16,
# its tiles dequantized to bf16 in shared memory first: the same wgmmas); per key tile each runs
# S = Q K^T as m64n32k16 wgmma (36 k-steps in a loop unrolled by 4) and O += P V as four m64n256k16.
# The combine and cache-write kernels are plain CUDA.
MLA_DECODE_PATTERN = re.compile(r"mla_decode_kernel")
MLA_DECODE_INSTANTIATIONS = 3  # bfloat16, float16, bfloat16 over the FP8 cache
MLA_DECODE_FP8_PATTERN = re.compile(r"mla_decode_kernel.*Lb1E")  # the template's kFp8 = true
MLA_DECODE_SHAPES = ("HGMMA.64x32x16", "HGMMA.64x256x16")
MLA_OTHER_KERNELS = ("mla_combine_kernel", "mla_cache_write_kernel")


def mla_decode_problems(shapes):
    return [f"{fn}: no {shape}" for fn, counts in sorted(shapes.items()) for shape in MLA_DECODE_SHAPES
            if not counts.get(shape)]


# ---- the parsers and checks themselves must be able to fail ----

_FAKE_USAGE = """
arch = sm_90a
Resource usage:
 Function _Z4goodv:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z6spillsv:
  REG:255 STACK:16 SHARED:0 LOCAL:16 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def _fake_sass(functions):
    """`cuobjdump -sass` text of sm_90a functions given as {mangled name: [instruction, ...]}."""
    lines = ["\tcode for sm_90a"]
    for name, instructions in functions.items():
        lines.append(f"\t\tFunction : {name}")
        lines += [f"        /*{16 * i:04x}*/                   {ins} ;" for i, ins in enumerate(instructions)]
    return "\n".join(lines) + "\n"


_QGMMA = "QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24, gsb0"
_HGMMA = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0"
_FAKE_SASS = _fake_sass({"_Z9Sm90aOnlyA": [_QGMMA], "_Z9Sm90aOnlyB": [_HGMMA]})
_FAKE_MLA_SASS = _fake_sass({
    "_Z17mla_decode_kernelIN7cutlass10bfloat16_tEEvv": [
        "HGMMA.64x32x16.F32.BF16 R152, gdesc[UR8], R152, UP0, gsb0",
        "HGMMA.64x8x16.F16 RZ, gdesc[URZ], RZ, !UPT, gsb0",
        "HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8].tnspB, R24"],
    "_Z17mla_decode_kernelIN7cutlass6half_tEEvv": ["HGMMA.64x32x16.F32 R152, gdesc[UR8], R152, UP0, gsb0"],
})


def test_gmma_shape_parser():
    shapes = gmma_shapes(_FAKE_MLA_SASS, MLA_DECODE_PATTERN)
    assert shapes == {
        "_Z17mla_decode_kernelIN7cutlass10bfloat16_tEEvv": {"HGMMA.64x32x16": 1, "HGMMA.64x8x16": 1,
                                                            "HGMMA.64x256x16": 1},
        "_Z17mla_decode_kernelIN7cutlass6half_tEEvv": {"HGMMA.64x32x16": 1},
    }
    assert mla_decode_problems(shapes) == ["_Z17mla_decode_kernelIN7cutlass6half_tEEvv: no HGMMA.64x256x16"]
    assert parse_sass(_FAKE_MLA_SASS, "HGMMA")[("sm_90a", "_Z17mla_decode_kernelIN7cutlass6half_tEEvv")] == 1


def test_checks_detect_spills_and_missing_qgmma():
    assert spilling(parse_resource_usage(_FAKE_USAGE)) == [
        "sm_90a _Z6spillsv: {'REG': 255, 'STACK': 16, 'SHARED': 0, 'LOCAL': 16, 'CONSTANT[0]': 584, "
        "'TEXTURE': 0, 'SURFACE': 0, 'SAMPLER': 0}"]
    gemms = gemm_functions(parse_sass(_FAKE_SASS))
    assert gemms == {("sm_90a", "_Z9Sm90aOnlyA"): 1, ("sm_90a", "_Z9Sm90aOnlyB"): 0}
    assert gemm_functions(parse_sass(_FAKE_SASS), re.compile("NoSuchKernel")) == {}
    # The two GEMM families share the wrapper: each pattern must leave the other's kernels out.
    assert gemm_functions(parse_sass(_FAKE_GROUPED_SASS)) == {}
    assert gmma_shapes(_FAKE_SASS, GROUPED_GEMM_PATTERN) == {}


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
def sass_text(module_so):
    return _run("-sass", module_so)


@pytest.fixture(scope="module")
def sass(sass_text):
    return parse_sass(sass_text)


@pytest.fixture(scope="module")
def resource_usage(module_so):
    return parse_resource_usage(_run("--dump-resource-usage", module_so))


def _sm90a_matching(table, pattern):
    """{function: entry} of the sm_90a rows of a parse_sass / parse_resource_usage table whose
    function name matches `pattern`."""
    return {fn: v for (arch, fn), v in table.items() if arch == "sm_90a" and pattern.search(fn)}


def test_gemm_kernels_use_qgmma(sass):
    gemms = gemm_functions(sass)
    assert len(gemms) == GEMM_INSTANTIATIONS, f"expected {GEMM_INSTANTIATIONS} sm_90a GEMM kernels, got {sorted(gemms)}"
    without = [fn for (_, fn), n in gemms.items() if n == 0]
    assert not without, f"GEMM kernels without QGMMA in their sm_90a SASS: {without}"


def test_no_kernel_spills(resource_usage):
    assert len(resource_usage) > GEMM_INSTANTIATIONS, "no resource usage parsed: has cuobjdump's format changed?"
    assert not spilling(resource_usage), ("kernels with local memory or a stack frame:\n"
                                          + "\n".join(spilling(resource_usage)))


def test_quant_kernels_present(sass):
    functions = [fn for (_, fn) in sass]
    missing = [k for k in QUANT_KERNELS if not any(k in fn for fn in functions)]
    assert not missing, f"kernels missing from _C.so: {missing}"


# ---- MLA ----

def test_mla_decode_kernels_use_hgmma(sass_text):
    shapes = gmma_shapes(sass_text, MLA_DECODE_PATTERN)
    assert len(shapes) == MLA_DECODE_INSTANTIATIONS, f"expected {MLA_DECODE_INSTANTIATIONS} sm_90a MLA decode kernels, got {sorted(shapes)}"
    assert not mla_decode_problems(shapes), mla_decode_problems(shapes)


def test_mla_decode_fp8_cache_kernel_dequantizes_in_hardware(sass_text):
    """The FP8-cache instantiation exists, runs both wgmmas, and converts e4m3 with the hardware
    instruction (F2FP.F16.E4M3.UNPACK_B), not a software decode."""
    shapes = gmma_shapes(sass_text, MLA_DECODE_FP8_PATTERN)
    assert len(shapes) == 1, sorted(shapes)
    assert not mla_decode_problems(shapes), mla_decode_problems(shapes)
    fp8_fn = next(iter(shapes))
    body = sass_text.split(fp8_fn, 1)[1].split("Function :", 1)[0]
    assert "F2FP.F16.E4M3.UNPACK_B" in body


def test_mla_kernels_present_and_within_registers(sass, resource_usage):
    functions = [fn for (_, fn) in sass]
    missing = [k for k in MLA_OTHER_KERNELS if not any(k in fn for fn in functions)]
    assert not missing, f"kernels missing from _C.so: {missing}"
    mla = _sm90a_matching(resource_usage, MLA_DECODE_PATTERN)
    assert len(mla) == MLA_DECODE_INSTANTIATIONS, sorted(mla)
    for fn, u in mla.items():
        assert u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0 and u["REG"] <= 255, (fn, u)


# ---- MoE ----

# moe_route.cu: one instantiation per experts-per-lane count (E up to 512 -> 1, 2, 4, 8, 16 slots).
MOE_ROUTE_PATTERN = re.compile(r"moe_route_kernel")
MOE_ROUTE_INSTANTIATIONS = 5


def test_moe_route_kernel_present_without_local_memory(sass, resource_usage):
    functions = _sm90a_matching(sass, MOE_ROUTE_PATTERN)
    assert len(functions) == MOE_ROUTE_INSTANTIATIONS, f"expected {MOE_ROUTE_INSTANTIATIONS} sm_90a moe_route kernels, got {sorted(functions)}"
    moe = _sm90a_matching(resource_usage, MOE_ROUTE_PATTERN)
    assert len(moe) == MOE_ROUTE_INSTANTIATIONS, sorted(moe)
    for fn, u in moe.items():
        # Register-resident expert arrays: any indexing the compiler could not resolve would show up as LOCAL.
        assert u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0 and u["REG"] <= 128, (fn, u)


# The expert layers. grouped_gemm_cutlass.cu: CUTLASS ptr-array GEMMs over a GroupProblemShape, wrapped
# in dsv3::Sm90aOnly<...> like fp8_gemm_cutlass.cu's, one bf16 (tile 128x256x64: HGMMA 64x256x16 per consumer warpgroup)
# and one FP8 blockwise-scaled (tile 128x128x128: QGMMA 64x128x32); the FP8 one is the instantiation
# whose name has float_e4m3_t operands.
GROUPED_GEMM_PATTERN = re.compile(r"Sm90aOnly.*GroupProblemShape")
GROUPED_GEMM_SHAPES = {True: "QGMMA.64x128x32", False: "HGMMA.64x256x16"}  # keyed by "is FP8"
# The other expert-layer kernels (ep_dispatch's too), by the file that holds them.
MOE_EXPERT_KERNELS = {
    "moe_permute.cu": ("permute_count_kernel", "permute_scan_kernel", "permute_place_kernel", "permute_gather_kernel",
                       "permute_gather_quant_kernel"),
    "silu_mul.cu": ("silu_mul_kernel", "silu_mul_quant_kernel"),
    "moe_unpermute.cu": ("moe_unpermute_kernel",),
    "grouped_gemm_cutlass.cu": ("build_group_args_kernel", "sfa_to_m_major_kernel", "zero_uncovered_rows_kernel"),
    "ep_dispatch.cu": ("ep_dest_kernel", "ep_meta_kernel"),
}


def grouped_gemm_problems(shapes):
    """What is wrong with the sm_90a grouped GEMMs of a gmma_shapes table (empty when all is well)."""
    kinds = sorted("float_e4m3" in fn for fn in shapes)
    problems = [] if kinds == [False, True] else [f"expected one bf16 and one FP8 grouped GEMM, got {sorted(shapes)}"]
    for fn, counts in sorted(shapes.items()):
        fp8 = "float_e4m3" in fn
        want, other = GROUPED_GEMM_SHAPES[fp8], "HGMMA" if fp8 else "QGMMA"
        if not counts.get(want):
            problems.append(f"{fn}: no {want}")
        if any(shape.startswith(other) for shape in counts):
            problems.append(f"{fn}: unexpected {other}")
    return problems


_GROUPED_FP8 = "_Z9Sm90aOnlyIN7cutlass4gemm17GroupProblemShapeENS0_12float_e4m3_tEEvv"
_GROUPED_BF16 = "_Z9Sm90aOnlyIN7cutlass4gemm17GroupProblemShapeENS0_10bfloat16_tEEvv"
_FAKE_GROUPED_SASS = _fake_sass({_GROUPED_FP8: [_QGMMA], _GROUPED_BF16: [_HGMMA]})


def test_grouped_gemm_check_detects_wrong_instructions():
    shapes = gmma_shapes(_FAKE_GROUPED_SASS, GROUPED_GEMM_PATTERN)
    assert grouped_gemm_problems(shapes) == [f"{_GROUPED_BF16}: no HGMMA.64x256x16"]
    assert grouped_gemm_problems({}) == ["expected one bf16 and one FP8 grouped GEMM, got []"]


def test_grouped_gemm_kernels_use_gmma(sass_text, resource_usage):
    shapes = gmma_shapes(sass_text, GROUPED_GEMM_PATTERN)
    assert not grouped_gemm_problems(shapes), grouped_gemm_problems(shapes)
    usage = _sm90a_matching(resource_usage, GROUPED_GEMM_PATTERN)
    assert len(usage) == len(GROUPED_GEMM_SHAPES), sorted(usage)
    for fn, u in usage.items():
        assert 0 < u["REG"] <= 255 and u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0, (fn, u)


def test_moe_expert_kernels_present(sass):
    functions = [fn for (arch, fn) in sass if arch == "sm_90a"]
    missing = [f"{k} ({source})" for source, kernels in MOE_EXPERT_KERNELS.items() for k in kernels
               if not any(k in fn for fn in functions)]
    assert not missing, f"kernels missing from _C.so: {missing}"


# ---- normalization ----

# rms_norm.cu: {fp32, bf16, fp16} x {16-byte vectors, scalar} x {a block per row, a warp per row}.
RMS_NORM_PATTERN = re.compile(r"rms_norm_kernel")
RMS_NORM_INSTANTIATIONS = 12


def test_rms_norm_kernels_present_without_local_memory(sass, resource_usage):
    functions = _sm90a_matching(sass, RMS_NORM_PATTERN)
    assert len(functions) == RMS_NORM_INSTANTIATIONS, sorted(functions)
    usage = _sm90a_matching(resource_usage, RMS_NORM_PATTERN)
    assert len(usage) == RMS_NORM_INSTANTIATIONS, sorted(usage)
    for fn, u in usage.items():
        assert u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0 and u["REG"] <= 64, (fn, u)


def _nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.isfile(path) else shutil.which("nvcc")


def _cutlass_include():
    if os.environ.get("DSV3_KERNELS_CUTLASS_DIR"):
        return os.path.join(os.environ["DSV3_KERNELS_CUTLASS_DIR"], "include")
    spec = importlib.util.find_spec("cutlass_library")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "source", "include")
        if os.path.isfile(os.path.join(path, "cute", "tensor.hpp")):
            return path
    return None


def test_mla_decode_layouts_on_host(tmp_path):
    """The V^T view of the K tile, the cp.async address arithmetic and the wgmma accumulator
    (row, col) maps of mla_decode_sm90.cu, checked with CuTe on the CPU (about 20 s of nvcc)."""
    nvcc, cutlass = _nvcc(), _cutlass_include()
    if nvcc is None or cutlass is None:
        pytest.skip("needs nvcc and the CUTLASS headers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path / "mla_layouts_check")
    subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-I", cutlass, "-I", os.path.join(root, "csrc"),
                    os.path.join(root, "tests", "cuda", "mla_layouts_check.cu"), "-o", exe],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([exe], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
