// silu_mul (semantics: dsv3_kernels/reference/moe.py): x [M, 2I] (gate | up) -> silu(gate) * up,
// fp32 math, rounded to x's dtype or quantised like act_quant (1x128 blocks, e4m3 + fp32 scale).
// One block per row (row_launch.cuh). Every product and sum is rounded separately (__fmul_rn /
// __fadd_rn / __fdiv_rn), as torch's separate ops round them, so nothing is contracted into an FMA.
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

}  // namespace dsv3::moe
