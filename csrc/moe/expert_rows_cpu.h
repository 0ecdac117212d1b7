// What the CPU kernels of the expert ops (moe_permute, grouped_gemm, silu_mul, moe_unpermute,
// fused_moe: their <op>_cpu.cpp) share besides the GEMM tiles (expert_gemm_cpu.h): the grouping of
// the (token, choice) pairs by expert and the row passes around the GEMMs (copies, quantization,
// SiLU-mul, weighted sums), each at the CPU's level (DSV3_KERNELS_CPU_ISA, common/cpu_isa.h).
// Semantics and rounding points: dsv3_kernels/reference/moe.py.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/torch_glue.h"
#include "moe/expert_cpu_avx2.h"
#include "moe/expert_cpu_avx512.h"

namespace dsv3::moe::cpu {

constexpr int64_t kBlock = 128;  // FP8 scale block, and the column tile of the GEMM work items
// Work per parallel_for task of the row passes (copies, quantization, combine), in elements.
constexpr int64_t kGrainElems = 1 << 16;

inline int64_t grain_for(int64_t elems_per_item) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item)); }

// ---------------------------------------------------------------- row passes

// x[0..len) rounded to bf16 and back, in place.
inline void round_bf16(float* x, int64_t len) {
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return round_bf16_avx512(x, len);
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return round_bf16_avx2(x, len);
#endif
  for (int64_t i = 0; i < len; ++i) x[i] = static_cast<float>(c10::BFloat16(x[i]));
}

// Columns [n0, n1) of the rows of c [rows, n] (fp32) -> out [rows, n] of T.
template <typename T>
void store_cols(const float* c, T* out, int64_t rows, int64_t n, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return fp8k::convert_cols_avx512<float_type_of<T>()>(c, out, rows, n, n0, n1);
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return fp8k::convert_cols_avx2<float_type_of<T>()>(c, out, rows, n, n0, n1);
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = n0; j < n1; ++j) out[r * n + j] = static_cast<T>(c[r * n + j]);
}

// acc[0..len) += w * x[0..len), the product rounded to fp32 before the sum (as the reference).
template <typename T>
void weighted_add(float* acc, const T* x, int64_t len, float w) {
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return weighted_add_avx512<float_type_of<T>()>(acc, x, len, w);
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return weighted_add_avx2<float_type_of<T>()>(acc, x, len, w);
#endif
  for (int64_t i = 0; i < len; ++i) acc[i] += w * static_cast<float>(x[i]);
}

// act_quant of one block x[0..len) into q: returns its scale, max(amax, 1e-4) / 448.
template <typename T>
float quantize_block(const T* x, uint8_t* q, int64_t len) {
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return fp8k::quantize_tile_avx512<float_type_of<T>()>(x, q, len, 1, len, false);
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return fp8k::quantize_tile_avx2<float_type_of<T>()>(x, q, len, 1, len, false);
#endif
  float amax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < len; ++i) {
    const float v = std::fabs(static_cast<float>(x[i]));
    amax = std::max(amax, v);
    nan |= std::isnan(v);
  }
  const float scale = fp8k::block_scale(nan ? std::numeric_limits<float>::quiet_NaN() : amax, false);
  for (int64_t i = 0; i < len; ++i) q[i] = c10::Float8_e4m3fn(static_cast<float>(x[i]) / scale).x;
  return scale;
}

// h[i] = silu(gate[i]) * up[i] in fp32, silu(x) = x / (1 + exp(-x)) as torch computes it.
inline void silu_mul_f32(const float* gate, const float* up, float* h, int64_t len) {
  for (int64_t i = 0; i < len; ++i) h[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// ---------------------------------------------------------------- grouping by expert

// The (token, choice) pairs grouped by expert, in order of t * topk + j within an expert; each
// segment padded to a multiple of align rows.
struct Grouping {
  std::vector<int32_t> offsets;  // [E+1]: expert e's rows are [offsets[e], offsets[e+1])
  std::vector<int64_t> pair;     // [rows]: the pair t * topk + j of each row, -1 for padding
  std::vector<int32_t> inverse;  // [T * topk]: the row of each pair; -1 for the id -1 (no expert), -2 for a bad id
};

inline Grouping group_by_expert(const int32_t* ids, int64_t pairs, int64_t experts, int64_t align, int64_t rows) {
  Grouping g{std::vector<int32_t>(experts + 1, 0), std::vector<int64_t>(rows, -1), std::vector<int32_t>(pairs)};
  std::vector<int64_t> count(experts, 0);
  for (int64_t i = 0; i < pairs; ++i)
    if (ids[i] >= 0 && ids[i] < experts) ++count[ids[i]];
  for (int64_t e = 0; e < experts; ++e)
    g.offsets[e + 1] = static_cast<int32_t>(g.offsets[e] + cdiv(count[e], align) * align);
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t i = 0; i < pairs; ++i) {
    const int32_t id = ids[i];
    const bool placed = id >= 0 && id < experts;
    g.inverse[i] = placed ? static_cast<int32_t>(next[id]) : (id == -1 ? -1 : -2);
    if (placed) g.pair[next[id]++] = i;
  }
  return g;
}

}  // namespace dsv3::moe::cpu
