// Argument checks shared by the CPU and CUDA glue of the MLA ops (shapes and dtypes only: the
// metadata values are checked by dsv3_kernels/ops.py where they are on the CPU, and handled
// in-kernel otherwise: see dsv3_kernels/reference/mla.py). They guard direct torch.ops calls.
#pragma once
#include <torch/library.h>

#include "mla/mla_fp8_layout.h"

namespace dsv3::mla {

constexpr int64_t kLoraRank = 512;  // c_kv, also the value
constexpr int64_t kRopeDim = 64;    // k_pe
constexpr int64_t kHeadDim = kLoraRank + kRopeDim;
// A uint8 cache is the FP8 one (mla_fp8_layout.h).
inline bool is_fp8_cache(const at::Tensor& kv_cache) { return kv_cache.scalar_type() == at::kByte; }

inline void check_cache_shape(const at::Tensor& kv_cache) {
  const int64_t width = is_fp8_cache(kv_cache) ? int64_t{kFp8TokenBytes} : kHeadDim;
  TORCH_CHECK(kv_cache.dim() == 3 && kv_cache.size(2) == width, "kv_cache must be [num_blocks, block_size, ", width,
              "] for dtype ", kv_cache.scalar_type(), ", got ", kv_cache.sizes());
}

inline bool is_attention_dtype(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat;
}

inline void check_mla_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                             const at::Tensor& cache_seqlens, int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4 && q.size(3) == kHeadDim, "q must be [B, s_q, H, 576], got ", q.sizes());
  check_cache_shape(kv_cache);
  TORCH_CHECK(is_attention_dtype(q.scalar_type()), "q must be bfloat16, float16 or float32, got ", q.scalar_type());
  TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type() || is_fp8_cache(kv_cache), "kv_cache must have q's dtype ",
              q.scalar_type(), " (or be the uint8 FP8 cache), got ", kv_cache.scalar_type());
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == q.size(0),
              "block_table must be int32 [B, max_blocks], got ", block_table.scalar_type(), " ", block_table.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == q.size(0),
              "cache_seqlens must be int32 [B], got ", cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && block_table.is_contiguous() &&
                  cache_seqlens.is_contiguous(),
              "q, kv_cache, block_table and cache_seqlens must be contiguous");
  const int64_t bs = kv_cache.size(1);
  TORCH_CHECK(bs > 0 && (bs & (bs - 1)) == 0, "kv_cache's block_size must be a power of two, got ", bs);
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0: automatic), got ", num_splits);
  TORCH_CHECK(q.device() == kv_cache.device() && q.device() == block_table.device() &&
                  q.device() == cache_seqlens.device(),
              "q, kv_cache, block_table and cache_seqlens must be on one device");
}

inline void check_mla_cache_write(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& kv_cache,
                                  const at::Tensor& slot_mapping, const std::optional<at::Tensor>& norm_weight,
                                  const std::optional<at::Tensor>& rope_cos,
                                  const std::optional<at::Tensor>& rope_sin) {
  TORCH_CHECK(kv_c.dim() == 2 && kv_c.size(1) == kLoraRank, "kv_c must be [T, 512], got ", kv_c.sizes());
  const int64_t t = kv_c.size(0);
  TORCH_CHECK(k_pe.dim() == 2 && k_pe.size(0) == t && k_pe.size(1) == kRopeDim, "k_pe must be [T, 64], got ",
              k_pe.sizes());
  check_cache_shape(kv_cache);
  TORCH_CHECK(is_attention_dtype(kv_c.scalar_type()) && k_pe.scalar_type() == kv_c.scalar_type(),
              "kv_c and k_pe must share one of bfloat16, float16, float32");
  TORCH_CHECK(is_attention_dtype(kv_cache.scalar_type()) || is_fp8_cache(kv_cache),
              "kv_cache must be bfloat16, float16, float32 or uint8 (the FP8 cache)");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == t,
              "slot_mapping must be int64 [T]");
  TORCH_CHECK(kv_c.is_contiguous() && k_pe.is_contiguous() && kv_cache.is_contiguous() &&
                  slot_mapping.is_contiguous(),
              "kv_c, k_pe, kv_cache and slot_mapping must be contiguous");
  if (norm_weight) {
    TORCH_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == kLoraRank && norm_weight->is_contiguous() &&
                    is_attention_dtype(norm_weight->scalar_type()),
                "kv_norm_weight must be a contiguous float [512]");
  }
  TORCH_CHECK(rope_cos.has_value() == rope_sin.has_value(), "rope_cos and rope_sin go together");
  if (rope_cos) {
    for (const at::Tensor* r : {&*rope_cos, &*rope_sin}) {
      TORCH_CHECK(r->scalar_type() == at::kFloat && r->dim() == 2 && r->size(0) == t &&
                      r->size(1) == kRopeDim / 2 && r->is_contiguous(),
                  "rope_cos and rope_sin must be contiguous float32 [T, 32]");
    }
  }
}

}  // namespace dsv3::mla
