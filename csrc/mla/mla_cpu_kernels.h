// Inner loops of the CPU mla_decode (torch-free; the glue, the split-KV combine and the
// portable fallback are in mla_cpu.cpp).
//
// One call attends one group of up to kGroupRows query rows of a request (all s_q * H rows of a
// request share the single latent key head) to a contiguous range of its keys. The rows live in
// the 16 lanes of a vector, so the query is held transposed (qt[d][row], fp32): a key is streamed
// once per group, its scores for all rows come out of 576 FMAs with the key's values broadcast,
// and the online softmax runs lane-wise with no horizontal reduction. Keys go in tiles of kTile,
// converted to fp32 once, then O[row][512] += p[row][key] * V[key] in 4-row x 64-column
// register blocks. With avx512_bf16, bf16 takes vdpbf16ps straight from the cache (half the
// instructions, products exact, sums fp32): the scores over adjacent dim pairs, O over adjacent
// key pairs with p rounded to bf16 (FlashMLA does the same; well inside the bf16 tolerance).
// (bf16, B = 8, H = 16, 4096 keys, 1 thread: 14.3 ms with O by fp32 FMAs, 10.2 ms so.)
//
// The FP8 cache (mla_fp8_layout.h) goes
// through the same loops: each tile's rows are dequantized once, exactly (e4m3 * a power-of-two
// scale fits bf16), into bf16 rows for the vdpbf16ps path or fp32 rows for the others.
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

#include "common/cpu_isa.h"
#include "common/float_type.h"
#include "mla/mla_fp8_layout.h"

namespace dsv3::mla::cpu {

constexpr int kGroupRows = 16;  // query rows per work item: one vector of lanes
constexpr int kTile = 8;        // keys per online-softmax step
constexpr int kDim = 576;       // c_kv 512 | k_pe 64
constexpr int kValueDim = 512;
constexpr int kDotBlock = 32;  // dims per partial sum of a score

// Where key j of a request lives: block_row[j >> log2_block] is its block in cache.
struct KeyRange {
  const void* cache;          // [num_blocks, block_size, 576] of the dtype
  const int32_t* block_row;   // the request's block_table row (already checked)
  int log2_block;
  int64_t begin, end;         // [begin, end) of the request's keys
};

// The group's queries and visibility. Lanes past `rows` have q = 0 and last = -1.
struct RowGroup {
  // [576][kGroupRows] fp32, or for the avx512_bf16 kernel [288][kGroupRows][2] bf16 (dim pairs)
  const void* q;
  const int32_t* last;   // [kGroupRows]: the last key each row sees (-1: none)
  int rows;
  float scale;
};

// Bytes of one cached token: 576 values of D, or the FP8 cache's 656.
template <FloatType D, bool Fp8>
constexpr int64_t row_bytes() {
  return Fp8 ? kFp8TokenBytes : kDim * (D == FloatType::kFloat32 ? 4 : 2);
}

template <FloatType D, bool Fp8 = false>
inline const void* key_ptr(const KeyRange& k, int64_t j) {
  const int64_t bs_mask = (int64_t{1} << k.log2_block) - 1;
  const int64_t slot = static_cast<int64_t>(k.block_row[j >> k.log2_block]) * (bs_mask + 1) + (j & bs_mask);
  return static_cast<const char*>(k.cache) + slot * row_bytes<D, Fp8>();
}

// An e4m3 byte's bits moved into an fp32 (sign; exponent and mantissa shifted down 20 bits): the
// fp32 is e4m3 * 2^-120 exactly, subnormals included (they become fp32 denormals).
inline uint32_t e4m3_as_f32_bits(uint8_t b) {
  return (static_cast<uint32_t>(b & 0x80) << 24) | (static_cast<uint32_t>(b & 0x7F) << 20);
}
constexpr float kTwoPow120 = 1.329227995784916e36f;

// One FP8-cache token -> 576 fp32 values (c_kv = e4m3 * scale | k_pe), the portable way.
inline void dequant_fp8_row(const uint8_t* src, float* dst) {
  float scale[kFp8Scales];
  std::memcpy(scale, src + kFp8ScaleOffset, sizeof(scale));
  for (int c = 0; c < kValueDim; ++c) {
    const uint32_t bits = e4m3_as_f32_bits(src[c]);
    float f;
    std::memcpy(&f, &bits, 4);
    dst[c] = f * kTwoPow120 * scale[c / kFp8Tile];
  }
  for (int c = 0; c < kDim - kValueDim; ++c) {
    uint16_t h;
    std::memcpy(&h, src + kFp8RopeOffset + 2 * c, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    std::memcpy(dst + kValueDim + c, &bits, 4);
  }
}

#if defined(__x86_64__)

#define DSV3_MLA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define DSV3_MLA_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")))

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// exp(x) for x <= 0 (the softmax only takes differences to the running max), ~1 ulp (Cephes'
// polynomial on [-ln2/2, ln2/2], 2^n applied by scalef). Below -110 the result is exactly 0, so
// a masked key (-inf) weighs nothing.
DSV3_MLA_AVX512 inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-110.0f));
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
  return _mm512_scalef_ps(p, n);
}

