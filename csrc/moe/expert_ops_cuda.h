// The CUDA implementations of the expert ops that fused_moe_cuda.cpp chains, each defined (and
// registered) in its <op>_cuda.cpp, and the glue they share.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/torch_glue.h"

namespace dsv3::moe {

// The vectorised kernels and TMA need 16-byte aligned bases; a view at an odd offset gets an
// aligned copy.
inline at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& hidden,
                                                                            const at::Tensor& topk_ids,
                                                                            int64_t num_experts, int64_t align,
                                                                            bool quant);

at::Tensor grouped_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& expert_offsets,
                             const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale_inv);

std::tuple<at::Tensor, at::Tensor> silu_mul_cuda(const at::Tensor& x_in, bool quant);

at::Tensor moe_unpermute_cuda(const at::Tensor& expert_out, const at::Tensor& topk_weights, const at::Tensor& inverse);

}  // namespace dsv3::moe
