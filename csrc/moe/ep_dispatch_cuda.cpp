// CUDA ep_dispatch: destination ranks (ep_dispatch.cu), moe_permute's CUDA kernels with the ranks
// as experts (rows grouped by rank, FP8 quantization fused into the copy), then the rows' local
// choices. Outputs have sizes fixed by the shapes and nothing is read on the host (CUDA graphs).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/torch_glue.h"
#include "moe/ep_dispatch_common.h"
#include "moe/moe_checks.h"
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_dispatch_cuda(
    const at::Tensor& hidden, const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t num_experts,
    int64_t world_size, bool quant) {
  check_ep_dispatch(hidden, topk_ids, topk_weights, num_experts, world_size, quant);
  TORCH_CHECK(hidden.is_cuda(), "ep_dispatch: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t t = topk_ids.size(0), k = topk_ids.size(1), slots = std::min(k, world_size);
  const int per_rank = static_cast<int>(num_experts / world_size);
  at::Tensor dest = at::empty({t, slots}, topk_ids.options());
  check_launch(ep_dest_launch(topk_ids.data_ptr<int>(), t, static_cast<int>(k), static_cast<int>(slots),
                              static_cast<int>(num_experts), per_rank, dest.data_ptr<int>(), stream),
               "ep_dispatch");
  auto [send, scale, rank_offsets, inverse] = permute_by_rank(hidden, dest, world_size, quant);
  at::Tensor send_ids = at::full({send.size(0), k}, -1, topk_ids.options());
  at::Tensor send_weights = at::zeros({send.size(0), k}, topk_weights.options());
  check_launch(ep_meta_launch(topk_ids.data_ptr<int>(), topk_weights.data_ptr<float>(), dest.data_ptr<int>(),
                              inverse.data_ptr<int>(), t, static_cast<int>(k), static_cast<int>(slots), per_rank,
                              send_ids.data_ptr<int>(), send_weights.data_ptr<float>(), stream),
               "ep_dispatch");
  return {send, scale, send_ids, send_weights, rank_offsets, inverse};
}

}  // namespace
}  // namespace dsv3::moe

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) { m.impl("ep_dispatch", &dsv3::moe::ep_dispatch_cuda); }
