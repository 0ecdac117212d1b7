// Argument checks shared by the CPU and CUDA glue of rms_norm; dsv3_kernels/ops.py gives the
// friendlier errors first, these guard direct torch.ops calls.
#pragma once
#include <torch/library.h>

namespace dsv3::norm {

inline void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
                   "rms_norm: x must be float32, bfloat16 or float16, got ", t);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1 && x.is_contiguous(),
                    "rms_norm: x must be a contiguous [..., D] tensor with D >= 1, got shape ", x.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == t, "rms_norm: weight must have x's dtype ", t, ", got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.is_contiguous(),
                    "rms_norm: weight must be a contiguous [D] = [", x.size(-1), "] tensor, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "rms_norm: weight must be on x's device");
  if (residual) {
    TORCH_CHECK_TYPE(residual->scalar_type() == t, "rms_norm: residual must have x's dtype ", t, ", got ",
                     residual->scalar_type());
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes() && residual->is_contiguous(),
                      "rms_norm: residual must be contiguous with x's shape ", x.sizes(), ", got ", residual->sizes());
    TORCH_CHECK_VALUE(residual->device() == x.device(), "rms_norm: residual must be on x's device");
  }
}

}  // namespace dsv3::norm
