// Every schema of the dsv3_kernels ops, in one place. The CPU and CUDA implementations
// register themselves with TORCH_LIBRARY_IMPL in their op family's *_cpu.cpp / *_cuda.cpp.
// The Python side (dsv3_kernels/ops.py) adds argument checks, docs and backend choice.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dsv3_kernels._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
}
