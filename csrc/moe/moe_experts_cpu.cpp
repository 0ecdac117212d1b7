// CPU kernels of the routed-expert ops moe_permute, grouped_gemm, silu_mul, moe_unpermute and
// fused_moe (schemas in registration.cpp, semantics and rounding points in
// dsv3_kernels/reference/moe.py).
//
// The expert GEMMs run as work items of (one expert's run of rows, <= kTileRows) x (a tile of
// kBlock output columns), in parallel, each writing its own block of an fp32 [rows, N] buffer.
// How a tile multiplies depends on the CPU (Path below); the A operand is brought once into the
// form that path takes. fused_moe is one kernel over that machinery: the (token, choice) pairs
// are sorted by expert, each item computes its gate and up columns, rounds them to bf16 and
// applies SiLU-mul (and the 1x128 quantization with FP8 weights) right away, then items of the
// down projection fill a [pairs, D] buffer and every token sums its rows in fp32.
//
// DSV3_KERNELS_CPU_ISA picks the level (common/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "common/torch_glue.h"
#include "moe/moe_checks.h"
#include "moe/moe_experts_cpu_kernels.h"
#include "moe/moe_experts_cpu_kernels_avx2.h"

namespace dsv3::moe::cpu {
namespace {

constexpr int64_t kBlock = 128;  // FP8 scale block, and the column tile of the GEMM work items
// Rows of one expert per work item: bounds an item's A rows swept per B panel (as fp8_gemm's
// kPanelRows) while a hot expert still splits across threads.
constexpr int64_t kTileRows = 256;
// Up to this many rows, the FP8 tiles convert B in registers (read once per group of rows of A);
// above it they convert a B panel once and reuse it (fp8_cpu.cpp measured these thresholds).
constexpr int64_t kSmallMaxRows = 48;
constexpr int64_t kDecodeMaxRows = 4;
// Work per parallel_for task of the row passes (copies, quantization, combine), in elements.
constexpr int64_t kGrainElems = 1 << 16;

int64_t grain_for(int64_t elems_per_item) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item)); }

inline float e4m3_to_float(uint8_t bits) {
  return static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits()));
}

inline float bf16_to_float(uint16_t bits) {
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

// ---------------------------------------------------------------- GEMM tiles

// How the expert GEMMs run on this CPU, which fixes the form of their A operand.
enum class Path {
  kBf16Dot,    // bf16 weights, avx512_bf16: A raw bf16 [rows, K], vdpbf16ps on both operands
  kFp8Dot,     // FP8 weights, avx512_bf16: A e4m3 widened to bf16 by fp8's table (uint16 [rows, K])
               // and its 1x128 scales [rows, K/128]
  kFp8Avx512,  // FP8 weights, AVX-512: A dequantized to fp32 [rows, K], fp8's fp32 FMA tiles
  kBf16Avx2,   // bf16 weights, AVX2 (also the avx512 level): A as fp32 [rows, K] in the even / odd
               // order of moe_experts_cpu_kernels_avx2.h, B widened in registers
  kFp8Avx2,    // FP8 weights, AVX2: A dequantized to fp32 [rows, K], fp8_cpu_gemm_avx2.h's tiles
  kPortable,   // A as fp32 values [rows, K] (dequantized); B decoded to fp32 one row at a time
};

Path gemm_path(bool fp8) {
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512Bf16)) return fp8 ? Path::kFp8Dot : Path::kBf16Dot;
  if (fp8 && cpu_isa_at_least(CpuIsa::kAvx512)) return Path::kFp8Avx512;
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return fp8 ? Path::kFp8Avx2 : Path::kBf16Avx2;
#endif
  return Path::kPortable;
}

size_t a_elem_bytes(Path p) { return p == Path::kBf16Dot || p == Path::kFp8Dot ? 2 : 4; }

