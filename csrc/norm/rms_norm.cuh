// Torch-free launcher of the rms_norm CUDA kernel (rms_norm.cu), called by rms_norm_cuda.cpp.
// Semantics and rounding points: dsv3_kernels/reference/norm.py. All tensors are contiguous and
// row-major; nothing here allocates or synchronises with the host (CUDA-graph capturable).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/float_type.h"

namespace dsv3::norm {

struct RmsNormParams {
  const void* x;         // [rows, d] of dtype
  const void* residual;  // [rows, d] of dtype, or nullptr: no residual add
  const void* weight;    // [d] of dtype
  void* out;             // [rows, d] of dtype
  void* residual_out;    // [rows, d] of dtype: h = x + residual (unused without a residual)
  int64_t rows, d;
  float eps;
  FloatType dtype;
};

// nullptr on success, else a static error message.
const char* rms_norm_launch(const RmsNormParams& p, cudaStream_t stream);

}  // namespace dsv3::norm
