// AVX2 (+ FMA + F16C) fp8_gemm: out = A' B'^T in fp32 with A' = a * a_scale and B' = b * b_scale_inv,
// for CPUs without AVX-512 (the glue is in fp8_cpu.cpp, the AVX-512 kernels in fp8_cpu_kernels.h).
//
// The fastest e4m3 -> fp32 decode here, measured in this file's few-rows loop (GB/s of fp8 B, 1
// thread, avx2 code on a Sapphire Rapids core of a shared machine, thread CPU time, medians of 3;
// N = 2112, K = 7168; B from L3 / from DRAM):
//                                                                      M = 1        M = 4
//   sign-extend 16 bytes (vpmovsxbw), << 7, & 0xBF80 to the fp16 bits
//   of value / 2^8, stored to an L1 buffer, vcvtph2ps from memory     18.9 / 12.7   8.5 / 7.1
//   the same, vcvtph2ps from the register (+ vextracti128)            13.5 / 11.2   8.5 / 7.0
//   the same from 8 bytes (xmm: no vextracti128)                      12.7 / 10.9   8.1 / 7.1
//   even / odd bytes of 16-bit words by shifts and ands (A permuted)  15.8 / 12.0
//   e4m3 bits moved straight into fp32 bits of value / 2^120           0.6 /  0.6   0.2 / 0.2
// vcvtph2ps ymm, xmm is a port-0 and a port-5 uop, and the upper half of a 16-lane result needs a
// port-5 vextracti128; with a memory source it is one port-0 uop and a load. Storing the fp16 bits
// and converting from memory moves work off the shuffle port onto the load and store ports,
// which the loop leaves idle: with one row of A the decode is the bottleneck, with 4 the FMAs
// are (then every variant is equal). The pure-integer decode makes e4m3 subnormals fp32
// denormals: each FMA that reads one takes a microcode assist (and under DAZ they would read 0);
// vcvtph2ps widens them exactly whatever MXCSR says.
//
// Few rows (decode): NR rows of B at a time, each in its own 4 KiB page (page_stride_rows), are
// decoded 32 bytes at a step and applied to up to 4 rows of A in registers; further groups of rows
// of A find those B rows in L1, and B is read from memory once, prefetched into L2 ahead. The
// b_scale_inv of the current 128-row block of B (and the 2^8 of the decode) are folded into an
// fp32 copy of A (a few rows: cheap), so the inner loop is the decode and FMAs. Many rows: a
// 64-row panel of B is converted to scaled fp32 (L2) and reused by all rows, as the AVX-512 panel
// path.
//
// Results differ from the reference (and the other ISAs) only by the fp32 summation order and by
// where the scales are multiplied in (one more rounding per product). NaN codes give the
// reference's NaN rows and columns: A' and the panels decode them to NaN; the few-rows loop's
// decode reads them as +-480, so its first row group also folds B's bytes into a running byte max
// (nan_code_max_avx2: one load, one add and one max per 32 bytes) and the columns of a flagged tile
// are marked NaN afterwards (mark_nan_columns).
#pragma once

#include <algorithm>
#include <cstdint>

#include "fp8/fp8_cpu_convert_avx2.h"

#if defined(__x86_64__)

namespace dsv3::fp8::cpu {

// GCC 12's own intrinsics headers trip -Wuninitialized / -Wmaybe-uninitialized on accumulator arrays.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The lane sums of 4 accumulators as [sum a, sum b, sum c, sum d].
DSV3_TARGET_AVX2 inline __m128 sum4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}

template <int O, int MR, int NR>
DSV3_TARGET_AVX2 inline __m256 tile_acc_avx2(__m256 (&acc)[MR][NR]) {
  if constexpr (O < MR * NR) return acc[O / NR][O % NR];
  else return _mm256_setzero_ps();
}

template <int O, int MR, int NR>
DSV3_TARGET_AVX2 inline void tile_sums_avx2(__m256 (&acc)[MR][NR], float* v) {
  if constexpr (O < MR * NR) {
    _mm_storeu_ps(v + O, sum4_avx2(tile_acc_avx2<O, MR, NR>(acc), tile_acc_avx2<O + 1, MR, NR>(acc),
                                   tile_acc_avx2<O + 2, MR, NR>(acc), tile_acc_avx2<O + 3, MR, NR>(acc)));
    tile_sums_avx2<O + 4, MR, NR>(acc, v);
  }
}