// rows x k values of src -> dst in `path`'s A form. src is raw bf16 (src_scale null) or e4m3
// with 1x128 scales src_scale [rows, k/128] (k a multiple of 128); kFp8Dot keeps its scales apart.
void to_gemm_form(Path path, const void* src, const float* src_scale, int64_t rows, int64_t k, void* dst) {
  switch (path) {
    case Path::kBf16Dot: std::memcpy(dst, src, rows * k * sizeof(uint16_t)); return;
#if defined(__x86_64__)
    case Path::kFp8Dot:
      fp8k::e4m3_to_bf16_avx512bf16(static_cast<const uint8_t*>(src), static_cast<uint16_t*>(dst), rows * k);
      return;
    case Path::kFp8Avx512:
      fp8k::dequant_a_avx512(static_cast<const uint8_t*>(src), src_scale, static_cast<float*>(dst), rows, k);
      return;
    case Path::kBf16Avx2:  // row by row: the order restarts with each row (k need not be a multiple of 16)
      for (int64_t r = 0; r < rows; ++r)
        bf16_to_f32_evenodd_avx2(static_cast<const uint16_t*>(src) + r * k, static_cast<float*>(dst) + r * k, k);
      return;
    case Path::kFp8Avx2:
      fp8k::dequant_a_avx2(static_cast<const uint8_t*>(src), src_scale, static_cast<float*>(dst), rows, k);
      return;
#endif
    default: break;
  }
  float* out = static_cast<float*>(dst);
  if (src_scale == nullptr) {
    const auto* x = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < rows * k; ++i) out[i] = bf16_to_float(x[i]);
    return;
  }
  const auto* x = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < rows * k; ++i) out[i] = e4m3_to_float(x[i]) * src_scale[(i / k) * (k / kBlock) + (i % k) / kBlock];
}

// One expert GEMM: c[r, j] = sum_k A[r, k] * B[j, k] in fp32.
struct Gemm {
  Path path;
  const void* a;         // [rows, k] in the path's form
  const float* a_scale;  // [rows, k/128] (kFp8Dot only)
  const void* b;         // the expert's weight [n, k]: bf16, or e4m3 with b_scale [ceil(n/128), k/128]
  const float* b_scale;  // null for bf16
  int64_t k, n;
  float* c;              // [rows, n]
};

// Per-task scratch of the tiles.
struct Scratch {
  std::vector<uint16_t> panel16;  // fp8's bf16 B panel
  std::vector<float> panel32;     // its fp32 B panel, or a decoded B row (portable)
  std::vector<float> scales;      // a_scale * b_scale_inv cache of fp8's few-rows tile (avx2: the scaled A)
};

