// The expert GEMMs of the CPU kernels of grouped_gemm and fused_moe (grouped_gemm_cpu.cpp,
// fused_moe_cpu.cpp): work items of (one expert's run of rows, <= kTileRows) x (a tile of kBlock
// output columns), run in parallel, each writing its own block of an fp32 [rows, N] buffer. How a
// tile multiplies depends on the CPU (Path below); the A operand is brought once into the form
// that path takes. DSV3_KERNELS_CPU_ISA picks the level (common/cpu_isa.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "common/torch_glue.h"
#include "moe/expert_cpu_avx2.h"
#include "moe/expert_cpu_avx512.h"
#include "moe/expert_rows_cpu.h"

namespace dsv3::moe::cpu {

// Rows of one expert per work item: bounds an item's A rows swept per B panel (as fp8_gemm's
// kPanelRows) while a hot expert still splits across threads.
constexpr int64_t kTileRows = 256;
// Up to this many rows, the FP8 tiles convert B in registers (read once per group of rows of A);
// above it they convert a B panel once and reuse it (fp8_cpu.cpp measured these thresholds).
constexpr int64_t kSmallMaxRows = 48;
constexpr int64_t kDecodeMaxRows = 4;

inline float e4m3_to_float(uint8_t bits) {
  return static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits()));
}

inline float bf16_to_float(uint16_t bits) {
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

// How the expert GEMMs run on this CPU, which fixes the form of their A operand.
enum class Path {
  kBf16Dot,    // bf16 weights, avx512_bf16: A raw bf16 [rows, K], vdpbf16ps on both operands
  kFp8Dot,     // FP8 weights, avx512_bf16: A e4m3 widened to bf16 by fp8's table (uint16 [rows, K])
               // and its 1x128 scales [rows, K/128]
  kFp8Avx512,  // FP8 weights, AVX-512: A dequantized to fp32 [rows, K], fp8's fp32 FMA tiles
  kBf16Avx2,   // bf16 weights, AVX2 (also the avx512 level): A as fp32 [rows, K] in the even / odd
               // order of expert_cpu_avx2.h, B widened in registers
  kFp8Avx2,    // FP8 weights, AVX2: A dequantized to fp32 [rows, K], fp8_cpu_gemm_avx2.h's tiles
  kPortable,   // A as fp32 values [rows, K] (dequantized); B decoded to fp32 one row at a time
};

inline Path gemm_path(bool fp8) {
#if defined(__x86_64__)
  if (cpu_isa_at_least(CpuIsa::kAvx512Bf16)) return fp8 ? Path::kFp8Dot : Path::kBf16Dot;
  if (fp8 && cpu_isa_at_least(CpuIsa::kAvx512)) return Path::kFp8Avx512;
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return fp8 ? Path::kFp8Avx2 : Path::kBf16Avx2;
#endif
  return Path::kPortable;
}

inline size_t a_elem_bytes(Path p) { return p == Path::kBf16Dot || p == Path::kFp8Dot ? 2 : 4; }

// rows x k values of src -> dst in `path`'s A form. src is raw bf16 (src_scale null) or e4m3
// with 1x128 scales src_scale [rows, k/128] (k a multiple of 128); kFp8Dot keeps its scales apart.
inline void to_gemm_form(Path path, const void* src, const float* src_scale, int64_t rows, int64_t k, void* dst) {
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
inline void gemm_tile_portable(const Gemm& g, int64_t r0, int64_t r1, int64_t n0, int64_t n1, std::vector<float>& brow) {
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
inline void gemm_tile(const Gemm& g, int64_t r0, int64_t r1, int64_t n0, int64_t n1, Scratch& s,
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
inline void add_runs(std::vector<RowRun>& runs, int64_t expert, int64_t lo, int64_t hi) {
  const int64_t pieces = cdiv(hi - lo, kTileRows);
  for (int64_t p = 0; p < pieces; ++p)
    runs.push_back({expert, lo + (hi - lo) * p / pieces, lo + (hi - lo) * (p + 1) / pieces});
}

}  // namespace dsv3::moe::cpu
