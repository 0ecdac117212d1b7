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

// c[i * ldc + j] = sum_k a[i * lda + k] * b[j * ldb + k] for MR rows of a and NR rows of b, both
// raw bf16, over k in [0, len); len a multiple of 8 (the last step of 32 is masked).
template <int MR, int NR>
DSV3_AVX512BF16 void dot_tile_bf16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t len,
                                   float* c, int64_t ldc) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < len; kk += 32) {
    const __mmask32 m = len - kk >= 32 ? ~__mmask32(0) : (__mmask32(1) << (len - kk)) - 1;
    __m512bh bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, b + j * ldb + kk);
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a + i * lda + kk);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
  fp8k::store_tile<MR, NR>(acc, c, ldc, false);
}

template <int NR>
DSV3_AVX512BF16 inline void dot_tile_bf16_mr(int mr, const uint16_t* a, int64_t lda, const uint16_t* b,
                                             int64_t ldb, int64_t len, float* c, int64_t ldc) {
  static_assert(kMRdot == 4, "one case per row count");
  switch (mr) {
    case 1: return dot_tile_bf16<1, NR>(a, lda, b, ldb, len, c, ldc);
    case 2: return dot_tile_bf16<2, NR>(a, lda, b, ldb, len, c, ldc);
    case 3: return dot_tile_bf16<3, NR>(a, lda, b, ldb, len, c, ldc);
    default: return dot_tile_bf16<4, NR>(a, lda, b, ldb, len, c, ldc);
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
      if (nr == kNRdot) dot_tile_bf16_mr<kNRdot>(mr, a + i * k, k, b + j * k, k, k, c + i * n + j, n);
      else dot_tile_bf16_mr<1>(mr, a + i * k, k, b + j * k, k, k, c + i * n + j, n);
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
// reference's `out += w * row` (no fused multiply-add, so that its results are reproduced).
template <FloatType D>
DSV3_AVX512 void weighted_add_avx512(float* acc, const void* x, int64_t len, float w) {
  const __m512 vw = _mm512_set1_ps(w);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = fp8k::tail_mask(len - i);
    const __m512 p = _mm512_mul_ps(vw, fp8k::load_f32<D>(x, i, m));
    _mm512_mask_storeu_ps(acc + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i), p));
  }
}

#pragma GCC diagnostic pop
#endif  // __x86_64__

}  // namespace dsv3::moe::cpu
