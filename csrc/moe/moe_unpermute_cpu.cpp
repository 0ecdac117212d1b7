// CPU kernel of moe_unpermute (schema in registration.cpp, semantics in
// dsv3_kernels/reference/moe.py): each token's rows, weighted and summed in fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "moe/expert_rows_cpu.h"
#include "moe/moe_checks.h"

namespace dsv3::moe::cpu {
namespace {

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

}  // namespace
}  // namespace dsv3::moe::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) { m.impl("moe_unpermute", &dsv3::moe::cpu::moe_unpermute_cpu); }
