// CPU kernel of fused_moe (schema in registration.cpp, semantics and rounding points in
// dsv3_kernels/reference/moe.py): one kernel over the expert GEMM machinery of expert_gemm_cpu.h.
// The (token, choice) pairs are sorted by expert, each item computes its gate and up columns,
// rounds them to bf16 and applies SiLU-mul (and the 1x128 quantization with FP8 weights) right
// away, then items of the down projection fill a [pairs, D] buffer and every token sums its rows
// in fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "moe/expert_gemm_cpu.h"
#include "moe/expert_rows_cpu.h"
#include "moe/moe_checks.h"

namespace dsv3::moe::cpu {
namespace {

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

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) { m.impl("fused_moe", &dsv3::moe::cpu::fused_moe_cpu); }
