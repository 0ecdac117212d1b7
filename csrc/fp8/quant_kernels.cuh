// Torch-free launchers of the FP8 quantisation kernels (DeepSeek-V3's block-scaled e4m3 recipe),
// called by fp8_cuda.cpp. Semantics: dsv3_kernels/reference/fp8.py, bit for bit.
// All tensors are contiguous and row-major; sizes are in elements; nothing is launched when a
// tensor is empty. Each returns nullptr on success, else a static CUDA error message.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/float_type.h"

namespace dsv3::fp8 {

// x [rows, k] -> q e4m3 [rows, k], scale [rows, ceil(k / block_size)].
const char* act_quant_launch(const void* x, FloatType x_type, int64_t rows, int64_t k, int block_size,
                             bool ue8m0, void* q, float* scale, cudaStream_t stream);

// w [n, k] -> q e4m3 [n, k], scale_inv [ceil(n / bs), ceil(k / bs)].
const char* weight_quant_launch(const void* w, FloatType w_type, int64_t n, int64_t k, int block_size,
                                void* q, float* scale_inv, cudaStream_t stream);

// q e4m3 [n, k], scale_inv [ceil(n / bs), ceil(k / bs)] -> out [n, k] of out_type.
const char* weight_dequant_launch(const void* q, const float* scale_inv, int64_t n, int64_t k,
                                  int block_size, FloatType out_type, void* out, cudaStream_t stream);

}  // namespace dsv3::fp8
