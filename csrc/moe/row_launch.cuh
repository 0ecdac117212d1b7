// Launch helpers of the memory-bound row kernels of silu_mul.cu and moe_unpermute.cu: one block
// per row, whole warps up to kMaxThreads, 16-byte vectors where the row length and base addresses
// allow it (a scalar instantiation otherwise).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace dsv3::moe {

constexpr int kMaxThreads = 128;

inline const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads for a row of `items` work items: whole warps, at most kMaxThreads.
inline int threads_for(int64_t items) {
  const int64_t warps = (items + 31) / 32;
  return warps >= kMaxThreads / 32 ? kMaxThreads : static_cast<int>(warps < 1 ? 32 : warps * 32);
}

}  // namespace dsv3::moe
