// AVX2 (+ FMA + F16C) inner loops of the CPU expert ops: the bf16 x bf16 GEMM tile and the row
// passes around the GEMMs (the FP8 tiles are fp8_cpu_gemm_avx2.h's). The counterparts of
// expert_cpu_avx512.h's AVX-512 ones; every function carries DSV3_TARGET_AVX2 and runs only
// after cpu_isa_at_least(CpuIsa::kAvx2) said yes.
//
// bf16 -> fp32 is a 16-bit shift, and of a 32-bit lane holding two bf16 values the high one is
// the lane with its low half cleared: 16 bf16 of a row of B give two fp32 vectors, its even and
// its odd elements, with one shift and one and (no shuffles, no conversions). A is stored in fp32
// in that same order (bf16_to_f32_evenodd_avx2), and a dot product does not care about the order.
// Results differ from the reference only by the fp32 summation order.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/float_type.h"
#include "fp8/fp8_cpu_gemm_avx2.h"

#if defined(__x86_64__)

namespace dsv3::moe::cpu {

namespace fp8k = dsv3::fp8::cpu;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// len (a multiple of 8) bf16 values -> fp32 in the even / odd order of the tile below: per 16,
// elements 0, 2, .., 14 then 1, 3, .., 15; a last 8 as 0, 2, 4, 6, 1, 3, 5, 7.
DSV3_TARGET_AVX2 inline void bf16_to_f32_evenodd_avx2(const uint16_t* src, float* dst, int64_t len) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
    _mm256_storeu_ps(dst + i + 8, _mm256_castsi256_ps(_mm256_and_si256(x, hi)));
  }
  if (i < len) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm_storeu_ps(dst + i, _mm_castsi128_ps(_mm_slli_epi32(x, 16)));
    _mm_storeu_ps(dst + i + 4, _mm_castsi128_ps(_mm_and_si128(x, _mm256_castsi256_si128(hi))));
  }
}

// 16 values of a B row as raw bf16 pairs (or, Tail, the last 8: lanes 4..7 zero).
template <bool Tail>
DSV3_TARGET_AVX2 __attribute__((always_inline)) inline __m256i load_bf16_pairs(const uint16_t* p) {
  if constexpr (Tail) return _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// The even (half 0) or odd (half 1) values of A matching load_bf16_pairs<Tail>. Past a tail's 4
// values B is zero, so A's lanes there only need to be finite (they are zero).
template <bool Tail>
DSV3_TARGET_AVX2 __attribute__((always_inline)) inline __m256 load_a_half(const float* p, int half) {
  if constexpr (Tail) return _mm256_zextps128_ps256(_mm_loadu_ps(p + 4 * half));
  else return fp8k::load_a8(p + 8 * half);
}

// One step of dot_tile_bf16_avx2 at kk. One or two rows of A are loaded first and each B row is
// widened right before its FMAs; with more rows every widened B vector of the step stays in a
// register (MR x NR accumulators + 2 NR B + 1 A <= 16 ymm).
template <int MR, int NR, bool Tail>
DSV3_TARGET_AVX2 __attribute__((always_inline)) inline void dot_step_bf16(__m256 (&acc)[MR][NR], const float* a,
                                                                         int64_t lda, const uint16_t* b, int64_t ldb,
                                                                         int64_t kk) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  if constexpr (MR <= 2) {
    __m256 ae[MR], ao[MR];
    for (int i = 0; i < MR; ++i) {
      ae[i] = load_a_half<Tail>(a + i * lda + kk, 0);
      ao[i] = load_a_half<Tail>(a + i * lda + kk, 1);
    }
    for (int j = 0; j < NR; ++j) {
      const __m256i x = load_bf16_pairs<Tail>(b + j * ldb + kk);
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(ae[i], even, acc[i][j]);
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(x, hi));
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(ao[i], odd, acc[i][j]);
    }
  } else {
    __m256 even[NR], odd[NR];
    for (int j = 0; j < NR; ++j) {
      const __m256i x = load_bf16_pairs<Tail>(b + j * ldb + kk);
      even[j] = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
      odd[j] = _mm256_castsi256_ps(_mm256_and_si256(x, hi));
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 ae = load_a_half<Tail>(a + i * lda + kk, 0);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(ae, even[j], acc[i][j]);
      const __m256 ao = load_a_half<Tail>(a + i * lda + kk, 1);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(ao, odd[j], acc[i][j]);
    }
  }
}