// The portable tile: each B row decoded to fp32 once, then dotted with every row of A.
void gemm_tile_portable(const Gemm& g, int64_t r0, int64_t r1, int64_t n0, int64_t n1, std::vector<float>& brow) {
  const int64_t k = g.k, kblocks = k / kBlock;
  const float* a = static_cast<const float*>(g.a);
  brow.resize(k);
  for (int64_t j = n0; j < n1; ++j) {
    if (g.b_scale == nullptr) {
      const auto* b = static_cast<const uint16_t*>(g.b) + j * k;
      for (int64_t i = 0; i < k; ++i) brow[i] = bf16_to_float(b[i]);
    } else {
      const auto* b = static_cast<const uint8_t*>(g.b) + j * k;
      const float* s = g.b_scale + (j / kBlock) * kblocks;
      for (int64_t i = 0; i < k; ++i) brow[i] = e4m3_to_float(b[i]) * s[i / kBlock];
    }
    for (int64_t r = r0; r < r1; ++r) {
      // 8 independent sums (k is a multiple of 8), which the compiler can keep in a vector.
      float acc[8] = {};
      for (int64_t i = 0; i < k; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += a[r * k + i + l] * brow[i + l];
      g.c[r * g.n + j] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  }
}

// Rows [r0, r1) x columns [n0, n1) of g.c; n0 a multiple of kBlock, n1 - n0 <= kBlock. next (or
// null): the first B row (of the same K) this thread's next tile reads, which the AVX2 tiles
// prefetch as they near their end.
void gemm_tile(const Gemm& g, int64_t r0, int64_t r1, int64_t n0, int64_t n1, Scratch& s,
               const void* next = nullptr) {
#if defined(__x86_64__)
  const int64_t m = r1 - r0, k = g.k, n = g.n;
  const auto* b8 = static_cast<const uint8_t*>(g.b);
  switch (g.path) {
    case Path::kBf16Dot:
      gemm_bf16_avx512bf16(static_cast<const uint16_t*>(g.a), static_cast<const uint16_t*>(g.b), k, n, r0, r1,
                                 n0, n1, g.c);
      return;
    case Path::kFp8Dot: {
      const auto* a = static_cast<const uint16_t*>(g.a);
      if (m <= kSmallMaxRows) {
        s.scales.resize(m * (k / kBlock));
        fp8k::gemm_small_avx512bf16(a + r0 * k, g.a_scale + r0 * (k / kBlock), m, b8, g.b_scale, k, n, n0, n1,
                                    g.c + r0 * n, s.scales.data());
        return;
      }
      // The panels of kPanelN B rows tile [n0, n1): n0 is a multiple of kBlock, itself of kPanelN.
      s.panel16.resize(fp8k::kPanelN * fp8k::kPanelKbf16);
      for (int64_t p = n0; p < n1; p += fp8k::kPanelN)
        fp8k::gemm_panel_avx512bf16(a, g.a_scale, r0, r1, b8, g.b_scale, k, n, p, g.c, s.panel16.data());
      return;
    }
    case Path::kFp8Avx512: {
      const auto* a = static_cast<const float*>(g.a);
      if (m <= kDecodeMaxRows) {
        fp8k::gemm_decode_avx512(a + r0 * k, m, b8, g.b_scale, k, n, n0, n1, g.c + r0 * n);
        return;
      }
      s.panel32.resize(fp8k::kPanelN * fp8k::kPanelK);
      for (int64_t p = n0; p < n1; p += fp8k::kPanelN)
        fp8k::gemm_panel_avx512(a, r0, r1, b8, g.b_scale, k, n, p, g.c, s.panel32.data());
      return;
    }
    case Path::kBf16Avx2:
      gemm_bf16_avx2_any(static_cast<const float*>(g.a), static_cast<const uint16_t*>(g.b), k, n, r0, r1, n0, n1,
                         static_cast<const uint16_t*>(next), g.c);
      return;
    case Path::kFp8Avx2: {
      const auto* a = static_cast<const float*>(g.a);
      if (m <= fp8k::kSmallMaxRowsAvx2) {
        s.scales.resize(fp8k::small_scratch_avx2(m, k));
        fp8k::gemm_small_avx2_any(a + r0 * k, m, b8, g.b_scale, k, n, n0, n1, static_cast<const uint8_t*>(next),
                                  g.c + r0 * n, s.scales.data());
        return;
      }
      s.panel32.resize(fp8k::kPanelN * fp8k::kPanelK);
      for (int64_t p = n0; p < n1; p += fp8k::kPanelN)
        fp8k::gemm_panel_avx2(a, r0, r1, b8, g.b_scale, k, n, p, g.c, s.panel32.data());
      return;
    }
    case Path::kPortable: break;
  }
#endif
  gemm_tile_portable(g, r0, r1, n0, n1, s.panel32);
}

// A run of rows [r0, r1) of one expert: one work item of the GEMMs (times the column tiles).
struct RowRun {
  int64_t expert, r0, r1;
};

// Appends rows [lo, hi) of `expert` as runs of at most kTileRows rows, split evenly.
void add_runs(std::vector<RowRun>& runs, int64_t expert, int64_t lo, int64_t hi) {
  const int64_t pieces = cdiv(hi - lo, kTileRows);
  for (int64_t p = 0; p < pieces; ++p)
    runs.push_back({expert, lo + (hi - lo) * p / pieces, lo + (hi - lo) * (p + 1) / pieces});
}

// ---------------------------------------------------------------- row passes

// x[0..len) rounded to bf16 and back, in place.
void round_bf16(float* x, int64_t len) {
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
void silu_mul_f32(const float* gate, const float* up, float* h, int64_t len) {
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

Grouping group_by_expert(const int32_t* ids, int64_t pairs, int64_t experts, int64_t align, int64_t rows) {
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

// ---------------------------------------------------------------- moe_permute

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& hidden,
                                                                           const at::Tensor& topk_ids,
                                                                           int64_t num_experts, int64_t align,
                                                                           bool quant) {
  check_moe_permute(hidden, topk_ids, num_experts, align, quant);
  const int64_t t = hidden.size(0), d = hidden.size(1), topk = topk_ids.size(1);
  const int64_t rows = permuted_rows(t, topk, num_experts, align), kblocks = d / kBlock;
  const Grouping g = group_by_expert(topk_ids.const_data_ptr<int32_t>(), t * topk, num_experts, align, rows);
  at::Tensor offsets = at::empty({num_experts + 1}, topk_ids.options());
  std::copy(g.offsets.begin(), g.offsets.end(), offsets.data_ptr<int32_t>());
  at::Tensor inverse = at::empty({t, topk}, topk_ids.options());
  std::copy(g.inverse.begin(), g.inverse.end(), inverse.data_ptr<int32_t>());
  at::Tensor permuted = at::empty({rows, d}, hidden.options().dtype(quant ? at::kFloat8_e4m3fn : hidden.scalar_type()));
  at::Tensor scale = at::empty({quant ? rows : 0, quant ? kblocks : 0}, hidden.options().dtype(at::kFloat));
  if (rows == 0 || d == 0) return {permuted, quant ? scale : scale.view({0}), offsets, inverse};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "moe_permute_cpu", [&] {
    const scalar_t* x = hidden.const_data_ptr<scalar_t>();
    if (!quant) {
      scalar_t* out = permuted.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          if (g.pair[r] >= 0) std::memcpy(out + r * d, x + (g.pair[r] / topk) * d, d * sizeof(scalar_t));
          else std::fill(out + r * d, out + (r + 1) * d, static_cast<scalar_t>(0.0f));
        }
      });
      return;
    }
    // Each token is quantized once, then its bytes go to its topk rows.
    std::vector<uint8_t> q(t * d);
    std::vector<float> qs(t * kblocks);
    at::parallel_for(0, t * kblocks, grain_for(kBlock), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) qs[i] = quantize_block(x + i * kBlock, q.data() + i * kBlock, kBlock);
    });
    auto* out = reinterpret_cast<uint8_t*>(permuted.data_ptr());
    float* out_scale = scale.data_ptr<float>();
    // A zero row's blocks get the scale act_quant gives zeros: max(0, 1e-4) / 448.
    const float zero_scale = fp8k::block_scale(0.0f, false);
    at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t tok = g.pair[r] / topk;
        if (g.pair[r] >= 0) {
          std::memcpy(out + r * d, q.data() + tok * d, d);
          std::copy(qs.begin() + tok * kblocks, qs.begin() + (tok + 1) * kblocks, out_scale + r * kblocks);
        } else {
          std::memset(out + r * d, 0, d);
          std::fill(out_scale + r * kblocks, out_scale + (r + 1) * kblocks, zero_scale);
        }
      }
    });
  });
  return {permuted, quant ? scale : scale.view({0}), offsets, inverse};
}

