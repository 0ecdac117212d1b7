// Torch-free launcher of the sm90a FP8 block-scaled GEMM (CUTLASS), called by fp8_cuda.cpp.
//   out[m, n] = sum_kb a_scale[m, kb] * b_scale_inv[n / 128, kb] * (a[m, kb-block] . b[n, kb-block])
// a [M, K] e4m3 row-major, a_scale [M, K/128] fp32 row-major, b [N, K] e4m3 row-major,
// b_scale_inv [ceil(N/128), K/128] fp32 row-major, out [M, ldo] row-major (ldo >= N).
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace dsv3::fp8 {

enum class GemmOutType { kBFloat16, kFloat32 };

struct Fp8GemmProblem {
  const void* a;          // e4m3 [m, k], 16-byte aligned
  const float* a_scale;   // [m, k / 128]
  const void* b;          // e4m3 [n, k], 16-byte aligned
  const float* b_scale;   // [ceil(n / 128), k / 128]
  void* out;              // [m, ldo], 16-byte aligned
  int64_t m, n, k;
  int64_t ldo;            // row stride of out in elements; ldo * sizeof(out element) % 16 == 0
  GemmOutType out_type;
  int sm_count;           // multiprocessors of the device (the persistent schedulers size the grid by it)
};

// Bytes of device workspace fp8_gemm_run needs for this problem (may be 0).
size_t fp8_gemm_workspace_size(const Fp8GemmProblem& p);

// Enqueues the GEMM on `stream`. Returns nullptr on success, else a static error message.
// workspace: fp8_gemm_workspace_size(p) bytes, 256-byte aligned; no host synchronisation.
const char* fp8_gemm_run(const Fp8GemmProblem& p, void* workspace, cudaStream_t stream);

}  // namespace dsv3::fp8
