// CUDA implementation of moe_permute: argument checks, device/stream, output and workspace allocation
// (torch's caching allocator only, no host synchronisation: CUDA-graph capturable), then the
// torch-free launcher in moe_kernels.cuh (moe_permute.cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "common/torch_glue.h"
#include "moe/expert_ops_cuda.h"
#include "moe/moe_checks.h"
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& hidden,
                                                                            const at::Tensor& topk_ids,
                                                                            int64_t num_experts, int64_t align,
                                                                            bool quant) {
  check_moe_permute(hidden, topk_ids, num_experts, align, quant);
  TORCH_CHECK(hidden.is_cuda(), "moe_permute: the CUDA kernel needs CUDA tensors");
  TORCH_CHECK(num_experts <= kMoePermuteMaxExperts, "moe_permute: the CUDA kernel takes at most ",
              kMoePermuteMaxExperts, " experts, got ", num_experts);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t t = hidden.size(0), d = hidden.size(1), topk = topk_ids.size(1);
  const int64_t rows = permuted_rows(t, topk, num_experts, align);
  TORCH_CHECK(rows <= INT_MAX - 1024, "moe_permute: ", rows, " permuted rows exceed the int32 row indices");
  const at::Tensor x = quant ? aligned16(hidden) : hidden;
  auto permuted = at::empty({rows, d}, x.options().dtype(quant ? at::kFloat8_e4m3fn : x.scalar_type()));
  const auto f32 = x.options().dtype(at::kFloat);
  auto scale = quant ? at::empty({rows, d / 128}, f32) : at::empty({0}, f32);
  auto offsets = at::empty({num_experts + 1}, topk_ids.options());
  auto inverse = at::empty({t, topk}, topk_ids.options());
  auto workspace = at::empty({moe_permute_workspace_ints(t, static_cast<int>(topk), static_cast<int>(num_experts), rows)},
                             topk_ids.options());

  MoePermuteParams p{};
  p.hidden = x.data_ptr();
  p.topk_ids = topk_ids.data_ptr<int>();
  p.permuted = permuted.data_ptr();
  p.scale = quant ? scale.data_ptr<float>() : nullptr;
  p.expert_offsets = offsets.data_ptr<int>();
  p.inverse = inverse.data_ptr<int>();
  p.workspace = workspace.data_ptr<int>();
  p.num_tokens = t;
  p.hidden_size = d;
  p.rows = rows;
  p.topk = static_cast<int>(topk);
  p.num_experts = static_cast<int>(num_experts);
  p.align = static_cast<int>(align);
  p.quant = quant;
  p.dtype = float_type(x.scalar_type());
  check_launch(moe_permute_launch(p, at::cuda::getCurrentCUDAStream()), "moe_permute");
  return {permuted, scale, offsets, inverse};
}

}  // namespace dsv3::moe

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) { m.impl("moe_permute", &dsv3::moe::moe_permute_cuda); }