// 16 e4m3 bytes -> e4m3 * scale in fp32, exactly (see e4m3_as_f32_bits; two multiplies, so that
// no factor overflows for any scale).
DSV3_MLA_AVX512 inline __m512 dequant16_fp8(const uint8_t* src, __m512 scale) {
  const __m512i x = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512 f = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(x, 20), _mm512_set1_epi32(0x87F00000)));
  return _mm512_mul_ps(_mm512_mul_ps(f, _mm512_set1_ps(kTwoPow120)), scale);
}

// One FP8-cache token -> 576 bf16 values (exact: e4m3 has 4 significant bits).
DSV3_MLA_AVX512BF16 inline void dequant_fp8_row_bf16(const uint8_t* src, uint16_t* dst) {
  for (int t = 0; t < kValueDim / kFp8Tile; ++t) {
    float scale;
    std::memcpy(&scale, src + kFp8ScaleOffset + 4 * t, 4);
    const __m512 vs = _mm512_set1_ps(scale);
    for (int c = t * kFp8Tile; c < (t + 1) * kFp8Tile; c += 32) {
      const __m512bh b = _mm512_cvtne2ps_pbh(dequant16_fp8(src + c + 16, vs), dequant16_fp8(src + c, vs));
      _mm512_storeu_si512(dst + c, (__m512i)b);
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
  for (int t = 0; t < kValueDim / kFp8Tile; ++t) {
    float scale;
    std::memcpy(&scale, src + kFp8ScaleOffset + 4 * t, 4);
    const __m512 vs = _mm512_set1_ps(scale);
    for (int c = t * kFp8Tile; c < (t + 1) * kFp8Tile; c += 16) _mm512_storeu_ps(dst + c, dequant16_fp8(src + c, vs));
  }
  for (int c = 0; c < kDim - kValueDim; c += 16)
    _mm512_storeu_ps(dst + kValueDim + c, load16<FloatType::kBFloat16>(src + kFp8RopeOffset, c));
}

// o[i][0..512) = o[i] * alpha[i] + sum_t p[t][i] * v[t], for R rows starting at row 0 of o, p, alpha.
template <int R>
DSV3_MLA_AVX512 inline void accumulate_rows(float* o, const float* p, const float* alpha, const float* const* v) {
  for (int c0 = 0; c0 < kValueDim; c0 += 64) {
    __m512 acc[R][4];
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(alpha[i]);
      for (int u = 0; u < 4; ++u) acc[i][u] = _mm512_mul_ps(_mm512_loadu_ps(o + i * kValueDim + c0 + 16 * u), a);
    }
    for (int t = 0; t < kTile; ++t) {
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

// The queries of a group, laid out for the kernels: `rows` rows of q (stride 576) -> dst.
template <typename T>
inline void transpose_f32(const T* q, int rows, float* dst) {
  std::fill(dst, dst + kDim * kGroupRows, 0.0f);
  for (int r = 0; r < rows; ++r)
    for (int d = 0; d < kDim; ++d) dst[d * kGroupRows + r] = static_cast<float>(q[r * kDim + d]);
}

inline void transpose_bf16_pairs(const uint16_t* q, int rows, uint16_t* dst) {
  std::fill(dst, dst + kDim * kGroupRows, uint16_t{0});
  for (int r = 0; r < rows; ++r)
    for (int d = 0; d < kDim; ++d) dst[(d / 2 * kGroupRows + r) * 2 + d % 2] = q[r * kDim + d];
}

// scores[t][row] = q[row] . key t (unscaled) for kTile bf16 keys, q in dim pairs. Summed in blocks
// of kDotBlock, as in attend_avx512: one chain of 576 products loses ~sqrt(576) roundings of the
// full sum, more than the fp32 lse tolerance of 1e-5 allows.
DSV3_MLA_AVX512BF16 inline void scores_bf16_pairs(const uint16_t* q, const void* const* raw, float* scores) {
  __m512 s[kTile];
  for (int t = 0; t < kTile; ++t) s[t] = _mm512_setzero_ps();
  for (int d0 = 0; d0 < kDim; d0 += kDotBlock) {
    __m512 blk[kTile];
    for (int t = 0; t < kTile; ++t) blk[t] = _mm512_setzero_ps();
    for (int d = d0; d < d0 + kDotBlock; d += 2) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + d * kGroupRows);
      for (int t = 0; t < kTile; ++t) {
        int32_t pair;
        std::memcpy(&pair, static_cast<const uint16_t*>(raw[t]) + d, 4);
        blk[t] = _mm512_dpbf16_ps(blk[t], qv, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
    for (int t = 0; t < kTile; ++t) s[t] = _mm512_add_ps(s[t], blk[t]);
  }
  for (int t = 0; t < kTile; ++t) _mm512_store_ps(scores + t * kGroupRows, s[t]);
}

// The bf16 tile for accumulate_rows_pairs: key pairs (2i, 2i + 1) interleaved per column,
// vi[chunk of 32 columns][i][unpacklo, unpackhi][32 bf16]. vpunpck*wd work per 128-bit lane, so
// the fp32 lanes of the dot products hold the columns in a fixed permuted order (unpermute_pairs).
DSV3_MLA_AVX512BF16 inline void interleave_pairs(const void* const* raw, uint16_t* vi) {
  for (int i = 0; i < kTile / 2; ++i) {
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
template <int R>
DSV3_MLA_AVX512BF16 inline void accumulate_rows_pairs(float* o, const uint32_t* pp, const float* alpha,
                                                      const uint16_t* vi) {
  for (int c0 = 0; c0 < kValueDim; c0 += 64) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
      for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_mul_ps(_mm512_loadu_ps(o + r * kValueDim + c0 + 16 * u), a);
    }
    for (int i = 0; i < kTile / 2; ++i) {
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

// One tile of O updates for all rows (a call, not inlined: the caller lacks avx512_bf16).
DSV3_MLA_AVX512BF16 inline void accumulate_pairs(int rows, float* o, const float* p, const float* alpha,
                                                 const void* const* raw, uint16_t* vi) {
  interleave_pairs(raw, vi);
  alignas(64) uint32_t pp[kTile / 2 * kGroupRows];
  pair_probs(p, pp);
  int r = 0;
  for (; r + 4 <= rows; r += 4) accumulate_rows_pairs<4>(o + r * kValueDim, pp + r, alpha + r, vi);
  switch (rows - r) {
    case 3: accumulate_rows_pairs<3>(o + r * kValueDim, pp + r, alpha + r, vi); break;
    case 2: accumulate_rows_pairs<2>(o + r * kValueDim, pp + r, alpha + r, vi); break;
    case 1: accumulate_rows_pairs<1>(o + r * kValueDim, pp + r, alpha + r, vi); break;
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

// Attends the group to keys [k.begin, k.end): o [kGroupRows][512] gets the unnormalized output,
// m and l [kGroupRows] the running max and sum of exp(score - m) (m = -inf where a row saw no key).
// tile: 2 * kTile * 576 floats of scratch; zero_key: 576 zero floats, standing in for the keys
// past the end of the last tile (never read from the cache).
// Fp8 (the cache is the FP8 one, D names the dequantized rows' type): each key is dequantized
// into the tile's second half (bf16 rows for Pairs) or its first (fp32 rows), then as above.
// Pairs (bf16, the caller checked avx512_bf16): scores by scores_bf16_pairs (g.q in dim pairs),
// O by accumulate_pairs, nothing converted to fp32. Otherwise the scores are summed in blocks of
// kDotBlock (see scores_bf16_pairs).
template <FloatType D, bool Pairs, bool Fp8 = false>
DSV3_MLA_AVX512 void attend_avx512(const RowGroup& g, const KeyRange& k, float* o, float* m, float* l,
                                       float* tile, const float* zero_key) {
  static_assert(!Pairs || D == FloatType::kBFloat16, "dim pairs are bf16");
  uint16_t* fp8_rows = reinterpret_cast<uint16_t*>(tile + kTile * kDim);  // Fp8 && Pairs: [kTile][576] bf16
  std::fill(o, o + kGroupRows * kValueDim, 0.0f);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vscale = _mm512_set1_ps(g.scale);
  const __m512i vlast = _mm512_loadu_si512(g.last);
  __m512 vm = neg_inf, vl = _mm512_setzero_ps();
  alignas(64) float p[kTile * kGroupRows];
  alignas(64) float alpha[kGroupRows];
  for (int64_t j0 = k.begin; j0 < k.end; j0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, k.end - j0));
    // The rows of the tile after next, while this one computes: the blocks are scattered, and the
    // hardware prefetcher leaves many lines to demand misses (bf16, goal shape, 1 thread: 16.5 ms
    // without, 13 ms with).
    for (int64_t j = j0 + 2 * kTile; j < std::min(j0 + 3 * kTile, k.end); ++j) {
      const char* row = static_cast<const char*>(key_ptr<D, Fp8>(k, j));
      for (int64_t b = 0; b < row_bytes<D, Fp8>(); b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
    }
    // raw: the cache rows (zeros past the end); key: them in fp32 (unless Pairs).
    const float* key[kTile];
    const void* raw[kTile];
    for (int t = 0; t < kTile; ++t) {
      if constexpr (Fp8) {
        if (t >= n) {
          raw[t] = zero_key;
          key[t] = zero_key;
        } else if constexpr (Pairs) {
          dequant_fp8_row_bf16(static_cast<const uint8_t*>(key_ptr<D, true>(k, j0 + t)), fp8_rows + t * kDim);
          raw[t] = fp8_rows + t * kDim;
        } else {
          dequant_fp8_row_f32(static_cast<const uint8_t*>(key_ptr<D, true>(k, j0 + t)), tile + t * kDim);
          key[t] = tile + t * kDim;
        }
        continue;
      }
      raw[t] = t < n ? key_ptr<D>(k, j0 + t) : zero_key;
      if constexpr (D == FloatType::kFloat32) {
        key[t] = static_cast<const float*>(raw[t]);
      } else if constexpr (!Pairs) {
        float* dst = tile + t * kDim;
        for (int d = 0; d < kDim; d += 16) _mm512_storeu_ps(dst + d, load16<D>(raw[t], d));
        key[t] = dst;
      }
    }
    __m512 s[kTile];
    if constexpr (Pairs) {
      alignas(64) float scores[kTile * kGroupRows];
      scores_bf16_pairs(static_cast<const uint16_t*>(g.q), raw, scores);
      for (int t = 0; t < kTile; ++t) s[t] = _mm512_load_ps(scores + t * kGroupRows);
    } else {
      const float* qt = static_cast<const float*>(g.q);
      for (int t = 0; t < kTile; ++t) s[t] = _mm512_setzero_ps();
      for (int d0 = 0; d0 < kDim; d0 += kDotBlock) {
        __m512 blk[kTile];
        for (int t = 0; t < kTile; ++t) blk[t] = _mm512_setzero_ps();
        for (int d = d0; d < d0 + kDotBlock; ++d) {
          const __m512 qv = _mm512_loadu_ps(qt + d * kGroupRows);
          for (int t = 0; t < kTile; ++t) blk[t] = _mm512_fmadd_ps(qv, _mm512_set1_ps(key[t][d]), blk[t]);
        }
        for (int t = 0; t < kTile; ++t) s[t] = _mm512_add_ps(s[t], blk[t]);
      }
    }
    __m512 mx = neg_inf;
    for (int t = 0; t < kTile; ++t) {
      const __mmask16 seen = t < n ? _mm512_cmple_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(j0 + t)), vlast)
                                   : __mmask16(0);
      s[t] = _mm512_mask_mul_ps(neg_inf, seen, s[t], vscale);
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
    if constexpr (Pairs) {
      accumulate_pairs(g.rows, o, p, alpha, raw, reinterpret_cast<uint16_t*>(tile));
      continue;
    }
    int i = 0;
    for (; i + 4 <= g.rows; i += 4) accumulate_rows<4>(o + i * kValueDim, p + i, alpha + i, key);
    switch (g.rows - i) {
      case 3: accumulate_rows<3>(o + i * kValueDim, p + i, alpha + i, key); break;
      case 2: accumulate_rows<2>(o + i * kValueDim, p + i, alpha + i, key); break;
      case 1: accumulate_rows<1>(o + i * kValueDim, p + i, alpha + i, key); break;
      default: break;
    }
  }
  if constexpr (Pairs) unpermute_pairs(o, g.rows);
  _mm512_storeu_ps(m, vm);
  _mm512_storeu_ps(l, vl);
}

#pragma GCC diagnostic pop
#endif  // __x86_64__

}  // namespace dsv3::mla::cpu
