// CUDA implementation of grouped_gemm: argument checks, device/stream, output and workspace allocation
// (torch's caching allocator only, no host synchronisation: CUDA-graph capturable), then the
// torch-free CUTLASS GEMM of grouped_gemm_cutlass.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "moe/expert_ops_cuda.h"
#include "moe/grouped_gemm_cutlass.h"
#include "moe/moe_checks.h"

namespace dsv3::moe {

at::Tensor grouped_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& expert_offsets,
                             const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale_inv) {
  const bool fp8 = check_grouped_gemm(a_in, b_in, expert_offsets, a_scale, b_scale_inv);
  TORCH_CHECK(a_in.is_cuda(), "grouped_gemm: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major == 9 && prop->minor == 0, "grouped_gemm: the CUDA kernel needs an sm_90 (Hopper) GPU, got ",
              prop->name, " (sm_", prop->major, prop->minor, ")");
  const int64_t m = a_in.size(0), n = b_in.size(1), k = a_in.size(1), e = b_in.size(0);
  TORCH_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && e <= INT_MAX,
              "grouped_gemm: dimensions must fit in int32");
  auto out = at::empty({m, n}, a_in.options().dtype(at::kBFloat16));
  if (m == 0 || n == 0) return out;
  const at::Tensor a = aligned16(a_in), b = aligned16(b_in);

  GroupedGemmProblem p{a.data_ptr(),
                       fp8 ? a_scale->data_ptr<float>() : nullptr,
                       b.data_ptr(),
                       fp8 ? b_scale_inv->data_ptr<float>() : nullptr,
                       expert_offsets.data_ptr<int>(),
                       out.data_ptr(),
                       m,
                       n,
                       k,
                       static_cast<int>(e),
                       fp8,
                       prop->multiProcessorCount};
  auto workspace = at::empty({static_cast<int64_t>(grouped_gemm_workspace_size(p))}, a.options().dtype(at::kByte));
  check_launch(grouped_gemm_run(p, workspace.data_ptr(), at::cuda::getCurrentCUDAStream()), "grouped_gemm");
  return out;
}

}  // namespace dsv3::moe

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) { m.impl("grouped_gemm", &dsv3::moe::grouped_gemm_cuda); }