// c[i * ldc + j] (+)= sum over k in [0, len) of A[i][k] * B[j][k], a: MR rows of A in the even /
// odd fp32 order (stride lda), b: NR rows of raw bf16 B (stride ldb), len a multiple of 8; then
// the next NR rows of B into the next NR columns of c, `tiles` times (the setup and the call
// weigh on short rows: K = 256, 16 rows of A). pf (or null): B rows to prefetch into L2
// alongside, at the same offsets.
template <int MR, int NR>
DSV3_TARGET_AVX2 void dot_tile_bf16_avx2(const float* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t len,
                                         float* c, int64_t ldc, bool accumulate, const uint16_t* pf, int64_t tiles) {
  for (int64_t tile = 0; tile < tiles; ++tile, b += NR * ldb, c += NR, pf = pf ? pf + NR * ldb : nullptr) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    int64_t kk = 0;
    for (; kk + 16 <= len; kk += 16) {
      if (pf != nullptr && (kk & 16) == 0)
        for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * ldb + kk), _MM_HINT_T1);
      dot_step_bf16<MR, NR, false>(acc, a, lda, b, ldb, kk);
    }
    if (kk < len) dot_step_bf16<MR, NR, true>(acc, a, lda, b, ldb, kk);
    fp8k::store_tile_avx2<MR, NR>(acc, c, ldc, accumulate);
  }
}

template <int NR>
DSV3_TARGET_AVX2 inline void dot_tile_bf16_avx2_mr(int mr, const float* a, int64_t lda, const uint16_t* b,
                                                   int64_t ldb, int64_t len, float* c, int64_t ldc, bool accumulate,
                                                   const uint16_t* pf, int64_t tiles) {
  static_assert(fp8k::kMRavx2 == 4, "one case per row count");
  switch (mr) {
    case 1: return dot_tile_bf16_avx2<1, NR>(a, lda, b, ldb, len, c, ldc, accumulate, pf, tiles);
    case 2: return dot_tile_bf16_avx2<2, NR>(a, lda, b, ldb, len, c, ldc, accumulate, pf, tiles);
    case 3: return dot_tile_bf16_avx2<3, NR>(a, lda, b, ldb, len, c, ldc, accumulate, pf, tiles);
    default: return dot_tile_bf16_avx2<4, NR>(a, lda, b, ldb, len, c, ldc, accumulate, pf, tiles);
  }
}

