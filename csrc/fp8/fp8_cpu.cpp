// CPU kernels of the FP8 block-scaled ops (schemas in registration.cpp, semantics in
// dsv3_kernels/reference/fp8.py). The AVX-512 inner loops live in fp8_cpu_kernels.h, the AVX2
// ones in fp8_cpu_convert_avx2.h and fp8_cpu_gemm_avx2.h, and are picked at run time; everything
// else runs a portable scalar version built on the c10 types, which the compiler may
// auto-vectorize for the baseline ISA.
//
// DSV3_KERNELS_CPU_ISA picks the level (common/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/torch_glue.h"
#include "fp8/fp8_checks.h"
#include "fp8/fp8_cpu_convert_avx2.h"
#include "fp8/fp8_cpu_gemm_avx2.h"
#include "fp8/fp8_cpu_kernels.h"

namespace dsv3::fp8::cpu {

namespace {

// Work per parallel_for task, in elements, so small tensors do not pay for threads.
constexpr int64_t kGrainElems = 32768;
// The same for the cheap per-element passes before a gemm (act_quant, A conversion): waking
// the pool costs more than such a pass over a decode batch (16 x 7168 take ~0.05 ms).
constexpr int64_t kLightGrainElems = 1 << 18;

int64_t grain_for(int64_t elems_per_item, int64_t grain_elems = kGrainElems) {
  return std::max<int64_t>(1, grain_elems / std::max<int64_t>(1, elems_per_item));
}

inline float e4m3_to_float(uint8_t bits) { return static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits())); }

// ---------------------------------------------------------------- quantization

template <typename T>
float quantize_tile_scalar(const T* x, uint8_t* q, int64_t ld, int64_t rows, int64_t cols, bool ue8m0) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float v = std::fabs(static_cast<float>(x[r * ld + c]));
      amax = std::max(amax, v);
      nan |= std::isnan(v);
    }
  }
  const float scale = block_scale(nan ? std::numeric_limits<float>::quiet_NaN() : amax, ue8m0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      q[r * ld + c] = c10::Float8_e4m3fn(static_cast<float>(x[r * ld + c]) / scale).x;
    }
  }
  return scale;
}

// One scale for the tile rows x cols (row stride ld) of x; returns it.
template <typename T>
float quantize_tile(const T* x, uint8_t* q, int64_t ld, int64_t rows, int64_t cols, bool ue8m0) {
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return quantize_tile_avx512<float_type_of<T>()>(x, q, ld, rows, cols, ue8m0);
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return quantize_tile_avx2<float_type_of<T>()>(x, q, ld, rows, cols, ue8m0);
#endif
  return quantize_tile_scalar(x, q, ld, rows, cols, ue8m0);
}

std::tuple<at::Tensor, at::Tensor> act_quant_cpu(const at::Tensor& x, int64_t block_size, bool ue8m0) {
  check_act_quant(x, block_size);
  const int64_t k = x.size(-1);
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  const int64_t kblocks = cdiv(k, block_size);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  std::vector<int64_t> scale_shape = x.sizes().vec();
  scale_shape.back() = kblocks;
  auto scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (q.numel() == 0) return {q, scale};

  auto* pq = reinterpret_cast<uint8_t*>(q.data_ptr());
  float* ps = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "act_quant_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    // One item per (row, block), so that a few long rows still split across threads once
    // there is enough work for it (kLightGrainElems).
    at::parallel_for(0, rows * kblocks, grain_for(block_size, kLightGrainElems), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t off = (i / kblocks) * k + (i % kblocks) * block_size;
        ps[i] = quantize_tile(px + off, pq + off, k, 1, std::min(block_size, k - (i % kblocks) * block_size), ue8m0);
      }
    });
  });
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> weight_quant_cpu(const at::Tensor& w, int64_t block_size) {
  check_weight_quant(w, block_size);
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t nblocks = cdiv(n, block_size), kblocks = cdiv(k, block_size);
  auto q = at::empty({n, k}, w.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty({nblocks, kblocks}, w.options().dtype(at::kFloat));
  if (q.numel() == 0) return {q, scale};

  auto* pq = reinterpret_cast<uint8_t*>(q.data_ptr());
  float* ps = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "weight_quant_cpu", [&] {
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    // One item per block: it is read twice (amax, then quantize) while it sits in L2.
    at::parallel_for(0, nblocks * kblocks, grain_for(block_size * block_size), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r0 = (i / kblocks) * block_size, c0 = (i % kblocks) * block_size;
        const int64_t off = r0 * k + c0;
        ps[i] = quantize_tile(pw + off, pq + off, k, std::min(block_size, n - r0), std::min(block_size, k - c0),
                              false);
      }
    });
  });
  return {q, scale};
}

// ---------------------------------------------------------------- dequantization

