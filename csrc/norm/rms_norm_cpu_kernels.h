// AVX2 and AVX-512 row loops of the CPU rms_norm (torch-free; the glue, the parallel split and the
// scalar fallback are in rms_norm_cpu.cpp). As in the other families, the extension is built for
// the x86-64 baseline: these functions carry a target attribute and run only after cpu_isa() said
// the host has that level.
//
// One row, two passes: the first forms h (x, or x + residual rounded to T and stored as
// residual_out) and sums h^2 in fp32 lanes; the second writes out = round(w * round(h * inv_rms))
// from h read back from x or residual_out (the row is still in L1/L2).
//
// The loops step over blocks of two vectors of fp32 lanes (a pair): for fp32/fp16 two consecutive
// vectors of elements; for bf16 one vector of raw bf16 split into its even elements (shifted up)
// and its odd ones (masked), so that widening and narrowing cost one integer op per vector, where
// the zero-extending moves and packs (vpmovzxwd, vpmovdw, vpackusdw) run on one port only. The
// element order inside a pair does not matter: every step is elementwise, and the sum of squares
// is added in its own order anyway (four accumulators: with two, the FMA latency bounds the first
// pass). Rounding to bf16 is on the bits (nearest even) and has no NaN case: every NaN rounded here
// has zero low 16 bits, which no rounding carry leaves (NaNs loaded from bf16 tensors, those
// propagated from them, as x86 keeps the first NaN operand's payload, and the default NaN
// 0xFFC00000 of inf * 0 or inf - inf). fp16 rounds through the F16C conversions.
// One bf16 row of D = 7168, one thread of this project's Xeon (AVX-512 BF16 class): AVX-512 1.2 us,
// AVX2 1.7 us; with vpmovzxwd/vpmovdw, the NaN case and two accumulators 1.9 and 3.3 us.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "common/float_type.h"
#include "fp8/fp8_cpu_kernels.h"

namespace dsv3::norm::cpu {

// One row of the op, in the row's dtype; residual == nullptr: none (residual_out not touched).
struct RowArgs {
  const void* x;
  const void* residual;
  const void* weight;
  void* out;
  void* residual_out;
  int64_t d;
  float eps;
};

inline float inv_rms(float sum_sq, int64_t d, float eps) {
  // mean as torch's CPU mean computes it (the sum divided by D), then 1 / sqrt as its rsqrt.
  return 1.0f / std::sqrt(sum_sq / static_cast<float>(d) + eps);
}

constexpr int64_t elem_size(FloatType t) { return t == FloatType::kFloat32 ? 4 : 2; }

#if defined(__x86_64__)

// GCC 12's AVX-512 intrinsics (masked loads, _mm512_reduce_add_ps) trip its own -Wuninitialized;
// nothing of ours is.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fp8k = dsv3::fp8::cpu;

constexpr uint32_t kBf16High = 0xFFFF0000u;

// ---------------------------------------------------------------- AVX2: pairs of 8 lanes

struct Pair8 {
  __m256 a, b;
};

// bits + 0x7FFF + (bit 16): rounds to nearest even into the upper 16 bits.
DSV3_TARGET_AVX2 inline __m256i bf16_carry8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
}

template <FloatType D>
DSV3_TARGET_AVX2 inline __m256 round8(__m256 v) {
  if constexpr (D == FloatType::kFloat32)
    return v;
  else if constexpr (D == FloatType::kFloat16)
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  else
    return _mm256_castsi256_ps(_mm256_and_si256(bf16_carry8(v), _mm256_set1_epi32(static_cast<int>(kBf16High))));
}

template <FloatType D>
DSV3_TARGET_AVX2 inline Pair8 round(Pair8 p) {
  return {round8<D>(p.a), round8<D>(p.b)};
}

template <FloatType D>
DSV3_TARGET_AVX2 inline __m256 load8(const void* p, int64_t i) {
  if constexpr (D == FloatType::kFloat32)
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  else
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
}

// Elements [i, i + 16).
template <FloatType D>
DSV3_TARGET_AVX2 inline Pair8 load16(const void* p, int64_t i) {
  if constexpr (D == FloatType::kBFloat16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(kBf16High))))};
  } else {
    return {load8<D>(p, i), load8<D>(p, i + 8)};
  }
}