// c[i * ldc + j * cs] (+)= the lane sum of acc[i][j] (compile-time indices keep acc in registers).
template <int MR, int NR>
DSV3_TARGET_AVX2 inline void store_tile_avx2(__m256 (&acc)[MR][NR], float* c, int64_t ldc, bool accumulate,
                                             int64_t cs = 1) {
  float v[(MR * NR + 3) / 4 * 4];
  tile_sums_avx2<0, MR, NR>(acc, v);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float& out = c[i * ldc + j * cs];
      out = accumulate ? out + v[i * NR + j] : v[i * NR + j];
    }
}

// 8 fp16 bit patterns (the few-rows tile's buffer) widened to fp32.
DSV3_TARGET_AVX2 inline __m256 load_b8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// A vector of A used by several FMAs, loaded once into a register: left to itself GCC folds the load
// into every FMA, and an FMA with an indexed memory operand is two uops on Intel cores (4 x 2
// tile, A and B in L1: 1.2 -> 1.6 FMAs per cycle).
DSV3_TARGET_AVX2 inline __m256 load_a8(const float* p) {
  __m256 v = _mm256_loadu_ps(p);
  asm("" : "+x"(v));
  return v;
}

// c[i * ldc + j] (+)= sum over k in [0, len) of a[i * lda + k] * b[j * ldb + k], B in fp32 (the
// many-rows panel); len a multiple of 8. MR * NR accumulators, NR B vectors and one A vector
// must fit the 16 ymm registers.
template <int MR, int NR>
DSV3_TARGET_AVX2 void gemm_tile_f32_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t len,
                                         float* c, int64_t ldc, bool accumulate) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < len; kk += 8) {
    __m256 bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm256_loadu_ps(b + j * ldb + kk);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = load_a8(a + i * lda + kk);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  store_tile_avx2<MR, NR>(acc, c, ldc, accumulate);
}

// As gemm_tile_f32_avx2 with NR rows of e4m3 B (stride ldb) decoded on the fly, len a multiple of
// 32: each 32-byte step of a row goes to fp16 bits in a stack buffer (L1) and vcvtph2ps converts
// from there (see the top of this file). pf (or null): B rows to prefetch into L2 alongside, at
// the same offsets (stride ldb). Where MR x NR accumulators, NR B vectors and an A vector do not
// fit the 16 registers (3 x 4), or with one row of A, the A vectors are loaded first and each B
// vector right before its FMAs. Detect: returns whether the tile's B bytes hold a NaN code (else
// false). cs: the stride of the tile's columns in c (its B rows may be ldb = cs rows apart).
template <int MR, int NR, bool Detect>
DSV3_TARGET_AVX2 bool gemm_tile_fp8b_avx2(const float* a, int64_t lda, const uint8_t* b, int64_t ldb, int64_t len,
                                          float* c, int64_t ldc, bool accumulate, const uint8_t* pf, int64_t cs) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  __m256i nan = _mm256_setzero_si256();
  for (int64_t kk = 0; kk < len; kk += 32) {
    if (pf != nullptr && (kk & 32) == 0)
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * ldb + kk), _MM_HINT_T1);
    alignas(32) uint16_t h[NR][32];
    for (int j = 0; j < NR; ++j) {
      if constexpr (Detect) nan = nan_code_max_avx2(nan, b + j * ldb + kk);
      for (int q = 0; q < 32; q += 16) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j * ldb + kk + q));
        _mm256_store_si256(reinterpret_cast<__m256i*>(h[j] + q), e4m3_to_f16_bits(bytes));
      }
    }
    // Through memory for real: GCC would otherwise keep the fp16 bits in registers (and spill
    // accumulators instead), which brings back the shuffle-port conversions.
    asm volatile("" : : "r"(&h[0][0]) : "memory");
    for (int q = 0; q < 32; q += 8) {
      if constexpr (MR * NR + NR + 1 > 16 || MR == 1) {
        __m256 av[MR];
        for (int i = 0; i < MR; ++i) av[i] = load_a8(a + i * lda + kk + q);
        for (int j = 0; j < NR; ++j) {
          const __m256 bv = load_b8(h[j] + q);
          for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
        }
      } else {
        __m256 bv[NR];
        for (int j = 0; j < NR; ++j) bv[j] = load_b8(h[j] + q);
        for (int i = 0; i < MR; ++i) {
          const __m256 av = load_a8(a + i * lda + kk + q);
          for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
        }
      }
    }
  }
  store_tile_avx2<MR, NR>(acc, c, ldc, accumulate, cs);
  return Detect && has_nan_code_avx2(nan);
}

