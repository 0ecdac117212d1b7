// AVX-512 inner loops of the FP8 CPU ops (torch-free; the glue and the portable scalar
// fallback are in fp8_cpu.cpp).
//
// The extension is compiled without -mavx512*, so every function here carries a target
// attribute and is only called after cpu_isa_at_least(CpuIsa::kAvx512) said yes. Lambdas do not inherit
// target attributes, hence the entry points are plain (non-lambda) functions over ranges.
//
// FP8 here is e4m3fn. Conversions:
// - fp32 -> e4m3: integer rounding of the fp32 bits (round-to-nearest-even), saturating to
//   +-448 like c10::Float8_e4m3fn (finite overflow and inf give +-448, NaN gives 0x7F|sign).
// - e4m3 -> fp32: the byte is sign-extended to 16 bits and shifted so that its exponent and
//   mantissa land in the fp16 exponent/mantissa fields; the hardware fp16 -> fp32 conversion
//   (which also handles the subnormals, whatever MXCSR.DAZ says) then yields value / 2^8.
//   Callers fold the 2^8 into the block scale they multiply by anyway, which is exact.
//   In that fast decode the NaN codes 0x7F/0xFF read as +-480, so every user deals with them,
//   as the reference's NaN rule asks (reference/fp8.py): weight_dequant, A' and the many-rows
//   panels patch NaN back in (e4m3_to_f32_div256_nan: cheap there, once per value of A or per
//   value of a B panel reused by many rows); the few-rows loops, which stream B once and are
//   bound by the decode, only detect them (two byte ops per 32 or 64 bytes) and mark the output
//   columns NaN afterwards (mark_nan_columns); the bf16 table decodes them to bf16 NaN, which
//   vdpbf16ps propagates.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "common/float_type.h"

namespace dsv3::fp8::cpu {

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxMin = 1e-4f;
constexpr int64_t kGemmBlk = 128;  // K block of fp8_gemm's scales
// The fast e4m3 decode returns value / 2^8 (see above); scales are multiplied by this.
constexpr float kDecodeUnscale = 256.0f;

// DeepSeek-V3's block scale; ue8m0 rounds it up to a power of two by carrying a non-zero
// mantissa into the exponent. NaN amax stays NaN (std::max keeps its first argument); ue8m0 leaves
// a NaN or inf scale alone (its bits carried up would wrap to -0.0 and hide it).
inline float block_scale(float amax, bool ue8m0) {
  float s = std::max(amax, kAmaxMin) / kFp8Max;
  return ue8m0 && f32_bits(s) < 0x7F800000u ? bits_f32((f32_bits(s) + 0x7FFFFFu) & ~0x7FFFFFu) : s;
}

// Whether bytes [0, len) of e4m3 hold a NaN code (0x7F / 0xFF): the second look, one row at a
// time, after a vector loop's detection flagged a tile (rare: corrupt data).
inline bool has_nan_code(const uint8_t* p, int64_t len) {
  for (int64_t i = 0; i < len; ++i)
    if ((p[i] & 0x7F) == 0x7F) return true;
  return false;
}

// The reference's NaN for the fast decode's +-480: c[i * ldc + j * cs] = NaN for all m rows and
// every j < nr whose row of b (stride ldb, len bytes from b) holds a NaN code. After the few-rows
// loops' stores (and before later K chunks add to c, which keep the NaN).
inline void mark_nan_columns(const uint8_t* b, int64_t ldb, int64_t len, int nr, float* c, int64_t m,
                             int64_t ldc, int64_t cs = 1) {
  for (int j = 0; j < nr; ++j) {
    if (!has_nan_code(b + j * ldb, len)) continue;
    for (int64_t i = 0; i < m; ++i) c[i * ldc + j * cs] = bits_f32(0x7FC00000u);
  }
}

// How many rows of B apart the few-rows tiles take their NR rows: far enough for each to lie in
// its own 4 KiB page, so that the L2 streamer, which follows one stream per page, runs NR streams
// at once; a power of two with 2 x NR x that <= kGemmBlk, so that a span of NR x that rows lies in
// one block of b_scale_inv. Measured with one row of A, B from DRAM (1 GiB streamed), 1 thread,
// on a Sapphire Rapids core, GB/s, rows read one after the other -> rows pages apart: the avx2 tile
// of 8 rows at K = 512 7.4 -> 11.4, K = 1024 9.2 -> 11.7, K = 2048 9.2 -> 11.6 (11.7 at K = 7168,
// whose consecutive rows are pages apart already); two rows of A (tile of 4) at K = 2048 7.6 ->
// 11.1; with four rows the FMAs bound the tile (6.2-6.8 either way); the avx512_bf16 pairs at K =
// 512 7.4 -> 10.9, K = 2048 7.5 -> 10.2.
inline int64_t page_stride_rows(int64_t k, int nr) {
  int64_t s = 1;
  while (s * k < 4096 && 2 * s * nr <= kGemmBlk) s *= 2;
  return s;
}

// The rows between the NR rows of a few-rows tile starting at row n0: `stride` (page_stride_rows)
// where an aligned span of NR x stride rows starts there and ends by n_end, so that it stays in
// one block of b_scale_inv; else 1, consecutive rows.
inline int64_t tile_row_step(int64_t n0, int64_t n_end, int64_t stride, int nr) {
  const int64_t span = nr * stride;
  return stride > 1 && n0 % span == 0 && n_end - n0 >= span ? stride : 1;
}

// Software prefetch distance along B, into L2, of every few-rows loop. On the avx2 loop 16-64 KiB
// are equal within the noise of the shared machine (M = 1..4, K = 512..16384), 4 KiB is slower,
// and without any prefetch the loop is 7-40% slower; the avx512_bf16 loop's measurements are at
// widen_b_slice.
constexpr int64_t kPrefetchBytes = 16384;

// That distance in rows of len bytes, rounded up to whole spans of `span` rows.
inline int64_t prefetch_rows(int64_t len, int64_t span) {
  return (kPrefetchBytes + span * len - 1) / (span * len) * span;
}

#if defined(__x86_64__)

#define DSV3_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

// GCC 12's _mm512_reduce_* intrinsics trip its own -Wuninitialized; nothing of ours is.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// ---------------------------------------------------------------- conversions (16 lanes)

DSV3_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

template <FloatType D>
DSV3_AVX512 inline __m512 load_f32(const void* base, int64_t i, __mmask16 m) {
  if constexpr (D == FloatType::kFloat32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
  } else {
    __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i);
    if constexpr (D == FloatType::kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Round-to-nearest-even on the bits; NaN -> 0xFFFF, as torch's vectorized CPU .to(bfloat16).
DSV3_AVX512 inline __m256i f32_to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(r);
}

template <FloatType D>
DSV3_AVX512 inline void store_f32(void* base, int64_t i, __m512 v, __mmask16 m) {
  if constexpr (D == FloatType::kFloat32) {
    _mm512_mask_storeu_ps(static_cast<float*>(base) + i, m, v);
  } else {
    __m256i h = D == FloatType::kBFloat16 ? f32_to_bf16(v)
                                   : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, m, h);
  }
}

// Columns [n0, n1) of the rows of c [rows, n] (fp32) stored to out [rows, n] of type D.
template <FloatType D>
DSV3_AVX512 void convert_cols_avx512(const float* c, void* out, int64_t rows, int64_t n, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = n0; j < n1; j += 16) {
      const __mmask16 m = tail_mask(n1 - j);
      store_f32<D>(out, r * n + j, _mm512_maskz_loadu_ps(m, c + r * n + j), m);
    }
  }
}