template <FloatType D>
DSV3_TARGET_AVX2 inline void store16(void* p, int64_t i, Pair8 v) {
  if constexpr (D == FloatType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v.a);
    _mm256_storeu_ps(static_cast<float*>(p) + i + 8, v.b);
  } else if constexpr (D == FloatType::kFloat16) {
    auto* q = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i);
    _mm_storeu_si128(q, _mm256_cvtps_ph(v.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(q + 1, _mm256_cvtps_ph(v.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m256i even = _mm256_srli_epi32(bf16_carry8(v.a), 16);
    const __m256i odd = _mm256_and_si256(bf16_carry8(v.b), _mm256_set1_epi32(static_cast<int>(kBf16High)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), _mm256_or_si256(even, odd));
  }
}

// Pass 1 on [i, i + 16): h, stored to residual_out with a residual.
template <FloatType D, bool kResidual>
DSV3_TARGET_AVX2 inline Pair8 h16(const void* x, const void* res, void* res_out, int64_t i) {
  const Pair8 xv = load16<D>(x, i);
  if constexpr (!kResidual) return xv;
  const Pair8 rv = load16<D>(res, i);
  const Pair8 h = round<D>(Pair8{_mm256_add_ps(xv.a, rv.a), _mm256_add_ps(xv.b, rv.b)});
  store16<D>(res_out, i, h);
  return h;
}

// Pass 2 on [i, i + 16).
template <FloatType D>
DSV3_TARGET_AVX2 inline void out16(const void* h, const void* w, void* out, int64_t i, __m256 inv) {
  const Pair8 hv = load16<D>(h, i), wv = load16<D>(w, i);
  const Pair8 normed = round<D>(Pair8{_mm256_mul_ps(hv.a, inv), _mm256_mul_ps(hv.b, inv)});
  store16<D>(out, i, Pair8{_mm256_mul_ps(wv.a, normed.a), _mm256_mul_ps(wv.b, normed.b)});
}

// The last D % 16 elements run through the same code on zero-padded copies (zeros add nothing to
// the sum of squares).
template <FloatType D, bool kResidual>
DSV3_TARGET_AVX2 void rms_norm_row_avx2(const RowArgs& r) {
  constexpr int64_t es = elem_size(D);
  const int64_t d = r.d, body = d / 16 * 16, tail = d - body;
  alignas(32) unsigned char tx[16 * es] = {}, tr[16 * es] = {}, th[16 * es] = {}, tw[16 * es] = {}, to[16 * es];
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= body; i += 32) {
    const Pair8 h = h16<D, kResidual>(r.x, r.residual, r.residual_out, i);
    const Pair8 g = h16<D, kResidual>(r.x, r.residual, r.residual_out, i + 16);
    a0 = _mm256_fmadd_ps(h.a, h.a, a0);
    a1 = _mm256_fmadd_ps(h.b, h.b, a1);
    a2 = _mm256_fmadd_ps(g.a, g.a, a2);
    a3 = _mm256_fmadd_ps(g.b, g.b, a3);
  }
  if (i < body) {
    const Pair8 h = h16<D, kResidual>(r.x, r.residual, r.residual_out, i);
    a0 = _mm256_fmadd_ps(h.a, h.a, a0);
    a1 = _mm256_fmadd_ps(h.b, h.b, a1);
  }
  if (tail) {
    std::memcpy(tx, static_cast<const unsigned char*>(r.x) + body * es, tail * es);
    if constexpr (kResidual) std::memcpy(tr, static_cast<const unsigned char*>(r.residual) + body * es, tail * es);
    const Pair8 h = h16<D, kResidual>(tx, tr, th, 0);
    a0 = _mm256_fmadd_ps(h.a, h.a, a0);
    a1 = _mm256_fmadd_ps(h.b, h.b, a1);
    if constexpr (kResidual) std::memcpy(static_cast<unsigned char*>(r.residual_out) + body * es, th, tail * es);
  }
  const __m256 s8 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m256 inv = _mm256_set1_ps(inv_rms(_mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))), d, r.eps));
  const void* h = kResidual ? r.residual_out : r.x;
  for (i = 0; i < body; i += 16) out16<D>(h, r.weight, r.out, i, inv);
  if (tail) {
    if constexpr (!kResidual) std::memcpy(th, tx, sizeof th);
    std::memcpy(tw, static_cast<const unsigned char*>(r.weight) + body * es, tail * es);
    out16<D>(th, tw, to, 0, inv);
    std::memcpy(static_cast<unsigned char*>(r.out) + body * es, to, tail * es);
  }
}

// ---------------------------------------------------------------- AVX-512: pairs of 16 lanes

struct Pair16 {
  __m512 a, b;
};

DSV3_AVX512 inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }

DSV3_AVX512 inline __m512i bf16_carry16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
}

template <FloatType D>
DSV3_AVX512 inline __m512 round16(__m512 v) {
  if constexpr (D == FloatType::kFloat32)
    return v;
  else if constexpr (D == FloatType::kFloat16)
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  else
    return _mm512_castsi512_ps(_mm512_and_si512(bf16_carry16(v), _mm512_set1_epi32(static_cast<int>(kBf16High))));
}

