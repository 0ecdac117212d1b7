// The avx512 and avx512_bf16 levels' mla_decode loop (torch-free; the glue, the split-KV combine
// and the portable loop are in mla_cpu.cpp, the avx2 loop in mla_cpu_avx2.h).
//
// One call attends one group of up to kGroupRows query rows of a request (all s_q * H rows of a
// request share the single latent key head) to a contiguous range of its keys, streaming each key
// once for the group. Keys go in tiles of kTile, converted to fp32 once (the FP8 cache dequantized
// exactly: e4m3 * a power-of-two scale fits bf16, into bf16 rows for the vdpbf16ps path, fp32 for
// the others). Scores: the dims in the lanes, 4 rows x 4 keys per pass and one transposing sum of
// the 16 accumulators, so the work is proportional to the rows (the shipped model has 4 heads; this
// layout replaced one with the 16 rows in the lanes: the same speed at 16 rows, 1.2-1.6x faster at
// 4 and 8). The online softmax runs lane-wise (rows in the lanes), then O[row][512] +=
// p[row][key] * V[key] in 4-row x 64-column register blocks. With avx512_bf16, bf16 takes
// vdpbf16ps straight from the cache (products exact, sums fp32): the scores over dim pairs, O over
// adjacent key pairs with p rounded to bf16 (FlashMLA does the same; well inside the bf16
// tolerance). Whether that beats fp32 FMAs depends on the core: the AMD EPYC of the README
// measured 14.3 ms with O by fp32 FMAs, 10.2 ms so (bf16, B = 8, H = 16, 4096 keys, 1 thread); on
// a Sapphire Rapids core a zmm vdpbf16ps (32 products) issues at a quarter of the rate of a zmm
// FMA (16), and the fp32 kernel (DSV3_KERNELS_CPU_ISA=avx512) is the faster one there.
//
// Non-finite scores as in mla_cpu_avx2.h: a mask of the rows that see one (their m comes out NaN),
// and the values of the keys some row does not see sanitized for P V where the tile has one.
//
// As in the fp8 kernels, the extension is built without -mavx512*: these functions carry a target
// attribute and run only after cpu_isa_at_least(CpuIsa::kAvx512) said yes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "mla/mla_cpu_avx2.h"
#include "mla/mla_cpu_common.h"

namespace dsv3::mla::cpu {

#if defined(__x86_64__)

#define DSV3_MLA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define DSV3_MLA_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")))

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// exp(x) for x <= 0 (the softmax only takes differences to the running max), ~1 ulp (Cephes'
// polynomial on [-ln2/2, ln2/2], 2^n applied by scalef); exactly 0 below kExpCutoff.
DSV3_MLA_AVX512 inline __m512 exp_nonpos(__m512 x) {
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpCutoff), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpCutoff));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(kept, _mm512_scalef_ps(p, n));
}

// 16 e4m3 bytes -> e4m3 * scale in fp32, exactly, by way of fp16 (fp8_to_f16_bits), times
// `factor` = 2^8 * scale (see fp8_factor_fits); the bytes' x + x goes into the running max `nan`
// (NaN codes: 0xFE; see fp8_factor_fits).
DSV3_MLA_AVX512 inline __m512 dequant16_fp8(const uint8_t* src, __m512 factor, __m128i& nan) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  nan = _mm_max_epu8(nan, _mm_add_epi8(bytes, bytes));
  return _mm512_mul_ps(_mm512_cvtph_ps(fp8_to_f16_bits(_mm256_cvtepi8_epi16(bytes))), factor);
}

