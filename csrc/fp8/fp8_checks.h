// Argument checks shared by the CPU and CUDA glue of the FP8 ops. The Python wrappers in
// dsv3_kernels/ops.py give friendlier errors first; these guard direct torch.ops calls.
#pragma once
#include <torch/library.h>

#include "common/torch_glue.h"

namespace dsv3::fp8 {

inline void check_block_size(int64_t block_size) {
  TORCH_CHECK(block_size >= 16 && block_size <= 1024 && (block_size & (block_size - 1)) == 0,
              "block_size must be a power of two in [16, 1024], got ", block_size);
}

inline void check_float_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

inline void check_act_quant(const at::Tensor& x, int64_t block_size) {
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dim");
  check_block_size(block_size);
}

inline void check_weight_quant(const at::Tensor& w, int64_t block_size) {
  check_float_input(w, "w");
  TORCH_CHECK(w.dim() == 2, "w must be 2-D [N, K], got ", w.dim(), "-D");
  check_block_size(block_size);
}

inline void check_weight_dequant(const at::Tensor& w, const at::Tensor& s, int64_t block_size,
                                 at::ScalarType dtype) {
  TORCH_CHECK(w.scalar_type() == at::kFloat8_e4m3fn, "w must be float8_e4m3fn, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous 2-D [N, K] tensor");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "scale_inv must be contiguous float32");
  check_block_size(block_size);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == cdiv(w.size(0), block_size) &&
                  s.size(1) == cdiv(w.size(1), block_size),
              "scale_inv must have shape [ceil(N/block_size), ceil(K/block_size)], got ", s.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(w.device() == s.device(), "w and scale_inv must be on one device");
}

constexpr int64_t kGemmBlock = 128;

inline void check_fp8_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale, at::ScalarType out_dtype) {
  TORCH_CHECK(a.scalar_type() == at::kFloat8_e4m3fn, "a must be float8_e4m3fn, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == at::kFloat8_e4m3fn, "b must be float8_e4m3fn, got ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "a and b must be 2-D");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a_scale.is_contiguous() && b_scale.is_contiguous(),
              "a, a_scale, b and b_scale_inv must be contiguous");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && b_scale.scalar_type() == at::kFloat,
              "a_scale and b_scale_inv must be float32");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  TORCH_CHECK(b.size(1) == k, "a and b must have the same K");
  TORCH_CHECK(k > 0 && k % kGemmBlock == 0, "K must be a positive multiple of 128, got ", k);
  TORCH_CHECK(n > 0, "N must be >= 1");
  TORCH_CHECK(a_scale.dim() == 2 && a_scale.size(0) == m && a_scale.size(1) == k / kGemmBlock,
              "a_scale must have shape [M, K/128], got ", a_scale.sizes());
  TORCH_CHECK(b_scale.dim() == 2 && b_scale.size(0) == cdiv(n, kGemmBlock) && b_scale.size(1) == k / kGemmBlock,
              "b_scale_inv must have shape [ceil(N/128), K/128], got ", b_scale.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  TORCH_CHECK(a.device() == b.device() && a.device() == a_scale.device() && a.device() == b_scale.device(),
              "a, a_scale, b and b_scale_inv must be on one device");
}

}  // namespace dsv3::fp8