// fp32 -> e4m3fn bytes, bit-identical to c10::Float8_e4m3fn(float).
DSV3_AVX512 inline __m128i f32_to_e4m3(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
  // Normal range: round the mantissa to 3 bits (ties to even) and rebias the exponent 127 -> 7.
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
  __m512i normal = _mm512_add_epi32(a, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFFF)));
  normal = _mm512_sub_epi32(_mm512_srli_epi32(normal, 20), _mm512_set1_epi32(120 << 3));
  // Below 2^-6 (e4m3 subnormals): adding 2^14 makes the fp32 ulp 2^-9, the subnormal step,
  // so the FPU does the rounding and the low bits are the code.
  const __m512 shifted = _mm512_add_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(16384.0f));
  const __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(0x46800000));
  __m512i r = _mm512_mask_mov_epi32(normal, _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(121 << 23)), sub);
  r = _mm512_min_epu32(r, _mm512_set1_epi32(0x7E));  // saturate (also catches rounding into 0x7F)
  r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000)),
                            _mm512_set1_epi32(0x7F));
  return _mm512_cvtepi32_epi8(_mm512_or_si512(r, sign));
}

// 16 e4m3 bytes (already in a register) -> fp32 values / 2^8. NaN codes read as +-480.
DSV3_AVX512 inline __m512 e4m3_to_f32_div256(__m128i bytes) {
  // Sign-extension puts the sign in bits 8..15; after << 7 bit 15 is the sign, bits 10..13 the
  // exponent, 7..9 the mantissa, and bit 14 (a sign copy) is cleared to keep the fp16 exponent < 16.
  __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7);
  return _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0xBF80))));
}

DSV3_AVX512 inline __m512 load_e4m3_div256(const uint8_t* p) {
  return e4m3_to_f32_div256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// As e4m3_to_f32_div256 with the NaN codes decoded to NaN: the fast decode gives +-1.875
// (0x3FF00000) there, and OR-ing 0x7FF00000 makes it c10's NaN (sign | 0x7FF00000), a payload
// the scale multiply and the fp16 / bf16 conversions carry through.
DSV3_AVX512 inline __m512 e4m3_to_f32_div256_nan(__m128i bytes) {
  const __m512 v = e4m3_to_f32_div256(bytes);
  const __m128i low7 = _mm_set1_epi8(0x7F);
  const __mmask16 is_nan = _mm_cmpeq_epi8_mask(_mm_and_si128(bytes, low7), low7);
  return _mm512_castsi512_ps(_mm512_mask_or_epi32(_mm512_castps_si512(v), is_nan, _mm512_castps_si512(v),
                                                  _mm512_set1_epi32(0x7FF00000)));
}

DSV3_AVX512 inline __m512 load_e4m3_div256_nan(const uint8_t* p) {
  return e4m3_to_f32_div256_nan(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// e4m3 NaN codes among 64 bytes at p, folded into a running byte max (as nan_code_max_avx2: x + x
// maps 0x7F / 0xFF to 0xFE, every other code below it); has_nan_code_avx512 reads the result.
DSV3_AVX512 inline __m512i nan_code_max_avx512(__m512i acc, const uint8_t* p) {
  const __m512i x = _mm512_loadu_si512(p);
  return _mm512_max_epu8(acc, _mm512_add_epi8(x, x));
}

DSV3_AVX512 inline bool has_nan_code_avx512(__m512i acc) {
  return _mm512_cmpeq_epi8_mask(acc, _mm512_set1_epi8(static_cast<char>(0xFE))) != 0;
}

// ---------------------------------------------------------------- quantization

// Quantizes the tile rows x cols (row stride ld) of x into q (same layout) with one scale,
// which it returns. act_quant calls it with one row, weight_quant with a block of rows.
template <FloatType D>
DSV3_AVX512 float quantize_tile_avx512(const void* x, uint8_t* q, int64_t ld, int64_t rows, int64_t cols,
                                       bool ue8m0) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 16) {
      __m512 v = load_f32<D>(x, r * ld + c, tail_mask(cols - c));
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // max_ps drops NaN; the reference keeps it
    }
  }
  const float amax = nan ? bits_f32(0x7FC00000u) : _mm512_reduce_max_ps(vmax);
  const float scale = block_scale(amax, ue8m0);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = tail_mask(cols - c);
      // A true division, as the reference does: x * (1/scale) would round differently.
      __m128i b = f32_to_e4m3(_mm512_div_ps(load_f32<D>(x, r * ld + c, m), vscale));
      _mm_mask_storeu_epi8(q + r * ld + c, m, b);
    }
  }
  return scale;
}

