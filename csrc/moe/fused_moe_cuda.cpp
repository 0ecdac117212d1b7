// CUDA implementation of fused_moe: the CUDA implementations of its parts (expert_ops_cuda.h)
// chained on the current stream, with no host synchronisation (CUDA-graph capturable).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "moe/expert_ops_cuda.h"
#include "moe/moe_checks.h"

namespace dsv3::moe {
namespace {

// permute (align 1; FP8 weights: act_quant fused) -> grouped_gemm(w13) -> bf16 gate_up ->
// silu_mul (FP8: quantised) -> grouped_gemm(w2) -> bf16 -> unpermute, all on the current stream.
// A token with an id outside [0, E) has inverse -1 and gets NaN from moe_unpermute.
at::Tensor fused_moe_cuda(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                          const std::optional<at::Tensor>& w13_scale_inv,
                          const std::optional<at::Tensor>& w2_scale_inv) {
  const bool fp8 = check_fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale_inv, w2_scale_inv);
  TORCH_CHECK(hidden.is_cuda(), "fused_moe: the CUDA kernel needs CUDA tensors");
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16, "fused_moe: the CUDA kernel takes bfloat16 hidden "
              "(float32 experts run on the triton, cpu and torch backends)");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto [x, x_scale, offsets, inverse] = moe_permute_cuda(hidden, topk_ids, w13.size(0), 1, fp8);
  const auto scale = [fp8](const at::Tensor& s) { return fp8 ? std::optional<at::Tensor>(s) : std::nullopt; };
  const at::Tensor gate_up = grouped_gemm_cuda(x, w13, offsets, scale(x_scale), w13_scale_inv);  // bf16 [P, 2I]
  const auto [h, h_scale] = silu_mul_cuda(gate_up, fp8);
  const at::Tensor y = grouped_gemm_cuda(h, w2, offsets, scale(h_scale), w2_scale_inv);  // bf16 [P, D]
  return moe_unpermute_cuda(y, topk_weights, inverse);
}

}  // namespace
}  // namespace dsv3::moe

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) { m.impl("fused_moe", &dsv3::moe::fused_moe_cuda); }