// ---------------------------------------------------------------- grouped_gemm

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                            const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale_inv) {
  const bool fp8 = check_grouped_gemm(a, b, expert_offsets, a_scale, b_scale_inv);
  const int64_t m = a.size(0), k = a.size(1), experts = b.size(0), n = b.size(1);
  at::Tensor out = at::zeros({m, n}, a.options().dtype(at::kBFloat16));
  if (m == 0 || n == 0) return out;

  // The expert of each row: the last segment covering it (the reference's loop overwrites), so
  // that overlapping segments of a malformed offsets tensor still give the reference's rows.
  std::vector<int64_t> owner(m, -1);
  const int32_t* offs = expert_offsets.const_data_ptr<int32_t>();
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t lo = std::clamp<int64_t>(offs[e], 0, m), hi = std::clamp<int64_t>(offs[e + 1], 0, m);
    std::fill(owner.begin() + lo, owner.begin() + std::max(lo, hi), e);
  }
  std::vector<RowRun> runs;
  for (int64_t r = 0; r < m;) {
    int64_t end = r + 1;
    while (end < m && owner[end] == owner[r]) ++end;
    if (owner[r] >= 0) add_runs(runs, owner[r], r, end);
    r = end;
  }
  if (runs.empty()) return out;

  const Path path = gemm_path(fp8);
  const float* as = fp8 ? a_scale->const_data_ptr<float>() : nullptr;
  const void* a_form = a.const_data_ptr();
  std::vector<uint8_t> a_buf;
  if (path != Path::kBf16Dot) {  // bf16 A is used as it is
    const size_t es = a_elem_bytes(path);
    a_buf.resize(m * k * es);
    const auto* src = static_cast<const uint8_t*>(a.const_data_ptr());
    const int64_t src_es = fp8 ? 1 : 2;
    at::parallel_for(0, m, grain_for(k), [&](int64_t begin, int64_t end) {
      to_gemm_form(path, src + begin * k * src_es, as ? as + begin * (k / kBlock) : nullptr, end - begin, k,
                   a_buf.data() + begin * k * es);
    });
    a_form = a_buf.data();
  }
  at::Tensor c = at::empty({m, n}, a.options().dtype(at::kFloat));
  const auto* pb = static_cast<const uint8_t*>(b.const_data_ptr());
  const int64_t b_bytes = n * k * (fp8 ? 1 : 2), bs_stride = cdiv(n, kBlock) * (k / kBlock);
  const float* bs = fp8 ? b_scale_inv->const_data_ptr<float>() : nullptr;
  auto* po = out.data_ptr<at::BFloat16>();
  const int64_t tiles = cdiv(n, kBlock);
  // The first B row of an item (the weight rows it streams).
  const auto b_rows = [&](int64_t item) { return pb + runs[item / tiles].expert * b_bytes + (item % tiles) * kBlock * k * (fp8 ? 1 : 2); };
  at::parallel_for(0, static_cast<int64_t>(runs.size()) * tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t item = begin; item < end; ++item) {
      const RowRun& run = runs[item / tiles];
      const int64_t n0 = (item % tiles) * kBlock, n1 = std::min(n, n0 + kBlock);
      const Gemm g{path, a_form, as, pb + run.expert * b_bytes, bs ? bs + run.expert * bs_stride : nullptr,
                   k, n, c.data_ptr<float>()};
      gemm_tile(g, run.r0, run.r1, n0, n1, s, item + 1 < end ? b_rows(item + 1) : nullptr);
      store_cols(g.c + run.r0 * n, po + run.r0 * n, run.r1 - run.r0, n, n0, n1);
    }
  });
  return out;
}