// out[0..len) = e4m3(w[0..len)) * scale, bit for bit what the reference gives, NaN included
// (c10 decodes the NaN codes to sign | 0x7FF00000, as e4m3_to_f32_div256_nan does).
template <FloatType D>
DSV3_AVX512 void dequant_span_avx512(const uint8_t* w, void* out, int64_t len, float scale) {
  const __m512 vscale = _mm512_set1_ps(scale * kDecodeUnscale);
  for (int64_t c = 0; c < len; c += 16) {
    const __mmask16 m = tail_mask(len - c);
    store_f32<D>(out, c, _mm512_mul_ps(e4m3_to_f32_div256_nan(_mm_maskz_loadu_epi8(m, w + c)), vscale), m);
  }
}

// ---------------------------------------------------------------- fp8_gemm
//
// Both operands are used dequantized in fp32, out = A' B'^T with A' = a * a_scale and
// B' = b * b_scale_inv: the scales are folded into the conversions, so the inner loops are
// plain fp32 dot products over K (rows of A and B are both K-contiguous). A micro-kernel
// keeps MR x NR zmm accumulators (one per output), each summing 16 lanes of K, and reduces
// them horizontally once at the end of its K range.

constexpr int kMR = 4;  // rows of A per micro-kernel
constexpr int kNR = 4;  // rows of B (columns of out) per micro-kernel

// A' rows [0, rows) of a [rows, K] -> fp32, each 128-block multiplied by its a_scale. NaN codes
// give NaN (A is small next to the GEMM: the check is cheap here, and a NaN in A' then reaches its
// whole output row through the FMAs).
DSV3_AVX512 inline void dequant_a_avx512(const uint8_t* a, const float* a_scale, float* out, int64_t rows,
                                         int64_t k) {
  const int64_t kblocks = k / kGemmBlk;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const __m512 s = _mm512_set1_ps(a_scale[r * kblocks + kb] * kDecodeUnscale);
      const int64_t base = r * k + kb * kGemmBlk;
      for (int64_t i = 0; i < kGemmBlk; i += 16) {
        _mm512_storeu_ps(out + base + i, _mm512_mul_ps(load_e4m3_div256_nan(a + base + i), s));
      }
    }
  }
}

// v's two 256-bit halves added.
DSV3_AVX512 inline __m256 fold_halves(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

// The lane sums of 4 accumulators as one vector [sum a, sum b, sum c, sum d]: a transposing
// reduction, 13 instructions where 4 separate horizontal sums take 32 (with K = 256, as in the
// down projection of small experts, those sums cost as much as the dot products).
DSV3_AVX512 inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(fold_halves(a), fold_halves(b)),
                                   _mm256_hadd_ps(fold_halves(c), fold_halves(d)));
  return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}

// acc[O / NR][O % NR], or zeros past the last output.
template <int O, int MR, int NR>
DSV3_AVX512 inline __m512 tile_acc(__m512 (&acc)[MR][NR]) {
  if constexpr (O < MR * NR) return acc[O / NR][O % NR];
  else return _mm512_setzero_ps();
}

// Outputs [O, MR * NR) of a tile: their lane sums four at a time into v.
template <int O, int MR, int NR>
DSV3_AVX512 inline void tile_sums(__m512 (&acc)[MR][NR], float* v) {
  if constexpr (O < MR * NR) {
    _mm_storeu_ps(v + O, sum4(tile_acc<O, MR, NR>(acc), tile_acc<O + 1, MR, NR>(acc), tile_acc<O + 2, MR, NR>(acc),
                              tile_acc<O + 3, MR, NR>(acc)));
    tile_sums<O + 4, MR, NR>(acc, v);
  }
}

// c[i * ldc + j] (+)= the lane sum of acc[i][j]. The indices are compile-time (templates, not a
// loop over a lambda), so that the accumulators stay in registers in the caller's K loop.
template <int MR, int NR>
DSV3_AVX512 inline void store_tile(__m512 (&acc)[MR][NR], float* c, int64_t ldc, bool accumulate, int64_t cs = 1) {
  float v[(MR * NR + 3) / 4 * 4];
  tile_sums<0, MR, NR>(acc, v);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float& out = c[i * ldc + j * cs];
      out = accumulate ? out + v[i * NR + j] : v[i * NR + j];
    }
}

// Decode micro-kernel (few rows of A, CPUs without avx512_bf16): B is read as fp8 straight from memory and converted
// on the fly, each of its 128-blocks scaled by b_scale_inv, so B is streamed exactly once.
// a: MR rows of A' (stride lda), b: NR rows of fp8 B (stride ldb, K = k), bscale[j]: row of
// b_scale_inv for B row j. Writes c[i * ldc + j * cs]. pf (or null): B rows to prefetch into L2
// alongside, at the same offsets (stride ldb). Detect: returns whether the NR rows of B hold an
// e4m3 NaN code (read as +-480 here; the caller marks their columns NaN), else false.
template <int MR, int NR, bool Detect>
DSV3_AVX512 bool gemm_tile_fp8b(const float* a, int64_t lda, const uint8_t* b, int64_t ldb, const float* const* bscale,
                                int64_t k, float* c, int64_t ldc, int64_t cs, const uint8_t* pf) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  __m512i nan = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < k / kGemmBlk; ++kb) {
    __m512 s[NR];
    for (int j = 0; j < NR; ++j) {
      s[j] = _mm512_set1_ps(bscale[j][kb] * kDecodeUnscale);
      if constexpr (Detect) {
        nan = nan_code_max_avx512(nan, b + j * ldb + kb * kGemmBlk);
        nan = nan_code_max_avx512(nan, b + j * ldb + kb * kGemmBlk + 64);
      }
    }
    for (int64_t kk = kb * kGemmBlk; kk < (kb + 1) * kGemmBlk; kk += 16) {
      if (pf != nullptr && (kk & 63) == 0)
        for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * ldb + kk), _MM_HINT_T1);
      __m512 bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = _mm512_mul_ps(load_e4m3_div256(b + j * ldb + kk), s[j]);
      for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_loadu_ps(a + i * lda + kk);
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
      }
    }
  }
  store_tile<MR, NR>(acc, c, ldc, false, cs);
  return Detect && has_nan_code_avx512(nan);
}

