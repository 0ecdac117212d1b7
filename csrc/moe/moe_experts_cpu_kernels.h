// AVX-512 inner loops of the CPU expert ops (torch-free; the glue, the work split and the portable
// fallback are in moe_experts_cpu.cpp).
//
// The FP8 GEMM tiles are fp8_cpu_kernels.h's (e4m3 widened to bf16 by table + vdpbf16ps, or fp32
// FMAs); this adds the bf16 x bf16 tile, where vdpbf16ps takes both operands straight from memory
// (products exact, sums fp32), and the row passes around the GEMMs. As in the fp8 kernels, the
// extension is built without -mavx512*: these functions carry a target attribute and run only
// after avx512_supported() / avx512_bf16_supported() said yes.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/float_type.h"
#include "fp8/fp8_cpu_kernels.h"

namespace dsv3::moe::cpu {

namespace fp8k = dsv3::fp8::cpu;

#if defined(__x86_64__)

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 4 x 4 accumulators + 4 B + 1 A registers of 32: each B vector is used by 4 rows of A.
constexpr int kMRdot = 4;
constexpr int kNRdot = 4;

// One row's accumulators of up to 4 columns of B. Named members, not arrays: GCC kept [4][4]
// accumulator arrays in registers but also stored them to the stack at every step of the K
// loop (16 stores per step, half the speed).
struct Acc4 {
  __m512 c0, c1, c2, c3;
};

// The sum of v's 16 lanes.
DSV3_AVX512BF16 inline float hsum(__m512 v) {
  const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

// c[i * ldc + j] = sum_k a[i * lda + k] * b[j * ldb + k] for mr <= 4 rows of a and NR (4 or 1)
// rows of b, both raw bf16, over k in [0, len); len a multiple of 8 (the last step of 32 is
// masked). Rows past mr repeat the last row (computed, not stored), so that one instantiation
// serves every edge. With `prefetch`, the next NR rows of b (the next tile's) are prefetched
// alongside: a few rows of A make this loop memory-bound, and the hardware prefetcher alone
// did not keep up with 4 short rows at a time (E = 64 bf16 experts: 20 -> 14 ms).
template <int NR>
DSV3_AVX512BF16 void dot_tile_bf16(const uint16_t* a, int64_t lda, int mr, const uint16_t* b, int64_t ldb,
                                   int64_t len, float* c, int64_t ldc, bool prefetch) {
  static_assert(kMRdot == 4 && (NR == 4 || NR == 1), "4 rows of A, 4 or 1 row of B");
  const uint16_t* ar[kMRdot];
  for (int i = 0; i < kMRdot; ++i) ar[i] = a + std::min(i, mr - 1) * lda;
  const __m512 z = _mm512_setzero_ps();
  Acc4 r0{z, z, z, z}, r1{z, z, z, z}, r2{z, z, z, z}, r3{z, z, z, z};
  for (int64_t kk = 0; kk < len; kk += 32) {
    const __mmask32 m = len - kk >= 32 ? ~__mmask32(0) : (__mmask32(1) << (len - kk)) - 1;
    if (prefetch)
      for (int j = NR; j < 2 * NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(b + j * ldb + kk), _MM_HINT_T0);
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi16(m, b + kk);
    const __m512bh b1 = NR == 4 ? (__m512bh)_mm512_maskz_loadu_epi16(m, b + ldb + kk) : b0;
    const __m512bh b2 = NR == 4 ? (__m512bh)_mm512_maskz_loadu_epi16(m, b + 2 * ldb + kk) : b0;
    const __m512bh b3 = NR == 4 ? (__m512bh)_mm512_maskz_loadu_epi16(m, b + 3 * ldb + kk) : b0;
    Acc4* rows[kMRdot] = {&r0, &r1, &r2, &r3};
    for (int i = 0; i < kMRdot; ++i) {
      const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, ar[i] + kk);
      Acc4& r = *rows[i];
      r.c0 = _mm512_dpbf16_ps(r.c0, av, b0);
      if constexpr (NR == 4) {
        r.c1 = _mm512_dpbf16_ps(r.c1, av, b1);
        r.c2 = _mm512_dpbf16_ps(r.c2, av, b2);
        r.c3 = _mm512_dpbf16_ps(r.c3, av, b3);
      }
    }
  }
  const Acc4 rows[kMRdot] = {r0, r1, r2, r3};
  for (int i = 0; i < mr; ++i) {
    c[i * ldc] = hsum(rows[i].c0);
    if constexpr (NR == 4) {
      c[i * ldc + 1] = hsum(rows[i].c1);
      c[i * ldc + 2] = hsum(rows[i].c2);
      c[i * ldc + 3] = hsum(rows[i].c3);
    }
  }
}

// Rows [r0, r1) x columns [n0, n1) of c [rows, n] = a [rows, k] b[n, k]^T, a and b raw bf16.
// kNRdot rows of b (kNRdot * k * 2 bytes, L1-resident) are swept over all the rows of a.
DSV3_AVX512BF16 inline void gemm_bf16_avx512bf16(const uint16_t* a, const uint16_t* b, int64_t k, int64_t n,
                                                 int64_t r0, int64_t r1, int64_t n0, int64_t n1, float* c) {
  for (int64_t j = n0; j < n1;) {
    const int nr = n1 - j >= kNRdot ? kNRdot : 1;
    for (int64_t i = r0; i < r1; i += kMRdot) {
      const int mr = static_cast<int>(std::min<int64_t>(kMRdot, r1 - i));
      if (nr == kNRdot) dot_tile_bf16<kNRdot>(a + i * k, k, mr, b + j * k, k, k, c + i * n + j, n, i == r0);
      else dot_tile_bf16<1>(a + i * k, k, mr, b + j * k, k, k, c + i * n + j, n, i == r0);
    }
    j += nr;
  }
}

// x[0..len) rounded to bf16 (round-to-nearest-even) and back to fp32, in place.
DSV3_AVX512 inline void round_bf16_avx512(float* x, int64_t len) {
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = fp8k::tail_mask(len - i);
    const __m256i h = fp8k::f32_to_bf16(_mm512_maskz_loadu_ps(m, x + i));
    _mm512_mask_storeu_ps(x + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
}

// acc[0..len) += w * x[0..len) (x of type D): the product rounded to fp32, then the sum, as the
// reference's `out += w * row` (no fused multiply-add, so that its results are reproduced; GCC
// contracts the two intrinsics into one FMA in C++ unless the product is pinned by the empty asm).
template <FloatType D>
DSV3_AVX512 void weighted_add_avx512(float* acc, const void* x, int64_t len, float w) {
  const __m512 vw = _mm512_set1_ps(w);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = fp8k::tail_mask(len - i);
    __m512 p = _mm512_mul_ps(vw, fp8k::load_f32<D>(x, i, m));
    asm("" : "+v"(p));
    _mm512_mask_storeu_ps(acc + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i), p));
  }
}

#pragma GCC diagnostic pop
#endif  // __x86_64__

}  // namespace dsv3::moe::cpu