// ---------------------------------------------------------------- silu_mul

std::tuple<at::Tensor, at::Tensor> silu_mul_cpu(const at::Tensor& x, bool quant) {
  check_silu_mul(x, quant);
  const int64_t m = x.size(0), inter = x.size(1) / 2, kblocks = inter / kBlock;
  at::Tensor y = at::empty({m, inter}, x.options().dtype(quant ? at::kFloat8_e4m3fn : x.scalar_type()));
  at::Tensor scale = at::empty({quant ? m : 0, quant ? kblocks : 0}, x.options().dtype(at::kFloat));
  if (!quant) scale = scale.view({0});
  if (y.numel() == 0) return {y, scale};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, m, grain_for(2 * inter), [&](int64_t begin, int64_t end) {
      std::vector<float> row(2 * inter), h(inter);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < 2 * inter; ++i) row[i] = static_cast<float>(px[r * 2 * inter + i]);
        silu_mul_f32(row.data(), row.data() + inter, h.data(), inter);
        if (quant) {
          auto* q = reinterpret_cast<uint8_t*>(y.data_ptr()) + r * inter;
          float* s = scale.data_ptr<float>() + r * kblocks;
          for (int64_t blk = 0; blk < kblocks; ++blk)
            s[blk] = quantize_block(h.data() + blk * kBlock, q + blk * kBlock, kBlock);
        } else {
          store_cols(h.data(), y.data_ptr<scalar_t>() + r * inter, 1, inter, 0, inter);
        }
      }
    });
  });
  return {y, scale};
}

