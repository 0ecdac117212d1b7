// Argument checks shared by the CPU and CUDA glue of the MoE ops; dsv3_kernels/ops.py gives the
// friendlier errors first, these guard direct torch.ops calls.
#pragma once
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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

inline bool is_float_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

inline void check_moe_permute(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts, int64_t align,
                              bool quant) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && is_float_dtype(hidden),
              "hidden must be a contiguous float32/bfloat16/float16 [T, D] tensor");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.is_contiguous() && topk_ids.scalar_type() == at::kInt &&
                  topk_ids.size(0) == hidden.size(0),
              "topk_ids must be a contiguous int32 [T, topk] tensor with hidden's T");
  TORCH_CHECK(topk_ids.device() == hidden.device(), "topk_ids must be on hidden's device");
  // The ids and offsets are int32: a larger E could not be named by an id (and its offsets would not fit).
  TORCH_CHECK(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(),
              "num_experts must be in [1, 2**31 - 1], got ", num_experts);
  TORCH_CHECK(align >= 1 && align <= 1024, "align must be in [1, 1024]");
  TORCH_CHECK(!quant || hidden.size(1) % 128 == 0, "quant needs D % 128 == 0");
}

// P = T*topk + (align > 1 ? min(T*topk, E) * (align - 1) : 0), the fixed row count of moe_permute.
inline int64_t permuted_rows(int64_t tokens, int64_t topk, int64_t num_experts, int64_t align) {
  const int64_t n = tokens * topk;
  return n + (align > 1 ? std::min(n, num_experts) * (align - 1) : 0);
}

// True for the FP8 variant.
inline bool check_grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& a_scale,
                               const std::optional<at::Tensor>& b_scale_inv) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "a must be a contiguous [M, K] tensor");
  TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.size(2) == a.size(1),
              "b must be a contiguous [E, N, K] tensor with a's K");
  TORCH_CHECK(offsets.dim() == 1 && offsets.is_contiguous() && offsets.scalar_type() == at::kInt &&
                  offsets.size(0) == b.size(0) + 1,
              "expert_offsets must be a contiguous int32 [E+1] tensor");
  TORCH_CHECK(b.size(1) % 8 == 0 && b.size(2) % 8 == 0, "b's N and K must be multiples of 8");
  TORCH_CHECK(offsets.device() == a.device() && b.device() == a.device(), "all tensors must be on a's device");
  const bool fp8 = a.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || a.scalar_type() == at::kBFloat16, "a must be bfloat16 or float8_e4m3fn");
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "b must have a's dtype");
  TORCH_CHECK(fp8 == a_scale.has_value() && fp8 == b_scale_inv.has_value(),
              "a_scale and b_scale_inv must be given exactly for float8_e4m3fn inputs");
  if (fp8) {
    const int64_t m = a.size(0), n = b.size(1), k = a.size(1), e = b.size(0);
    TORCH_CHECK(k % 128 == 0, "FP8 grouped_gemm needs K % 128 == 0");
    TORCH_CHECK(a_scale->scalar_type() == at::kFloat && a_scale->is_contiguous() && a_scale->dim() == 2 &&
                    a_scale->size(0) == m && a_scale->size(1) == k / 128,
                "a_scale must be a contiguous float32 [M, K/128] tensor");
    TORCH_CHECK(b_scale_inv->scalar_type() == at::kFloat && b_scale_inv->is_contiguous() && b_scale_inv->dim() == 3 &&
                    b_scale_inv->size(0) == e && b_scale_inv->size(1) == (n + 127) / 128 &&
                    b_scale_inv->size(2) == k / 128,
                "b_scale_inv must be a contiguous float32 [E, ceil(N/128), K/128] tensor");
    TORCH_CHECK(a_scale->device() == a.device() && b_scale_inv->device() == a.device(),
                "all tensors must be on a's device");
  }
  return fp8;
}

inline void check_silu_mul(const at::Tensor& x, bool quant) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && is_float_dtype(x) && x.size(1) % 2 == 0,
              "x must be a contiguous float32/bfloat16/float16 [M, 2I] tensor");
  TORCH_CHECK(!quant || (x.size(1) / 2) % 128 == 0, "quant needs I % 128 == 0");
}

inline void check_moe_unpermute(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                                const at::Tensor& inverse) {
  TORCH_CHECK(expert_out.dim() == 2 && expert_out.is_contiguous() && is_float_dtype(expert_out),
              "expert_out must be a contiguous float32/bfloat16/float16 [P, D] tensor");
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.is_contiguous() && topk_weights.scalar_type() == at::kFloat,
              "topk_weights must be a contiguous float32 [T, topk] tensor");
  TORCH_CHECK(inverse.scalar_type() == at::kInt && inverse.is_contiguous() && inverse.sizes() == topk_weights.sizes(),
              "inverse must be a contiguous int32 tensor of topk_weights' shape");
  TORCH_CHECK(topk_weights.device() == expert_out.device() && inverse.device() == expert_out.device(),
              "all tensors must be on expert_out's device");
}

