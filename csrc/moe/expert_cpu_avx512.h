// AVX-512 inner loops of the CPU expert ops (torch-free; the work split and the portable fallback
// are in expert_gemm_cpu.h and expert_rows_cpu.h, the glue in the <op>_cpu.cpp files).
//
// The FP8 GEMM tiles are fp8_cpu_kernels.h's (e4m3 widened to bf16 by table + vdpbf16ps, or fp32
// FMAs); this adds the bf16 x bf16 tile, where vdpbf16ps takes both operands straight from memory
// (products exact, sums fp32), and the row passes around the GEMMs. As in the fp8 kernels, the
// extension is built without -mavx512*: these functions carry a target attribute and run only
// after cpu_isa_at_least(CpuIsa::kAvx512) / cpu_isa_at_least(CpuIsa::kAvx512Bf16) said yes.
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

// Up to 6 rows of A x 4 rows of B: 24 accumulators + 4 B + 1 A registers of 32. Decode-sized
// experts have a few rows each (T=64, top-6 of 64 experts: 6 on average), and every row a tile
// computes costs a vdpbf16ps per B vector, so a tile takes exactly the rows it has (1..6)
// instead of padding them to a fixed 4 (T=1: 4x the arithmetic).
constexpr int kMRdot = 6;
constexpr int kNRdot = 4;

// One row's accumulators of 4 columns of B. Named members, not arrays: GCC kept [4][4]
// accumulator arrays in registers but also stored them to the stack at every step of the K
// loop (16 stores per step, half the speed).
struct Acc4 {
  __m512 c0, c1, c2, c3;
};

// One K step of one row: r.cj += a-row . b_j over 32 values.
DSV3_AVX512BF16 __attribute__((always_inline)) inline void dot_step(Acc4& r, __m512bh av, __m512bh b0, __m512bh b1,
                                                                   __m512bh b2, __m512bh b3) {
  r.c0 = _mm512_dpbf16_ps(r.c0, av, b0);
  r.c1 = _mm512_dpbf16_ps(r.c1, av, b1);
  r.c2 = _mm512_dpbf16_ps(r.c2, av, b2);
  r.c3 = _mm512_dpbf16_ps(r.c3, av, b3);
}

// c[i * ldc + j] = sum_k a[i * lda + k] * b[j * ldb + k] for MR rows of a and 4 rows of b, both
// raw bf16, over k in [0, len); len a multiple of 8 (the last step of 32 is masked). With
// `prefetch`, B is prefetched into L2 `ahead` elements past each row (the rows of B are
// contiguous, so that is a later tile's): a few rows of A make this loop memory-bound, and the
// hardware prefetcher alone did not keep up with 4 short rows at a time.
// The rows are spelled out one by one: through an array of pointers to them (or an array of
// accumulators), GCC stores all 24 accumulators to the stack at every K step.
template <int MR>
DSV3_AVX512BF16 void dot_tile_bf16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t len,
                                   float* c, int64_t ldc, bool prefetch, int64_t ahead) {
  static_assert(kNRdot == 4 && MR >= 1 && MR <= kMRdot, "1..6 rows of A, 4 rows of B");
  const __m512 z = _mm512_setzero_ps();
  Acc4 r0{z, z, z, z}, r1{z, z, z, z}, r2{z, z, z, z}, r3{z, z, z, z}, r4{z, z, z, z}, r5{z, z, z, z};
  for (int64_t kk = 0; kk < len; kk += 32) {
    const __mmask32 m = len - kk >= 32 ? ~__mmask32(0) : (__mmask32(1) << (len - kk)) - 1;
    if (prefetch)
      for (int j = 0; j < kNRdot; ++j) _mm_prefetch(reinterpret_cast<const char*>(b + j * ldb + kk + ahead), _MM_HINT_T1);
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi16(m, b + kk);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi16(m, b + ldb + kk);
    const __m512bh b2 = (__m512bh)_mm512_maskz_loadu_epi16(m, b + 2 * ldb + kk);
    const __m512bh b3 = (__m512bh)_mm512_maskz_loadu_epi16(m, b + 3 * ldb + kk);
    const auto row = [&](int i) DSV3_AVX512BF16 { return (__m512bh)_mm512_maskz_loadu_epi16(m, a + i * lda + kk); };
    dot_step(r0, row(0), b0, b1, b2, b3);
    if constexpr (MR > 1) dot_step(r1, row(1), b0, b1, b2, b3);
    if constexpr (MR > 2) dot_step(r2, row(2), b0, b1, b2, b3);
    if constexpr (MR > 3) dot_step(r3, row(3), b0, b1, b2, b3);
    if constexpr (MR > 4) dot_step(r4, row(4), b0, b1, b2, b3);
    if constexpr (MR > 5) dot_step(r5, row(5), b0, b1, b2, b3);
  }
  _mm_storeu_ps(c, fp8k::sum4(r0.c0, r0.c1, r0.c2, r0.c3));
  if constexpr (MR > 1) _mm_storeu_ps(c + ldc, fp8k::sum4(r1.c0, r1.c1, r1.c2, r1.c3));
  if constexpr (MR > 2) _mm_storeu_ps(c + 2 * ldc, fp8k::sum4(r2.c0, r2.c1, r2.c2, r2.c3));
  if constexpr (MR > 3) _mm_storeu_ps(c + 3 * ldc, fp8k::sum4(r3.c0, r3.c1, r3.c2, r3.c3));
  if constexpr (MR > 4) _mm_storeu_ps(c + 4 * ldc, fp8k::sum4(r4.c0, r4.c1, r4.c2, r4.c3));
  if constexpr (MR > 5) _mm_storeu_ps(c + 5 * ldc, fp8k::sum4(r5.c0, r5.c1, r5.c2, r5.c3));
}

