// Every schema of the dsv3_kernels ops, in one place. The CPU and CUDA implementations
// register themselves with TORCH_LIBRARY_IMPL in csrc/<family>/<op>_cpu.cpp / <op>_cuda.cpp, or in
// a file named for the family where one holds several of its ops (fp8_cpu.cpp, mla_cuda.cpp).
// The Python side (dsv3_kernels/ops.py) adds argument checks, docs and backend choice.
#include <Python.h>
#include <torch/library.h>

#include <c10/util/Exception.h>

#include "common/cpu_isa.h"

namespace {

// _C.cpu_isa() -> (the level the CPU kernels use, the host's best): names from common/cpu_isa.h.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return Py_BuildValue("(ss)", dsv3::cpu_isa_name(dsv3::cpu_isa()), dsv3::cpu_isa_name(dsv3::host_cpu_isa()));
  } catch (const c10::Error& e) {  // a DSV3_KERNELS_CPU_ISA that names no level
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// _C.set_cpu_isa(name) -> the level now in use (name capped at the host's best).
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name == nullptr) {
    PyErr_SetString(PyExc_TypeError, "set_cpu_isa takes a level name (str)");
    return nullptr;
  }
  try {
    return PyUnicode_FromString(dsv3::cpu_isa_name(dsv3::set_cpu_isa(name)));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// _C.set_cpu_bf16_gemm(choice) -> whether the avx512_bf16 level's GEMMs now use vdpbf16ps
// (choice 1 / 0; -1: the host's rule, common/cpu_isa.h).
PyObject* set_cpu_bf16_gemm(PyObject*, PyObject* arg) {
  const long choice = PyLong_Check(arg) ? PyLong_AsLong(arg) : -2;
  if (choice < -1 || choice > 1) {
    PyErr_SetString(PyExc_ValueError, "set_cpu_bf16_gemm takes 1, 0 or -1");
    return nullptr;
  }
  return PyBool_FromLong(dsv3::set_cpu_bf16_gemm(static_cast<int>(choice)));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "(level in use, host's best level) of the C++ CPU kernels"},
    {"set_cpu_isa", set_cpu_isa, METH_O, "use this level of the C++ CPU kernels (capped at the host's)"},
    {"set_cpu_bf16_gemm", set_cpu_bf16_gemm, METH_O, "1 / 0 / -1 (the host's rule): vdpbf16ps in compute-bound GEMMs"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import dsv3_kernels._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dsv3_kernels, m) {
  // ---- FP8 block-scaled family (DeepSeek-V3's recipe) ----
  // x [..., K] fp32/bf16/fp16 -> (x_fp8 e4m3 [..., K], scale fp32 [..., ceil(K/block_size)])
  m.def("act_quant(Tensor x, int block_size, bool ue8m0) -> (Tensor, Tensor)");
  // w [N, K] -> (w_fp8 e4m3 [N, K], weight_scale_inv fp32 [ceil(N/bs), ceil(K/bs)])
  m.def("weight_quant(Tensor w, int block_size) -> (Tensor, Tensor)");
  // w_fp8 [N, K] e4m3, scale_inv [ceil(N/bs), ceil(K/bs)] -> w [N, K] of `dtype`
  m.def("weight_dequant(Tensor w, Tensor scale_inv, int block_size, ScalarType dtype) -> Tensor");
  // a [M, K] e4m3, a_scale [M, K/128] fp32, b [N, K] e4m3, b_scale_inv [ceil(N/128), K/128] fp32
  //   -> a @ b.T [M, N] of out_dtype, fp32 accumulation promoted per 128-wide K block
  m.def("fp8_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale_inv, ScalarType out_dtype) -> Tensor");

  // ---- MLA absorbed-attention decode over a paged latent KV cache ----
  // q [B, s_q, H, 576] (absorbed q_nope 512 | q_pe 64), kv_cache [num_blocks, block_size, 576]
  // (c_kv 512 | k_pe 64) of q's dtype or the FP8 cache uint8 [num_blocks, block_size, 656] (per
  // token: c_kv e4m3 512 B | 4 fp32 scales, one per 128 values | k_pe bf16 128 B; FlashMLA's
  // layout, dsv3_kernels/reference/mla.py), block_table int32 [B, max_blocks], cache_seqlens int32 [B]
  // (counting the s_q new tokens, the last s_q of each sequence); num_splits 0 = the kernel's choice
  //   -> (out [B, s_q, H, 512] of q's dtype, lse fp32 [B, H, s_q], natural log)
  m.def("mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, float softmax_scale, "
        "bool causal, int num_splits) -> (Tensor, Tensor)");
  // kv_c [T, 512], k_pe [T, 64] written (uint8 cache: quantized) to kv_cache [num_blocks, block_size,
  // 576 | 656 bytes] at slot_mapping
  // int64 [T] (slot = block * block_size + offset; < 0 skips the token). Optional fusions:
  // RMSNorm of kv_c with kv_norm_weight [512] and eps (kv_a_layernorm), interleaved RoPE of k_pe
  // with rope_cos/rope_sin fp32 [T, 32].
  m.def("mla_cache_write(Tensor kv_c, Tensor k_pe, Tensor(a!) kv_cache, Tensor slot_mapping, "
        "Tensor? kv_norm_weight, float eps, Tensor? rope_cos, Tensor? rope_sin) -> ()");

  // ---- DeepSeekMoE ----
  // router_logits [T, E] fp32/bf16/fp16, e_score_correction_bias fp32 [E] or None, score_func
  // "sigmoid" or "softmax" -> (topk_weights fp32 [T, topk], topk_ids int32 [T, topk], best first);
  // group-limited selection, ties to the lower index (dsv3_kernels/reference/moe.py)
  m.def("moe_route(Tensor router_logits, Tensor? e_score_correction_bias, int n_group, int topk_group, int topk, "
        "float routed_scaling_factor, str score_func, bool renormalize) -> (Tensor, Tensor)");
  // The expert layers (dsv3_kernels/reference/moe.py states the exact semantics and rounding points).
  // hidden [T, D] fp32/bf16/fp16, topk_ids int32 [T, topk]; align >= 1 pads each expert's segment to
  // a multiple of align rows; quant fuses act_quant (1x128, D % 128 == 0)
  //   -> (permuted [P, D] of hidden's dtype (quant: e4m3), scale fp32 [P, D/128] (quant) or [0],
  //       expert_offsets int32 [E+1], inverse int32 [T, topk] (the permuted row of each choice)),
  //   P = T*topk + (align > 1 ? min(T*topk, E) * (align - 1) : 0); padding rows are zero
  m.def("moe_permute(Tensor hidden, Tensor topk_ids, int num_experts, int align, bool quant) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // a [M, K] bf16 (b bf16) or e4m3 (b e4m3, a_scale fp32 [M, K/128], b_scale_inv fp32 [E, ceil(N/128),
  // K/128]), b [E, N, K], expert_offsets int32 [E+1] -> out bf16 [M, N]: rows [offsets[e], offsets[e+1])
  // are a @ b[e].T, rows no expert covers are 0
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor expert_offsets, Tensor? a_scale, Tensor? b_scale_inv) -> Tensor");
  // x [M, 2I] fp32/bf16/fp16 (gate | up) -> (silu(gate) * up [M, I] of x's dtype, or e4m3 with
  // quant, scale fp32 [M, I/128] (quant) or [0]), computed in fp32
  m.def("silu_mul(Tensor x, bool quant) -> (Tensor, Tensor)");
  // expert_out [P, D] fp32/bf16/fp16, topk_weights fp32 [T, topk], inverse int32 [T, topk]
  //   -> [T, D] of expert_out's dtype: sum_j topk_weights[t, j] * expert_out[inverse[t, j]] in fp32
  m.def("moe_unpermute(Tensor expert_out, Tensor topk_weights, Tensor inverse) -> Tensor");
  // hidden bf16 [T, D], w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I], bf16 or e4m3 with
  // w13_scale_inv fp32 [E, 2I/128, D/128] and w2_scale_inv [E, D/128, I/128], topk_weights fp32
  // [T, topk], topk_ids int32 [T, topk] -> bf16 [T, D]: the routed experts' SwiGLU MLPs, weighted
  m.def("fused_moe(Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
        "Tensor? w13_scale_inv, Tensor? w2_scale_inv) -> Tensor");
  // Expert parallelism's packing by destination rank (rank r owns experts [r*E/W, (r+1)*E/W)):
  // hidden [T, D], topk_ids int32 / topk_weights fp32 [T, topk] -> (send [P, D] (quant: e4m3),
  // send_scale fp32 [P, D/128] or [0], send_ids int32 [P, topk] (ids local to the row's rank, -1
  // for other ranks' choices), send_weights fp32 [P, topk], rank_offsets int32 [W+1], inverse int32
  // [T, S]): moe_permute of each token over its S = min(topk, W) distinct destination ranks,
  // P = T * S; rows past rank_offsets[W] are zero with ids -1 and weights 0.
  m.def("ep_dispatch(Tensor hidden, Tensor topk_ids, Tensor topk_weights, int num_experts, int world_size, "
        "bool quant) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- Normalization ----
  // x [..., D] fp32/bf16/fp16, weight [D] and residual (None or x's shape) of x's dtype
  //   -> (out of x's shape and dtype, residual_out: h of x's shape, or [0] without a residual):
  // h = x (+ residual, rounded), out = weight * RMSNorm(h) as Hugging Face's DeepseekV3RMSNorm
  // (dsv3_kernels/reference/norm.py: fp32 math, rounding points); fresh outputs, no aliasing.
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor)");
}
