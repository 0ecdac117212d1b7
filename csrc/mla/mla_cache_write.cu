// mla_cache_write: one warp per token. Optional RMSNorm of kv_c (Hugging Face's DeepseekV3RMSNorm:
// normalize in fp32, round to kv_c's dtype, multiply by the weight in torch's promoted dtype of
// (weight, kv_c), then store in the cache dtype) and optional interleaved RoPE of k_pe (fp32, each
// product rounded separately as torch does: no FMA contraction). Semantics:
// dsv3_kernels/reference/mla.py::mla_cache_write. Slots < 0 (padding) and >= capacity are skipped.
// The FP8 cache (mla_fp8_layout.h): each 128-value tile's amax by warp shuffles, FlashMLA's
// power-of-two scale on the bits, e4m3 by the hardware conversion (round to nearest even; the
// values are within +-448 by construction), k_pe in bf16. A NaN / inf in a tile gives it a NaN /
// inf scale and NaN codes (x / NaN, inf / inf), as the reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "mla/mla_kernels.cuh"

namespace dsv3::mla {
namespace {

constexpr int kLora = 512, kRope = 64, kHead = 576;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float load(const void* p, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case FloatType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store(void* p, FloatType t, int64_t i, float v) {
  switch (t) {
    case FloatType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case FloatType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// v rounded to dtype t (round to nearest even), back in fp32.
__device__ __forceinline__ float round_to(FloatType t, float v) {
  switch (t) {
    case FloatType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(v));
    case FloatType::kFloat16: return __half2float(__float2half_rn(v));
    default: return v;
  }
}

// max(a, b), NaN if either is NaN (PTX max.NaN, sm_80+; fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// max(amax / 448, 1e-4) rounded up to a power of two (IEEE division, then on the bits). A NaN or
// inf amax stays NaN / inf (reference/mla.py: carried up, the bits would wrap to -0.0).
__device__ __forceinline__ float fp8_tile_scale(float amax) {
  const float s = max_nan(__fdiv_rn(amax, 448.f), 1e-4f);
  return __float_as_uint(s) >= 0x7F800000u ? s : __uint_as_float((__float_as_uint(s) + 0x7FFFFFu) & ~0x7FFFFFu);
}

// x: this lane's kv_c values (columns lane + 32 i), pe: its k_pe pair -> the 656-byte token at dst.
__device__ __forceinline__ void store_fp8_token(uint8_t* dst, const float (&x)[kLora / 32], float x0, float x1,
                                                int lane) {
  constexpr int kPerTile = kFp8Tile / 32;  // values of a tile per lane
#pragma unroll
  for (int t = 0; t < kFp8Scales; ++t) {
    float amax = 0.f;
#pragma unroll
    for (int i = t * kPerTile; i < (t + 1) * kPerTile; ++i) amax = max_nan(amax, fabsf(x[i]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float scale = fp8_tile_scale(amax);
#pragma unroll
    for (int i = t * kPerTile; i < (t + 1) * kPerTile; ++i)
      dst[lane + 32 * i] = __nv_cvt_float_to_fp8(__fdiv_rn(x[i], scale), __NV_SATFINITE, __NV_E4M3);
    if (lane == 0) reinterpret_cast<float*>(dst + kFp8ScaleOffset)[t] = scale;
  }
  __nv_bfloat16* pe = reinterpret_cast<__nv_bfloat16*>(dst + kFp8RopeOffset);
  pe[2 * lane] = __float2bfloat16_rn(x0);
  pe[2 * lane + 1] = __float2bfloat16_rn(x1);
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) mla_cache_write_kernel(const MlaCacheWriteParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= p.num_tokens) return;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0 || slot >= p.capacity) return;  // padding / out of the cache: skipped (documented)
  const int64_t src = token * kLora;

  // kv_c: lane owns columns lane + 32 * i (coalesced).
  float x[kLora / 32];
#pragma unroll
  for (int i = 0; i < kLora / 32; ++i) x[i] = load(p.kv_c, p.x_dtype, src + lane + 32 * i);
  if (p.norm_weight != nullptr) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < kLora / 32; ++i) ss = fmaf(x[i], x[i], ss);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    // IEEE sqrt and division (not rsqrtf's approximation) to stay close to torch.rsqrt.
    const float r = 1.f / sqrtf(ss / kLora + p.eps);
    // torch: (weight * normed) is computed in promote(weight dtype, x dtype).
    const FloatType prod_t = p.w_dtype == p.x_dtype ? p.x_dtype : FloatType::kFloat32;
#pragma unroll
    for (int i = 0; i < kLora / 32; ++i) {
      const float normed = round_to(p.x_dtype, __fmul_rn(x[i], r));
      x[i] = round_to(prod_t, __fmul_rn(load(p.norm_weight, p.w_dtype, lane + 32 * i), normed));
    }
  }
  // k_pe: lane owns the interleaved pair (2 lane, 2 lane + 1), rotated by angle `lane`.
  const int64_t pe = token * kRope + 2 * lane;
  float x0 = load(p.k_pe, p.x_dtype, pe), x1 = load(p.k_pe, p.x_dtype, pe + 1);
  if (p.rope_cos != nullptr) {
    const float c = p.rope_cos[token * (kRope / 2) + lane], s = p.rope_sin[token * (kRope / 2) + lane];
    const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    const float y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    x0 = y0;
    x1 = y1;
  }
  if (p.cache_fp8) {
    store_fp8_token(static_cast<uint8_t*>(p.kv_cache) + slot * kFp8TokenBytes, x, x0, x1, lane);
    return;
  }
  const int64_t dst = slot * kHead;
#pragma unroll
  for (int i = 0; i < kLora / 32; ++i) store(p.kv_cache, p.cache_dtype, dst + lane + 32 * i, x[i]);
  store(p.kv_cache, p.cache_dtype, dst + kLora + 2 * lane, x0);
  store(p.kv_cache, p.cache_dtype, dst + kLora + 2 * lane + 1, x1);
}

}  // namespace

const char* mla_cache_write_launch(const MlaCacheWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return nullptr;
  const int64_t blocks = (p.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return "mla_cache_write: too many tokens";
  mla_cache_write_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace dsv3::mla
