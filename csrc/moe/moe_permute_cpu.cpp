// CPU kernel of moe_permute (schema in registration.cpp, semantics in dsv3_kernels/reference/moe.py):
// the (token, choice) pairs grouped by expert (expert_rows_cpu.h), each row a copy of its token, or
// with quant the bytes of the token quantized once (act_quant, 1x128).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "moe/expert_rows_cpu.h"
#include "moe/moe_checks.h"

namespace dsv3::moe::cpu {
namespace {

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

}  // namespace
}  // namespace dsv3::moe::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) { m.impl("moe_permute", &dsv3::moe::cpu::moe_permute_cpu); }