constexpr int kMRavx2 = 4;  // rows of A per tile (4 x 2 accumulators + 2 B + 1 A registers)

// Runtime row count (1..kMRavx2) -> tile instantiation.
template <int NR, bool Detect>
DSV3_TARGET_AVX2 inline bool gemm_tile_fp8b_avx2_mr(int mr, const float* a, int64_t lda, const uint8_t* b,
                                                    int64_t ldb, int64_t len, float* c, int64_t ldc, bool accumulate,
                                                    const uint8_t* pf, int64_t cs) {
  static_assert(kMRavx2 == 4, "one case per row count");
  switch (mr) {
    case 1: return gemm_tile_fp8b_avx2<1, NR, Detect>(a, lda, b, ldb, len, c, ldc, accumulate, pf, cs);
    case 2: return gemm_tile_fp8b_avx2<2, NR, Detect>(a, lda, b, ldb, len, c, ldc, accumulate, pf, cs);
    case 3: return gemm_tile_fp8b_avx2<3, NR, Detect>(a, lda, b, ldb, len, c, ldc, accumulate, pf, cs);
    default: return gemm_tile_fp8b_avx2<4, NR, Detect>(a, lda, b, ldb, len, c, ldc, accumulate, pf, cs);
  }
}

template <int NR>
DSV3_TARGET_AVX2 inline void gemm_tile_f32_avx2_mr(int mr, const float* a, int64_t lda, const float* b, int64_t ldb,
                                                   int64_t len, float* c, int64_t ldc, bool accumulate) {
  switch (mr) {
    case 1: return gemm_tile_f32_avx2<1, NR>(a, lda, b, ldb, len, c, ldc, accumulate);
    case 2: return gemm_tile_f32_avx2<2, NR>(a, lda, b, ldb, len, c, ldc, accumulate);
    case 3: return gemm_tile_f32_avx2<3, NR>(a, lda, b, ldb, len, c, ldc, accumulate);
    default: return gemm_tile_f32_avx2<4, NR>(a, lda, b, ldb, len, c, ldc, accumulate);
  }
}

// ---------------------------------------------------------------- few rows

// Bytes of the scaled fp32 A chunk (all rows) of the few-rows path: L2-resident on every AVX2 CPU
// (Zen 2/3: 512 KiB). A chunk that fit L1 (16 KiB) was slower: 1 thread, fp8 B from DRAM, N =
// 2112, K = 7168: M = 1 10.2 vs 11.9 GB/s, M = 4 5.3 vs 6.3 (the B rows are cut into pieces
// that the prefetchers follow less well, and c is summed once per piece).
constexpr int64_t kChunkBytesAvx2 = 131072;

// Up to this many rows of A the few-rows path runs, above it the panel path (1 thread, N = 2112,
// K = 7168, B from DRAM, GB/s of B: 16 rows 1.4 vs 1.3, 32 rows 0.8 vs 0.9).
constexpr int64_t kSmallMaxRowsAvx2 = 16;

// B rows per tile: at least 8 accumulators, so that the FMA latency (4 cycles, 2 per cycle) is
// covered, as long as they fit: 1 row of A x 8, 2 x 4, 3 x 4 (12 accumulators: from DRAM 8.0 vs
// 6.8 GB/s with 3 x 2, 1 thread, N = 2112, K = 7168), groups of 3-4 rows x 2.
inline int small_nr_avx2(int64_t m) { return m == 1 ? 8 : m <= 3 ? 4 : 2; }

