// AVX2 (+ FMA + F16C) element conversions, quantization and dequantization of the FP8 CPU ops, 8
// lanes at a time; the counterparts of the AVX-512 ones in fp8_cpu_kernels.h, bit for bit.
//
// Every function carries DSV3_TARGET_AVX2 and runs only after cpu_isa_at_least(CpuIsa::kAvx2)
// said yes. AVX2 has no masked loads or stores of bytes or 16-bit words, so a tail (fewer than
// 8 elements) goes through a small zero-filled buffer on the stack.
//
// e4m3 -> fp32 here is the AVX-512 path's fast decode (see fp8_cpu_kernels.h): the byte is
// sign-extended to 16 bits, shifted and masked into the bits of an fp16 of value / 2^8, and F16C's
// vcvtph2ps (exact, subnormals included, whatever MXCSR.DAZ says) widens it; the 2^8 goes into the
// scale the value is multiplied by anyway. fp8_cpu_gemm_avx2.h says why this is the fastest decode.
#pragma once

#include <cstdint>
#include <cstring>

#include "fp8/fp8_cpu_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

namespace dsv3::fp8::cpu {

template <FloatType D>
constexpr int64_t elem_bytes() {
  return D == FloatType::kFloat32 ? 4 : 2;
}

// 8 bf16 / fp16 values (raw bits) -> fp32.
template <FloatType D>
DSV3_TARGET_AVX2 inline __m256 widen8_f32(__m128i h) {
  if constexpr (D == FloatType::kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Elements [i, i + n) of base (type D) as fp32, n <= 8; lanes past n are 0.
template <FloatType D>
DSV3_TARGET_AVX2 inline __m256 load8_f32(const void* base, int64_t i, int64_t n) {
  const char* p = static_cast<const char*>(base) + i * elem_bytes<D>();
  alignas(32) char buf[32];
  if (n < 8) {
    std::memset(buf, 0, sizeof(buf));
    std::memcpy(buf, p, n * elem_bytes<D>());
    p = buf;
  }
  if constexpr (D == FloatType::kFloat32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  else return widen8_f32<D>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Round-to-nearest-even on the bits; NaN -> 0xFFFF, as torch's vectorized CPU .to(bfloat16).
DSV3_TARGET_AVX2 inline __m128i f32_to_bf16_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_or_si256(r, _mm256_and_si256(nan, _mm256_set1_epi32(0xFFFF)));
  // packus works within 128-bit lanes: words 0-3 land in qword 0, words 4-7 in qword 2.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// v's lanes [0, n) stored to elements [i, i + n) of base (type D), n <= 8.
template <FloatType D>
DSV3_TARGET_AVX2 inline void store8_f32(void* base, int64_t i, __m256 v, int64_t n) {
  char* p = static_cast<char*>(base) + i * elem_bytes<D>();
  alignas(32) char buf[32];
  char* dst = n < 8 ? buf : p;
  if constexpr (D == FloatType::kFloat32) {
    _mm256_storeu_ps(reinterpret_cast<float*>(dst), v);
  } else {
    const __m128i h = D == FloatType::kBFloat16 ? f32_to_bf16_avx2(v)
                                               : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
  }
  if (n < 8) std::memcpy(p, buf, n * elem_bytes<D>());
}

// Columns [n0, n1) of the rows of c [rows, n] (fp32) stored to out [rows, n] of type D.
template <FloatType D>
DSV3_TARGET_AVX2 void convert_cols_avx2(const float* c, void* out, int64_t rows, int64_t n, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = n0; j < n1; j += 8) {
      const int64_t len = std::min<int64_t>(8, n1 - j);
      store8_f32<D>(out, r * n + j, load8_f32<FloatType::kFloat32>(c, r * n + j, len), len);
    }
}

// fp32 -> e4m3fn bytes in the low 8 bytes, bit-identical to c10::Float8_e4m3fn(float); the
// AVX-512 f32_to_e4m3's steps with AVX2 compares (|x| as int32 is never negative, so the signed
// compares order it as the unsigned ones there).
DSV3_TARGET_AVX2 inline __m128i f32_to_e4m3_avx2(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
  // Normal range: round the mantissa to 3 bits (ties to even) and rebias the exponent 127 -> 7.
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  __m256i normal = _mm256_add_epi32(a, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFFF)));
  normal = _mm256_sub_epi32(_mm256_srli_epi32(normal, 20), _mm256_set1_epi32(120 << 3));
  // Below 2^-6 (e4m3 subnormals): adding 2^14 makes the fp32 ulp 2^-9, the subnormal step.
  const __m256 shifted = _mm256_add_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(16384.0f));
  const __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x46800000));
  __m256i r = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), a));
  r = _mm256_min_epu32(r, _mm256_set1_epi32(0x7E));  // saturate (also catches rounding into 0x7F)
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7F), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F800000)));
  r = _mm256_or_si256(r, sign);
  // Byte 0 of each dword: to dword 0 of each 128-bit lane, then the two lanes' dwords together.
  const __m256i gather = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  r = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(r, gather), _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
  return _mm256_castsi256_si128(r);
}

// 16 e4m3 bytes -> the fp16 bits of value / 2^8 (see fp8_cpu_kernels.h's e4m3_to_f32_div256):
// the sign-extension puts the sign in bits 8..15; after << 7 bit 15 is the sign, bits 10..13 the
// exponent and 7..9 the mantissa, and bit 14 (a sign copy) is cleared. NaN codes read as +-1.875:
// e4m3_to_f32_div256_nan_avx2 patches them, the GEMM's on-the-fly decode detects them
// (nan_code_max_avx2).
DSV3_TARGET_AVX2 inline __m256i e4m3_to_f16_bits(__m128i bytes) {
  const __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7);
  return _mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0xBF80)));
}