// Rows [r0, r1) x columns [n0, n1) of c [rows, n] = A b[n, k]^T, a: A [rows, k] in the even / odd
// fp32 order, b raw bf16. Per K chunk (the A rows' chunk L2-resident, as the FP8 few-rows path),
// NR rows of b are swept over the rows of A in balanced groups of at most 4; the first group
// streams b from memory and prefetches ahead, and at the end into `next` (or null): the B rows
// (of the same k) this thread reads after these.
template <int NR>
DSV3_TARGET_AVX2 void gemm_bf16_avx2(const float* a, const uint16_t* b, int64_t k, int64_t n, int64_t r0, int64_t r1,
                                     int64_t n0, int64_t n1, const uint16_t* next, float* c) {
  const int64_t m = r1 - r0, groups = (m + fp8k::kMRavx2 - 1) / fp8k::kMRavx2;
  // Whole 16s of K (the even / odd groups), m * kc fp32 within the FP8 path's budget.
  const int64_t kc = std::min(k, std::max<int64_t>(16, fp8k::kChunkBytesAvx2 / (m * 4) / 16 * 16));
  for (int64_t k0 = 0; k0 < k; k0 += kc) {
    const int64_t len = std::min(kc, k - k0);
    const int64_t ahead = (fp8k::kPrefetchBytes / 2 + len - 1) / len;  // rows
    // A run of tiles per call: about a prefetch distance of b (16 KiB), which stays in L1 for the
    // later groups of rows of A; the prefetch address steps along with the tiles.
    const int64_t run = (ahead + NR - 1) / NR;
    for (int64_t j = n0; j < n1;) {
      const int64_t full = (n1 - j) / NR;
      const int64_t tiles = std::min(full, run), nr = tiles > 0 ? NR : 1, cols = tiles > 0 ? tiles * NR : 1;
      const uint16_t* pf = fp8k::prefetch_row(b, k, k0, len, n0, n1, next, j + ahead);
      for (int64_t g = 0, i = r0; g < groups; ++g) {
        const int mr = static_cast<int>((r1 - i) / (groups - g));
        const float* pa = a + i * k + k0;
        float* pc = c + i * n + j;
        const uint16_t* pb = b + j * k + k0;
        if (nr == NR) dot_tile_bf16_avx2_mr<NR>(mr, pa, k, pb, k, len, pc, n, k0 > 0, g == 0 ? pf : nullptr, tiles);
        else dot_tile_bf16_avx2_mr<1>(mr, pa, k, pb, k, len, pc, n, k0 > 0, g == 0 ? pf : nullptr, 1);
        i += mr;
      }
      j += cols;
    }
  }
}

// gemm_bf16_avx2 with NR rows of B per tile for r1 - r0 rows: 8 accumulators at least (the FMA
// latency) while MR x NR accumulators and 2 NR widened B vectors fit: 1 x 8, 2 x 4, 3-4 x 2.
DSV3_TARGET_AVX2 inline void gemm_bf16_avx2_any(const float* a, const uint16_t* b, int64_t k, int64_t n, int64_t r0,
                                                int64_t r1, int64_t n0, int64_t n1, const uint16_t* next, float* c) {
  switch (r1 - r0 == 1 ? 8 : r1 - r0 == 2 ? 4 : 2) {
    case 8: return gemm_bf16_avx2<8>(a, b, k, n, r0, r1, n0, n1, next, c);
    case 4: return gemm_bf16_avx2<4>(a, b, k, n, r0, r1, n0, n1, next, c);
    default: return gemm_bf16_avx2<2>(a, b, k, n, r0, r1, n0, n1, next, c);
  }
}

// x[0..len) rounded to bf16 (round-to-nearest-even) and back to fp32, in place.
DSV3_TARGET_AVX2 inline void round_bf16_avx2(float* x, int64_t len) {
  for (int64_t i = 0; i < len; i += 8) {
    const int64_t n = std::min<int64_t>(8, len - i);
    const __m128i h = fp8k::f32_to_bf16_avx2(fp8k::load8_f32<FloatType::kFloat32>(x, i, n));
    fp8k::store8_f32<FloatType::kFloat32>(x, i, fp8k::widen8_f32<FloatType::kBFloat16>(h), n);
  }
}

// acc[0..len) += w * x[0..len) (x of type D): the product rounded to fp32, then the sum, as the
// reference's `out += w * row` (the empty asm keeps GCC from contracting the two into an FMA).
template <FloatType D>
DSV3_TARGET_AVX2 void weighted_add_avx2(float* acc, const void* x, int64_t len, float w) {
  const __m256 vw = _mm256_set1_ps(w);
  for (int64_t i = 0; i < len; i += 8) {
    const int64_t n = std::min<int64_t>(8, len - i);
    __m256 p = _mm256_mul_ps(vw, fp8k::load8_f32<D>(x, i, n));
    asm("" : "+x"(p));
    fp8k::store8_f32<FloatType::kFloat32>(acc, i, _mm256_add_ps(fp8k::load8_f32<FloatType::kFloat32>(acc, i, n), p), n);
  }
}

#pragma GCC diagnostic pop

}  // namespace dsv3::moe::cpu

#endif  // __x86_64__
