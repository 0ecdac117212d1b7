"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90), without a GPU.

`compile_for_sm90()` compiles every kernel in every configuration the ops can launch (each
fp8_gemm config of fp8.GEMM_CONFIGS, each block size, each dtype; each MLA decode config of
mla.DECODE_CONFIGS, each cache-write fusion; moe_route for DeepSeek-V3's and a one-group expert
layout; each grouped_gemm config, bf16 and fp8; rms_norm at DeepSeek-V3's sizes) and returns their
asm dicts ("ttir", "ttgir", "llir", "ptx", "cubin") plus the register/spill counts ptxas reports
and the shared memory. `check_sm90()` asserts the properties the team relies on: fp8 (e4m3) wgmma
in every fp8_gemm kernel, in-kernel saturating fp8 conversion in the quantize kernels, tensor-core
mma.sync in the 16-bit MLA decode kernels, exact fp32 division (and square root in rms_norm),
shared memory within sm_90's limit, and no register spills.

Written against triton 3.8's `triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget(...))`. Other versions may differ; anything unexpected raises
AotCompileError rather than passing silently. Must run without TRITON_INTERPRET=1 (the
interpreter's kernels are plain Python and cannot be compiled). All 263 variants take a few
minutes on a cold Triton cache (seconds when cached); `only=` selects a subset."""

import itertools
import re
import subprocess
import tempfile

import torch
import triton

from ..utils import GEMM_BLOCK
from . import ep_dispatch, fp8, grouped_gemm, mla, moe_route, norm

SM90 = 90
HOPPER_WARP_SIZE = 32
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
_POINTER_ALIGNMENT = 16  # torch allocations are 16-byte aligned; the JIT specializes on it

_TRITON_TYPE = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.float8_e4m3fn: "fp8e4nv",
}


class AotCompileError(RuntimeError):
    """Ahead-of-time compilation is not possible or produced something unexpected."""


def _compile(kernel, args, constexprs, num_warps, num_stages=3, multiples_of_16=()):
    """Compile `kernel` for sm_90. args: ordered {name: triton type string} of the runtime
    arguments (pointers "*<type>", integers "i32"). Like the JIT, which specializes on the
    actual arguments, pointers get a 16-byte alignment hint, and so do the integer arguments
    named in multiples_of_16 (it decides whether rows can be loaded with vector loads)."""
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise AotCompileError("kernels are not JIT functions (is TRITON_INTERPRET=1 set?); "
                              "ahead-of-time compilation needs the real compiler")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        raise AotCompileError(f"this triton ({triton.__version__}) lacks the AOT API used here: {e}") from e
    signature = dict(args)
    signature.update({name: "constexpr" for name in constexprs})
    names = kernel.arg_names
    if sorted(names) != sorted(signature):
        raise AotCompileError(f"{kernel.__name__}: signature {sorted(signature)} != arguments {names}")
    attrs = {(names.index(name),): [["tt.divisibility", _POINTER_ALIGNMENT]]
             for name, ty in args.items() if ty.startswith("*") or name in multiples_of_16}
    try:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", SM90, HOPPER_WARP_SIZE),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:
        raise AotCompileError(f"{kernel.__name__} {constexprs} failed to compile for sm_{SM90} "
                              f"with triton {triton.__version__}: {type(e).__name__}: {e}") from e
    asm = dict(compiled.asm)
    asm["shared"] = compiled.metadata.shared  # bytes of shared memory per program
    for key in ("ptx", "cubin"):
        if not asm.get(key):
            raise AotCompileError(f"{kernel.__name__}: no {key} in the compiled kernel")
    return asm


def _ptxas_usage(ptx):
    """(registers, spill store bytes, spill load bytes) that ptxas -v reports for `ptx` on sm_90a."""
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except AttributeError as e:
        raise AotCompileError(f"cannot locate ptxas in triton {triton.__version__}: {e}") from e
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{SM90}a", f.name, "-o", "/dev/null"],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise AotCompileError(f"ptxas failed: {log}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spills):
        raise AotCompileError(f"unexpected ptxas -v output: {log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _kernel_variants():
    """(label, kernel, args, constexprs, num_warps, num_stages, multiples_of_16) for every launch
    the ops can make. The quantize kernels are compiled with and without K % 16 == 0 (vector
    and scalar row loads); fp8_gemm always has K % 128 == 0, and N aligned or not."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    block_sizes = [2 ** p for p in range(4, 11)]  # every power of two in 16..1024
    alignments = ((), ("K",))
    for dtype, bs, ue8m0, aligned in itertools.product(dtypes, block_sizes, (False, True), alignments):
        yield (f"act_quant {_TRITON_TYPE[dtype]} bs={bs} ue8m0={ue8m0} {_label(aligned)}",
               fp8._act_quant_kernel,
               {"x_ptr": f"*{_TRITON_TYPE[dtype]}", "y_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                "R": "i32", "K": "i32", "NB": "i32"},
               {"ROWS": max(1, fp8.ACT_QUANT_TILE // bs), "BS": bs, "UE8M0": ue8m0},
               fp8.ELEMENTWISE_WARPS, 1, aligned)
    for dtype, bs, aligned in itertools.product(dtypes, block_sizes, alignments):
        yield (f"weight_quant {_TRITON_TYPE[dtype]} bs={bs} {_label(aligned)}",
               fp8._weight_quant_kernel,
               {"w_ptr": f"*{_TRITON_TYPE[dtype]}", "y_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                "N": "i32", "K": "i32", "NBK": "i32"},
               {"BS": bs, "CHUNK": max(1, min(bs, fp8.WEIGHT_QUANT_CHUNK // bs))},
               fp8.ELEMENTWISE_WARPS, 1, aligned)
    tile_n, tile_k = fp8.DEQUANT_TILE
    for dtype, bs, aligned in itertools.product(dtypes, block_sizes, alignments):
        yield (f"weight_dequant {_TRITON_TYPE[dtype]} bs={bs} {_label(aligned)}",
               fp8._weight_dequant_kernel,
               {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": f"*{_TRITON_TYPE[dtype]}",
                "N": "i32", "K": "i32", "NBK": "i32"},
               {"BS": bs, "TILE_N": tile_n, "TILE_K": tile_k, "INTERPRET": False}, fp8.ELEMENTWISE_WARPS, 1,
               aligned)
    gemm_alignments = (("K",), ("K", "N"))
    for (_, block_m, block_n, warps, stages), dtype, aligned in itertools.product(
            fp8.GEMM_CONFIGS, dtypes, gemm_alignments):
        # split-K launches are the same kernel storing fp32
        yield (f"fp8_gemm {_TRITON_TYPE[dtype]} {block_m}x{block_n} w{warps} s{stages} {_label(aligned)}",
               fp8._fp8_gemm_kernel,
               {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32",
                "c_ptr": f"*{_TRITON_TYPE[dtype]}", "M": "i32", "N": "i32", "K": "i32",
                "KB_PER_SPLIT": "i32"},
               {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": GEMM_BLOCK,
                "GROUP_M": fp8.GROUP_M, "INTERPRET": False},
               warps, stages, aligned)
    yield from _mla_variants()
    yield from _moe_variants()
    yield from _norm_variants()


def _mla_variants():
    """MLA: one split kernel and one merge kernel per dtype (page size, causal, lengths and split
    counts are runtime arguments), and the split kernel over the FP8 cache ("fp8cache": bf16 q on
    the bf16 configs, fp16/fp32 q on the fp32 one); the cache write with each of its fusions,
    cache and weight of kv_c's dtype (other dtype mixes differ only in their load/store
    conversions), and into the FP8 cache."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    decode_cases = [(dtype, dtype, False) for dtype in dtypes] + [
        (torch.bfloat16, torch.bfloat16, True), (torch.float16, torch.float32, True), (torch.float32, torch.float32, True)]
    for dtype, dot_dtype, fp8_cache in decode_cases:
        ty = _TRITON_TYPE[dtype]
        configs = mla.FP8_DECODE_CONFIGS if fp8_cache else mla.DECODE_CONFIGS
        for _, block_r, block_n, warps, stages in configs[dot_dtype]:
            cache = (" fp8cache" + (" fp32dot" if dot_dtype != dtype else "")) if fp8_cache else ""
            yield (f"mla_decode_split {ty}{cache} r{block_r} n{block_n} w{warps} s{stages}",
                   mla._mla_decode_split_kernel,
                   {"q_ptr": f"*{ty}", "kv_ptr": "*u8" if fp8_cache else f"*{ty}", "bt_ptr": "*i32",
                    "seqlens_ptr": "*i32", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "qk_scale": "fp32",
                    "S_Q": "i32", "H": "i32", "NUM_BLOCKS": "i32", "MAX_BLOCKS": "i32", "NUM_SPLITS": "i32",
                    "BLOCK_SIZE": "i32", "CAUSAL": "i1"},
                   {"BLOCK_R": block_r, "BLOCK_N": block_n, "FP32_DOT": dot_dtype == torch.float32,
                    "FP8": fp8_cache, "INTERPRET": False},
                   warps, stages, ("BLOCK_SIZE",))
        yield (f"mla_decode_merge {ty}", mla._mla_decode_merge_kernel,
               {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "out_ptr": f"*{ty}", "lse_ptr": "*fp32",
                "S_Q": "i32", "H": "i32", "NUM_SPLITS": "i32"},
               {"BLOCK_R": mla.MERGE_BLOCK_R, "INTERPRET": False}, mla.MERGE_WARPS, 1, ())
    for dtype, norm, rope, fp8_cache in itertools.product(dtypes, (False, True), (False, True), (False, True)):
        ty = _TRITON_TYPE[dtype]
        yield (f"mla_cache_write {ty}{' fp8cache' if fp8_cache else ''} norm={norm} rope={rope}",
               mla._mla_cache_write_kernel,
               {"kv_c_ptr": f"*{ty}", "k_pe_ptr": f"*{ty}", "cache_ptr": "*u8" if fp8_cache else f"*{ty}",
                "slot_ptr": "*i64", "w_ptr": f"*{ty}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "eps": "fp32",
                "CAPACITY": "i32"},
               {"NORM": norm, "ROPE": rope, "INTERPRET": False, "FP8": fp8_cache}, mla.CACHE_WRITE_WARPS, 1, ())


def _moe_variants():
    """moe_route: DeepSeek-V3's layout (256 experts, 8 groups, bias, sigmoid) and a V2-Lite-like
    one (64 experts, one group, softmax, no bias), bf16 and fp32 logits; other expert counts
    change only the tile shape."""
    layouts = ((256, 8, 4, 8, False, True), (64, 1, 1, 6, True, False))
    for (e, n_group, topk_group, topk, softmax, bias), dtype in itertools.product(
            layouts, (torch.bfloat16, torch.float32)):
        ty = _TRITON_TYPE[dtype]
        block_t, block_e, block_k = moe_route.route_config(e, topk)
        yield (f"moe_route {ty} E={e} g{n_group} kg{topk_group} k{topk}", moe_route._moe_route_kernel,
               {"logits_ptr": f"*{ty}", "bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i32",
                "T": "i32", "scale": "fp32"},
               {"E": e, "N_GROUP": n_group, "TOPK_GROUP": topk_group, "TOPK": topk, "SOFTMAX": softmax,
                "HAS_BIAS": bias, "RENORMALIZE": True, "BLOCK_T": block_t, "BLOCK_E": block_e,
                "BLOCK_K": block_k},
               moe_route.ROUTE_WARPS, 1, ())
    # bf16 and FP8 in every config; float32 (the fp32 reference-precision model, IEEE dot) in one
    for (_, block_m, block_n, warps, stages), ab in itertools.chain(
            itertools.product(grouped_gemm.GEMM_CONFIGS, ("fp8e4nv", "bf16")), [(grouped_gemm.GEMM_CONFIGS[0], "fp32")]):
        fp8_in = ab == "fp8e4nv"
        yield (f"grouped_gemm {ab} {block_m}x{block_n} w{warps} s{stages}", grouped_gemm._grouped_gemm_kernel,
               {"a_ptr": f"*{ab}", "as_ptr": "*fp32", "b_ptr": f"*{ab}", "bs_ptr": "*fp32",
                "c_ptr": "*fp32" if ab == "fp32" else "*bf16",
                "seg_lo_ptr": "*i32", "seg_rows_ptr": "*i32", "tile_start_ptr": "*i32", "N": "i32", "K": "i32",
                "E": "i32"},
               {"FP8": fp8_in, "BLOCK_M": block_m, "BLOCK_N": block_n,
                "BLOCK_K": GEMM_BLOCK if fp8_in else 64, "BLOCK_S": 512, "DOT_FP32": False,
                "IEEE": ab == "fp32"},
               warps, stages, ("K", "N"))  # DeepSeek-V3's N and K; others JIT a scalar-load variant
    # ep_dispatch's own kernels (its row copy is moe_permute's), top-8 (DeepSeek-V3) and top-2
    for block_k in (8, 2):
        yield (f"ep_dest k{block_k}", ep_dispatch._ep_dest_kernel,
               {"ids_ptr": "*i32", "dest_ptr": "*i32", "T": "i32", "K": "i32", "S": "i32", "E": "i32",
                "PER_RANK": "i32"}, {"ROWS": ep_dispatch.ROWS, "BLOCK_K": block_k}, ep_dispatch.WARPS, 1, ())
        yield (f"ep_meta k{block_k}", ep_dispatch._ep_meta_kernel,
               {"ids_ptr": "*i32", "w_ptr": "*fp32", "dest_ptr": "*i32", "inv_ptr": "*i32", "out_ids_ptr": "*i32",
                "out_w_ptr": "*fp32", "N": "i32", "K": "i32", "S": "i32", "PER_RANK": "i32"},
               {"ROWS": ep_dispatch.ROWS, "BLOCK_K": block_k}, ep_dispatch.WARPS, 1, ())


def _norm_variants():
    """rms_norm: each dtype with and without the residual, at the chunk sizes of DeepSeek-V3's norms
    (D = 7168 in two chunks of 4096, the latent 1536 and 512) with D % 16 == 0 as they have, and
    D = 1, which the JIT makes a compile-time constant."""
    for dtype, residual in itertools.product((torch.float32, torch.bfloat16, torch.float16), (False, True)):
        ty = _TRITON_TYPE[dtype]
        ptrs = {name: f"*{ty}" for name in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")}
        for d in (7168, 1536, 512):
            block, warps = norm.block_and_warps(d)
            yield (f"rms_norm {ty} D={d} residual={residual}", norm._rms_norm_kernel,
                   {**ptrs, "D": "i32", "eps": "fp32"}, {"RESIDUAL": residual, "BLOCK": block, "INTERPRET": False},
                   warps, 1, ("D",))
        block, warps = norm.block_and_warps(1)
        yield (f"rms_norm {ty} D=1 residual={residual}", norm._rms_norm_kernel, {**ptrs, "eps": "fp32"},
               {"D": 1, "RESIDUAL": residual, "BLOCK": block, "INTERPRET": False}, warps, 1, ())


def _label(multiples_of_16):
    return "%16:" + (",".join(multiples_of_16) or "-")


def compile_for_sm90(only=None):
    """Compile every kernel variant for sm_90. only: a substring of the labels to keep (e.g.
    "fp8_gemm"). Returns {label: asm dict}, each asm dict extended with "n_regs",
    "spill_stores" and "spill_loads" (bytes) from ptxas -v."""
    results = {}
    for label, kernel, args, constexprs, warps, stages, aligned in _kernel_variants():
        if only is not None and only not in label:
            continue
        asm = _compile(kernel, args, constexprs, warps, stages, aligned)
        asm["n_regs"], asm["spill_stores"], asm["spill_loads"] = _ptxas_usage(asm["ptx"])
        results[label] = asm
    return results


def check_sm90(results=None):
    """Assert what the kernels must compile to on Hopper; returns the compile_for_sm90() results."""
    results = compile_for_sm90() if results is None else results
    if not results:
        raise AotCompileError("nothing was compiled")
    for label, asm in results.items():
        if asm["spill_stores"] or asm["spill_loads"]:
            raise AotCompileError(f"{label}: register spills ({asm['spill_stores']} B stored, "
                                  f"{asm['spill_loads']} B loaded, {asm['n_regs']} registers)")
        ptx = asm["ptx"]
        wgmma_expected = label.startswith("fp8_gemm") or (label.startswith("grouped_gemm fp8")
                                                           and not label.startswith("grouped_gemm fp8e4nv 16x"))
        if wgmma_expected and not re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx):
            raise AotCompileError(f"{label}: no fp8 (e4m3) wgmma in the PTX")
        if "quant" in label and "dequant" not in label and "cvt.rn.satfinite.e4m3x2.f32" not in ptx:
            raise AotCompileError(f"{label}: no in-kernel saturating fp32 -> e4m3 conversion")
        if label.startswith("mla_decode_split") and "fp32" not in label and not re.search(
                r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(bf16|f16)", ptx):
            raise AotCompileError(f"{label}: no tensor-core mma.sync in the PTX")
        if asm["shared"] > SM90_MAX_SHARED:
            raise AotCompileError(f"{label}: {asm['shared']} B of shared memory, more than sm_90's "
                                  f"{SM90_MAX_SHARED} B per block")
        if "div.full.f32" in ptx or "div.approx" in ptx:
            raise AotCompileError(f"{label}: approximate fp32 division in the PTX")
        if label.startswith("rms_norm") and "sqrt.approx" in ptx:
            raise AotCompileError(f"{label}: approximate square root in the PTX")
    return results
