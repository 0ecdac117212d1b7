// Torch-free launcher of the MoE routing CUDA kernel, called by moe_cuda.cpp. Semantics:
// dsv3_kernels/reference/moe.py. All tensors are contiguous; the launcher returns nullptr on
// success, else a static error message. Nothing here allocates: the caller passes every buffer.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/float_type.h"

namespace dsv3::moe {

// The kernel keeps ceil(E / 32) experts per lane in registers (one warp per token).
constexpr int kMoeMaxExperts = 512;

// moe_route (moe_route.cu): logits [T, E] (dtype), bias fp32 [E] or nullptr
//   -> topk_weights fp32 [T, topk], topk_ids int32 [T, topk], best first.
// The caller checks: 1 <= E <= kMoeMaxExperts, E % n_group == 0, 1 <= topk_group <= n_group,
// 1 <= topk <= topk_group * E / n_group, and with a bias and n_group > 1, E / n_group >= 2.
struct MoeRouteParams {
  const void* logits;
  const float* bias;  // nullptr: no e_score_correction_bias
  float* topk_weights;
  int* topk_ids;
  int64_t num_tokens;
  int num_experts;
  int n_group, topk_group, topk;
  float routed_scaling_factor;
  bool softmax;  // false: sigmoid
  bool renormalize;
  FloatType dtype;
};

const char* moe_route_launch(const MoeRouteParams& p, cudaStream_t stream);

}  // namespace dsv3::moe
