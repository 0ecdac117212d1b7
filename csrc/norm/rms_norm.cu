// rms_norm on the GPU (semantics and rounding points: dsv3_kernels/reference/norm.py).
//
// The threads of a row are a whole block (up to kMaxThreads: DeepSeek-V3's D = 7168 in bf16 is
// 896 16-byte vectors) or, for rows of at most kWarpRowMaxVecs vectors (D <= 512 in bf16, the
// latent norm of kv), one warp, kWarpRowsPerBlock rows per block, so that short rows do not leave
// most of a block idle. Pass 1 forms h (x, or x + residual rounded, stored to residual_out) and
// sums h^2 in fp32 (per thread in order, then a shuffle tree, then over the warps); pass 2 forms
// h again from the inputs, which are still in L1/L2 (reading residual_out back would need a fence
// between the threads of the block), and stores round(w * round(h * inv_rms)). 16-byte vectors
// where D and every base address allow it, a scalar instantiation otherwise. inv_rms is IEEE
// (__fsqrt_rn, __fdiv_rn: rsqrtf is approximate) and every other product and sum is rounded on its
// own (__fmul_rn, __fadd_rn), as torch's separate ops round them; only the sum of squares uses
// FMAs, its order differing from torch's anyway.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "fp8/quant_math.cuh"
#include "norm/rms_norm.cuh"

namespace dsv3::norm {
namespace {

using fp8::from_float;
using fp8::to_float;
using fp8::Vec;

constexpr int kMaxThreads = 512;
constexpr int kWarpRowsPerBlock = 4;
constexpr int kWarpRowMaxVecs = 64;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The sum over the block; every warp adds the per-warp sums itself, in the same order, so every
// thread gets the same value with one barrier.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kMaxThreads / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0f);
}

// h of the kVec elements at offset i: x, or x + residual rounded to T (stored to residual_out when
// `store`).
template <class T, int kVec>
__device__ __forceinline__ Vec<T, kVec> load_h(const T* __restrict__ x, const T* __restrict__ residual,
                                               T* __restrict__ residual_out, int64_t i, bool store) {
  Vec<T, kVec> h = *reinterpret_cast<const Vec<T, kVec>*>(x + i);
  if (residual != nullptr) {
    const Vec<T, kVec> r = *reinterpret_cast<const Vec<T, kVec>*>(residual + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) h.v[k] = from_float<T>(__fadd_rn(to_float(h.v[k]), to_float(r.v[k])));
    if (store) *reinterpret_cast<Vec<T, kVec>*>(residual_out + i) = h;
  }
  return h;
}

template <class T, int kVec, bool kWarpRow>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                T* __restrict__ out, T* __restrict__ residual_out, int64_t rows, int64_t d, float eps) {
  int64_t row;
  int tid, nthreads;
  if constexpr (kWarpRow) {
    row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
    if (row >= rows) return;  // the whole warp: the warp's own shuffles are all it syncs on
    tid = threadIdx.x % 32;
    nthreads = 32;
  } else {
    row = blockIdx.x;
    tid = threadIdx.x;
    nthreads = blockDim.x;
  }
  const int64_t base = row * d, nvec = d / kVec;
  float ss = 0.0f;
  for (int64_t v = tid; v < nvec; v += nthreads) {
    const Vec<T, kVec> h = load_h<T, kVec>(x, residual, residual_out, base + v * kVec, true);
#pragma unroll
    for (int k = 0; k < kVec; ++k) ss = __fmaf_rn(to_float(h.v[k]), to_float(h.v[k]), ss);
  }
  ss = kWarpRow ? warp_sum(ss) : block_sum(ss);
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(d)), eps)));
  for (int64_t v = tid; v < nvec; v += nthreads) {
    const Vec<T, kVec> h = load_h<T, kVec>(x, residual, residual_out, base + v * kVec, false);
    const Vec<T, kVec> w = *reinterpret_cast<const Vec<T, kVec>*>(weight + v * kVec);
    Vec<T, kVec> o;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float normed = to_float(from_float<T>(__fmul_rn(to_float(h.v[k]), inv)));
      o.v[k] = from_float<T>(__fmul_rn(to_float(w.v[k]), normed));
    }
    *reinterpret_cast<Vec<T, kVec>*>(out + base + v * kVec) = o;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T, int kVec>
void launch(const RmsNormParams& p, cudaStream_t stream) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* res = static_cast<const T*>(p.residual);
  const auto* w = static_cast<const T*>(p.weight);
  auto* out = static_cast<T*>(p.out);
  auto* res_out = static_cast<T*>(p.residual_out);
  const int64_t nvec = p.d / kVec;
  if (nvec <= kWarpRowMaxVecs) {
    const unsigned grid = static_cast<unsigned>((p.rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
    rms_norm_kernel<T, kVec, true><<<grid, kWarpRowsPerBlock * 32, 0, stream>>>(x, res, w, out, res_out, p.rows, p.d,
                                                                                p.eps);
  } else {
    // Whole warps, one vector per thread up to kMaxThreads.
    const int threads = static_cast<int>(nvec >= kMaxThreads ? kMaxThreads : (nvec + 31) / 32 * 32);
    rms_norm_kernel<T, kVec, false><<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(x, res, w, out, res_out,
                                                                                          p.rows, p.d, p.eps);
  }
}

template <class T>
const char* launch_typed(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.d % kVec == 0 && aligned16(p.x) && aligned16(p.weight) && aligned16(p.out) &&
                   (p.residual == nullptr || (aligned16(p.residual) && aligned16(p.residual_out)));
  if (vec) launch<T, kVec>(p, stream);
  else launch<T, 1>(p, stream);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* rms_norm_launch(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.d == 0) return nullptr;
  if (p.rows > INT_MAX) return "rms_norm: more than 2^31 - 1 rows";
  switch (p.dtype) {
    case FloatType::kFloat32: return launch_typed<float>(p, stream);
    case FloatType::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
    case FloatType::kFloat16: return launch_typed<__half>(p, stream);
  }
  return "rms_norm: unsupported dtype";
}

}  // namespace dsv3::norm
