// Torch-free launchers of the MoE CUDA kernels, called by the ops' <op>_cuda.cpp glue (the grouped
// GEMM is in grouped_gemm_cutlass.h).
// Semantics: dsv3_kernels/reference/moe.py. All tensors are contiguous and row-major; each
// launcher returns nullptr on success, else a static error message. Nothing here allocates or
// synchronises with the host: the caller passes every buffer.
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

// moe_permute (moe_permute.cu): hidden [T, D] (dtype), topk_ids int32 [T, topk]
//   -> permuted [P, D] (dtype, or e4m3 with quant), scale fp32 [P, D/128] (quant),
//      expert_offsets int32 [E+1], inverse int32 [T, topk].
// The caller checks: 1 <= E <= kMoePermuteMaxExperts, 1 <= align <= 1024, P = permuted_rows(...)
// < 2^31, D % 128 == 0 and a 16-byte aligned hidden with quant.
constexpr int kMoePermuteMaxExperts = 1024;

struct MoePermuteParams {
  const void* hidden;
  const int* topk_ids;
  void* permuted;
  float* scale;  // nullptr without quant
  int* expert_offsets;
  int* inverse;
  int* workspace;  // moe_permute_workspace_ints(...) ints
  int64_t num_tokens, hidden_size, rows;  // T, D, P
  int topk, num_experts, align;
  bool quant;
  FloatType dtype;
};

// Ints of scratch memory moe_permute_launch needs (per-unit expert counts, row sources).
int64_t moe_permute_workspace_ints(int64_t num_tokens, int topk, int num_experts, int64_t rows);

const char* moe_permute_launch(const MoePermuteParams& p, cudaStream_t stream);

// silu_mul (silu_mul.cu): x [rows, 2I] (dtype, gate | up) -> out [rows, I] of dtype, or
// e4m3 with scale fp32 [rows, I/128] when quant. The caller checks I % 128 == 0 and a 16-byte
// aligned x with quant.
const char* silu_mul_launch(const void* x, FloatType dtype, int64_t rows, int64_t inter, bool quant, void* out,
                            float* scale, cudaStream_t stream);

// moe_unpermute (moe_unpermute.cu): expert_out [P, D] (dtype), topk_weights fp32 [T, topk],
// inverse int32 [T, topk] -> out [T, D] of dtype.
const char* moe_unpermute_launch(const void* expert_out, FloatType dtype, int64_t rows, int64_t hidden_size,
                                 const float* topk_weights, const int* inverse, int64_t num_tokens, int topk,
                                 void* out, cudaStream_t stream);

// ep_dispatch (ep_dispatch.cu), around moe_permute with the ranks as experts (rank r owns experts
// [r * per_rank, (r+1) * per_rank)):
// ep_dest: topk_ids int32 [T, topk] -> dest int32 [T, slots]: each token's distinct owner ranks in
//   order of first choice, -1 after the last (slots = min(topk, world_size)).
const char* ep_dest_launch(const int* topk_ids, int64_t num_tokens, int topk, int slots, int num_experts,
                           int per_rank, int* dest, cudaStream_t stream);
// ep_meta: for each (token, slot) with a row (inverse [T, slots] >= 0), that row of send_ids int32
//   [P, topk] / send_weights fp32 [P, topk] = the token's ids local to rank dest (-1 for choices
//   other ranks own) and their weights (0 for those). The caller fills the rows first (-1, 0).
const char* ep_meta_launch(const int* topk_ids, const float* topk_weights, const int* dest, const int* inverse,
                           int64_t num_tokens, int topk, int slots, int per_rank, int* send_ids,
                           float* send_weights, cudaStream_t stream);

}  // namespace dsv3::moe
