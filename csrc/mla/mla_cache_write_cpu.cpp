// The CPU mla_cache_write (schema in registration.cpp, semantics in dsv3_kernels/reference/mla.py):
// new tokens into their cache slots, optionally through the fused kv_a_layernorm and RoPE; into
// the FP8 cache quantized as the reference does (bit for bit: power-of-two scales).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/float_type.h"
#include "mla/mla_checks.h"

namespace dsv3::mla::cpu {
namespace {

// The writer's loops are branch-free, for the compiler to vectorize them: the c10 conversions branch
// per value, and the model writes B tokens per layer and step (B = 8 with the fused norm and RoPE,
// 1 thread: 15 / 25 us into a bf16 / FP8 cache that way, 8.6 / 13 us so; mla_decode of those 8
// requests with H = 4 over 128 keys: 135 us).

// x rounded to bf16, to nearest even, as c10::BFloat16 does (NaN: 0x7FC0); in fp32's bits.
inline uint32_t bf16_round_bits(float x) {
  const uint32_t b = f32_bits(x);
  return (b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : (b + 0x7FFFu + ((b >> 16) & 1)) & 0xFFFF0000u;
}

// x -> float8_e4m3fn, to nearest even, as c10::Float8_e4m3fn does for |x| < 480 and NaN (the
// quantizer's values are within 448).
inline uint8_t e4m3_bits(float x) {
  const uint32_t b = f32_bits(x), mag = b & 0x7FFFFFFFu;
  // below 2^-6 (subnormal): adding 2^14, whose ulp is e4m3's 2^-9, rounds in the hardware
  const uint32_t sub = f32_bits(bits_f32(mag) + 16384.0f) - 0x46800000u;
  // normal: round the mantissa to 3 bits on the bits, carry into the exponent, rebias 127 -> 7
  const uint32_t normal = (mag + 0x7FFFFu + ((mag >> 20) & 1) - (120u << 23)) >> 20;
  const uint32_t code = mag > 0x7F800000u ? 0x7Fu : mag < (121u << 23) ? sub : normal;
  return static_cast<uint8_t>(((b >> 24) & 0x80) | code);
}

template <typename T>
float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return bits_f32(bf16_round_bits(x));
  else return static_cast<float>(static_cast<T>(x));
}

// One token's values before the cast to the cache: kv_c (optionally RMSNorm-ed and scaled) -> c
// [512] and k_pe (optionally rotated) -> pe [64]. The rounding steps are the reference's: normed to
// kv_c's dtype, normed * weight to their promoted dtype, Product (the store then rounds to the
// cache's). The promoted dtype is kv_c's or float32.
template <typename In, typename Product>
void token_values(const In* kv_c, const In* k_pe, const float* weight, float eps, const float* cos, const float* sin,
                  float* c, float* pe) {
  if (weight != nullptr) {
    float part[8] = {};
    for (int64_t i = 0; i < kLoraRank; i += 8)
      for (int u = 0; u < 8; ++u) part[u] += static_cast<float>(kv_c[i + u]) * static_cast<float>(kv_c[i + u]);
    const float ss = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(kLoraRank) + eps);
    for (int64_t i = 0; i < kLoraRank; ++i) {
      const float normed = round_to<In>(static_cast<float>(kv_c[i]) * inv);
      c[i] = round_to<Product>(weight[i] * normed);
    }
  } else {
    for (int64_t i = 0; i < kLoraRank; ++i) c[i] = static_cast<float>(kv_c[i]);
  }
  if (cos != nullptr) {
    for (int64_t p = 0; p < kRopeDim / 2; ++p) {
      const float x0 = static_cast<float>(k_pe[2 * p]), x1 = static_cast<float>(k_pe[2 * p + 1]);
      pe[2 * p] = x0 * cos[p] - x1 * sin[p];
      pe[2 * p + 1] = x0 * sin[p] + x1 * cos[p];
    }
  } else {
    for (int64_t i = 0; i < kRopeDim; ++i) pe[i] = static_cast<float>(k_pe[i]);
  }
}

template <typename Out>
void store_token(const float* c, const float* pe, Out* dst) {
  auto cast = [](float x) {
    if constexpr (std::is_same_v<Out, c10::BFloat16>) {
      return c10::BFloat16(static_cast<uint16_t>(bf16_round_bits(x) >> 16), c10::BFloat16::from_bits());
    } else {
      return static_cast<Out>(x);
    }
  };
  for (int64_t i = 0; i < kLoraRank; ++i) dst[i] = cast(c[i]);
  for (int64_t i = 0; i < kRopeDim; ++i) dst[kLoraRank + i] = cast(pe[i]);
}

// FlashMLA's tile scale: max(amax / 448, 1e-4) rounded up to a power of two, on the bits (the
// reference does the same), so c / scale is exact and every backend stores the same bytes. A NaN
// or inf amax stays NaN / inf (std::max keeps its first argument; carried up, the bits would wrap
// to -0.0 and zero the tile).
float fp8_tile_scale(float amax) {
  const float s = std::max(amax / 448.0f, 1e-4f);
  const uint32_t bits = f32_bits(s);
  return (bits & 0x7F800000u) == 0x7F800000u ? s : bits_f32((bits + 0x7FFFFFu) & ~0x7FFFFFu);
}

// The FP8 cache's 656 bytes (mla_fp8_layout.h): c e4m3 per 128-value tile with its scale, pe in bf16.
void store_token_fp8(const float* c, const float* pe, uint8_t* dst) {
  for (int64_t t = 0; t < kLoraRank / kFp8Tile; ++t) {
    const float* x = c + t * kFp8Tile;
    // amax in 8 parts, NaN kept as torch.amax keeps it (then the scale is NaN: reference/mla.py)
    auto max_nan = [](float a, float v) { return a < v || v != v ? v : a; };
    float part[8] = {};
    for (int64_t i = 0; i < kFp8Tile; i += 8)
      for (int u = 0; u < 8; ++u) part[u] = max_nan(part[u], std::abs(x[i + u]));
    float amax = 0.0f;
    for (float v : part) amax = max_nan(amax, v);
    const float scale = fp8_tile_scale(amax);
    const float inv = 1.0f / scale;  // exact: a power of two (0 for an infinite scale, as x / inf)
    for (int64_t i = 0; i < kFp8Tile; ++i) dst[t * kFp8Tile + i] = e4m3_bits(x[i] * inv);
    std::memcpy(dst + kFp8ScaleOffset + 4 * t, &scale, 4);
  }
  for (int64_t i = 0; i < kRopeDim; ++i) {
    const uint16_t h = static_cast<uint16_t>(bf16_round_bits(pe[i]) >> 16);
    std::memcpy(dst + kFp8RopeOffset + 2 * i, &h, 2);
  }
}

void mla_cache_write_cpu(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& kv_cache,
                         const at::Tensor& slot_mapping, const std::optional<at::Tensor>& kv_norm_weight, double eps,
                         const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin) {
  check_mla_cache_write(kv_c, k_pe, kv_cache, slot_mapping, kv_norm_weight, rope_cos, rope_sin);
  const int64_t t = kv_c.size(0);
  if (t == 0) return;
  // As on a GPU, a slot past the cache is skipped rather than written out of bounds (ops.py
  // raises an error for it first where slot_mapping is on the CPU).
  const int64_t capacity = kv_cache.size(0) * kv_cache.size(1);
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  std::vector<float> weight;
  bool product_is_input = true;  // else float32
  if (kv_norm_weight) {
    weight.resize(kLoraRank);  // converted here: an ATen .to() costs more than a decode token's write
    const int64_t stride = kv_norm_weight->stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_norm_weight->scalar_type(), "kv_norm_weight", [&] {
      const scalar_t* w = kv_norm_weight->const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < kLoraRank; ++i) weight[i] = static_cast<float>(w[i * stride]);
    });
    product_is_input = at::promoteTypes(kv_norm_weight->scalar_type(), kv_c.scalar_type()) == kv_c.scalar_type();
  }
  const float* pcos = rope_cos ? rope_cos->const_data_ptr<float>() : nullptr;
  const float* psin = rope_sin ? rope_sin->const_data_ptr<float>() : nullptr;
  const bool fp8 = is_fp8_cache(kv_cache);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_c.scalar_type(), "mla_cache_write_cpu", [&] {
    using in_t = scalar_t;
    const in_t* pc = kv_c.const_data_ptr<in_t>();
    const in_t* pe = k_pe.const_data_ptr<in_t>();
    // Stores token i's values into slot `slot` of the cache; a per-dtype lambda.
    auto write_all = [&](auto store) {
      at::parallel_for(0, t, 64, [&](int64_t begin, int64_t end) {
        float c[kLoraRank], rot[kRopeDim];
        for (int64_t i = begin; i < end; ++i) {
          if (slots[i] < 0 || slots[i] >= capacity) continue;
          const float* w = weight.empty() ? nullptr : weight.data();
          const float* cos_i = pcos ? pcos + i * kRopeDim / 2 : nullptr;
          const float* sin_i = psin ? psin + i * kRopeDim / 2 : nullptr;
          const float e = static_cast<float>(eps);
          if (product_is_input) {
            token_values<in_t, in_t>(pc + i * kLoraRank, pe + i * kRopeDim, w, e, cos_i, sin_i, c, rot);
          } else {
            token_values<in_t, float>(pc + i * kLoraRank, pe + i * kRopeDim, w, e, cos_i, sin_i, c, rot);
          }
          store(c, rot, slots[i]);
        }
      });
    };
    if (fp8) {
      uint8_t* dst = kv_cache.data_ptr<uint8_t>();
      write_all([&](const float* c, const float* rot, int64_t slot) {
        store_token_fp8(c, rot, dst + slot * kFp8TokenBytes);
      });
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_cache.scalar_type(), "mla_cache_write_cpu", [&] {
      scalar_t* dst = kv_cache.data_ptr<scalar_t>();
      write_all([&](const float* c, const float* rot, int64_t slot) { store_token(c, rot, dst + slot * kHeadDim); });
    });
  });
}

}  // namespace
}  // namespace dsv3::mla::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) {
  m.impl("mla_cache_write", &dsv3::mla::cpu::mla_cache_write_cpu);
}