inline void check_ep_dispatch(const at::Tensor& hidden, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              int64_t num_experts, int64_t world_size, bool quant) {
  TORCH_CHECK(num_experts <= std::numeric_limits<int32_t>::max(), "num_experts must be <= 2**31 - 1 (int32 ids), got ",
              num_experts);
  TORCH_CHECK(world_size >= 1 && num_experts >= world_size && num_experts % world_size == 0,
              "num_experts (", num_experts, ") must split evenly over world_size (", world_size, ") ranks");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(1) >= 1, "topk_ids must be [T, topk] with topk >= 1");
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.is_contiguous() && topk_weights.scalar_type() == at::kFloat &&
                  topk_weights.sizes() == topk_ids.sizes(),
              "topk_weights must be a contiguous float32 tensor of topk_ids' shape");
  TORCH_CHECK(topk_weights.device() == hidden.device(), "topk_weights must be on hidden's device");
  check_moe_permute(hidden, topk_ids, world_size, 1, quant);
}

// True for FP8 weights.
inline bool check_fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                            const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                            const std::optional<at::Tensor>& w13_scale_inv,
                            const std::optional<at::Tensor>& w2_scale_inv) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() &&
                  (hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kFloat),
              "hidden must be a contiguous bfloat16 (or float32) [T, D] tensor");
  const int64_t d = hidden.size(1);
  TORCH_CHECK(w13.dim() == 3 && w13.is_contiguous() && w13.size(2) == d && w13.size(1) % 2 == 0,
              "w13 must be a contiguous [E, 2I, D] tensor");
  const int64_t e = w13.size(0), i = w13.size(1) / 2;
  TORCH_CHECK(w2.dim() == 3 && w2.is_contiguous() && w2.size(0) == e && w2.size(1) == d && w2.size(2) == i,
              "w2 must be a contiguous [E, D, I] tensor");
  TORCH_CHECK(d % 8 == 0 && i % 8 == 0, "D and I must be multiples of 8");
  const bool fp8 = w13.scalar_type() == at::kFloat8_e4m3fn;
  const bool f32 = hidden.scalar_type() == at::kFloat;
  TORCH_CHECK(!f32 || w13.scalar_type() == at::kFloat, "float32 hidden needs float32 w13 and w2");
  TORCH_CHECK(f32 || fp8 || w13.scalar_type() == at::kBFloat16, "w13 must be bfloat16 or float8_e4m3fn");
  TORCH_CHECK(w2.scalar_type() == w13.scalar_type(), "w2 must have w13's dtype");
  TORCH_CHECK(fp8 == w13_scale_inv.has_value() && fp8 == w2_scale_inv.has_value(),
              "w13_scale_inv and w2_scale_inv must be given exactly for float8_e4m3fn weights");
  if (fp8) {
    TORCH_CHECK(d % 128 == 0 && i % 128 == 0, "FP8 experts need D and I to be multiples of 128");
    TORCH_CHECK(w13_scale_inv->scalar_type() == at::kFloat && w13_scale_inv->is_contiguous() &&
                    w13_scale_inv->sizes() == at::IntArrayRef({e, 2 * i / 128, d / 128}),
                "w13_scale_inv must be a contiguous float32 [E, 2I/128, D/128] tensor");
    TORCH_CHECK(w2_scale_inv->scalar_type() == at::kFloat && w2_scale_inv->is_contiguous() &&
                    w2_scale_inv->sizes() == at::IntArrayRef({e, d / 128, i / 128}),
                "w2_scale_inv must be a contiguous float32 [E, D/128, I/128] tensor");
    TORCH_CHECK(w13_scale_inv->device() == hidden.device() && w2_scale_inv->device() == hidden.device(),
                "all tensors must be on hidden's device");
  }
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.is_contiguous() && topk_weights.scalar_type() == at::kFloat &&
                  topk_weights.size(0) == hidden.size(0),
              "topk_weights must be a contiguous float32 [T, topk] tensor");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt && topk_ids.is_contiguous() && topk_ids.sizes() == topk_weights.sizes(),
              "topk_ids must be a contiguous int32 tensor of topk_weights' shape");
  TORCH_CHECK(w13.device() == hidden.device() && w2.device() == hidden.device() &&
                  topk_weights.device() == hidden.device() && topk_ids.device() == hidden.device(),
              "all tensors must be on hidden's device");
  return fp8;
}

}  // namespace dsv3::moe
