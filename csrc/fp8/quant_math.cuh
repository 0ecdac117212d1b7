// Device helpers of DeepSeek-V3's FP8 activation quantisation (1 x block_size blocks, e4m3),
// shared by the act_quant kernels (quant_kernels.cu) and the kernels that fuse act_quant into
// another pass (moe_permute, silu_mul). Bit-exact with dsv3_kernels/reference/fp8.py:
// scale = max(amax, 1e-4) / 448 and q = x / scale are IEEE fp32 divisions (__fdiv_rn, whatever
// the fast-math flags), and the e4m3 conversion rounds to nearest even with saturation. A NaN in a
// block makes its amax and scale NaN (max_nan; fmaxf would drop it), as torch.amax does.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace dsv3::fp8 {

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxMin = 1e-4f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// max(a, b), NaN if either is NaN (PTX max.NaN, sm_80+): the amax of a block holding a NaN is NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float block_scale(float amax, bool ue8m0) {
  float s = __fdiv_rn(max_nan(amax, kAmaxMin), kFp8Max);
  if (ue8m0 && __float_as_uint(s) < 0x7F800000u) {
    // Smallest power of two >= s: a non-zero mantissa carries into the exponent (exact, no log2).
    // A NaN or inf scale stays as it is (carried up, its bits would wrap to -0.0).
    s = __uint_as_float((__float_as_uint(s) + 0x7FFFFFu) & ~0x7FFFFFu);
  }
  return s;
}

__device__ __forceinline__ uint8_t quant1(float v, float s) {
  return __nv_cvt_float_to_fp8(__fdiv_rn(v, s), __NV_SATFINITE, __NV_E4M3);
}

// Two values -> two e4m3 bytes, the first in the low byte (memory order).
__device__ __forceinline__ uint16_t quant2(float v0, float v1, float s) {
  return __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(v0, s), __fdiv_rn(v1, s)), __NV_SATFINITE, __NV_E4M3);
}

// Max over the `width` lanes (a power of two <= 32, aligned) of each group of a warp, NaN if any
// is NaN. Every lane of the warp must call it.
__device__ __forceinline__ float group_max(float v, int width) {
  for (int o = width / 2; o > 0; o /= 2) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <class T, int kVec>
struct alignas(sizeof(T) * kVec < 16 ? sizeof(T) * kVec : 16) Vec {
  T v[kVec];
};

// One 1x128 block held as kVec values by each of the `width` lanes of an aligned lane group:
// returns the block's scale (act_quant's, not ue8m0) and the lane's kVec e4m3 bytes in `q`.
// Every lane of the warp must call it (shuffles); lanes of a group outside the data pass zeros.
template <int kVec>
__device__ __forceinline__ float quant_vec(const float (&v)[kVec], int width, Vec<uint16_t, kVec / 2>& q) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) amax = max_nan(amax, fabsf(v[i]));
  const float s = block_scale(group_max(amax, width), false);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) q.v[i] = quant2(v[2 * i], v[2 * i + 1], s);
  return s;
}

}  // namespace dsv3::fp8