// Many-rows micro-kernel: B' already converted to fp32 (a cache-resident panel, stride ldb).
// Covers K range [0, len) of the pointers given; accumulates into c when asked (K chunks).
template <int MR, int NR>
DSV3_AVX512 void gemm_tile_f32(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t len,
                               float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < len; kk += 16) {
    __m512 bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm512_loadu_ps(b + j * ldb + kk);
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * lda + kk);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  store_tile<MR, NR>(acc, c, ldc, accumulate);
}

// B' panel: rows [n0, n0 + rows) x K range [k0, k0 + len) of fp8 b [N, K] -> fp32 panel
// with row stride ldp, each 128x128 block scaled by its b_scale_inv; NaN codes give NaN (the
// panel is reused by every row of A, so the check is cheap here).
DSV3_AVX512 inline void dequant_b_panel_avx512(const uint8_t* b, const float* b_scale, int64_t k, int64_t n0,
                                               int64_t rows, int64_t k0, int64_t len, float* panel,
                                               int64_t ldp) {
  const int64_t kblocks = k / kGemmBlk;
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t n = n0 + j;
    const float* srow = b_scale + (n / kGemmBlk) * kblocks;
    for (int64_t kk = 0; kk < len; kk += kGemmBlk) {
      const __m512 s = _mm512_set1_ps(srow[(k0 + kk) / kGemmBlk] * kDecodeUnscale);
      for (int64_t i = 0; i < kGemmBlk; i += 16) {
        __m512 v = _mm512_mul_ps(load_e4m3_div256_nan(b + n * k + k0 + kk + i), s);
        _mm512_storeu_ps(panel + j * ldp + kk + i, v);
      }
    }
  }
}

// Runtime mr (edges of M) -> micro-kernel instantiation.
template <int NR, bool Detect>
DSV3_AVX512 inline bool gemm_tile_fp8b_mr(int mr, const float* a, int64_t lda, const uint8_t* b, int64_t ldb,
                                          const float* const* bscale, int64_t k, float* c, int64_t ldc, int64_t cs,
                                          const uint8_t* pf) {
  static_assert(kMR == 4, "one case per row count");
  switch (mr) {
    case 1: return gemm_tile_fp8b<1, NR, Detect>(a, lda, b, ldb, bscale, k, c, ldc, cs, pf);
    case 2: return gemm_tile_fp8b<2, NR, Detect>(a, lda, b, ldb, bscale, k, c, ldc, cs, pf);
    case 3: return gemm_tile_fp8b<3, NR, Detect>(a, lda, b, ldb, bscale, k, c, ldc, cs, pf);
    default: return gemm_tile_fp8b<4, NR, Detect>(a, lda, b, ldb, bscale, k, c, ldc, cs, pf);
  }
}

template <int NR>
DSV3_AVX512 inline void gemm_tile_f32_mr(int mr, const float* a, int64_t lda, const float* b, int64_t ldb,
                                         int64_t len, float* c, int64_t ldc, bool accumulate) {
  switch (mr) {
    case 1: return gemm_tile_f32<1, NR>(a, lda, b, ldb, len, c, ldc, accumulate);
    case 2: return gemm_tile_f32<2, NR>(a, lda, b, ldb, len, c, ldc, accumulate);
    case 3: return gemm_tile_f32<3, NR>(a, lda, b, ldb, len, c, ldc, accumulate);
    default: return gemm_tile_f32<4, NR>(a, lda, b, ldb, len, c, ldc, accumulate);
  }
}

// Decode path: c[0..m) x columns [n_begin, n_end) of out = A' B'^T, B converted on the fly.
// All rows of A' are swept per group of kNR rows of B, which stays in L1/L2 meanwhile; the first
// group, which streams B from memory, prefetches ahead and looks for NaN codes in it
// (mark_nan_columns). An aligned span of kNR x page_stride_rows rows goes as that many groups
// whose rows are that far apart. Against consecutive rows without prefetch, builds alternated, 1
// thread, B from DRAM (1 GiB rotation), fp8_gemm op, ms: one row of A 2112 x 7168 2.16-2.27 ->
// 1.61-1.69, 7168 x 2048 2.64-2.69 -> 1.54-1.56, 32768 x 512 3.83-3.88 -> 2.09-2.15; four rows
// 2.53 -> 2.13, 3.00 -> 2.03, 4.48 -> 3.27.
DSV3_AVX512 inline void gemm_decode_avx512(const float* a, int64_t m, const uint8_t* b, const float* b_scale,
                                           int64_t k, int64_t n, int64_t n_begin, int64_t n_end, float* c) {
  const int64_t kblocks = k / kGemmBlk;
  const int64_t stride = page_stride_rows(k, kNR), span = kNR * stride;
  const int64_t ahead = prefetch_rows(k, span);
  for (int64_t n0 = n_begin; n0 < n_end;) {
    const int64_t step = tile_row_step(n0, n_end, stride, kNR);  // = columns between a group's outputs
    const bool spread = step > 1;
    const int nr = spread || n_end - n0 >= kNR ? kNR : 1;
    for (int64_t col = n0; col < n0 + step; ++col) {
      const float* bscale[kNR];
      for (int j = 0; j < nr; ++j) bscale[j] = b_scale + ((col + j * step) / kGemmBlk) * kblocks;
      const uint8_t* pb = b + col * k;
      const uint8_t* pf = col + ahead < n_end ? b + (col + ahead) * k : nullptr;
      bool nan = false;
      for (int64_t m0 = 0; m0 < m; m0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m - m0));
        const float* pa = a + m0 * k;
        float* pc = c + m0 * n + col;
        if (nr == kNR && m0 == 0)
          nan = gemm_tile_fp8b_mr<kNR, true>(mr, pa, k, pb, step * k, bscale, k, pc, n, step, pf);
        else if (nr == kNR) gemm_tile_fp8b_mr<kNR, false>(mr, pa, k, pb, step * k, bscale, k, pc, n, step, nullptr);
        else if (m0 == 0) nan = gemm_tile_fp8b_mr<1, true>(mr, pa, k, pb, k, bscale, k, pc, n, 1, pf);
        else gemm_tile_fp8b_mr<1, false>(mr, pa, k, pb, k, bscale, k, pc, n, 1, nullptr);
      }
      if (nan) mark_nan_columns(pb, step * k, k, nr, c + col, m, n, step);
    }
    n0 += spread ? span : nr;
  }
}