// The K chunk of the few-rows path for m rows: whole 128-blocks, m * chunk fp32 within kChunkBytesAvx2.
inline int64_t small_chunk_avx2(int64_t m, int64_t k) {
  const int64_t blocks = std::max<int64_t>(1, kChunkBytesAvx2 / (m * kGemmBlk * static_cast<int64_t>(sizeof(float))));
  return std::min(k, blocks * kGemmBlk);
}

// Where a few-rows sweep prefetches B for row t (`ahead` rows past the current one) in the order
// it visits them: rows [n_begin, n_end) of the K chunk [k0, k0 + len), then those of the next
// chunk, then the B rows the caller streams next (`next`: rows of the same k, or null). A
// prefetch never faults; null where there is nothing worth fetching.
template <typename T>
inline const T* prefetch_row(const T* b, int64_t k, int64_t k0, int64_t len, int64_t n_begin, int64_t n_end,
                             const T* next, int64_t t) {
  if (t < n_end) return b + t * k + k0;
  if (k0 + len < k) return t - n_end < n_end - n_begin ? b + (n_begin + t - n_end) * k + k0 + len : nullptr;
  return next != nullptr ? next + (t - n_end) * k : nullptr;
}

// Scratch floats of gemm_small_avx2 (the scaled A chunk).
inline int64_t small_scratch_avx2(int64_t m, int64_t k) { return m * small_chunk_avx2(m, k); }

// Columns [n_begin, n_end) (n_begin a multiple of NR) of c[m, n] = A' B'^T, a = A' [m, k] fp32.
// An aligned span of NR x page_stride_rows rows goes as that many tiles, each of NR rows that
// far apart; other rows as tiles of NR (or 1) consecutive rows. next (or null): the B rows (of
// the same k) this thread reads after these, prefetched as the sweep nears its end: a new stream
// would start with demand misses. a_blk: small_scratch_avx2(m, k) floats.
template <int NR>
DSV3_TARGET_AVX2 void gemm_small_avx2(const float* a, int64_t m, const uint8_t* b, const float* b_scale, int64_t k,
                                      int64_t n, int64_t n_begin, int64_t n_end, const uint8_t* next, float* c,
                                      float* a_blk) {
  static_assert(kGemmBlk % NR == 0, "a tile must not straddle a block of b_scale_inv");
  const int64_t kblocks = k / kGemmBlk, kc = small_chunk_avx2(m, k);
  const int64_t groups = (m + kMRavx2 - 1) / kMRavx2;
  const int64_t stride = page_stride_rows(k, NR), span = NR * stride;
  for (int64_t k0 = 0; k0 < k; k0 += kc) {
    const int64_t len = std::min(kc, k - k0);
    const int64_t ahead = prefetch_rows(len, span);
    int64_t cached_nb = -1;
    for (int64_t n0 = n_begin; n0 < n_end;) {
      const int64_t step = tile_row_step(n0, n_end, stride, NR);  // = columns between a tile's outputs
      const bool spread = step > 1;
      const int nr = spread || n_end - n0 >= NR ? NR : 1;
      const int64_t nb = n0 / kGemmBlk;
      if (nb != cached_nb) {
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t kk = 0; kk < len; kk += kGemmBlk) {
            const __m256 s = _mm256_set1_ps(b_scale[nb * kblocks + (k0 + kk) / kGemmBlk] * kDecodeUnscale);
            for (int64_t q = 0; q < kGemmBlk; q += 8)
              _mm256_storeu_ps(a_blk + i * len + kk + q, _mm256_mul_ps(_mm256_loadu_ps(a + i * k + k0 + kk + q), s));
          }
        }
        cached_nb = nb;
      }
      for (int64_t col = n0; col < n0 + step; ++col) {
        const uint8_t* pb = b + col * k + k0;
        bool nan = false;
        for (int64_t g = 0, i = 0; g < groups; ++g) {
          const int mr = static_cast<int>((m - i) / (groups - g));  // balanced: 5 rows are 3 + 2
          // The first group streams B from memory (and prefetches, and looks for NaN codes); the
          // others find it in L1.
          const float* pa = a_blk + i * len;
          float* pc = c + i * n + col;
          const bool first = g == 0;
          const uint8_t* pf = first ? prefetch_row(b, k, k0, len, n_begin, n_end, next, col + ahead) : nullptr;
          const int64_t ldb = step * k;
          const bool add = k0 > 0;
          if (nr == NR && first)
            nan = gemm_tile_fp8b_avx2_mr<NR, true>(mr, pa, len, pb, ldb, len, pc, n, add, pf, step);
          else if (nr == NR) gemm_tile_fp8b_avx2_mr<NR, false>(mr, pa, len, pb, ldb, len, pc, n, add, nullptr, step);
          else if (first) nan = gemm_tile_fp8b_avx2_mr<1, true>(mr, pa, len, pb, k, len, pc, n, add, pf, 1);
          else gemm_tile_fp8b_avx2_mr<1, false>(mr, pa, len, pb, k, len, pc, n, add, nullptr, 1);
          i += mr;
        }
        if (nan) mark_nan_columns(pb, step * k, len, nr, c + col, m, n, step);
      }
      n0 += spread ? span : nr;
    }
  }
}

