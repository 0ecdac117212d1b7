// The avx2 level's mla_decode loop (AVX2 + FMA + F16C: 8 fp32 lanes, 16 vector registers).
//
// Same contract as attend_avx512 (mla_cpu_avx512.h): one group of up to kGroupRows query rows of a
// request, a contiguous range of its keys, an unnormalized output with its running max and sum.
// Keys go in tiles of kTile, converted to fp32 once into `tile` (the FP8 cache dequantized there,
// exactly), so that every later pass over a key is plain fp32 loads whatever the cache holds:
//   scores  the dims in the lanes, 4 rows x 2 keys per pass (8 accumulators, one horizontal sum
//           tree for all 8): work proportional to the rows, for 1 row as for 16;
//   softmax the rows in the lanes (one vector per 8 rows), online, as in attend_avx512;
//   P V     the value columns in the lanes, 4 rows x 16 columns of O in registers across the tile.
// Non-finite scores (reference/mla.py's rule): the softmax pass flags the rows that see one (their
// m comes out NaN) and notes whether the tile has one at all; only then, and only where some row
// does not see some key of the tile (the causal tail), are those keys' values sanitized before
// P V (sanitize_hidden_keys), so that 0 * NaN never reaches a row that does not see the key.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "mla/mla_cpu_common.h"

namespace dsv3::mla::cpu {

#if defined(__x86_64__)

// exp(x) for x <= 0 as exp_nonpos in mla_cpu_avx512.h (same polynomial, exactly 0 below
// kExpCutoff); 2^n goes into the exponent bits, n >= -126 above the cutoff.
DSV3_TARGET_AVX2 inline __m256 exp_nonpos_avx2(__m256 x) {
  const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(kExpCutoff), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpCutoff));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(pow2n)), kept);
}

// 8 values of a bf16 / fp16 row from element i, in fp32.
template <FloatType D>
DSV3_TARGET_AVX2 inline __m256 load8_avx2(const void* base, int i) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
  if constexpr (D == FloatType::kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// e4m3 bytes sign-extended to 16 bits -> the fp16 bits of e4m3 * 2^-8, exactly (fp8_factor_fits):
// << 7 puts exponent and mantissa in place and the sign in bits 15 and 14; bit 14 is cleared.
DSV3_TARGET_AVX2 inline __m256i fp8_to_f16_bits(__m256i x) {
  return _mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
}

// Whether 16-byte running maxima of x + x (fp8_factor_fits) saw an e4m3 NaN code (0xFE).
DSV3_TARGET_AVX2 inline bool saw_nan_code(__m128i nan) {
  return _mm_movemask_epi8(_mm_cmpeq_epi8(nan, _mm_set1_epi8(static_cast<char>(0xFE)))) != 0;
}

// One FP8-cache token -> 576 fp32 values. By way of fp16 (fp8_factor_fits) rather than by moving
// the bits straight into an fp32 (e4m3 * 2^-120, then times 2^120 * scale): the same speed on
// ordinary caches (1,024 keys, 1 / 4 / 16 rows: 92 / 178 / 579 ns per key either way), 16x faster
// where the codes include subnormals (1,463 ns per key at 1 row the other way: assists).
DSV3_TARGET_AVX2 inline void dequant_fp8_row_avx2(const uint8_t* src, float* dst) {
  for (int t = 0; t < kFp8Scales; ++t) {
    float scale;
    std::memcpy(&scale, src + kFp8ScaleOffset + 4 * t, 4);
    const uint8_t* tile = src + t * kFp8Tile;
    float* out = dst + t * kFp8Tile;
    if (!fp8_factor_fits(scale)) {
      dequant_fp8_tile(tile, scale, out);
      continue;
    }
    const __m256 factor = _mm256_set1_ps(256.0f * scale);
    __m128i nan = _mm_setzero_si128();
    for (int c = 0; c < kFp8Tile; c += 16) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + c));
      nan = _mm_max_epu8(nan, _mm_add_epi8(bytes, bytes));
      const __m256i h = fp8_to_f16_bits(_mm256_cvtepi8_epi16(bytes));
      _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), factor));
      _mm256_storeu_ps(out + c + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), factor));
    }
    if (saw_nan_code(nan)) dequant_fp8_tile(tile, scale, out);
  }
  for (int c = 0; c < kDim - kValueDim; c += 8)
    _mm256_storeu_ps(dst + kValueDim + c, load8_avx2<FloatType::kBFloat16>(src + kFp8RopeOffset, c));
}

