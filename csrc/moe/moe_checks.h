// Argument checks shared by the CPU and CUDA glue of the MoE ops; dsv3_kernels/ops.py gives the
// friendlier errors first, these guard direct torch.ops calls.
#pragma once
#include <torch/library.h>

#include <string>

namespace dsv3::moe {

inline void check_moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t n_group,
                            int64_t topk_group, int64_t topk, const std::string& score_func) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "router_logits must be a contiguous [T, E] tensor");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "router_logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t e = logits.size(1);
  TORCH_CHECK(n_group >= 1 && e % n_group == 0, "n_experts (", e, ") must be divisible by n_group (", n_group, ")");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "topk_group must be in [1, n_group], got ", topk_group);
  TORCH_CHECK(topk >= 1 && topk <= topk_group * (e / n_group),
              "topk must be in [1, topk_group * experts per group], got ", topk);
  TORCH_CHECK(score_func == "sigmoid" || score_func == "softmax", "score_func must be sigmoid or softmax");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == e && bias->is_contiguous(),
                "e_score_correction_bias must be a contiguous float32 [E] tensor");
    TORCH_CHECK(bias->device() == logits.device(), "e_score_correction_bias must be on router_logits' device");
    TORCH_CHECK(n_group == 1 || e / n_group >= 2, "with a bias, groups need at least 2 experts (top-2 group score)");
  }
}

}  // namespace dsv3::moe
