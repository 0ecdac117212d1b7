// CUDA implementation of moe_route: argument checks, device/stream, output allocation (torch's
// caching allocator only, no host synchronisation: CUDA-graph capturable), then the torch-free
// launcher in moe_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "common/torch_glue.h"
#include "moe/moe_checks.h"
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& router_logits, const std::optional<at::Tensor>& bias,
                                                  int64_t n_group, int64_t topk_group, int64_t topk,
                                                  double routed_scaling_factor, c10::string_view score_func,
                                                  bool renormalize) {
  const std::string func(score_func);
  check_moe_route(router_logits, bias, n_group, topk_group, topk, func);
  TORCH_CHECK(router_logits.is_cuda(), "moe_route: the CUDA kernel needs CUDA tensors");
  const int64_t t = router_logits.size(0), e = router_logits.size(1);
  TORCH_CHECK(e >= 1 && e <= kMoeMaxExperts, "moe_route: the CUDA kernel takes 1 to ", kMoeMaxExperts,
              " experts, got ", e);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  auto weights = at::empty({t, topk}, router_logits.options().dtype(at::kFloat));
  auto ids = at::empty({t, topk}, router_logits.options().dtype(at::kInt));
  if (t == 0) return {weights, ids};

  MoeRouteParams p{};
  p.logits = router_logits.data_ptr();
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.topk_weights = weights.data_ptr<float>();
  p.topk_ids = ids.data_ptr<int>();
  p.num_tokens = t;
  p.num_experts = static_cast<int>(e);
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.topk = static_cast<int>(topk);
  p.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  p.softmax = func == "softmax";
  p.renormalize = renormalize;
  p.dtype = float_type(router_logits.scalar_type());
  check_launch(moe_route_launch(p, at::cuda::getCurrentCUDAStream()), "moe_route");
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) { m.impl("moe_route", &moe_route_cuda); }

}  // namespace dsv3::moe