template <typename T>
void dequant_span(const uint8_t* w, T* out, int64_t len, float scale) {
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return dequant_span_avx512<float_type_of<T>()>(w, out, len, scale);
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return dequant_span_avx2<float_type_of<T>()>(w, out, len, scale);
#endif
  for (int64_t c = 0; c < len; ++c) out[c] = static_cast<T>(e4m3_to_float(w[c]) * scale);
}

at::Tensor weight_dequant_cpu(const at::Tensor& w, const at::Tensor& scale_inv, int64_t block_size,
                              at::ScalarType dtype) {
  check_weight_dequant(w, scale_inv, block_size, dtype);
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t kblocks = cdiv(k, block_size);
  // The portable path goes through fp32 and ATen's conversion, as the reference does: a
  // scalar static_cast to bf16/fp16 writes NaN with other bits than ATen's vectorized one.
  if (!cpu_isa_at_least(CpuIsa::kAvx2) && dtype != at::kFloat && w.numel() > 0) {
    return weight_dequant_cpu(w, scale_inv, block_size, at::kFloat).to(dtype);
  }
  auto out = at::empty({n, k}, w.options().dtype(dtype));
  if (out.numel() == 0) return out;

  const auto* pw = reinterpret_cast<const uint8_t*>(w.const_data_ptr());
  const float* ps = scale_inv.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "weight_dequant_cpu", [&] {
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * kblocks, grain_for(block_size), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / kblocks, c0 = (i % kblocks) * block_size;
        dequant_span(pw + r * k + c0, po + r * k + c0, std::min(block_size, k - c0),
                     ps[(r / block_size) * kblocks + i % kblocks]);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- fp8_gemm

// With avx512_bf16, up to kSmallMaxRows rows of A each B block is converted in registers
// and read from memory once (decode, memory-bound); above it a converted bf16 B panel is
// reused across the rows (compute-bound). Converting B again per group of 8 rows still beats
// the panel path up to about 48 rows (1 thread, N = 2112, K = 7168: 10.5 vs 12.4 ms at 48,
// even at 64). Without avx512_bf16 the same split is done in fp32 at kDecodeMaxRows, and
// with AVX2 only at kSmallMaxRowsAvx2. See fp8_cpu_kernels.h and fp8_cpu_gemm_avx2.h.
constexpr int64_t kSmallMaxRows = 48;
constexpr int64_t kDecodeMaxRows = 4;
// Rows of A per task of the many-rows path (bounds the A' bytes swept per B panel).
constexpr int64_t kPanelRows = 256;

// A' = float(a) * a_scale per 128-block, [m, k] fp32.
at::Tensor dequant_a(const at::Tensor& a, const at::Tensor& a_scale) {
  const int64_t m = a.size(0), k = a.size(1), kblocks = k / kGemmBlock;
  auto out = at::empty({m, k}, a.options().dtype(at::kFloat));
  const auto* pa = reinterpret_cast<const uint8_t*>(a.const_data_ptr());
  const float* ps = a_scale.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, m, grain_for(k, kLightGrainElems), [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if (cpu_isa_at_least(CpuIsa::kAvx512)) return dequant_a_avx512(pa + begin * k, ps + begin * kblocks, po + begin * k, end - begin, k);
    if (cpu_isa_at_least(CpuIsa::kAvx2)) return dequant_a_avx2(pa + begin * k, ps + begin * kblocks, po + begin * k, end - begin, k);
#endif
    for (int64_t i = begin * k; i < end * k; ++i) po[i] = e4m3_to_float(pa[i]) * ps[(i / k) * kblocks + (i % k) / kGemmBlock];
  });
  return out;
}

// c[m, n] = A' B'^T in fp32, portable version: one converted row of B' dotted with every row of A'.
void gemm_scalar(const float* a, int64_t m, const uint8_t* b, const float* b_scale, int64_t k, int64_t n, float* c) {
  const int64_t kblocks = k / kGemmBlock;
  at::parallel_for(0, n, grain_for(m * k), [&](int64_t begin, int64_t end) {
    std::vector<float> brow(k);
    for (int64_t j = begin; j < end; ++j) {
      const float* srow = b_scale + (j / kGemmBlock) * kblocks;
      for (int64_t i = 0; i < k; ++i) brow[i] = e4m3_to_float(b[j * k + i]) * srow[i / kGemmBlock];
      for (int64_t r = 0; r < m; ++r) {
        float acc = 0.0f;
        for (int64_t i = 0; i < k; ++i) acc += a[r * k + i] * brow[i];
        c[r * n + j] = acc;
      }
    }
  });
}

#if defined(__x86_64__)
void gemm_avx512(const float* a, int64_t m, const uint8_t* b, const float* b_scale, int64_t k, int64_t n, float* c) {
  if (m <= kDecodeMaxRows) {
    // Parallel over groups of kNR columns, so every task runs full-width micro-kernels.
    at::parallel_for(0, cdiv(n, kNR), grain_for(k), [&](int64_t begin, int64_t end) {
      gemm_decode_avx512(a, m, b, b_scale, k, n, begin * kNR, std::min(n, end * kNR), c);
    });
    return;
  }
  const int64_t panels = cdiv(n, kPanelN), mchunks = cdiv(m, kPanelRows);
  at::parallel_for(0, panels * mchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(kPanelN * kPanelK);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / panels) * kPanelRows;
      gemm_panel_avx512(a, m0, std::min(m, m0 + kPanelRows), b, b_scale, k, n, (t % panels) * kPanelN, c,
                        panel.data());
    }
  });
}

