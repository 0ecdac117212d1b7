// CUDA implementation of moe_unpermute: argument checks, device/stream, output allocation (torch's
// caching allocator only, no host synchronisation: CUDA-graph capturable), then the torch-free
// launcher in moe_kernels.cuh (moe_unpermute.cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "moe/expert_ops_cuda.h"
#include "moe/moe_checks.h"
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {

at::Tensor moe_unpermute_cuda(const at::Tensor& expert_out, const at::Tensor& topk_weights, const at::Tensor& inverse) {
  check_moe_unpermute(expert_out, topk_weights, inverse);
  TORCH_CHECK(expert_out.is_cuda(), "moe_unpermute: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const int64_t t = inverse.size(0), topk = inverse.size(1), d = expert_out.size(1);
  auto out = at::empty({t, d}, expert_out.options());
  check_launch(moe_unpermute_launch(expert_out.data_ptr(), float_type(expert_out.scalar_type()), expert_out.size(0), d,
                                    topk_weights.data_ptr<float>(), inverse.data_ptr<int>(), t,
                                    static_cast<int>(topk), out.data_ptr(), at::cuda::getCurrentCUDAStream()),
               "moe_unpermute");
  return out;
}

}  // namespace dsv3::moe

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) { m.impl("moe_unpermute", &dsv3::moe::moe_unpermute_cuda); }