// Many-rows path, one task: rows [m0, m1) x a panel of kPanelN rows of B starting at n0.
// Per chunk of kPanelK along K the B panel is converted once into `panel` (kPanelN x
// kPanelK fp32, L2-resident) and reused by every row of A; chunk results are summed in c.
constexpr int64_t kPanelN = 64;
constexpr int64_t kPanelK = 512;

DSV3_AVX512 inline void gemm_panel_avx512(const float* a, int64_t m0, int64_t m1, const uint8_t* b,
                                          const float* b_scale, int64_t k, int64_t n, int64_t n0, float* c,
                                          float* panel) {
  const int64_t rows = std::min(kPanelN, n - n0);
  for (int64_t k0 = 0; k0 < k; k0 += kPanelK) {
    const int64_t len = std::min(kPanelK, k - k0);
    dequant_b_panel_avx512(b, b_scale, k, n0, rows, k0, len, panel, kPanelK);
    for (int64_t i = m0; i < m1; i += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - i));
      for (int64_t j = 0; j < rows;) {
        const float* pa = a + i * k + k0;
        float* pc = c + i * n + n0 + j;
        if (rows - j >= kNR) {
          gemm_tile_f32_mr<kNR>(mr, pa, k, panel + j * kPanelK, kPanelK, len, pc, n, k0 > 0);
          j += kNR;
        } else {
          gemm_tile_f32_mr<1>(mr, pa, k, panel + j * kPanelK, kPanelK, len, pc, n, k0 > 0);
          j += 1;
        }
      }
    }
  }
}

// ---------------------------------------------------------------- fp8_gemm with avx512_bf16
//
// For more than a few rows the fp32 FMA kernel is compute-bound; vdpbf16ps does twice the
// multiply-adds per instruction. e4m3 values (/ 2^8) are exact in bf16 and their products
// exact in fp32, so only the unscaled operands go through bf16: each micro-kernel sums a
// 128-wide K block in `blk` accumulators, then adds blk * (a_scale * b_scale_inv) to `tot`.

#define DSV3_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16,avx512vbmi")))

constexpr int kMRbf16 = 4;  // 2 x 4 x 3 accumulators + 3 B + 1 A registers of 32
constexpr int kNRbf16 = 3;
// Longer K chunks than the fp32 path (the bf16 panel is half the bytes): fewer horizontal sums.
constexpr int64_t kPanelKbf16 = 2048;
constexpr float kDecodeUnscale2 = kDecodeUnscale * kDecodeUnscale;

// e4m3 -> bf16 by table: byte-wise lookups of the low and high bf16 bytes of value / 2^8
// (vpermi2b indexes 128 entries with the low 7 bits; the sign is OR-ed in), then the bytes are
// interleaved. The interleave works per 128-bit lane, so each group of 64 values comes out
// in a fixed permuted order; A and B go through the same routine, so their dot products
// are unchanged (and a group never straddles a 128-block of scales).
struct Bf16Lut {
  uint8_t lo[128];
  uint8_t hi[128];
};

inline const Bf16Lut& bf16_lut() {
  static const Bf16Lut lut = [] {
    Bf16Lut t{};
    for (int m = 0; m < 128; ++m) {
      const int e = m >> 3, mant = m & 7;
      // value / 2^8; the NaN code is bf16 NaN (0x7FC0; 0xFFC0 with the sign OR-ed in), which
      // vdpbf16ps carries into its sums (NaN * 0 included), as the reference's NaN rule asks.
      const float v = m == 0x7F ? bits_f32(0x7FC00000u)
                      : e      ? bits_f32(static_cast<uint32_t>((e + 127 - 7 - 8) << 23 | mant << 20))
                               : static_cast<float>(mant) * 0x1p-17f;
      t.lo[m] = static_cast<uint8_t>(f32_bits(v) >> 16);
      t.hi[m] = static_cast<uint8_t>(f32_bits(v) >> 24);
    }
    return t;
  }();
  return lut;
}

// The lookup tables in registers.
struct Bf16Tables {
  __m512i lo0, lo1, hi0, hi1, sign;
};

DSV3_AVX512BF16 inline Bf16Tables bf16_tables() {
  const Bf16Lut& t = bf16_lut();
  return {_mm512_loadu_si512(t.lo), _mm512_loadu_si512(t.lo + 64), _mm512_loadu_si512(t.hi),
          _mm512_loadu_si512(t.hi + 64), _mm512_set1_epi8(static_cast<char>(0x80))};
}