// Columns [n0, n1) of the fp32 result c [m, n] -> out (bf16 or fp16; nothing to do for fp32).
void convert_cols(const float* c, void* out, at::ScalarType out_dtype, int64_t m, int64_t n, int64_t n0,
                  int64_t n1) {
  if (cpu_isa_at_least(CpuIsa::kAvx512)) {
    if (out_dtype == at::kBFloat16) convert_cols_avx512<FloatType::kBFloat16>(c, out, m, n, n0, n1);
    if (out_dtype == at::kHalf) convert_cols_avx512<FloatType::kFloat16>(c, out, m, n, n0, n1);
    return;
  }
  if (out_dtype == at::kBFloat16) convert_cols_avx2<FloatType::kBFloat16>(c, out, m, n, n0, n1);
  if (out_dtype == at::kHalf) convert_cols_avx2<FloatType::kFloat16>(c, out, m, n, n0, n1);
}

// AVX2: a = A' [m, k] fp32. Few rows: parallel over groups of columns, every thread streams its own
// part of B once and converts its columns of c to out_dtype; many rows: B panels per task.
at::Tensor gemm_avx2(const float* a, int64_t m, const uint8_t* b, const float* b_scale, int64_t k, int64_t n,
                     const at::Tensor& c, at::ScalarType out_dtype) {
  float* pc = c.data_ptr<float>();
  if (m <= kSmallMaxRowsAvx2) {
    at::Tensor out = out_dtype == at::kFloat ? c : at::empty({m, n}, c.options().dtype(out_dtype));
    void* po = out.data_ptr();
    const int64_t nr = small_nr_avx2(m);
    at::parallel_for(0, cdiv(n, nr), grain_for(nr * k), [&](int64_t begin, int64_t end) {
      std::vector<float> a_blk(small_scratch_avx2(m, k));
      const int64_t n0 = begin * nr, n1 = std::min(n, end * nr);
      gemm_small_avx2_any(a, m, b, b_scale, k, n, n0, n1, nullptr, pc, a_blk.data());
      convert_cols(pc, po, out_dtype, m, n, n0, n1);
    });
    return out;
  }
  const int64_t panels = cdiv(n, kPanelN), mchunks = cdiv(m, kPanelRows);
  at::parallel_for(0, panels * mchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(kPanelN * kPanelK);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / panels) * kPanelRows;
      gemm_panel_avx2(a, m0, std::min(m, m0 + kPanelRows), b, b_scale, k, n, (t % panels) * kPanelN, pc,
                      panel.data());
    }
  });
  return c.to(out_dtype);
}

// With avx512_bf16: A goes to raw bf16 once; then few rows take gemm_small_avx512bf16, many
// rows B panels per task. The a_scale * b_scale_inv products are applied per 128-block
// inside the micro-kernels. c: fp32 [m, n] scratch (the result when out_dtype is fp32).
at::Tensor gemm_avx512bf16(const uint8_t* a, const float* a_scale, int64_t m, const uint8_t* b,
                           const float* b_scale, int64_t k, int64_t n, const at::Tensor& c,
                           at::ScalarType out_dtype) {
  float* pc = c.data_ptr<float>();
  std::vector<uint16_t> a_bf16(m * k);
  at::parallel_for(0, m, grain_for(k, kLightGrainElems), [&](int64_t begin, int64_t end) {
    e4m3_to_bf16_avx512bf16(a + begin * k, a_bf16.data() + begin * k, (end - begin) * k);
  });
  if (m <= kSmallMaxRows) {
    at::Tensor out = out_dtype == at::kFloat ? c : at::empty({m, n}, c.options().dtype(out_dtype));
    void* po = out.data_ptr();
    // Parallel over pairs of columns only: every thread streams its own part of B once, and
    // converts its own columns to out_dtype (no separate pass, no second pool wake-up).
    at::parallel_for(0, cdiv(n, kNRsmall), grain_for(kNRsmall * k), [&](int64_t begin, int64_t end) {
      std::vector<float> scales(m * (k / kGemmBlk));
      const int64_t n0 = begin * kNRsmall, n1 = std::min(n, end * kNRsmall);
      gemm_small_avx512bf16(a_bf16.data(), a_scale, m, b, b_scale, k, n, n0, n1, pc, scales.data());
      convert_cols(pc, po, out_dtype, m, n, n0, n1);
    });
    return out;
  }
  const int64_t panels = cdiv(n, kPanelN), mchunks = cdiv(m, kPanelRows);
  at::parallel_for(0, panels * mchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> panel(kPanelN * kPanelKbf16);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / panels) * kPanelRows;
      gemm_panel_avx512bf16(a_bf16.data(), a_scale, m0, std::min(m, m0 + kPanelRows), b, b_scale, k, n,
                            (t % panels) * kPanelN, pc, panel.data());
    }
  });
  return c.to(out_dtype);
}
#endif