// Lane i of the result: the sum of v[i]'s lanes.
DSV3_TARGET_AVX2 inline __m256 sum_lanes8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a: v0..v3's sums of lanes 0-3, then of lanes 4-7; b: the same for v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// scores[t][r] = q[r] . key t (unscaled) for R rows of q (row-major fp32) and T keys, the dims in
// the lanes (each lane sums 576 / 8 = 72 products, then sum_lanes8).
template <int R, int T>
DSV3_TARGET_AVX2 inline void dot_rows_avx2(const float* q, const float* const* key, float* scores) {
  static_assert(R * T <= 8);
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int d = 0; d < kDim; d += 8) {
    __m256 kv[T];
    for (int t = 0; t < T; ++t) {
      kv[t] = _mm256_loadu_ps(key[t] + d);
      if constexpr (R > 1) keep_in_register(kv[t]);
    }
    for (int r = 0; r < R; ++r) {
      __m256 qv = _mm256_loadu_ps(q + r * kDim + d);
      if constexpr (T > 1) keep_in_register(qv);
      for (int t = 0; t < T; ++t) acc[r * T + t] = _mm256_fmadd_ps(qv, kv[t], acc[r * T + t]);
    }
  }
  alignas(32) float sums[8];
  _mm256_store_ps(sums, sum_lanes8(acc));
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) scores[t * kGroupRows + r] = sums[r * T + t];
}

// scores[t][r] for the group's rows and the tile's first n keys (at least): blocks of 4 rows x 2
// keys, the last 1-3 rows with more keys per pass (8 accumulators each).
template <typename Prefetch>
DSV3_TARGET_AVX2 inline void scores_avx2(const float* q, int rows, const float* const* key, int n, float* scores,
                                         Prefetch& prefetch) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    for (int t = 0; t < n; t += 2) {
      prefetch.issue(4);
      dot_rows_avx2<4, 2>(q + r * kDim, key + t, scores + t * kGroupRows + r);
    }
  }
  const int tail = rows - r;
  for (int t = 0; tail > 0 && t < n; t += 8 / tail) {  // 2, 4 or 8 keys per pass
    prefetch.issue(4);
    switch (tail) {
      case 3: dot_rows_avx2<3, 2>(q + r * kDim, key + t, scores + t * kGroupRows + r); break;
      case 2: dot_rows_avx2<2, 4>(q + r * kDim, key + t, scores + t * kGroupRows + r); break;
      case 1: dot_rows_avx2<1, 8>(q + r * kDim, key + t, scores + t * kGroupRows + r); break;
      default: break;
    }
  }
}

