// Torch-free launchers of the MLA CUDA kernels, called by mla_cuda.cpp. Semantics:
// dsv3_kernels/reference/mla.py. All tensors are contiguous; each launcher returns nullptr on
// success, else a static CUDA error message. Nothing here allocates: the caller passes every buffer.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/float_type.h"
#include "mla/mla_fp8_layout.h"

namespace dsv3::mla {

// mla_decode on sm_90a (mla_decode_sm90.cu). q [B, s_q, H, 576], kv_cache [num_blocks, block_size,
// 576] (bf16 or fp16, one dtype) or with fp8_cache the FP8 cache [num_blocks, block_size, 656 bytes]
// (mla_fp8_layout.h; q bf16), block_table int32 [B, max_blocks], cache_seqlens int32 [B]
//   -> out [B, s_q, H, 512] (q's dtype), lse fp32 [B, H, s_q].
// num_splits > 1 needs the workspace: o_part fp32 [B, s_q*H, num_splits, 512] and lse_part fp32
// [B, s_q*H, num_splits]; with num_splits == 1 the kernel writes out/lse directly (no workspace).
struct MlaDecodeParams {
  const void* q;
  const void* kv_cache;
  const int* block_table;
  const int* cache_seqlens;
  void* out;
  float* lse;
  float* o_part;    // num_splits > 1 only
  float* lse_part;  // num_splits > 1 only
  int batch, s_q, heads;
  int64_t num_blocks;
  int block_size;  // a multiple of 64
  int max_blocks;
  int num_splits;
  float softmax_scale;
  bool causal;
  bool fp8_cache;   // kv_cache is the FP8 cache (then dtype is kBFloat16)
  FloatType dtype;  // kBFloat16 or kFloat16
};

// Key tokens per CTA tile and query rows (s_q * H flattened) per CTA.
constexpr int kMlaBlockN = 64;
constexpr int kMlaBlockM = 64;

const char* mla_decode_sm90_launch(const MlaDecodeParams& p, cudaStream_t stream);

// mla_cache_write (mla_cache_write.cu): kv_c [T, 512], k_pe [T, 64] (x_dtype) into kv_cache
// [capacity slots, 576] (cache_dtype), or with cache_fp8 quantized into the FP8 cache [capacity
// slots, 656 bytes] (mla_fp8_layout.h), at slot_mapping int64 [T]; slots < 0 or >= capacity are
// skipped. norm_weight [512] (w_dtype) or nullptr; rope_cos/rope_sin fp32 [T, 32] or nullptr.
struct MlaCacheWriteParams {
  const void* kv_c;
  const void* k_pe;
  void* kv_cache;
  const int64_t* slot_mapping;
  const void* norm_weight;
  const float* rope_cos;
  const float* rope_sin;
  int64_t num_tokens;
  int64_t capacity;  // num_blocks * block_size
  float eps;
  bool cache_fp8;
  FloatType x_dtype, cache_dtype, w_dtype;  // cache_dtype: unused with cache_fp8
};

const char* mla_cache_write_launch(const MlaCacheWriteParams& p, cudaStream_t stream);

}  // namespace dsv3::mla