// Whether a scale tensor holds a NaN or inf (its floats' exponent bits all set).
bool has_nonfinite(const at::Tensor& scale) {
  const auto* bits = reinterpret_cast<const uint32_t*>(scale.const_data_ptr<float>());
  uint32_t bad = 0;
  for (int64_t i = 0; i < scale.numel(); ++i) bad |= static_cast<uint32_t>((bits[i] & 0x7F800000u) == 0x7F800000u);
  return bad != 0;
}

// The reference's formula as it reads (reference/fp8.py): per 128-wide K block the fp32 sum of the
// products, times a_scale * b_scale_inv. For scales holding a NaN or inf only: the fast paths
// multiply the scales into the values, where an inf scale gives inf * 0 = NaN for a zero value
// that the block's partial sum would not see. Checking the scales costs ~1 us next to a GEMM
// (2112 x 7168: 1,008 of them); such scales come from corrupt data, so speed does not matter here.
at::Tensor gemm_blockwise(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                          const at::Tensor& b_scale_inv, at::ScalarType out_dtype) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  const at::Tensor af = a.to(at::kFloat), bf = b.to(at::kFloat);
  const at::Tensor b_scale = b_scale_inv.repeat_interleave(kGemmBlock, 0).narrow(0, 0, n);  // [N, K/128]
  at::Tensor out = at::zeros({m, n}, a.options().dtype(at::kFloat));
  for (int64_t kb = 0; kb < k / kGemmBlock; ++kb) {
    const at::Tensor partial = at::mm(af.narrow(1, kb * kGemmBlock, kGemmBlock), bf.narrow(1, kb * kGemmBlock, kGemmBlock).t());
    out += partial * (a_scale.select(1, kb).unsqueeze(1) * b_scale.select(1, kb).unsqueeze(0));
  }
  return out.to(out_dtype);
}

at::Tensor fp8_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                        const at::Tensor& b_scale_inv, at::ScalarType out_dtype) {
  check_fp8_gemm(a, a_scale, b, b_scale_inv, out_dtype);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  auto c = at::empty({m, n}, a.options().dtype(at::kFloat));
  if (m == 0) return c.to(out_dtype);
  if (has_nonfinite(a_scale) || has_nonfinite(b_scale_inv)) return gemm_blockwise(a, a_scale, b, b_scale_inv, out_dtype);

  const auto* pb = reinterpret_cast<const uint8_t*>(b.const_data_ptr());
  const float* ps = b_scale_inv.const_data_ptr<float>();
#if defined(__x86_64__)
  // Above the few-rows path the GEMM is compute-bound: fp32 where vdpbf16ps does not pay (cpu_isa.h).
  if (cpu_isa_at_least(CpuIsa::kAvx512Bf16) && (m <= kSmallMaxRows || cpu_bf16_gemm())) {
    return gemm_avx512bf16(reinterpret_cast<const uint8_t*>(a.const_data_ptr()), a_scale.const_data_ptr<float>(), m,
                           pb, ps, k, n, c, out_dtype);
  }
#endif
  const at::Tensor a_f32 = dequant_a(a, a_scale);
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512)) {
    gemm_avx512(a_f32.const_data_ptr<float>(), m, pb, ps, k, n, c.data_ptr<float>());
    return c.to(out_dtype);
  }
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return gemm_avx2(a_f32.const_data_ptr<float>(), m, pb, ps, k, n, c, out_dtype);
#endif
  gemm_scalar(a_f32.const_data_ptr<float>(), m, pb, ps, k, n, c.data_ptr<float>());
  return c.to(out_dtype);
}

}  // namespace
}  // namespace dsv3::fp8::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) {
  using namespace dsv3::fp8::cpu;
  m.impl("act_quant", &act_quant_cpu);
  m.impl("weight_quant", &weight_quant_cpu);
  m.impl("weight_dequant", &weight_dequant_cpu);
  m.impl("fp8_gemm", &fp8_gemm_cpu);
}
