// moe_unpermute (semantics: dsv3_kernels/reference/moe.py): out[t] = sum over j in order of
// w[t, j] * expert_out[inverse[t, j]], fp32, rounded once; an entry -1 adds nothing; NaN for a
// token with another entry outside [0, P). One block per token (row_launch.cuh).
// Every product and sum is rounded separately (__fmul_rn / __fadd_rn), as torch's separate ops
// round them, so nothing is contracted into an FMA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fp8/quant_math.cuh"
#include "moe/moe_kernels.cuh"
#include "moe/row_launch.cuh"

namespace dsv3::moe {
namespace {

using fp8::from_float;
using fp8::to_float;
using fp8::Vec;

template <class T, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
moe_unpermute_kernel(const T* __restrict__ expert_out, const float* __restrict__ weights, const int* __restrict__ inverse,
                     T* __restrict__ out, int64_t rows, int64_t d, int topk) {
  const int64_t token = blockIdx.x;
  const int* inv = inverse + token * topk;
  const float* w = weights + token * topk;
  bool valid = true;
  for (int j = 0; j < topk; ++j) valid &= inv[j] == -1 || (inv[j] >= 0 && inv[j] < rows);  // -1: no row, adds nothing
  T* dst = out + token * d;
  for (int64_t c = threadIdx.x * kVec; c < d; c += blockDim.x * kVec) {
    Vec<T, kVec> res;
    if (valid) {
      float acc[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
      for (int j = 0; j < topk; ++j) {
        if (inv[j] < 0) continue;
        const float wj = w[j];
        const Vec<T, kVec> v = *reinterpret_cast<const Vec<T, kVec>*>(expert_out + static_cast<int64_t>(inv[j]) * d + c);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(wj, to_float(v.v[i])));
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) res.v[i] = from_float<T>(acc[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) res.v[i] = from_float<T>(__int_as_float(0x7fc00000));  // NaN
    }
    *reinterpret_cast<Vec<T, kVec>*>(dst + c) = res;
  }
}

template <class T>
const char* unpermute_typed(const T* expert_out, int64_t rows, int64_t d, const float* w, const int* inverse,
                            int64_t tokens, int topk, T* out, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const unsigned grid = static_cast<unsigned>(tokens);
  if (d % kVec == 0 && aligned16(expert_out) && aligned16(out)) {
    moe_unpermute_kernel<T, kVec><<<grid, threads_for(d / kVec), 0, stream>>>(expert_out, w, inverse, out, rows, d,
                                                                              topk);
  } else {
    moe_unpermute_kernel<T, 1><<<grid, threads_for(d), 0, stream>>>(expert_out, w, inverse, out, rows, d, topk);
  }
  return last_error();
}

}  // namespace

const char* moe_unpermute_launch(const void* expert_out, FloatType dtype, int64_t rows, int64_t hidden_size,
                                 const float* topk_weights, const int* inverse, int64_t num_tokens, int topk,
                                 void* out, cudaStream_t stream) {
  if (num_tokens == 0 || hidden_size == 0) return nullptr;
  if (num_tokens > INT32_MAX) return "moe_unpermute: too many tokens";
  switch (dtype) {
    case FloatType::kFloat32:
      return unpermute_typed(static_cast<const float*>(expert_out), rows, hidden_size, topk_weights, inverse,
                             num_tokens, topk, static_cast<float*>(out), stream);
    case FloatType::kBFloat16:
      return unpermute_typed(static_cast<const __nv_bfloat16*>(expert_out), rows, hidden_size, topk_weights, inverse,
                             num_tokens, topk, static_cast<__nv_bfloat16*>(out), stream);
    case FloatType::kFloat16:
      return unpermute_typed(static_cast<const __half*>(expert_out), rows, hidden_size, topk_weights, inverse,
                             num_tokens, topk, static_cast<__half*>(out), stream);
  }
  return "moe_unpermute: unsupported dtype";
}

}  // namespace dsv3::moe