// ---------------------------------------------------------------- moe_unpermute

at::Tensor moe_unpermute_cpu(const at::Tensor& expert_out, const at::Tensor& topk_weights, const at::Tensor& inverse) {
  check_moe_unpermute(expert_out, topk_weights, inverse);
  const int64_t p = expert_out.size(0), d = expert_out.size(1), t = inverse.size(0), topk = inverse.size(1);
  at::Tensor out = at::empty({t, d}, expert_out.options());
  if (out.numel() == 0) return out;
  const float* w = topk_weights.const_data_ptr<float>();
  const int32_t* inv = inverse.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, expert_out.scalar_type(), "moe_unpermute_cpu", [&] {
    const scalar_t* x = expert_out.const_data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, t, grain_for(d * topk), [&](int64_t begin, int64_t end) {
      std::vector<float> acc(d);
      for (int64_t tok = begin; tok < end; ++tok) {
        const int32_t* rows = inv + tok * topk;
        const bool ok = std::all_of(rows, rows + topk, [&](int32_t r) { return r == -1 || (r >= 0 && r < p); });
        std::fill(acc.begin(), acc.end(), ok ? 0.0f : std::numeric_limits<float>::quiet_NaN());
        for (int64_t j = 0; ok && j < topk; ++j)
          if (rows[j] >= 0) weighted_add(acc.data(), x + rows[j] * d, d, w[tok * topk + j]);
        store_cols(acc.data(), po + tok * d, 1, d, 0, d);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- fused_moe

// A buffer left uninitialized. fused_moe writes each of its buffers in full before reading it;
// as std::vectors they were zero-filled first, 3.3 MB at T = 64 (E = 64, D = 1024, I = 256,
// top-6), on the calling thread while the other threads waited.
template <typename T>
class Uninit {
 public:
  explicit Uninit(int64_t n) : p_(n > 0 ? new T[n] : nullptr), n_(n) {}
  T* data() const { return p_.get(); }
  bool empty() const { return n_ == 0; }
  T& operator[](int64_t i) const { return p_[i]; }

 private:
  std::unique_ptr<T[]> p_;
  int64_t n_;
};

// float32 experts: the reference precision of a whole model (dsv3's fp32 path), nothing rounded.
// Per expert, its tokens through two ATen (BLAS) GEMMs, accumulated in expert order as the
// reference's loop does; speed is not the point of this path, agreement with it is.
at::Tensor fused_moe_f32(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  const int64_t t = hidden.size(0), topk = topk_ids.size(1), experts = w13.size(0), inter = w13.size(1) / 2;
  at::Tensor out = at::zeros_like(hidden);
  if (out.numel() == 0) return out;
  const int32_t* ids = topk_ids.const_data_ptr<int32_t>();
  const Grouping grp = group_by_expert(ids, t * topk, experts, 1, t * topk);
  at::Tensor pair = at::from_blob(const_cast<int64_t*>(grp.pair.data()), {grp.offsets[experts]}, at::kLong);
  at::Tensor weights = topk_weights.reshape({-1});
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t lo = grp.offsets[e], hi = grp.offsets[e + 1];
    if (hi == lo) continue;
    at::Tensor pairs = pair.slice(0, lo, hi);
    at::Tensor tok = at::floor_divide(pairs, topk);
    at::Tensor gate_up = at::mm(hidden.index_select(0, tok), w13[e].t());
    at::Tensor act = at::silu(gate_up.slice(1, 0, inter)) * gate_up.slice(1, inter, 2 * inter);
    at::Tensor y = at::mm(act, w2[e].t()) * weights.index_select(0, pairs).unsqueeze(1);
    out.index_add_(0, tok, y);
  }
  for (int64_t tok = 0; tok < t; ++tok)  // a token with an id outside [-1, E) gets NaN (-1: no expert)
    for (int64_t j = 0; j < topk; ++j)
      if (grp.inverse[tok * topk + j] < -1) out[tok].fill_(std::numeric_limits<float>::quiet_NaN());
  return out;
}

at::Tensor fused_moe_cpu(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                         const std::optional<at::Tensor>& w13_scale_inv, const std::optional<at::Tensor>& w2_scale_inv) {
  const bool fp8 = check_fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv, w2_scale_inv);
  if (hidden.scalar_type() == at::kFloat) return fused_moe_f32(hidden, w13, w2, topk_weights, topk_ids);
  const int64_t t = hidden.size(0), d = hidden.size(1), experts = w13.size(0), inter = w13.size(1) / 2;
  const int64_t topk = topk_ids.size(1), dblocks = d / kBlock, iblocks = inter / kBlock;
  at::Tensor out = at::empty({t, d}, hidden.options());
  if (out.numel() == 0) return out;

  // 1. The pairs sorted by expert: rows [offsets[e], offsets[e+1]) of the buffers below.
  const int32_t* ids = topk_ids.const_data_ptr<int32_t>();
  const Grouping grp = group_by_expert(ids, t * topk, experts, 1, t * topk);
  const int64_t rows = grp.offsets[experts];
  std::vector<RowRun> runs;
  for (int64_t e = 0; e < experts; ++e)
    if (grp.offsets[e + 1] > grp.offsets[e]) add_runs(runs, e, grp.offsets[e], grp.offsets[e + 1]);

  // 2. A [rows, D]: each pair's token in the GEMM path's form; with FP8 weights every token is
  // quantized (act_quant, 1x128) once first.
  const Path path = gemm_path(fp8);
  const size_t es = a_elem_bytes(path);
  const auto* x = reinterpret_cast<const uint16_t*>(hidden.const_data_ptr());
  Uninit<uint8_t> xq(fp8 ? t * d : 0);
  Uninit<float> xs(fp8 ? t * dblocks : 0);
  if (fp8) {
    const auto* xb = hidden.const_data_ptr<at::BFloat16>();
    at::parallel_for(0, t * dblocks, grain_for(kBlock), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) xs[i] = quantize_block(xb + i * kBlock, xq.data() + i * kBlock, kBlock);
    });
  }
  Uninit<uint8_t> a(rows * d * es);
  Uninit<float> a_scale(path == Path::kFp8Dot ? rows * dblocks : 0);
  at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tok = grp.pair[r] / topk;
      if (fp8) to_gemm_form(path, xq.data() + tok * d, xs.data() + tok * dblocks, 1, d, a.data() + r * d * es);
      else to_gemm_form(path, x + tok * d, nullptr, 1, d, a.data() + r * d * es);
      if (!a_scale.empty()) std::copy_n(xs.data() + tok * dblocks, dblocks, a_scale.data() + r * dblocks);
    }
  });

  // 3. Per item of (run, 128 columns of I): its gate and up columns [rows, 2I] in fp32, rounded
  // to bf16, then silu(gate) * up in fp32 -> H [rows, I] in the GEMM form: rounded to bf16, or
  // with FP8 weights quantized per 1x128 block (the tile is exactly one block).
  const auto* p13 = static_cast<const uint8_t*>(w13.const_data_ptr());
  const auto* p2 = static_cast<const uint8_t*>(w2.const_data_ptr());
  const int64_t wes = fp8 ? 1 : 2;
  const float* s13 = fp8 ? w13_scale_inv->const_data_ptr<float>() : nullptr;
  const float* s2 = fp8 ? w2_scale_inv->const_data_ptr<float>() : nullptr;
  Uninit<float> gate_up(rows * 2 * inter);
  Uninit<uint8_t> h(rows * inter * es);
  Uninit<float> h_scale(path == Path::kFp8Dot ? rows * iblocks : 0);
  const int64_t itiles = cdiv(inter, kBlock);
  // The first w13 / w2 row of a gate-up / down item (the gate rows of a gate-up item: its up rows
  // are `inter` rows on).
  const auto w13_rows = [&](int64_t item, int64_t row) {
    return p13 + (runs[item / itiles].expert * 2 * inter + row) * d * wes;
  };
  at::parallel_for(0, static_cast<int64_t>(runs.size()) * itiles, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    float act[kBlock];
    uint16_t act16[kBlock];
    uint8_t act8[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const RowRun& run = runs[item / itiles];
      const int64_t c0 = (item % itiles) * kBlock, c1 = std::min(inter, c0 + kBlock), len = c1 - c0;
      const Gemm g{path, a.data(), a_scale.data(), p13 + run.expert * 2 * inter * d * wes,
                   fp8 ? s13 + run.expert * 2 * iblocks * dblocks : nullptr, d, 2 * inter, gate_up.data()};
      gemm_tile(g, run.r0, run.r1, c0, c1, s, w13_rows(item, inter + c0));
      gemm_tile(g, run.r0, run.r1, inter + c0, inter + c1, s,
                item + 1 < end ? w13_rows(item + 1, ((item + 1) % itiles) * kBlock) : nullptr);
      for (int64_t r = run.r0; r < run.r1; ++r) {
        float* gu = gate_up.data() + r * 2 * inter;
        round_bf16(gu + c0, len);
        round_bf16(gu + inter + c0, len);
        silu_mul_f32(gu + c0, gu + inter + c0, act, len);
        uint8_t* dst = h.data() + (r * inter + c0) * es;
        if (fp8) {
          const float sc = quantize_block(act, act8, len);
          to_gemm_form(path, act8, &sc, 1, len, dst);
          if (!h_scale.empty()) h_scale[r * iblocks + c0 / kBlock] = sc;
        } else {
          store_cols(act, reinterpret_cast<at::BFloat16*>(act16), 1, len, 0, len);
          to_gemm_form(path, act16, nullptr, 1, len, dst);
        }
      }
    }
  });

  // 4. Per item of (run, 128 columns of D): the down projection, rounded to bf16 -> y [rows, D].
  Uninit<float> y(rows * d);
  const int64_t dtiles = cdiv(d, kBlock);
  const auto w2_rows = [&](int64_t item) {
    return p2 + (runs[item / dtiles].expert * d + (item % dtiles) * kBlock) * inter * wes;
  };
  at::parallel_for(0, static_cast<int64_t>(runs.size()) * dtiles, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t item = begin; item < end; ++item) {
      const RowRun& run = runs[item / dtiles];
      const int64_t n0 = (item % dtiles) * kBlock, n1 = std::min(d, n0 + kBlock);
      const Gemm g{path, h.data(), h_scale.data(), p2 + run.expert * d * inter * wes,
                   fp8 ? s2 + run.expert * dblocks * iblocks : nullptr, inter, d, y.data()};
      gemm_tile(g, run.r0, run.r1, n0, n1, s, item + 1 < end ? w2_rows(item + 1) : nullptr);
      for (int64_t r = run.r0; r < run.r1; ++r) round_bf16(y.data() + r * d + n0, n1 - n0);
    }
  });

  // 5. Each token sums its rows weighted, in fp32, in order of expert (then choice) as the
  // reference's per-expert loop accumulates; the id -1 (no expert) adds nothing, a token with an id
  // outside [-1, E) gets NaN.
  const float* w = topk_weights.const_data_ptr<float>();
  auto* po = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, t, grain_for(d * topk), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    std::vector<int64_t> order(topk);
    for (int64_t tok = begin; tok < end; ++tok) {
      const int32_t* inv = grp.inverse.data() + tok * topk;
      const bool ok = std::all_of(inv, inv + topk, [](int32_t r) { return r >= -1; });
      std::fill(acc.begin(), acc.end(), ok ? 0.0f : std::numeric_limits<float>::quiet_NaN());
      for (int64_t j = 0; j < topk; ++j) order[j] = j;
      std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return ids[tok * topk + i] < ids[tok * topk + j]; });
      for (int64_t j = 0; ok && j < topk; ++j)
        if (inv[order[j]] >= 0) weighted_add(acc.data(), y.data() + inv[order[j]] * d, d, w[tok * topk + order[j]]);
      store_cols(acc.data(), po + tok * d, 1, d, 0, d);
    }
  });
  return out;
}

}  // namespace
}  // namespace dsv3::moe::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) {
  using namespace dsv3::moe::cpu;
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("fused_moe", &fused_moe_cpu);
}
