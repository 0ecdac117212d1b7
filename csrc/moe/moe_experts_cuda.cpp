// CUDA implementation of the expert-layer ops (moe_permute, grouped_gemm, silu_mul,
// moe_unpermute, fused_moe): argument checks, device/stream, output and workspace allocation
// (torch's caching allocator only, no host synchronisation: CUDA-graph capturable), then the
// torch-free launchers in moe_kernels.cuh and grouped_gemm_cutlass.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "common/torch_glue.h"
#include "moe/grouped_gemm_cutlass.h"
#include "moe/moe_checks.h"
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {
namespace {

void check_launch(const char* error, const char* op) { TORCH_CHECK(error == nullptr, op, ": ", error); }

// The vectorised kernels and TMA need 16-byte aligned bases; a view at an odd offset gets an
// aligned copy.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& hidden,
                                                                            const at::Tensor& topk_ids,
                                                                            int64_t num_experts, int64_t align,
                                                                            bool quant) {
  check_moe_permute(hidden, topk_ids, num_experts, align, quant);
  TORCH_CHECK(hidden.is_cuda(), "moe_permute: the CUDA kernel needs CUDA tensors");
  TORCH_CHECK(num_experts <= kMoePermuteMaxExperts, "moe_permute: the CUDA kernel takes at most ",
              kMoePermuteMaxExperts, " experts, got ", num_experts);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t t = hidden.size(0), d = hidden.size(1), topk = topk_ids.size(1);
  const int64_t rows = permuted_rows(t, topk, num_experts, align);
  TORCH_CHECK(rows <= INT_MAX - 1024, "moe_permute: ", rows, " permuted rows exceed the int32 row indices");
  const at::Tensor x = quant ? aligned16(hidden) : hidden;
  auto permuted = at::empty({rows, d}, x.options().dtype(quant ? at::kFloat8_e4m3fn : x.scalar_type()));
  const auto f32 = x.options().dtype(at::kFloat);
  auto scale = quant ? at::empty({rows, d / 128}, f32) : at::empty({0}, f32);
  auto offsets = at::empty({num_experts + 1}, topk_ids.options());
  auto inverse = at::empty({t, topk}, topk_ids.options());
  auto workspace = at::empty({moe_permute_workspace_ints(t, static_cast<int>(topk), static_cast<int>(num_experts), rows)},
                             topk_ids.options());

  MoePermuteParams p{};
  p.hidden = x.data_ptr();
  p.topk_ids = topk_ids.data_ptr<int>();
  p.permuted = permuted.data_ptr();
  p.scale = quant ? scale.data_ptr<float>() : nullptr;
  p.expert_offsets = offsets.data_ptr<int>();
  p.inverse = inverse.data_ptr<int>();
  p.workspace = workspace.data_ptr<int>();
  p.num_tokens = t;
  p.hidden_size = d;
  p.rows = rows;
  p.topk = static_cast<int>(topk);
  p.num_experts = static_cast<int>(num_experts);
  p.align = static_cast<int>(align);
  p.quant = quant;
  p.dtype = float_type(x.scalar_type());
  check_launch(moe_permute_launch(p, at::cuda::getCurrentCUDAStream()), "moe_permute");
  return {permuted, scale, offsets, inverse};
}

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

std::tuple<at::Tensor, at::Tensor> silu_mul_cuda(const at::Tensor& x_in, bool quant) {
  check_silu_mul(x_in, quant);
  TORCH_CHECK(x_in.is_cuda(), "silu_mul: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = quant ? aligned16(x_in) : x_in;
  const int64_t m = x.size(0), i = x.size(1) / 2;
  auto out = at::empty({m, i}, x.options().dtype(quant ? at::kFloat8_e4m3fn : x.scalar_type()));
  const auto f32 = x.options().dtype(at::kFloat);
  auto scale = quant ? at::empty({m, i / 128}, f32) : at::empty({0}, f32);
  check_launch(silu_mul_launch(x.data_ptr(), float_type(x.scalar_type()), m, i, quant, out.data_ptr(),
                               quant ? scale.data_ptr<float>() : nullptr, at::cuda::getCurrentCUDAStream()),
               "silu_mul");
  return {out, scale};
}

at::Tensor moe_unpermute_cuda(const at::Tensor& expert_out, const at::Tensor& topk_weights, const at::Tensor& inverse) {
  check_moe_unpermute(expert_out, topk_weights, inverse);
  TORCH_CHECK(expert_out.is_cuda(), "moe_unpermute: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const int64_t t = inverse.size(0), topk = inverse.size(1), d = expert_out.size(1);
  auto out = at::empty({t, d}, expert_out.options());
  check_launch(moe_unpermute_launch(expert_out.data_ptr(), float_type(expert_out.scalar_type()), expert_out.size(0), d,
                                    topk_weights.data_ptr<float>(), inverse.data_ptr<int>(), t,
                                    static_cast<int>(topk), out.data_ptr(), at::cuda::getCurrentCUDAStream()),
               "moe_unpermute");
  return out;
}

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

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) {
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("fused_moe", &fused_moe_cuda);
}

}  // namespace dsv3::moe