// e4m3 NaN codes among 32 bytes at p, folded into a running byte max: x + x drops the sign bit and
// maps 0x7F / 0xFF to 0xFE, every other code to <= 0xFC, so acc holds 0xFE in some byte once a NaN
// code went through (has_nan_code_avx2). One load, one add, one max per 32 bytes: the check the
// GEMM's few-rows loop affords, whose fast decode reads NaN codes as +-480.
DSV3_TARGET_AVX2 inline __m256i nan_code_max_avx2(__m256i acc, const uint8_t* p) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_max_epu8(acc, _mm256_add_epi8(x, x));
}

DSV3_TARGET_AVX2 inline bool has_nan_code_avx2(__m256i acc) {
  return _mm256_movemask_epi8(_mm256_cmpeq_epi8(acc, _mm256_set1_epi8(static_cast<char>(0xFE)))) != 0;
}

// ---------------------------------------------------------------- quantization

// Quantizes the tile rows x cols (row stride ld) of x into q (same layout) with one scale,
// which it returns (as quantize_tile_avx512).
template <FloatType D>
DSV3_TARGET_AVX2 float quantize_tile_avx2(const void* x, uint8_t* q, int64_t ld, int64_t rows, int64_t cols,
                                          bool ue8m0) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 8) {
      const __m256 v = load8_f32<D>(x, r * ld + c, std::min<int64_t>(8, cols - c));
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // max_ps drops NaN; the reference keeps it
    }
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm256_movemask_ps(nan) ? bits_f32(0x7FC00000u) : _mm_cvtss_f32(m4);
  const float scale = block_scale(amax, ue8m0);
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 8) {
      const int64_t n = std::min<int64_t>(8, cols - c);
      // A true division, as the reference does: x * (1/scale) would round differently.
      const __m128i b = f32_to_e4m3_avx2(_mm256_div_ps(load8_f32<D>(x, r * ld + c, n), vscale));
      if (n == 8) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + r * ld + c), b);
      } else {
        alignas(16) uint8_t buf[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(buf), b);
        std::memcpy(q + r * ld + c, buf, n);
      }
    }
  }
  return scale;
}

// ---------------------------------------------------------------- dequantization

// 16 e4m3 bytes -> 2 x 8 fp32 of value / 2^8, NaN codes included: the fast decode reads them as
// +-1.875 (0x3FF00000), and OR-ing 0x7FF00000 there makes it c10's NaN (sign | 0x7FF00000), a
// payload the scale multiply and the fp16 / bf16 conversions carry through.
DSV3_TARGET_AVX2 inline void e4m3_to_f32_div256_nan_avx2(__m128i b, __m256& lo, __m256& hi) {
  const __m256i h = e4m3_to_f16_bits(b);
  const __m128i low7 = _mm_set1_epi8(0x7F);
  const __m128i is_nan = _mm_cmpeq_epi8(_mm_and_si128(b, low7), low7);
  const __m256i nan_bits = _mm256_set1_epi32(0x7FF00000);
  const __m256i nan_lo = _mm256_and_si256(_mm256_cvtepi8_epi32(is_nan), nan_bits);
  const __m256i nan_hi = _mm256_and_si256(_mm256_cvtepi8_epi32(_mm_srli_si128(is_nan, 8)), nan_bits);
  lo = _mm256_or_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_castsi256_ps(nan_lo));
  hi = _mm256_or_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), _mm256_castsi256_ps(nan_hi));
}

// out[0..len) = e4m3(w[0..len)) * scale, bit for bit what the reference gives, NaN included.
// 16 values a step; a tail goes through a zero-filled copy.
template <FloatType D>
DSV3_TARGET_AVX2 void dequant_span_avx2(const uint8_t* w, void* out, int64_t len, float scale) {
  const __m256 vscale = _mm256_set1_ps(scale * kDecodeUnscale);
  for (int64_t c = 0; c < len; c += 16) {
    const int64_t n = std::min<int64_t>(16, len - c);
    alignas(16) uint8_t buf[16];
    const uint8_t* src = w + c;
    if (n < 16) {
      std::memset(buf, 0, sizeof(buf));
      std::memcpy(buf, src, n);
      src = buf;
    }
    __m256 v[2];
    e4m3_to_f32_div256_nan_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)), v[0], v[1]);
    for (int half = 0; half < 2 && 8 * half < n; ++half)
      store8_f32<D>(out, c + 8 * half, _mm256_mul_ps(v[half], vscale), std::min<int64_t>(8, n - 8 * half));
  }
}

// A' rows [0, rows) of a [rows, K] -> fp32, each 128-block multiplied by its a_scale (K a
// multiple of 128). NaN codes give NaN (A is small next to the GEMM: the check is cheap here, and
// a NaN in A' then reaches its whole output row through the FMAs).
DSV3_TARGET_AVX2 inline void dequant_a_avx2(const uint8_t* a, const float* a_scale, float* out, int64_t rows,
                                            int64_t k) {
  const int64_t kblocks = k / kGemmBlk;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const __m256 s = _mm256_set1_ps(a_scale[r * kblocks + kb] * kDecodeUnscale);
      const int64_t base = r * k + kb * kGemmBlk;
      for (int64_t i = 0; i < kGemmBlk; i += 16) {
        __m256 lo, hi;
        e4m3_to_f32_div256_nan_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + base + i)), lo, hi);
        _mm256_storeu_ps(out + base + i, _mm256_mul_ps(lo, s));
        _mm256_storeu_ps(out + base + i + 8, _mm256_mul_ps(hi, s));
      }
    }
  }
}

}  // namespace dsv3::fp8::cpu

#endif  // __x86_64__