// Runtime row count (1..kMRdot) -> tile instantiation.
DSV3_AVX512BF16 inline void dot_tile_bf16_mr(int mr, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                                             int64_t len, float* c, int64_t ldc, bool prefetch, int64_t ahead) {
  static_assert(kMRdot == 6, "one case per row count");
  switch (mr) {
    case 1: return dot_tile_bf16<1>(a, lda, b, ldb, len, c, ldc, prefetch, ahead);
    case 2: return dot_tile_bf16<2>(a, lda, b, ldb, len, c, ldc, prefetch, ahead);
    case 3: return dot_tile_bf16<3>(a, lda, b, ldb, len, c, ldc, prefetch, ahead);
    case 4: return dot_tile_bf16<4>(a, lda, b, ldb, len, c, ldc, prefetch, ahead);
    case 5: return dot_tile_bf16<5>(a, lda, b, ldb, len, c, ldc, prefetch, ahead);
    default: return dot_tile_bf16<6>(a, lda, b, ldb, len, c, ldc, prefetch, ahead);
  }
}

// Software prefetch distance along B, into L2: at least this many bytes (and whole tiles of
// kNRdot rows) ahead. Measured on the decode shape (E = 64, D = 1024, I = 256, T = 64, 1 thread):
// 4 KiB into L1 (the previous setting) 14.7 ms, 4 KiB into L2 9.8 ms, 8-32 KiB into L2 7-8 ms;
// the B loads were where the loop stalled, and L2 tracks more outstanding misses than L1.
constexpr int64_t kDotPrefetchBytes = 16384;

// Rows [r0, r1) x columns [n0, n1) of c [rows, n] = a [rows, k] b[n, k]^T, a and b raw bf16,
// n1 - n0 a multiple of kNRdot (N is a multiple of 8, tiles start at multiples of 128).
// kNRdot rows of b (kNRdot * k * 2 bytes, L1-resident) are swept over the rows of a in
// balanced groups of at most kMRdot (7 rows: 4 + 3, not 6 + 1); the first group streams b
// from memory and prefetches ahead, up to the end of b (past it lies another expert's weight,
// which this call may not need).
DSV3_AVX512BF16 inline void gemm_bf16_avx512bf16(const uint16_t* a, const uint16_t* b, int64_t k, int64_t n,
                                                 int64_t r0, int64_t r1, int64_t n0, int64_t n1, float* c) {
  const int64_t groups = (r1 - r0 + kMRdot - 1) / kMRdot;
  const int64_t tile = kNRdot * k;
  const int64_t ahead = std::max<int64_t>(1, (kDotPrefetchBytes / 2 + tile - 1) / tile) * tile;
  for (int64_t j = n0; j < n1; j += kNRdot) {
    const bool prefetch = j * k + ahead + tile <= n * k;
    for (int64_t g = 0, i = r0; g < groups; ++g) {
      const int mr = static_cast<int>((r1 - i) / (groups - g));
      dot_tile_bf16_mr(mr, a + i * k, k, b + j * k, k, k, c + i * n + j, n, prefetch && g == 0, ahead);
      i += mr;
    }
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
