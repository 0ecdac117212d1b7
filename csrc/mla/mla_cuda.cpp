// CUDA implementations of the MLA ops: argument checks, device/stream, output and workspace
// allocation (torch's caching allocator only: no cudaMalloc, no host synchronisation, and the
// split count depends on shapes only, so the ops are CUDA-graph capturable), then the torch-free
// launchers in mla_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/torch_glue.h"
#include "mla/mla_checks.h"
#include "mla/mla_kernels.cuh"

namespace dsv3::mla {
namespace {

// Splits of each request's key range: enough CTAs for ~2 waves over the SMs, at most one per
// 64-key tile of the longest possible sequence. Shapes only, never data (graph capture).
int64_t auto_num_splits(int64_t batch, int64_t rows, int64_t max_blocks, int64_t block_size, int num_sms) {
  const int64_t ctas = batch * cdiv(rows, kMlaBlockM);
  const int64_t max_tiles = std::max<int64_t>(1, cdiv(max_blocks * block_size, kMlaBlockN));
  return std::clamp<int64_t>(cdiv(2 * static_cast<int64_t>(num_sms), std::max<int64_t>(ctas, 1)), 1, max_tiles);
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache,
                                                   const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                                   double softmax_scale, bool causal, int64_t num_splits) {
  check_mla_decode(q, kv_cache, block_table, cache_seqlens, num_splits);
  const bool fp8 = is_fp8_cache(kv_cache);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || (q.scalar_type() == at::kHalf && !fp8),
              "mla_decode: the CUDA kernel takes bfloat16 or float16 (bfloat16 with the FP8 cache), got ",
              q.scalar_type(), "; use backend=\"triton\"");
  const int64_t block_size = kv_cache.size(1);
  TORCH_CHECK(block_size % kMlaBlockN == 0, "mla_decode: the CUDA kernel needs kv_cache's block_size to be a "
              "multiple of 64, got ", block_size, "; use backend=\"triton\"");
  TORCH_CHECK(q.is_cuda(), "mla_decode: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major == 9 && prop->minor == 0, "mla_decode: the CUDA kernel needs an sm_90 (Hopper) GPU, got ",
              prop->name, " (sm_", prop->major, prop->minor, "); use backend=\"triton\"");

  const int64_t b = q.size(0), s_q = q.size(1), h = q.size(2), rows = s_q * h;
  const int64_t max_blocks = block_table.size(1);
  auto out = at::empty({b, s_q, h, kLoraRank}, q.options());
  auto lse = at::empty({b, h, s_q}, q.options().dtype(at::kFloat));
  if (b == 0 || rows == 0) return {out, lse};
  TORCH_CHECK(b <= 65535, "mla_decode: the CUDA kernel takes at most 65535 requests, got ", b);
  TORCH_CHECK(rows <= (int64_t{1} << 24), "mla_decode: s_q * H too large: ", rows);
  TORCH_CHECK(max_blocks * block_size <= std::numeric_limits<int32_t>::max(),
              "mla_decode: block_table covers more than 2^31 tokens per request");
  const int64_t splits = num_splits > 0 ? num_splits
                                        : auto_num_splits(b, rows, max_blocks, block_size, prop->multiProcessorCount);
  TORCH_CHECK(splits <= 65535, "mla_decode: num_splits must be <= 65535, got ", splits);

  at::Tensor o_part, lse_part;
  if (splits > 1) {
    o_part = at::empty({b, rows, splits, kLoraRank}, q.options().dtype(at::kFloat));
    lse_part = at::empty({b, rows, splits}, q.options().dtype(at::kFloat));
  }
  MlaDecodeParams p{};
  p.q = q.data_ptr();
  p.kv_cache = kv_cache.data_ptr();
  p.block_table = block_table.data_ptr<int>();
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_part = splits > 1 ? o_part.data_ptr<float>() : nullptr;
  p.lse_part = splits > 1 ? lse_part.data_ptr<float>() : nullptr;
  p.batch = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.heads = static_cast<int>(h);
  p.num_blocks = kv_cache.size(0);
  p.block_size = static_cast<int>(block_size);
  p.max_blocks = static_cast<int>(max_blocks);
  p.num_splits = static_cast<int>(splits);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.fp8_cache = fp8;
  p.dtype = float_type(q.scalar_type());
  check_launch(mla_decode_sm90_launch(p, at::cuda::getCurrentCUDAStream()), "mla_decode");
  return {out, lse};
}

void mla_cache_write_cuda(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& kv_cache,
                          const at::Tensor& slot_mapping, const std::optional<at::Tensor>& kv_norm_weight, double eps,
                          const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin) {
  check_mla_cache_write(kv_c, k_pe, kv_cache, slot_mapping, kv_norm_weight, rope_cos, rope_sin);
  TORCH_CHECK(kv_c.is_cuda(), "mla_cache_write: the CUDA kernel needs CUDA tensors");
  TORCH_CHECK(kv_c.device() == kv_cache.device() && kv_c.device() == k_pe.device() &&
                  kv_c.device() == slot_mapping.device() &&
                  (!kv_norm_weight || kv_norm_weight->device() == kv_c.device()) &&
                  (!rope_cos || (rope_cos->device() == kv_c.device() && rope_sin->device() == kv_c.device())),
              "mla_cache_write: all tensors must be on one device");
  const c10::cuda::CUDAGuard guard(kv_c.device());
  MlaCacheWriteParams p{};
  p.kv_c = kv_c.data_ptr();
  p.k_pe = k_pe.data_ptr();
  p.kv_cache = kv_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.norm_weight = kv_norm_weight ? kv_norm_weight->data_ptr() : nullptr;
  p.rope_cos = rope_cos ? rope_cos->data_ptr<float>() : nullptr;
  p.rope_sin = rope_sin ? rope_sin->data_ptr<float>() : nullptr;
  p.num_tokens = kv_c.size(0);
  p.capacity = kv_cache.size(0) * kv_cache.size(1);
  p.eps = static_cast<float>(eps);
  p.x_dtype = float_type(kv_c.scalar_type());
  p.cache_fp8 = is_fp8_cache(kv_cache);
  p.cache_dtype = p.cache_fp8 ? FloatType::kBFloat16 : float_type(kv_cache.scalar_type());
  p.w_dtype = kv_norm_weight ? float_type(kv_norm_weight->scalar_type()) : p.x_dtype;
  check_launch(mla_cache_write_launch(p, at::cuda::getCurrentCUDAStream()), "mla_cache_write");
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) {
  m.impl("mla_decode", &mla_decode_cuda);
  m.impl("mla_cache_write", &mla_cache_write_cuda);
}

}  // namespace dsv3::mla