template <FloatType D>
DSV3_AVX512 inline Pair16 round(Pair16 p) {
  return {round16<D>(p.a), round16<D>(p.b)};
}

// Elements [i, i + 32) of mask m (masked-off lanes load 0).
template <FloatType D>
DSV3_AVX512 inline Pair16 load32(const void* p, int64_t i, __mmask32 m) {
  if constexpr (D == FloatType::kBFloat16) {
    const __m512i v = _mm512_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(kBf16High))))};
  } else {
    return {fp8k::load_f32<D>(p, i, static_cast<__mmask16>(m)),
            fp8k::load_f32<D>(p, i + 16, static_cast<__mmask16>(m >> 16))};
  }
}

template <FloatType D>
DSV3_AVX512 inline void store32(void* p, int64_t i, Pair16 v, __mmask32 m) {
  if constexpr (D == FloatType::kBFloat16) {
    const __m512i even = _mm512_srli_epi32(bf16_carry16(v.a), 16);
    // (odd & 0xFFFF0000) | even in one op (truth table 0xEA: A & B | C)
    const __m512i both = _mm512_ternarylogic_epi32(bf16_carry16(v.b), _mm512_set1_epi32(static_cast<int>(kBf16High)),
                                                   even, 0xEA);
    _mm512_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, both);
  } else {
    fp8k::store_f32<D>(p, i, v.a, static_cast<__mmask16>(m));
    fp8k::store_f32<D>(p, i + 16, v.b, static_cast<__mmask16>(m >> 16));
  }
}

template <FloatType D, bool kResidual>
DSV3_AVX512 inline Pair16 h32(const void* x, const void* res, void* res_out, int64_t i, __mmask32 m) {
  const Pair16 xv = load32<D>(x, i, m);
  if constexpr (!kResidual) return xv;
  const Pair16 rv = load32<D>(res, i, m);
  const Pair16 h = round<D>(Pair16{_mm512_add_ps(xv.a, rv.a), _mm512_add_ps(xv.b, rv.b)});
  store32<D>(res_out, i, h, m);
  return h;
}

template <FloatType D>
DSV3_AVX512 inline void out32(const void* h, const void* w, void* out, int64_t i, __m512 inv, __mmask32 m) {
  const Pair16 hv = load32<D>(h, i, m), wv = load32<D>(w, i, m);
  const Pair16 normed = round<D>(Pair16{_mm512_mul_ps(hv.a, inv), _mm512_mul_ps(hv.b, inv)});
  store32<D>(out, i, Pair16{_mm512_mul_ps(wv.a, normed.a), _mm512_mul_ps(wv.b, normed.b)}, m);
}

// Full blocks run with the constant mask (plain loads and stores), the last D % 32 elements with a
// partial one.
template <FloatType D, bool kResidual>
DSV3_AVX512 void rms_norm_row_avx512(const RowArgs& r) {
  const int64_t d = r.d;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= d; i += 64) {
    const Pair16 h = h32<D, kResidual>(r.x, r.residual, r.residual_out, i, ~__mmask32(0));
    const Pair16 g = h32<D, kResidual>(r.x, r.residual, r.residual_out, i + 32, ~__mmask32(0));
    a0 = _mm512_fmadd_ps(h.a, h.a, a0);
    a1 = _mm512_fmadd_ps(h.b, h.b, a1);
    a2 = _mm512_fmadd_ps(g.a, g.a, a2);
    a3 = _mm512_fmadd_ps(g.b, g.b, a3);
  }
  if (i + 32 <= d) {
    const Pair16 h = h32<D, kResidual>(r.x, r.residual, r.residual_out, i, ~__mmask32(0));
    a0 = _mm512_fmadd_ps(h.a, h.a, a0);
    a1 = _mm512_fmadd_ps(h.b, h.b, a1);
    i += 32;
  }
  if (i < d) {
    const Pair16 h = h32<D, kResidual>(r.x, r.residual, r.residual_out, i, tail_mask32(d - i));
    a0 = _mm512_fmadd_ps(h.a, h.a, a0);
    a1 = _mm512_fmadd_ps(h.b, h.b, a1);
  }
  const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
  const __m512 inv = _mm512_set1_ps(inv_rms(_mm512_reduce_add_ps(sum), d, r.eps));
  const void* h = kResidual ? r.residual_out : r.x;
  for (i = 0; i + 32 <= d; i += 32) out32<D>(h, r.weight, r.out, i, inv, ~__mmask32(0));
  if (i < d) out32<D>(h, r.weight, r.out, i, inv, tail_mask32(d - i));
}

#pragma GCC diagnostic pop

#endif  // __x86_64__

}  // namespace dsv3::norm::cpu
