// CUDA implementation of rms_norm: argument checks, device/stream and output allocation (torch's
// caching allocator, no host synchronisation: CUDA-graph capturable), then the torch-free launcher
// in rms_norm.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "norm/rms_norm.cuh"
#include "norm/rms_norm_checks.h"

namespace dsv3::norm {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                 const std::optional<at::Tensor>& residual) {
  check_rms_norm(x, weight, residual);
  TORCH_CHECK(x.is_cuda(), "rms_norm: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor residual_out = residual ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t d = x.size(-1);
  const RmsNormParams p{x.data_ptr(),   residual ? residual->data_ptr() : nullptr,
                        weight.data_ptr(), out.data_ptr(),
                        residual ? residual_out.data_ptr() : nullptr,
                        x.numel() / d,  d,
                        static_cast<float>(eps), float_type(x.scalar_type())};
  check_launch(rms_norm_launch(p, at::cuda::getCurrentCUDAStream()), "rms_norm");
  return {out, residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }

}  // namespace dsv3::norm