// o[i][0..512) = o[i] * alpha[i] + sum_{t < n} p[t][i] * v[t], for R rows from row 0 of o, p, alpha.
template <int R, typename Prefetch>
DSV3_TARGET_AVX2 inline void accumulate_rows_avx2(float* o, const float* p, const float* alpha,
                                                  const float* const* v, int n, Prefetch& prefetch) {
  for (int c0 = 0; c0 < kValueDim; c0 += 16) {
    prefetch.issue(4);
    __m256 acc[R][2];
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_set1_ps(alpha[i]);
      for (int u = 0; u < 2; ++u) acc[i][u] = _mm256_mul_ps(_mm256_loadu_ps(o + i * kValueDim + c0 + 8 * u), a);
    }
    for (int t = 0; t < n; ++t) {
      const __m256 v0 = _mm256_loadu_ps(v[t] + c0), v1 = _mm256_loadu_ps(v[t] + c0 + 8);
      for (int i = 0; i < R; ++i) {
        const __m256 pb = _mm256_broadcast_ss(p + t * kGroupRows + i);
        acc[i][0] = _mm256_fmadd_ps(pb, v0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(pb, v1, acc[i][1]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < 2; ++u) _mm256_storeu_ps(o + i * kValueDim + c0 + 8 * u, acc[i][u]);
  }
}

// Keys j0 + t (t < n) of a tile that some row does not see (past min_last) whose values hold a NaN or
// inf: key[t] is pointed at a copy with those values 0 (tile + t * kDim; in place where key[t]
// already is that copy), for P V. Rare (corrupt data in a causal tail): plain loops.
inline void sanitize_hidden_keys(const float** key, int64_t j0, int n, int32_t min_last, float* tile) {
  for (int t = 0; t < n; ++t) {
    if (j0 + t <= min_last || std::none_of(key[t], key[t] + kValueDim, nonfinite)) continue;
    sanitize_values(key[t], tile + t * kDim);
    key[t] = tile + t * kDim;
  }
}

// Attends the group to keys [k.begin, k.end) as attend_avx512 does (same arguments; g.q row-major
// fp32, [rows][576]). Fp8: the cache is the FP8 one (D is then q's type, unused here).
template <FloatType D, bool Fp8>
DSV3_TARGET_AVX2 void attend_avx2(const RowGroup& g, const KeyRange& k, float* o, float* m, float* l, float* tile,
                                  const float* zero_key) {
  std::fill(o, o + g.rows * kValueDim, 0.0f);
  const int vecs = (g.rows + 7) / 8;  // row vectors of the softmax
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 vscale = _mm256_set1_ps(g.scale);
  const int32_t min_last = *std::min_element(g.last, g.last + g.rows);  // keys past it: hidden from some row
  __m256i vlast[2];
  __m256 vm[2], vl[2], bad[2];  // bad: the rows that saw a non-finite score
  for (int v = 0; v < 2; ++v) {
    vlast[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.last + 8 * v));
    vm[v] = neg_inf;
    vl[v] = _mm256_setzero_ps();
    bad[v] = _mm256_setzero_ps();
  }
  alignas(32) float p[kTile * kGroupRows] = {};  // scores, then probabilities; lanes past g.rows stay masked
  alignas(32) float alpha[kGroupRows];
  TilePrefetch<D, Fp8> prefetch(k);
  for (int64_t j0 = k.begin; j0 < k.end; j0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, k.end - j0));
    prefetch.queue(j0 + 2 * kTile);
    const float* key[kTile];
    for (int t = 0; t < kTile; ++t) {
      if (t >= n) {
        key[t] = zero_key;
        continue;
      }
      prefetch.issue(2);
      const void* raw = key_ptr<D, Fp8>(k, j0 + t);
      float* dst = tile + t * kDim;
      if constexpr (Fp8) {
        dequant_fp8_row_avx2(static_cast<const uint8_t*>(raw), dst);
      } else if constexpr (D == FloatType::kFloat32) {
        dst = const_cast<float*>(static_cast<const float*>(raw));
      } else {
        // bf16: zero-extend and shift. Unpacking with zeros (2 shuffles per 16 values) measured
        // 2-8% faster but leaves the dims permuted, which q and O would have to follow.
        for (int d = 0; d < kDim; d += 8) _mm256_storeu_ps(dst + d, load8_avx2<D>(raw, d));
      }
      key[t] = dst;
    }
    scores_avx2(static_cast<const float*>(g.q), g.rows, key, n, p, prefetch);
    __m256 tile_nonfinite = _mm256_setzero_ps();  // lanes with a non-finite score, seen or not
    for (int v = 0; v < vecs; ++v) {
      __m256 s[kTile];
      __m256 mx = neg_inf;
      for (int t = 0; t < kTile; ++t) {
        const __m256 seen = t < n ? _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                        vlast[v], _mm256_set1_epi32(static_cast<int32_t>(j0 + t - 1))))
                                  : _mm256_setzero_ps();
        const __m256 x = _mm256_mul_ps(_mm256_load_ps(p + t * kGroupRows + 8 * v), vscale);
        const __m256 nonfin = _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), inf, _CMP_NLT_UQ);  // NaN or +-inf
        bad[v] = _mm256_or_ps(bad[v], _mm256_and_ps(nonfin, seen));
        tile_nonfinite = _mm256_or_ps(tile_nonfinite, nonfin);  // keys past n: zero_key, finite q . 0
        s[t] = _mm256_blendv_ps(neg_inf, x, seen);
        mx = _mm256_max_ps(mx, s[t]);
      }
      const __m256 m_new = _mm256_max_ps(vm[v], mx);
      // Rows that have seen no key yet keep m = -inf; subtracting 0 keeps exp's input -inf, not NaN.
      const __m256 m_sub = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ));
      const __m256 a = exp_nonpos_avx2(_mm256_sub_ps(vm[v], m_sub));
      __m256 sum = _mm256_setzero_ps();
      for (int t = 0; t < kTile; ++t) {
        const __m256 pt = exp_nonpos_avx2(_mm256_sub_ps(s[t], m_sub));
        sum = _mm256_add_ps(sum, pt);
        _mm256_store_ps(p + t * kGroupRows + 8 * v, pt);
      }
      vl[v] = _mm256_fmadd_ps(vl[v], a, sum);
      vm[v] = m_new;
      _mm256_store_ps(alpha + 8 * v, a);
    }
    if (j0 + n - 1 > min_last && _mm256_movemask_ps(tile_nonfinite))
      sanitize_hidden_keys(key, j0, n, min_last, tile);
    int i = 0;
    for (; i + 4 <= g.rows; i += 4) accumulate_rows_avx2<4>(o + i * kValueDim, p + i, alpha + i, key, n, prefetch);
    switch (g.rows - i) {
      case 3: accumulate_rows_avx2<3>(o + i * kValueDim, p + i, alpha + i, key, n, prefetch); break;
      case 2: accumulate_rows_avx2<2>(o + i * kValueDim, p + i, alpha + i, key, n, prefetch); break;
      case 1: accumulate_rows_avx2<1>(o + i * kValueDim, p + i, alpha + i, key, n, prefetch); break;
      default: break;
    }
  }
  for (int v = 0; v < 2; ++v) {
    _mm256_storeu_ps(m + 8 * v, _mm256_blendv_ps(vm[v], _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                                                 bad[v]));
    _mm256_storeu_ps(l + 8 * v, vl[v]);
  }
}

#endif  // __x86_64__

}  // namespace dsv3::mla::cpu
