// CPU kernel of grouped_gemm (schema in registration.cpp, semantics in dsv3_kernels/reference/moe.py):
// each expert's rows times its weight, as the expert GEMM work items of expert_gemm_cpu.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "moe/expert_gemm_cpu.h"
#include "moe/expert_rows_cpu.h"
#include "moe/moe_checks.h"

namespace dsv3::moe::cpu {
namespace {

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                            const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale_inv) {
  const bool fp8 = check_grouped_gemm(a, b, expert_offsets, a_scale, b_scale_inv);
  const int64_t m = a.size(0), k = a.size(1), experts = b.size(0), n = b.size(1);
  at::Tensor out = at::empty({m, n}, a.options().dtype(at::kBFloat16));
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
  auto* po = out.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < m;) {
    int64_t end = r + 1;
    while (end < m && owner[end] == owner[r]) ++end;
    if (owner[r] >= 0) {
      add_runs(runs, owner[r], r, end);
    } else {  // rows no expert covers are 0 (zeroed here only: a decode step's GEMMs cover every row)
      std::fill(po + r * n, po + end * n, at::BFloat16(0.0f));
    }
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

}  // namespace
}  // namespace dsv3::moe::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) { m.impl("grouped_gemm", &dsv3::moe::cpu::grouped_gemm_cpu); }