// 64 e4m3 bytes at src -> 2 x 32 bf16 of value / 2^8, permuted as above.
DSV3_AVX512BF16 inline void widen64_bf16(const Bf16Tables& t, const uint8_t* src, __m512i& first, __m512i& second) {
  const __m512i x = _mm512_loadu_si512(src);
  const __m512i lo = _mm512_permutex2var_epi8(t.lo0, x, t.lo1);
  const __m512i hi = _mm512_or_si512(_mm512_permutex2var_epi8(t.hi0, x, t.hi1), _mm512_and_si512(x, t.sign));
  first = _mm512_unpacklo_epi8(lo, hi);
  second = _mm512_unpackhi_epi8(lo, hi);
}

// count (a multiple of 64) e4m3 bytes -> bf16 of value / 2^8, permuted per 64 as above.
DSV3_AVX512BF16 inline void e4m3_to_bf16_avx512bf16(const uint8_t* src, uint16_t* dst, int64_t count) {
  const Bf16Tables t = bf16_tables();
  for (int64_t i = 0; i < count; i += 64) {
    __m512i first, second;
    widen64_bf16(t, src + i, first, second);
    _mm512_storeu_si512(dst + i, first);
    _mm512_storeu_si512(dst + i + 32, second);
  }
}

// a: MR rows of raw bf16 A (stride lda), ascale: their a_scale rows (stride ldas), b: NR rows
// of raw bf16 B (stride ldb) sharing the b_scale_inv row bscale; K range [0, len).
template <int MR, int NR>
DSV3_AVX512BF16 void gemm_tile_bf16(const uint16_t* a, int64_t lda, const float* ascale, int64_t ldas,
                                    const uint16_t* b, int64_t ldb, const float* bscale, int64_t len, float* c,
                                    int64_t ldc, bool accumulate) {
  __m512 tot[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < len / kGemmBlk; ++kb) {
    __m512 blk[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) blk[i][j] = _mm512_setzero_ps();
    for (int64_t kk = kb * kGemmBlk; kk < (kb + 1) * kGemmBlk; kk += 32) {
      __m512bh bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + j * ldb + kk);
      for (int i = 0; i < MR; ++i) {
        const __m512bh av = (__m512bh)_mm512_loadu_si512(a + i * lda + kk);
        for (int j = 0; j < NR; ++j) blk[i][j] = _mm512_dpbf16_ps(blk[i][j], av, bv[j]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 s = _mm512_set1_ps(ascale[i * ldas + kb] * bscale[kb] * kDecodeUnscale2);
      for (int j = 0; j < NR; ++j) tot[i][j] = _mm512_fmadd_ps(blk[i][j], s, tot[i][j]);
    }
  }
  store_tile<MR, NR>(tot, c, ldc, accumulate);
}

template <int NR>
DSV3_AVX512BF16 inline void gemm_tile_bf16_mr(int mr, const uint16_t* a, int64_t lda, const float* ascale,
                                              int64_t ldas, const uint16_t* b, int64_t ldb, const float* bscale,
                                              int64_t len, float* c, int64_t ldc, bool accumulate) {
  static_assert(kMRbf16 == 4, "one case per row count");
  switch (mr) {
    case 1: return gemm_tile_bf16<1, NR>(a, lda, ascale, ldas, b, ldb, bscale, len, c, ldc, accumulate);
    case 2: return gemm_tile_bf16<2, NR>(a, lda, ascale, ldas, b, ldb, bscale, len, c, ldc, accumulate);
    case 3: return gemm_tile_bf16<3, NR>(a, lda, ascale, ldas, b, ldb, bscale, len, c, ldc, accumulate);
    default: return gemm_tile_bf16<4, NR>(a, lda, ascale, ldas, b, ldb, bscale, len, c, ldc, accumulate);
  }
}

// As gemm_panel_avx512, with A already in raw bf16 (a_bf16 [M, K]) and a bf16 B panel.
// Panels start at multiples of kPanelN, which divides 128, so the rows of a tile (all inside
// one panel) share one 128-row block of b_scale_inv.
DSV3_AVX512BF16 inline void gemm_panel_avx512bf16(const uint16_t* a, const float* a_scale, int64_t m0, int64_t m1,
                                                  const uint8_t* b, const float* b_scale, int64_t k, int64_t n,
                                                  int64_t n0, float* c, uint16_t* panel) {
  static_assert(kGemmBlk % kPanelN == 0, "a tile must not straddle a scale block");
  const int64_t rows = std::min(kPanelN, n - n0), kblocks = k / kGemmBlk;
  for (int64_t k0 = 0; k0 < k; k0 += kPanelKbf16) {
    const int64_t len = std::min(kPanelKbf16, k - k0);
    for (int64_t j = 0; j < rows; ++j) e4m3_to_bf16_avx512bf16(b + (n0 + j) * k + k0, panel + j * kPanelKbf16, len);
    for (int64_t i = m0; i < m1; i += kMRbf16) {
      const int mr = static_cast<int>(std::min<int64_t>(kMRbf16, m1 - i));
      const float* as = a_scale + i * kblocks + k0 / kGemmBlk;
      for (int64_t j = 0; j < rows;) {
        const float* bs = b_scale + ((n0 + j) / kGemmBlk) * kblocks + k0 / kGemmBlk;
        const uint16_t* pa = a + i * k + k0;
        float* pc = c + i * n + n0 + j;
        const uint16_t* pb = panel + j * kPanelKbf16;
        if (rows - j >= kNRbf16) {
          gemm_tile_bf16_mr<kNRbf16>(mr, pa, k, as, kblocks, pb, kPanelKbf16, bs, len, pc, n, k0 > 0);
          j += kNRbf16;
        } else {
          gemm_tile_bf16_mr<1>(mr, pa, k, as, kblocks, pb, kPanelKbf16, bs, len, pc, n, k0 > 0);
          j += 1;
        }
      }
    }
  }
}

// Few rows (decode) with avx512_bf16: every 128-K block of a pair of B rows is converted
// to bf16 in registers (same LUT and order as e4m3_to_bf16_avx512bf16) and applied to all
// MR rows of A at once, so B is read from memory once and converted once per MR rows.
// Per row and block the two dot products are summed in a short dpbf16 chain, then scaled
// into `tot`; the register budget (8 B + 1 A + 2 chain + 2 * MR tot + LUT) sets kMRsmall = 8.
constexpr int kMRsmall = 8;
constexpr int kNRsmall = 2;
constexpr int kMRfold = 12;
// kPrefetchBytes along each B row (near a row's end this runs into the next rows), into L2, which
// tracks more outstanding misses than L1. 1 thread, weights from DRAM: fp8_linear 2112 x 7168 at
// M = 1 1.42 -> 0.83-0.92 ms, M = 8 2.5 -> 2.0-2.1 ms, and fused_moe FP8 at T = 8 (E = 64, D =
// 1024, I = 256, top-6) 3.0 -> 1.8 ms, against the previous 4 KiB into L1 (itself faster than
// 512 B - 2 KiB, notably for short rows); 8 KiB does as well.

// One B row's 128-wide K slice at src -> 4 x 32 bf16, prefetching the row kPrefetchBytes ahead.
DSV3_AVX512BF16 inline void widen_b_slice(const Bf16Tables& t, const uint8_t* src, __m512bh out[4]) {
  _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes + 64), _MM_HINT_T1);
  for (int h = 0; h < 2; ++h) {
    __m512i first, second;
    widen64_bf16(t, src + 64 * h, first, second);
    out[2 * h] = (__m512bh)first;
    out[2 * h + 1] = (__m512bh)second;
  }
}