// One FP8-cache token -> 576 bf16 values (exact: e4m3 has 4 significant bits).
DSV3_MLA_AVX512BF16 inline void dequant_fp8_row_bf16(const uint8_t* src, uint16_t* dst) {
  for (int t = 0; t < kFp8Scales; ++t) {
    float scale;
    std::memcpy(&scale, src + kFp8ScaleOffset + 4 * t, 4);
    const uint8_t* tile = src + t * kFp8Tile;
    uint16_t* out = dst + t * kFp8Tile;
    __m128i nan = _mm_setzero_si128();
    if (fp8_factor_fits(scale)) {
      const __m512 factor = _mm512_set1_ps(256.0f * scale);
      for (int c = 0; c < kFp8Tile; c += 32) {
        const __m512 hi = dequant16_fp8(tile + c + 16, factor, nan), lo = dequant16_fp8(tile + c, factor, nan);
        _mm512_storeu_si512(out + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      if (!saw_nan_code(nan)) continue;
    }
    alignas(64) float f[kFp8Tile];
    dequant_fp8_tile(tile, scale, f);
    for (int c = 0; c < kFp8Tile; ++c) {  // exact in bf16: the top half of the bits (NaN stays NaN)
      uint32_t bits;
      std::memcpy(&bits, f + c, 4);
      out[c] = static_cast<uint16_t>(bits >> 16);
    }
  }
  std::memcpy(dst + kValueDim, src + kFp8RopeOffset, 2 * (kDim - kValueDim));
}

template <FloatType D>
DSV3_MLA_AVX512 inline __m512 load16(const void* base, int64_t i) {
  if constexpr (D == FloatType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (D == FloatType::kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// One FP8-cache token -> 576 fp32 values.
DSV3_MLA_AVX512 inline void dequant_fp8_row_f32(const uint8_t* src, float* dst) {
  for (int t = 0; t < kFp8Scales; ++t) {
    float scale;
    std::memcpy(&scale, src + kFp8ScaleOffset + 4 * t, 4);
    const uint8_t* tile = src + t * kFp8Tile;
    float* out = dst + t * kFp8Tile;
    __m128i nan = _mm_setzero_si128();
    if (fp8_factor_fits(scale)) {
      const __m512 factor = _mm512_set1_ps(256.0f * scale);
      for (int c = 0; c < kFp8Tile; c += 16) _mm512_storeu_ps(out + c, dequant16_fp8(tile + c, factor, nan));
      if (!saw_nan_code(nan)) continue;
    }
    dequant_fp8_tile(tile, scale, out);
  }
  for (int c = 0; c < kDim - kValueDim; c += 16)
    _mm512_storeu_ps(dst + kValueDim + c, load16<FloatType::kBFloat16>(src + kFp8RopeOffset, c));
}

// o[i][0..512) = o[i] * alpha[i] + sum_{t < n} p[t][i] * v[t], for R rows from row 0 of o, p, alpha.
template <int R, typename Prefetch>
DSV3_MLA_AVX512 inline void accumulate_rows(float* o, const float* p, const float* alpha, const float* const* v,
                                            int n, Prefetch& prefetch) {
  for (int c0 = 0; c0 < kValueDim; c0 += 64) {
    prefetch.issue(8);
    __m512 acc[R][4];
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(alpha[i]);
      for (int u = 0; u < 4; ++u) acc[i][u] = _mm512_mul_ps(_mm512_loadu_ps(o + i * kValueDim + c0 + 16 * u), a);
    }
    for (int t = 0; t < n; ++t) {
      __m512 vv[4];
      for (int u = 0; u < 4; ++u) vv[u] = _mm512_loadu_ps(v[t] + c0 + 16 * u);
      for (int i = 0; i < R; ++i) {
        const __m512 pb = _mm512_set1_ps(p[t * kGroupRows + i]);
        for (int u = 0; u < 4; ++u) acc[i][u] = _mm512_fmadd_ps(pb, vv[u], acc[i][u]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(o + i * kValueDim + c0 + 16 * u, acc[i][u]);
  }
}

// Lane i of the result: the sum of acc[i]'s lanes. A transposing tree (15 adds, 30 shuffles;
// 16 separate reductions take 64 + 16). Its lanes come out in the order g = {0, 2, 1, 3, 8, 10,
// 9, 11, 4, 6, 5, 7, 12, 14, 13, 15}, an involution: fed acc[g(i)], lane i is acc[i]'s sum.
DSV3_MLA_AVX512 inline __m512 sum_lanes16(const __m512* acc) {
  static constexpr int g[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i) {  // 128-bit quarters 0-1: acc[g(i)]'s 8 partial sums, 2-3: acc[g(i + 8)]'s
    const __m512 a = acc[g[i]], b = acc[g[i + 8]];
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // quarter: 4 partial sums of one vector
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[i], x[i + 4], 0x88), _mm512_shuffle_f32x4(x[i], x[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // lanes of a quarter: 2 + 2 partial sums of two vectors
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[i], y[i + 2], 0x44), _mm512_shuffle_ps(y[i], y[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

// scores[t][r] += sums of acc[r * T + t], r < R, t < T.
template <int R, int T>
DSV3_MLA_AVX512 inline void store_sums(const __m512* acc, float* scores) {
  alignas(64) float sums[16];
  _mm512_store_ps(sums, sum_lanes16(acc));
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) scores[t * kGroupRows + r] = sums[r * T + t];
}

// scores[t][r] = q[r] . key t (unscaled) for R rows of q (row-major) and T keys, the dims in the
// lanes: the work is proportional to the rows (the rows in the lanes would pay for 16). Each lane
// sums 576 / 16 products (18 pairs with vdpbf16ps), then sum_lanes16 sums the lanes.
template <int R, int T>
DSV3_MLA_AVX512 inline void dot_rows_f32(const float* q, const float* const* key, float* scores) {
  static_assert(R * T <= 16);
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int d = 0; d < kDim; d += 16) {
    __m512 kv[T];
    for (int t = 0; t < T; ++t) {
      kv[t] = _mm512_loadu_ps(key[t] + d);
      if constexpr (R > 1) keep_in_register(kv[t]);
    }
    for (int r = 0; r < R; ++r) {
      __m512 qv = _mm512_loadu_ps(q + r * kDim + d);
      keep_in_register(qv);
      for (int t = 0; t < T; ++t) acc[r * T + t] = _mm512_fmadd_ps(qv, kv[t], acc[r * T + t]);
    }
  }
  store_sums<R, T>(acc, scores);
}

template <int R, int T>
DSV3_MLA_AVX512BF16 inline void dot_rows_bf16(const uint16_t* q, const void* const* key, float* scores) {
  static_assert(R * T <= 16);
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int d = 0; d < kDim; d += 32) {
    __m512bh kv[T];
    for (int t = 0; t < T; ++t) kv[t] = (__m512bh)_mm512_loadu_si512(static_cast<const uint16_t*>(key[t]) + d);
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + r * kDim + d);
      for (int t = 0; t < T; ++t) acc[r * T + t] = _mm512_dpbf16_ps(acc[r * T + t], qv, kv[t]);
    }
  }
  store_sums<R, T>(acc, scores);
}

template <bool Pairs, int R, int T>
DSV3_MLA_AVX512 inline void dot_rows(const void* q, int r0, const void* const* key, float* scores) {
  if constexpr (Pairs) {
    dot_rows_bf16<R, T>(static_cast<const uint16_t*>(q) + r0 * kDim, key, scores + r0);
  } else {
    dot_rows_f32<R, T>(static_cast<const float*>(q) + r0 * kDim, reinterpret_cast<const float* const*>(key),
                       scores + r0);
  }
}

// scores[t][r] for the group's rows (q row-major: bf16 for Pairs, else fp32) and the tile's first
// n keys (at least), in blocks of 4 rows x 4 keys or 1-2 rows x 8 keys (16 accumulators at most).
template <bool Pairs, typename Prefetch>
DSV3_MLA_AVX512 inline void scores_by_rows(const void* q, int rows, const void* const* key, int n, float* scores,
                                           Prefetch& prefetch) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    for (int t = 0; t < n; t += 4) {
      prefetch.issue(8);
      dot_rows<Pairs, 4, 4>(q, r, key + t, scores + t * kGroupRows);
    }
  }
  prefetch.issue(8);
  switch (rows - r) {
    case 3:
      for (int t = 0; t < n; t += 4) dot_rows<Pairs, 3, 4>(q, r, key + t, scores + t * kGroupRows);
      break;
    case 2: dot_rows<Pairs, 2, 8>(q, r, key, scores); break;
    case 1: dot_rows<Pairs, 1, 8>(q, r, key, scores); break;
    default: break;
  }
}

// The bf16 tile for accumulate_rows_pairs: key pairs (2i, 2i + 1) interleaved per column,
// vi[chunk of 32 columns][i][unpacklo, unpackhi][32 bf16]. vpunpck*wd work per 128-bit lane, so
// the fp32 lanes of the dot products hold the columns in a fixed permuted order (unpermute_pairs).
DSV3_MLA_AVX512BF16 inline void interleave_pairs(const void* const* raw, int pairs, uint16_t* vi) {
  for (int i = 0; i < pairs; ++i) {
    const uint16_t* a = static_cast<const uint16_t*>(raw[2 * i]);
    const uint16_t* b = static_cast<const uint16_t*>(raw[2 * i + 1]);
    for (int ch = 0; ch < kValueDim / 32; ++ch) {
      const __m512i va = _mm512_loadu_si512(a + 32 * ch), vb = _mm512_loadu_si512(b + 32 * ch);
      uint16_t* dst = vi + (ch * (kTile / 2) + i) * 64;
      _mm512_storeu_si512(dst, _mm512_unpacklo_epi16(va, vb));
      _mm512_storeu_si512(dst + 32, _mm512_unpackhi_epi16(va, vb));
    }
  }
}

// pp[i][row] = (p[2i][row], p[2i + 1][row]) rounded to bf16, as one 32-bit pair.
DSV3_MLA_AVX512BF16 inline void pair_probs(const float* p, uint32_t* pp) {
  // After vcvtne2ps2bf16, element r is p[2i][r] and 16 + r is p[2i + 1][r].
  alignas(64) static constexpr uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int i = 0; i < kTile / 2; ++i) {
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_load_ps(p + (2 * i + 1) * kGroupRows),
                                           _mm512_load_ps(p + 2 * i * kGroupRows));
    _mm512_store_si512(pp + i * kGroupRows, _mm512_permutexvar_epi16(idx, (__m512i)b));
  }
}

// As accumulate_rows by vdpbf16ps over key pairs: p rounded to bf16 (as FlashMLA does; the
// products and sums stay fp32), v straight from the cache. o's columns are in pair order.
template <int R, typename Prefetch>
DSV3_MLA_AVX512BF16 inline void accumulate_rows_pairs(float* o, const uint32_t* pp, const float* alpha,
                                                      const uint16_t* vi, int pairs, Prefetch& prefetch) {
  for (int c0 = 0; c0 < kValueDim; c0 += 64) {
    prefetch.issue(8);
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
      for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_mul_ps(_mm512_loadu_ps(o + r * kValueDim + c0 + 16 * u), a);
    }
    for (int i = 0; i < pairs; ++i) {
      __m512bh vv[4];
      for (int u = 0; u < 4; ++u)
        vv[u] = (__m512bh)_mm512_loadu_si512(vi + ((c0 / 32 + u / 2) * (kTile / 2) + i) * 64 + 32 * (u % 2));
      for (int r = 0; r < R; ++r) {
        const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pp[i * kGroupRows + r]));
        for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], pb, vv[u]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(o + r * kValueDim + c0 + 16 * u, acc[r][u]);
  }
}

