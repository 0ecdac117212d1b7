// CUDA implementation of silu_mul: argument checks, device/stream, output allocation (torch's
// caching allocator only, no host synchronisation: CUDA-graph capturable), then the torch-free
// launcher in moe_kernels.cuh (silu_mul.cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "moe/expert_ops_cuda.h"
#include "moe/moe_checks.h"
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {

std::tuple<at::Tensor, at::Tensor> silu_mul_cuda(const at::Tensor& x_in, bool quant) {
  check_silu_mul(x_in, quant);
  TORCH_CHECK(x_in.is_cuda(), "silu_mul: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = quant ? aligned16(x_in) : x_in;
  const int64_t m = x.size(0), i = x.size(1) / 2;
  auto out = at::empty({m, i}, x.options().dtype(quant ? at::kFloat8_e4m3fn : x.scalar_type()));
  const auto f32 = x.options().dtype(at::kFloat);
  auto scale = quant ? at::empty({m, i / 128}, f32) : at::empty({0}, f32);
  check_launch(silu_mul_launch(x.data_ptr(), float_type(x.scalar_type()), m, i, quant, out.data_ptr(),
                               quant ? scale.data_ptr<float>() : nullptr, at::cuda::getCurrentCUDAStream()),
               "silu_mul");
  return {out, scale};
}

}  // namespace dsv3::moe

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) { m.impl("silu_mul", &dsv3::moe::silu_mul_cuda); }