// a: MR rows of raw bf16 A (stride k); s[kb * lds + i]: a_scale * b_scale_inv * 2^16 for row
// i and block kb; b: `tiles` tiles of NR rows of fp8 B, all inside one 128-row block of
// b_scale_inv, each written to its NR columns of c. step: the rows between a tile's rows (and the
// columns between its outputs): 1, the tiles one after the other, or more, the tiles on
// successive rows (page_stride_rows). Several tiles per call, because the call's own costs (the
// tables, the zeroing, the stores) weighed on short K: with K = 256 (the down projection of a
// small expert) a tile is two 128-blocks.
template <int MR, int NR>
DSV3_AVX512BF16 void gemm_small_bf16(const uint16_t* a, const float* s, int64_t lds, const uint8_t* b, int64_t k,
                                     float* c, int64_t ldc, int64_t tiles, int64_t step) {
  const Bf16Tables t = bf16_tables();
  const int64_t advance = step == 1 ? NR : 1;
  for (int64_t tile = 0; tile < tiles; ++tile, b += advance * k, c += advance) {
    __m512 tot[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) tot[i][j] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < k / kGemmBlk; ++kb) {
      const int64_t k0 = kb * kGemmBlk;
      __m512bh bv[NR][4];
      for (int j = 0; j < NR; ++j) widen_b_slice(t, b + j * step * k + k0, bv[j]);
      for (int i = 0; i < MR; ++i) {
        __m512 blk[NR];
        for (int j = 0; j < NR; ++j) blk[j] = _mm512_setzero_ps();
        for (int q = 0; q < 4; ++q) {
          const __m512bh av = (__m512bh)_mm512_loadu_si512(a + i * k + k0 + 32 * q);
          for (int j = 0; j < NR; ++j) blk[j] = _mm512_dpbf16_ps(blk[j], av, bv[j][q]);
        }
        const __m512 si = _mm512_set1_ps(s[kb * lds + i]);
        for (int j = 0; j < NR; ++j) tot[i][j] = _mm512_fmadd_ps(blk[j], si, tot[i][j]);
      }
    }
    store_tile<MR, NR>(tot, c, ldc, false, step);
  }
}