// One tile of O updates for all rows, over the pairs holding its first n keys (a call, not
// inlined: the caller lacks avx512_bf16).
template <typename Prefetch>
DSV3_MLA_AVX512BF16 inline void accumulate_pairs(int rows, float* o, const float* p, const float* alpha,
                                                 const void* const* raw, int n, uint16_t* vi, Prefetch& prefetch) {
  const int pairs = (n + 1) / 2;
  interleave_pairs(raw, pairs, vi);
  alignas(64) uint32_t pp[kTile / 2 * kGroupRows];
  pair_probs(p, pp);
  int r = 0;
  for (; r + 4 <= rows; r += 4) accumulate_rows_pairs<4>(o + r * kValueDim, pp + r, alpha + r, vi, pairs, prefetch);
  switch (rows - r) {
    case 3: accumulate_rows_pairs<3>(o + r * kValueDim, pp + r, alpha + r, vi, pairs, prefetch); break;
    case 2: accumulate_rows_pairs<2>(o + r * kValueDim, pp + r, alpha + r, vi, pairs, prefetch); break;
    case 1: accumulate_rows_pairs<1>(o + r * kValueDim, pp + r, alpha + r, vi, pairs, prefetch); break;
    default: break;
  }
}

// o's rows from pair order back to column order. In each 32 columns, unpacklo held columns
// 8L + 0..3 and unpackhi 8L + 4..7 of 128-bit lane L, at positions 4L + 0..3 of either half.
DSV3_MLA_AVX512 inline void unpermute_pairs(float* o, int rows) {
  alignas(64) int32_t idx[32];
  for (int c = 0; c < 32; ++c) idx[c] = (c % 8 < 4 ? 0 : 16) + c / 8 * 4 + c % 4;
  const __m512i lo = _mm512_load_si512(idx), hi = _mm512_load_si512(idx + 16);
  for (int r = 0; r < rows; ++r) {
    for (int c0 = 0; c0 < kValueDim; c0 += 32) {
      float* x = o + r * kValueDim + c0;
      const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
      _mm512_storeu_ps(x, _mm512_permutex2var_ps(a, lo, b));
      _mm512_storeu_ps(x + 16, _mm512_permutex2var_ps(a, hi, b));
    }
  }
}

