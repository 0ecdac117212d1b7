// Torch-free launcher of the sm90a grouped (per-expert) GEMMs (CUTLASS ptr-array kernels), called
// by grouped_gemm_cuda.cpp. Semantics (dsv3_kernels/reference/moe.py, grouped_gemm):
//   lo_e = clamp(expert_offsets[e], 0, M), hi_e = clamp(expert_offsets[e+1], 0, M);
//   out[lo_e:hi_e] = a[lo_e:hi_e] @ b[e].T for hi_e > lo_e (fp32 accumulation, bf16 out), and
//   every row no segment covers is 0.
// Segments that overlap (only non-monotone offsets can make them) race: their common rows are
// unspecified, but nothing is read or written out of bounds. moe_permute's offsets never overlap.
// Everything that depends on expert_offsets is computed on the device: no host synchronisation.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace dsv3::moe {

struct GroupedGemmProblem {
  const void* a;               // [m, k] row-major, bf16 or e4m3; 16-byte aligned
  const float* a_scale;        // e4m3: [m, k / 128] row-major (act_quant's 1x128 scales); else nullptr
  const void* b;               // [num_experts, n, k] row-major, a's dtype; 16-byte aligned
  const float* b_scale;        // e4m3: [num_experts, ceil(n / 128), k / 128] row-major; else nullptr
  const int* expert_offsets;   // [num_experts + 1] (device)
  void* out;                   // bf16 [m, n] row-major; 16-byte aligned
  int64_t m, n, k;             // n % 8 == 0 and k % 8 == 0 (TMA: 16-byte rows); e4m3: k % 128 == 0
  int num_experts;
  bool fp8;                    // a and b are e4m3 with the scales above; else both bf16
  int sm_count;                // multiprocessors of the device (the persistent grid)
};

// Bytes of device workspace grouped_gemm_run needs (256-byte aligned regions inside).
size_t grouped_gemm_workspace_size(const GroupedGemmProblem& p);

// Enqueues the GEMMs (and their small argument / zero-fill kernels) on `stream`. Returns nullptr
// on success, else a static error message. workspace: grouped_gemm_workspace_size(p) bytes,
// 256-byte aligned.
const char* grouped_gemm_run(const GroupedGemmProblem& p, void* workspace, cudaStream_t stream);

}  // namespace dsv3::moe