// As gemm_small_bf16<MR, 2> for kMRsmall < MR <= kMRfold rows: both B rows share one scale
// per (row, block), so their two block sums are first folded into one vector (lanes 0-7: B row
// 0, 8-15: B row 1; two shuffles and an add) and scaled by one FMA. That halves the
// accumulator registers, so 9-12 rows take one group and B is converted once for them instead
// of twice (1 thread, N = 2112, K = 7168: 9 rows 1.8 vs 2.2 ms). 13+ rows would spill (at 16:
// slower than 8 + 8); halving the scale FMAs alone gains nothing measurable (8 rows: equal).
template <int MR>
DSV3_AVX512BF16 void gemm_small_bf16_fold(const uint16_t* a, const float* s, int64_t lds, const uint8_t* b,
                                          int64_t k, float* c, int64_t ldc) {
  const Bf16Tables t = bf16_tables();
  __m512 tot[MR];
  for (int i = 0; i < MR; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < k / kGemmBlk; ++kb) {
    const int64_t k0 = kb * kGemmBlk;
    __m512bh bv[2][4];
    for (int j = 0; j < 2; ++j) widen_b_slice(t, b + j * k + k0, bv[j]);
    // Unrolled so that tot[] stays in registers (GCC keeps a 9+ trip loop rolled).
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      __m512 blk0 = _mm512_setzero_ps(), blk1 = _mm512_setzero_ps();
      for (int q = 0; q < 4; ++q) {
        const __m512bh av = (__m512bh)_mm512_loadu_si512(a + i * k + k0 + 32 * q);
        blk0 = _mm512_dpbf16_ps(blk0, av, bv[0][q]);
        blk1 = _mm512_dpbf16_ps(blk1, av, bv[1][q]);
      }
      const __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(blk0, blk1, 0x44), _mm512_shuffle_f32x4(blk0, blk1, 0xEE));
      tot[i] = _mm512_fmadd_ps(v, _mm512_set1_ps(s[kb * lds + i]), tot[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    c[i * ldc] = _mm512_reduce_add_ps(_mm512_insertf32x8(tot[i], _mm256_setzero_ps(), 1));
    c[i * ldc + 1] = _mm512_reduce_add_ps(_mm512_insertf32x8(tot[i], _mm256_setzero_ps(), 0));
  }
}

template <int NR>
DSV3_AVX512BF16 inline void gemm_small_bf16_mr(int mr, const uint16_t* a, const float* s, int64_t lds,
                                               const uint8_t* b, int64_t k, float* c, int64_t ldc, int64_t tiles,
                                               int64_t step) {
  static_assert(kMRsmall == 8, "one case per row count");
  switch (mr) {
    case 1: return gemm_small_bf16<1, NR>(a, s, lds, b, k, c, ldc, tiles, step);
    case 2: return gemm_small_bf16<2, NR>(a, s, lds, b, k, c, ldc, tiles, step);
    case 3: return gemm_small_bf16<3, NR>(a, s, lds, b, k, c, ldc, tiles, step);
    case 4: return gemm_small_bf16<4, NR>(a, s, lds, b, k, c, ldc, tiles, step);
    case 5: return gemm_small_bf16<5, NR>(a, s, lds, b, k, c, ldc, tiles, step);
    case 6: return gemm_small_bf16<6, NR>(a, s, lds, b, k, c, ldc, tiles, step);
    case 7: return gemm_small_bf16<7, NR>(a, s, lds, b, k, c, ldc, tiles, step);
    default: return gemm_small_bf16<8, NR>(a, s, lds, b, k, c, ldc, tiles, step);
  }
}

DSV3_AVX512BF16 inline void gemm_small_bf16_fold_mr(int mr, const uint16_t* a, const float* s, int64_t lds,
                                                    const uint8_t* b, int64_t k, float* c, int64_t ldc) {
  static_assert(kMRfold == 12, "one case per row count above kMRsmall");
  switch (mr) {
    case 9: return gemm_small_bf16_fold<9>(a, s, lds, b, k, c, ldc);
    case 10: return gemm_small_bf16_fold<10>(a, s, lds, b, k, c, ldc);
    case 11: return gemm_small_bf16_fold<11>(a, s, lds, b, k, c, ldc);
    default: return gemm_small_bf16_fold<12>(a, s, lds, b, k, c, ldc);
  }
}

// Columns [n_begin, n_end) (n_begin even) of c[m, n] = A' B'^T for all m rows, A in raw bf16.
// Rows go in balanced groups of at most kMRsmall (9 rows: 5 + 4, not 8 + 1), or, for long
// rows of A and a pair of B rows, of at most kMRfold (17 rows: 9 + 8, not 12 + 5). `scales`
// (m * kblocks floats) caches a_scale * b_scale_inv for the current 128-row block of B.
DSV3_AVX512BF16 inline void gemm_small_avx512bf16(const uint16_t* a, const float* a_scale, int64_t m,
                                                  const uint8_t* b, const float* b_scale, int64_t k, int64_t n,
                                                  int64_t n_begin, int64_t n_end, float* c, float* scales) {
  const int64_t kblocks = k / kGemmBlk;
  // Bigger groups only pay where a group's rows of A spill out of L1 (32 KiB) anyway: with
  // K = 2048, 12 rows (48 KiB) in one group are slower than 6 + 6 (24 KiB each, L1-resident).
  const bool fold_rows = k * static_cast<int64_t>(sizeof(uint16_t)) * kMRsmall > 32768;
  const int64_t stride = page_stride_rows(k, kNRsmall), span = kNRsmall * stride;
  int64_t cached_nb = -1;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNRsmall) {
    const int64_t nb = n0 / kGemmBlk;
    if (nb != cached_nb) {
      // Layout [kb][row], so a row group reads its scales of one block contiguously.
      for (int64_t kb = 0; kb < kblocks; ++kb)
        for (int64_t i = 0; i < m; ++i)
          scales[kb * m + i] = a_scale[i * kblocks + kb] * b_scale[nb * kblocks + kb] * kDecodeUnscale2;
      cached_nb = nb;
    }
    const bool pair = n_end - n0 >= kNRsmall;
    const int64_t group_max = pair && fold_rows ? kMRfold : kMRsmall, groups = (m + group_max - 1) / group_max;
    if (pair && m <= kMRsmall) {
      // One group of rows: up to the end of this block of b_scale_inv in one call, as aligned
      // spans of pairs whose rows lie pages apart (page_stride_rows), else as consecutive pairs.
      const int64_t end = std::min(n_end, (nb + 1) * kGemmBlk);
      if (tile_row_step(n0, end, stride, kNRsmall) > 1) {
        const int64_t spans = (end - n0) / span;
        for (int64_t q = 0; q < spans; ++q)
          gemm_small_bf16_mr<kNRsmall>(static_cast<int>(m), a, scales, m, b + (n0 + q * span) * k, k,
                                       c + n0 + q * span, n, stride, stride);
        n0 += spans * span - kNRsmall;  // the loop adds the last pair
        continue;
      }
      const int64_t pairs = (end - n0) / kNRsmall;
      gemm_small_bf16_mr<kNRsmall>(static_cast<int>(m), a, scales, m, b + n0 * k, k, c + n0, n, pairs, 1);
      n0 += (pairs - 1) * kNRsmall;  // the loop adds the last pair
      continue;
    }
    for (int64_t g = 0, m0 = 0; g < groups; ++g) {
      const int mr = static_cast<int>((m - m0) / (groups - g));
      const uint16_t* pa = a + m0 * k;
      const uint8_t* pb = b + n0 * k;
      float* pc = c + m0 * n + n0;
      if (pair && mr > kMRsmall) {
        gemm_small_bf16_fold_mr(mr, pa, scales + m0, m, pb, k, pc, n);
      } else if (pair) {
        gemm_small_bf16_mr<kNRsmall>(mr, pa, scales + m0, m, pb, k, pc, n, 1, 1);
      } else {
        gemm_small_bf16_mr<1>(mr, pa, scales + m0, m, pb, k, pc, n, 1, 1);
      }
      m0 += mr;
    }
  }
}

#pragma GCC diagnostic pop
#endif  // __x86_64__

}  // namespace dsv3::fp8::cpu