// Keys j0 + t (t < n) of a tile that some row does not see (past min_last) whose values hold a NaN or
// inf, for P V: Pairs: raw[t] is pointed at a bf16 copy with those values 0 at rows[t * kDim] (in
// place where raw[t] already is that copy: the FP8 cache's rows); else key[t] at an fp32 one at
// tile + t * kDim (likewise). Rare (corrupt data in a causal tail): plain loops.
template <bool Pairs>
inline void sanitize_hidden_keys_avx512(const void** raw, const float** key, int64_t j0, int n, int32_t min_last,
                                        float* tile, uint16_t* rows) {
  for (int t = 0; t < n; ++t) {
    if (j0 + t <= min_last) continue;
    if constexpr (Pairs) {
      const auto* src = static_cast<const uint16_t*>(raw[t]);
      if (std::none_of(src, src + kValueDim, [](uint16_t h) { return (h & 0x7F80u) == 0x7F80u; })) continue;
      sanitize_values_bf16(src, rows + t * kDim);
      raw[t] = rows + t * kDim;
    } else {
      if (std::none_of(key[t], key[t] + kValueDim, nonfinite)) continue;
      sanitize_values(key[t], tile + t * kDim);
      key[t] = tile + t * kDim;
    }
  }
}

// Attends the group to keys [k.begin, k.end): o [g.rows][512] gets the unnormalized output,
// m and l [kGroupRows] the running max and sum of exp(score - m) (m = -inf where a row saw no key,
// NaN where it saw a non-finite score).
// g.q: the rows row-major, bf16 for Pairs, else fp32. tile: 2 * kTile * 576 floats of scratch;
// zero_key: 576 zero floats, standing in for the keys past the end of the last tile (never read
// from the cache).
// Fp8 (the cache is the FP8 one, D names the dequantized rows' type): each key is dequantized
// into the tile's second half (bf16 rows for Pairs) or its first (fp32 rows), then as above.
// Pairs (bf16, the caller checked avx512_bf16): scores and O by vdpbf16ps, nothing converted to fp32.
template <FloatType D, bool Pairs, bool Fp8>
DSV3_MLA_AVX512 void attend_avx512(const RowGroup& g, const KeyRange& k, float* o, float* m, float* l,
                                       float* tile, const float* zero_key) {
  static_assert(!Pairs || D == FloatType::kBFloat16, "dim pairs are bf16");
  uint16_t* fp8_rows = reinterpret_cast<uint16_t*>(tile + kTile * kDim);  // Fp8 && Pairs: [kTile][576] bf16
  std::fill(o, o + g.rows * kValueDim, 0.0f);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512 vscale = _mm512_set1_ps(g.scale);
  const __m512i vlast = _mm512_loadu_si512(g.last);
  const int32_t min_last = *std::min_element(g.last, g.last + g.rows);  // keys past it: hidden from some row
  __m512 vm = neg_inf, vl = _mm512_setzero_ps();
  __mmask16 bad = 0;  // the rows that saw a non-finite score
  alignas(64) float p[kTile * kGroupRows];
  alignas(64) float alpha[kGroupRows];
  alignas(64) float scores[kTile * kGroupRows] = {};  // lanes past g.rows stay 0 (masked below)
  TilePrefetch<D, Fp8> prefetch(k);
  for (int64_t j0 = k.begin; j0 < k.end; j0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, k.end - j0));
    prefetch.queue(j0 + 2 * kTile);
    // raw: the cache rows (zeros past the end); key: them in fp32 (unless Pairs).
    const float* key[kTile];
    const void* raw[kTile];
    for (int t = 0; t < kTile; ++t) {
      if (t >= n) {
        raw[t] = zero_key;
        key[t] = zero_key;
        continue;
      }
      prefetch.issue(4);
      const void* row = key_ptr<D, Fp8>(k, j0 + t);
      if constexpr (Fp8 && Pairs) {
        dequant_fp8_row_bf16(static_cast<const uint8_t*>(row), fp8_rows + t * kDim);
        raw[t] = fp8_rows + t * kDim;
      } else if constexpr (Fp8) {
        dequant_fp8_row_f32(static_cast<const uint8_t*>(row), tile + t * kDim);
        key[t] = tile + t * kDim;
      } else if constexpr (D == FloatType::kFloat32) {
        key[t] = static_cast<const float*>(row);
      } else {
        raw[t] = row;
        if constexpr (!Pairs) {
          for (int d = 0; d < kDim; d += 16) _mm512_storeu_ps(tile + t * kDim + d, load16<D>(row, d));
          key[t] = tile + t * kDim;
        }
      }
    }
    const void* const* keys = Pairs ? raw : reinterpret_cast<const void* const*>(key);
    scores_by_rows<Pairs>(g.q, g.rows, keys, n, scores, prefetch);
    __m512 s[kTile];
    for (int t = 0; t < kTile; ++t) s[t] = _mm512_load_ps(scores + t * kGroupRows);
    __m512 mx = neg_inf;
    __mmask16 tile_nonfinite = 0;  // lanes with a non-finite score, seen or not (keys past n: q . 0)
    for (int t = 0; t < kTile; ++t) {
      const __mmask16 seen = t < n ? _mm512_cmple_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(j0 + t)), vlast)
                                   : __mmask16(0);
      const __m512 x = _mm512_mul_ps(s[t], vscale);
      const __mmask16 nonfin = _mm512_cmp_ps_mask(_mm512_abs_ps(x), inf, _CMP_NLT_UQ);  // NaN or +-inf
      bad |= nonfin & seen;
      tile_nonfinite |= nonfin;
      s[t] = _mm512_mask_mov_ps(neg_inf, seen, x);
      mx = _mm512_max_ps(mx, s[t]);
    }
    const __m512 m_new = _mm512_max_ps(vm, mx);
    // Rows that have seen no key yet keep m = -inf; subtracting 0 instead keeps exp's input -inf, not NaN.
    const __m512 m_sub = _mm512_mask_mov_ps(m_new, _mm512_cmpeq_ps_mask(m_new, neg_inf), _mm512_setzero_ps());
    const __m512 a = exp_nonpos(_mm512_sub_ps(vm, m_sub));
    __m512 sum = _mm512_setzero_ps();
    for (int t = 0; t < kTile; ++t) {
      const __m512 pt = exp_nonpos(_mm512_sub_ps(s[t], m_sub));
      sum = _mm512_add_ps(sum, pt);
      _mm512_store_ps(p + t * kGroupRows, pt);
    }
    vl = _mm512_fmadd_ps(vl, a, sum);
    vm = m_new;
    _mm512_store_ps(alpha, a);
    if (j0 + n - 1 > min_last && tile_nonfinite)
      sanitize_hidden_keys_avx512<Pairs>(raw, key, j0, n, min_last, tile, fp8_rows);
    if constexpr (Pairs) {
      accumulate_pairs(g.rows, o, p, alpha, raw, n, reinterpret_cast<uint16_t*>(tile), prefetch);
      continue;
    }
    int i = 0;
    for (; i + 4 <= g.rows; i += 4) accumulate_rows<4>(o + i * kValueDim, p + i, alpha + i, key, n, prefetch);
    switch (g.rows - i) {
      case 3: accumulate_rows<3>(o + i * kValueDim, p + i, alpha + i, key, n, prefetch); break;
      case 2: accumulate_rows<2>(o + i * kValueDim, p + i, alpha + i, key, n, prefetch); break;
      case 1: accumulate_rows<1>(o + i * kValueDim, p + i, alpha + i, key, n, prefetch); break;
      default: break;
    }
  }
  if constexpr (Pairs) unpermute_pairs(o, g.rows);
  _mm512_storeu_ps(m, _mm512_mask_mov_ps(vm, bad, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN())));
  _mm512_storeu_ps(l, vl);
}

#pragma GCC diagnostic pop
#endif  // __x86_64__

}  // namespace dsv3::mla::cpu
