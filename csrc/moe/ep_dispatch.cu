// CUDA kernels of ep_dispatch around moe_permute (semantics: dsv3_kernels/reference/moe.py):
// one thread per token finds its destination ranks, one thread per (token, slot) writes a packed
// row's local choices. Both are small next to the row copy moe_permute does.
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {
namespace {

constexpr int kThreads = 256;

__global__ void ep_dest_kernel(const int* __restrict__ ids, int64_t t, int k, int slots, int num_experts,
                               int per_rank, int* __restrict__ dest) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tok >= t) return;
  const int* row = ids + tok * k;
  int* d = dest + tok * slots;
  int n = 0;
  for (int j = 0; j < k; ++j) {
    const int id = row[j];
    if (id < 0 || id >= num_experts) continue;
    const int r = id / per_rank;
    bool seen = false;
    for (int i = 0; i < n; ++i) seen |= d[i] == r;
    if (!seen) d[n++] = r;  // n <= slots: at most min(k, world_size) distinct ranks
  }
  for (int i = n; i < slots; ++i) d[i] = -1;
}

__global__ void ep_meta_kernel(const int* __restrict__ ids, const float* __restrict__ weights,
                               const int* __restrict__ dest, const int* __restrict__ inverse, int64_t pairs, int k,
                               int slots, int per_rank, int* __restrict__ send_ids, float* __restrict__ send_weights) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs || inverse[i] < 0) return;
  const int64_t tok = i / slots, row = inverse[i];
  const int rank = dest[i];
  for (int j = 0; j < k; ++j) {
    const int id = ids[tok * k + j];
    const int local = id - rank * per_rank;
    const bool mine = id >= 0 && local >= 0 && local < per_rank;
    send_ids[row * k + j] = mine ? local : -1;
    send_weights[row * k + j] = mine ? weights[tok * k + j] : 0.0f;
  }
}

const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

}  // namespace

const char* ep_dest_launch(const int* topk_ids, int64_t num_tokens, int topk, int slots, int num_experts,
                           int per_rank, int* dest, cudaStream_t stream) {
  if (num_tokens == 0) return nullptr;
  ep_dest_kernel<<<blocks_for(num_tokens), kThreads, 0, stream>>>(topk_ids, num_tokens, topk, slots, num_experts,
                                                                   per_rank, dest);
  return launch_error();
}

const char* ep_meta_launch(const int* topk_ids, const float* topk_weights, const int* dest, const int* inverse,
                           int64_t num_tokens, int topk, int slots, int per_rank, int* send_ids,
                           float* send_weights, cudaStream_t stream) {
  const int64_t pairs = num_tokens * slots;
  if (pairs == 0) return nullptr;
  ep_meta_kernel<<<blocks_for(pairs), kThreads, 0, stream>>>(topk_ids, topk_weights, dest, inverse, pairs, topk, slots,
                                                              per_rank, send_ids, send_weights);
  return launch_error();
}

}  // namespace dsv3::moe
