// The expert layer's memory-bound row kernels (semantics: dsv3_kernels/reference/moe.py):
//   silu_mul       x [M, 2I] (gate | up) -> silu(gate) * up, fp32 math, rounded to x's dtype or
//                  quantised like act_quant (1x128 blocks, e4m3 + fp32 scale);
//   moe_unpermute  out[t] = sum over j in order of w[t, j] * expert_out[inverse[t, j]], fp32,
//                  rounded once; an entry -1 adds nothing; NaN for a token with another entry outside [0, P).
// One block per row, 16-byte vectors where the row length and base addresses allow it (a scalar
// instantiation otherwise). Every product and sum is rounded separately (__fmul_rn / __fadd_rn /
// __fdiv_rn), as torch's separate ops round them, so nothing is contracted into an FMA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fp8/quant_math.cuh"
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {
namespace {

using fp8::from_float;
using fp8::to_float;
using fp8::Vec;

constexpr int kMaxThreads = 128;
constexpr int kQuantBlock = 128;

// silu(g) * u as torch computes it in fp32: g / (1 + exp(-g)), then the product.
__device__ __forceinline__ float silu_mul1(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

template <class T, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
silu_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t inter) {
  const int64_t row = blockIdx.x;
  const T* gate = x + row * 2 * inter;
  const T* up = gate + inter;
  T* dst = out + row * inter;
  for (int64_t c = threadIdx.x * kVec; c < inter; c += blockDim.x * kVec) {
    const Vec<T, kVec> g = *reinterpret_cast<const Vec<T, kVec>*>(gate + c);
    const Vec<T, kVec> u = *reinterpret_cast<const Vec<T, kVec>*>(up + c);
    Vec<T, kVec> h;
#pragma unroll
    for (int i = 0; i < kVec; ++i) h.v[i] = from_float<T>(silu_mul1(to_float(g.v[i]), to_float(u.v[i])));
    *reinterpret_cast<Vec<T, kVec>*>(dst + c) = h;
  }
}

// A group of kQuantBlock / kVec threads holds one 1x128 block of the output; every thread runs
// the same number of passes (the amax shuffles need full warps).
template <class T>
__global__ void __launch_bounds__(kMaxThreads)
silu_mul_quant_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, float* __restrict__ scale, int64_t inter) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kGroup = kQuantBlock / kVec;
  const int64_t row = blockIdx.x;
  const T* gate = x + row * 2 * inter;
  const T* up = gate + inter;
  const int64_t blocks = inter / kQuantBlock;
  const int lane = threadIdx.x % kGroup;
  for (int64_t b0 = 0; b0 < blocks; b0 += blockDim.x / kGroup) {
    const int64_t b = b0 + threadIdx.x / kGroup;
    const int64_t c = b * kQuantBlock + lane * kVec;
    const bool active = b < blocks;
    float h[kVec];
    if (active) {
      const Vec<T, kVec> g = *reinterpret_cast<const Vec<T, kVec>*>(gate + c);
      const Vec<T, kVec> u = *reinterpret_cast<const Vec<T, kVec>*>(up + c);
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[i] = silu_mul1(to_float(g.v[i]), to_float(u.v[i]));
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[i] = 0.0f;
    }
    Vec<uint16_t, kVec / 2> q;
    const float s = fp8::quant_vec<kVec>(h, kGroup, q);
    if (active) {
      *reinterpret_cast<Vec<uint16_t, kVec / 2>*>(out + row * inter + c) = q;
      if (lane == 0) scale[row * blocks + b] = s;
    }
  }
}

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

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads for a row of `items` work items: whole warps, at most kMaxThreads.
int threads_for(int64_t items) {
  const int64_t warps = (items + 31) / 32;
  return warps >= kMaxThreads / 32 ? kMaxThreads : static_cast<int>(warps < 1 ? 32 : warps * 32);
}

template <class T>
const char* silu_mul_typed(const T* x, int64_t rows, int64_t inter, bool quant, void* out, float* scale,
                           cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const unsigned grid = static_cast<unsigned>(rows);
  if (quant) {
    if (inter % kQuantBlock != 0 || !aligned16(x)) return "silu_mul: quant needs I % 128 == 0 and a 16-byte aligned x";
    // Whole groups per block: threads_for gives multiples of 32 >= one group (16 or 32 lanes).
    silu_mul_quant_kernel<T><<<grid, threads_for(inter / kVec), 0, stream>>>(x, static_cast<uint8_t*>(out), scale,
                                                                             inter);
  } else if (inter % kVec == 0 && aligned16(x) && aligned16(out)) {
    silu_mul_kernel<T, kVec><<<grid, threads_for(inter / kVec), 0, stream>>>(x, static_cast<T*>(out), inter);
  } else {
    silu_mul_kernel<T, 1><<<grid, threads_for(inter), 0, stream>>>(x, static_cast<T*>(out), inter);
  }
  return last_error();
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

const char* silu_mul_launch(const void* x, FloatType dtype, int64_t rows, int64_t inter, bool quant, void* out,
                            float* scale, cudaStream_t stream) {
  if (rows == 0 || inter == 0) return nullptr;
  if (rows > INT32_MAX) return "silu_mul: too many rows";
  switch (dtype) {
    case FloatType::kFloat32: return silu_mul_typed(static_cast<const float*>(x), rows, inter, quant, out, scale, stream);
    case FloatType::kBFloat16:
      return silu_mul_typed(static_cast<const __nv_bfloat16*>(x), rows, inter, quant, out, scale, stream);
    case FloatType::kFloat16: return silu_mul_typed(static_cast<const __half*>(x), rows, inter, quant, out, scale, stream);
  }
  return "silu_mul: unsupported dtype";
}

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