// gemm_small_avx2 with the NR of small_nr_avx2(m).
DSV3_TARGET_AVX2 inline void gemm_small_avx2_any(const float* a, int64_t m, const uint8_t* b, const float* b_scale,
                                                 int64_t k, int64_t n, int64_t n_begin, int64_t n_end,
                                                 const uint8_t* next, float* c, float* a_blk) {
  switch (small_nr_avx2(m)) {
    case 8: return gemm_small_avx2<8>(a, m, b, b_scale, k, n, n_begin, n_end, next, c, a_blk);
    case 4: return gemm_small_avx2<4>(a, m, b, b_scale, k, n, n_begin, n_end, next, c, a_blk);
    default: return gemm_small_avx2<2>(a, m, b, b_scale, k, n, n_begin, n_end, next, c, a_blk);
  }
}

// ---------------------------------------------------------------- many rows

// One task of the many-rows path: rows [m0, m1) x a panel of kPanelN rows of B from n0. Per
// kPanelK chunk of K the panel is converted once to fp32 times its b_scale_inv (L2-resident, NaN
// codes to NaN: cheap once per panel value) and reused by every row of A; chunk results are
// summed in c. a = A' [m, k].
DSV3_TARGET_AVX2 inline void gemm_panel_avx2(const float* a, int64_t m0, int64_t m1, const uint8_t* b,
                                             const float* b_scale, int64_t k, int64_t n, int64_t n0, float* c,
                                             float* panel) {
  const int64_t rows = std::min(kPanelN, n - n0), kblocks = k / kGemmBlk;
  for (int64_t k0 = 0; k0 < k; k0 += kPanelK) {
    const int64_t len = std::min(kPanelK, k - k0);
    for (int64_t j = 0; j < rows; ++j) {
      const uint8_t* src = b + (n0 + j) * k + k0;
      for (int64_t kk = 0; kk < len; kk += kGemmBlk) {
        const __m256 s = _mm256_set1_ps(b_scale[((n0 + j) / kGemmBlk) * kblocks + (k0 + kk) / kGemmBlk] * kDecodeUnscale);
        for (int64_t q = kk; q < kk + kGemmBlk; q += 16) {
          __m256 lo, hi;
          e4m3_to_f32_div256_nan_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + q)), lo, hi);
          _mm256_storeu_ps(panel + j * kPanelK + q, _mm256_mul_ps(lo, s));
          _mm256_storeu_ps(panel + j * kPanelK + q + 8, _mm256_mul_ps(hi, s));
        }
      }
    }
    for (int64_t i = m0; i < m1; i += kMRavx2) {
      const int mr = static_cast<int>(std::min<int64_t>(kMRavx2, m1 - i));
      for (int64_t j = 0; j < rows;) {
        const int nr = rows - j >= 2 ? 2 : 1;
        const float* pa = a + i * k + k0;
        float* pc = c + i * n + n0 + j;
        if (nr == 2) gemm_tile_f32_avx2_mr<2>(mr, pa, k, panel + j * kPanelK, kPanelK, len, pc, n, k0 > 0);
        else gemm_tile_f32_avx2_mr<1>(mr, pa, k, panel + j * kPanelK, kPanelK, len, pc, n, k0 > 0);
        j += nr;
      }
    }
  }
}

#pragma GCC diagnostic pop

}  // namespace dsv3::fp8::cpu

#endif  // __x86_64__
