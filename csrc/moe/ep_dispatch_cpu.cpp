// CPU ep_dispatch (semantics: dsv3_kernels/reference/moe.py): each token's destination ranks, the
// rows packed by rank with moe_permute's CPU kernel (FP8 quantization fused into its copy), then
// each row's choices as its rank sees them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "moe/ep_dispatch_common.h"
#include "moe/moe_checks.h"

namespace dsv3::moe::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_dispatch_cpu(
    const at::Tensor& hidden, const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t num_experts,
    int64_t world_size, bool quant) {
  check_ep_dispatch(hidden, topk_ids, topk_weights, num_experts, world_size, quant);
  const int64_t t = topk_ids.size(0), k = topk_ids.size(1), slots = std::min(k, world_size);
  const int64_t per_rank = num_experts / world_size;
  const int32_t* ids = topk_ids.const_data_ptr<int32_t>();
  const float* w = topk_weights.const_data_ptr<float>();
  auto owner = [&](int32_t id) -> int64_t { return id >= 0 && id < num_experts ? id / per_rank : -1; };

  at::Tensor dest = at::empty({t, slots}, topk_ids.options());
  int32_t* pd = dest.data_ptr<int32_t>();
  for (int64_t tok = 0; tok < t; ++tok) {
    int32_t* d = pd + tok * slots;
    int64_t n = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = owner(ids[tok * k + j]);
      if (r >= 0 && std::find(d, d + n, r) == d + n) d[n++] = static_cast<int32_t>(r);
    }
    std::fill(d + n, d + slots, -1);
  }
  auto [send, scale, rank_offsets, inverse] = permute_by_rank(hidden, dest, world_size, quant);

  at::Tensor send_ids = at::full({send.size(0), k}, -1, topk_ids.options());
  at::Tensor send_weights = at::zeros({send.size(0), k}, topk_weights.options());
  int32_t* out_ids = send_ids.data_ptr<int32_t>();
  float* out_w = send_weights.data_ptr<float>();
  const int32_t* inv = inverse.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < t * slots; ++i) {
    if (inv[i] < 0) continue;
    const int64_t tok = i / slots, rank = pd[i], row = inv[i];
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ids[tok * k + j];
      const bool mine = owner(id) == rank;
      out_ids[row * k + j] = mine ? static_cast<int32_t>(id - rank * per_rank) : -1;
      out_w[row * k + j] = mine ? w[tok * k + j] : 0.0f;
    }
  }
  return {send, scale, send_ids, send_weights, rank_offsets, inverse};
}

}  // namespace
}  // namespace dsv3::moe::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) { m.impl("ep_dispatch", &dsv3::moe::cpu::ep_dispatch_cpu); }
