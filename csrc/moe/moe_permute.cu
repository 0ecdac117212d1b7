// moe_permute: the "align + permute" step of the expert layer (semantics: moe_permute in
// dsv3_kernels/reference/moe.py). Deterministic and free of host synchronisation: every size is
// fixed by the shapes, and the order of an expert's rows is the flat index t * topk + j, never the
// order in which atomics happen to land.
//
// The N = T * topk choices are cut into units of kUnit consecutive choices, one warp each.
//   1. count: each warp counts its unit's choices per expert (warp __match_any_sync groups equal
//      ids; the lowest lane of a group adds the group's size to the warp's shared-memory
//      histogram) -> counts [units, E]. The same kernel sets row_src [P] (the source token of
//      each permuted row) to -1.
//   2. scan: one block per expert turns its column of counts into exclusive prefixes over the
//      units (in place) and writes the expert's total.
//   3. place: every block scans the padded totals into the expert offsets (block 0 also stores
//      them), then each warp walks its unit in order: a choice's row is offsets[e] + the unit's
//      prefix for e + the number of earlier choices of e in the unit (its rank within the
//      __match_any_sync group plus the group sizes of earlier steps). Writes inverse and row_src.
//      Ids outside [0, E) are not counted or placed: inverse -1 for the id -1 ("no expert", skipped
//      downstream), -2 for any other (its token combines to NaN).
//   4. gather: one block per permuted row copies hidden[row_src] with 16-byte vectors (zeros for
//      padding rows), or quantises it on the way (act_quant's 1x128 blocks: a padding row gets
//      e4m3 zeros and the zero block's scale 1e-4 / 448).
// Steps 1-3 touch only ids and small tables (~10 us for T = 16384, topk = 8, E = 256 by the
// design's arithmetic; not measured here, no GPU); step 4 moves P * D elements at memory speed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fp8/quant_math.cuh"
#include "moe/moe_kernels.cuh"

namespace dsv3::moe {
namespace {

using fp8::to_float;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;                    // warps per block in count / place
constexpr int kPerLane = 8;                  // choices per lane per unit
constexpr int kUnit = 32 * kPerLane;         // choices per warp
constexpr int kScanThreads = 256;
constexpr int kScanItems = 4;                // units per thread per pass of the scan
constexpr int kGatherThreads = 128;
constexpr int kQuantBlock = 128;

// Exclusive prefix sum over the block of one int per thread; *total gets the block's sum.
// Every thread of the block must call it; blockDim.x is a multiple of 32.
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const int result = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
  *total = warp_sums[warps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return result;
}

// The unit's choices held by this lane: id for flat index unit * kUnit + s * 32 + lane, or -1
// past the end or outside [0, E) (one key for "not placed").
__device__ __forceinline__ void load_unit(const int* __restrict__ ids, int64_t n, int64_t unit, int num_experts,
                                          int (&key)[kPerLane]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int s = 0; s < kPerLane; ++s) {
    const int64_t idx = unit * kUnit + s * 32 + lane;
    const int id = idx < n ? ids[idx] : -1;
    key[s] = (id >= 0 && id < num_experts) ? id : -1;
  }
}

__global__ void __launch_bounds__(kWarps * 32)
permute_count_kernel(const int* __restrict__ ids, int64_t n, int num_experts, int64_t units, int* __restrict__ counts,
                     int* __restrict__ row_src, int64_t rows) {
  __shared__ int hist[kWarps][kMoePermuteMaxExperts];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    row_src[i] = -1;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (unit >= units) return;  // whole warps; only __syncwarp below
  int* h = hist[warp];
  for (int e = lane; e < num_experts; e += 32) h[e] = 0;
  int key[kPerLane];
  load_unit(ids, n, unit, num_experts, key);
  __syncwarp();
#pragma unroll
  for (int s = 0; s < kPerLane; ++s) {
    const unsigned group = __match_any_sync(kFull, key[s]);
    if (key[s] >= 0 && lane == __ffs(group) - 1) h[key[s]] += __popc(group);
    __syncwarp();
  }
  int* out = counts + unit * num_experts;
  for (int e = lane; e < num_experts; e += 32) out[e] = h[e];
}

// Block e: counts[:, e] -> exclusive prefix over the units (in place); totals[e] = the sum.
__global__ void __launch_bounds__(kScanThreads)
permute_scan_kernel(int* __restrict__ counts, int64_t units, int num_experts, int* __restrict__ totals) {
  const int e = blockIdx.x;
  int carry = 0;
  for (int64_t base = 0; base < units; base += kScanThreads * kScanItems) {  // uniform in the block
    int v[kScanItems], sum = 0;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int64_t u = base + threadIdx.x * kScanItems + i;
      v[i] = u < units ? counts[u * num_experts + e] : 0;
      sum += v[i];
    }
    int pass_total;
    int prefix = carry + block_exclusive_scan(sum, &pass_total);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int64_t u = base + threadIdx.x * kScanItems + i;
      if (u < units) counts[u * num_experts + e] = prefix;
      prefix += v[i];
    }
    carry += pass_total;
  }
  if (threadIdx.x == 0) totals[e] = carry;
}

__global__ void __launch_bounds__(kWarps * 32)
permute_place_kernel(const int* __restrict__ ids, int64_t n, int topk, int num_experts, int align, int64_t units,
                     const int* __restrict__ prefix, const int* __restrict__ totals, int* __restrict__ offsets_out,
                     int* __restrict__ inverse, int* __restrict__ row_src) {
  __shared__ int offsets[kMoePermuteMaxExperts + 1];
  __shared__ int next_row[kWarps][kMoePermuteMaxExperts];

  // Padded segment sizes -> expert offsets; thread i scans experts [i * per, (i + 1) * per).
  const int per = (num_experts + blockDim.x - 1) / blockDim.x;
  int sum = 0;
  for (int i = 0; i < per; ++i) {
    const int e = threadIdx.x * per + i;
    if (e < num_experts) sum += (totals[e] + align - 1) / align * align;
  }
  int total;
  int run = block_exclusive_scan(sum, &total);
  for (int i = 0; i < per; ++i) {
    const int e = threadIdx.x * per + i;
    if (e < num_experts) {
      offsets[e] = run;
      run += (totals[e] + align - 1) / align * align;
    }
  }
  if (threadIdx.x == 0) offsets[num_experts] = total;
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) offsets_out[e] = offsets[e];
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (unit >= units) return;  // whole warps; only __syncwarp below
  int* next = next_row[warp];
  const int* unit_prefix = prefix + unit * num_experts;
  for (int e = lane; e < num_experts; e += 32) next[e] = offsets[e] + unit_prefix[e];
  int key[kPerLane];
  load_unit(ids, n, unit, num_experts, key);
  __syncwarp();
  const unsigned lower_lanes = (1u << lane) - 1;
#pragma unroll
  for (int s = 0; s < kPerLane; ++s) {
    const unsigned group = __match_any_sync(kFull, key[s]);
    const int row = key[s] >= 0 ? next[key[s]] + __popc(group & lower_lanes) : -1;
    __syncwarp();  // every lane has read next[] before the group leaders advance it
    if (key[s] >= 0 && lane == __ffs(group) - 1) next[key[s]] += __popc(group);
    __syncwarp();
    const int64_t idx = unit * kUnit + s * 32 + lane;
    if (idx < n) {
      inverse[idx] = row >= 0 ? row : (ids[idx] == -1 ? -1 : -2);  // -1: no expert (skipped); -2: a bad id
      if (row >= 0) row_src[row] = static_cast<int>(idx / topk);
    }
  }
}

// One block per permuted row: a copy of hidden[row_src[row]] (zeros when -1) in V-sized words.
template <class V>
__global__ void __launch_bounds__(kGatherThreads)
permute_gather_kernel(const V* __restrict__ hidden, V* __restrict__ out, const int* __restrict__ row_src,
                      int64_t row_words) {
  const int64_t row = blockIdx.x;
  const int src = row_src[row];
  V* dst = out + row * row_words;
  if (src < 0) {
    for (int64_t i = threadIdx.x; i < row_words; i += kGatherThreads) dst[i] = V{};
    return;
  }
  const V* in = hidden + static_cast<int64_t>(src) * row_words;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < row_words; i += kGatherThreads) dst[i] = in[i];
}

// One block per permuted row, quantised like act_quant: a group of kQuantBlock / kVec threads
// holds one 1x128 block (one 16-byte vector each), so the values stay in registers between the
// amax and the division. Every thread runs the same number of passes (the shuffles need full warps).
template <class T>
__global__ void __launch_bounds__(kGatherThreads)
permute_gather_quant_kernel(const T* __restrict__ hidden, uint8_t* __restrict__ out, float* __restrict__ scale,
                            const int* __restrict__ row_src, int64_t d) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kGroup = kQuantBlock / kVec;
  const int64_t row = blockIdx.x;
  const int src = row_src[row];
  const int64_t blocks = d / kQuantBlock;
  const int lane = threadIdx.x % kGroup;
  for (int64_t b0 = 0; b0 < blocks; b0 += kGatherThreads / kGroup) {
    const int64_t b = b0 + threadIdx.x / kGroup;
    const int64_t col = b * kQuantBlock + lane * kVec;
    const bool active = b < blocks;
    float v[kVec];
    if (active && src >= 0) {
      const fp8::Vec<T, kVec> in = *reinterpret_cast<const fp8::Vec<T, kVec>*>(hidden + src * d + col);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = to_float(in.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = 0.0f;
    }
    fp8::Vec<uint16_t, kVec / 2> q;
    const float s = fp8::quant_vec<kVec>(v, kGroup, q);
    if (active) {
      *reinterpret_cast<fp8::Vec<uint16_t, kVec / 2>*>(out + row * d + col) = q;
      if (lane == 0) scale[row * blocks + b] = s;
    }
  }
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

int64_t units_for(int64_t n) { return n > kUnit ? (n + kUnit - 1) / kUnit : 1; }

template <class T>
void gather_quant(const MoePermuteParams& p, const int* row_src, cudaStream_t stream) {
  permute_gather_quant_kernel<T><<<static_cast<unsigned>(p.rows), kGatherThreads, 0, stream>>>(
      static_cast<const T*>(p.hidden), static_cast<uint8_t*>(p.permuted), p.scale, row_src, p.hidden_size);
}

template <class V>
void gather(const MoePermuteParams& p, int64_t row_bytes, const int* row_src, cudaStream_t stream) {
  permute_gather_kernel<V><<<static_cast<unsigned>(p.rows), kGatherThreads, 0, stream>>>(
      static_cast<const V*>(p.hidden), static_cast<V*>(p.permuted), row_src, row_bytes / static_cast<int64_t>(sizeof(V)));
}

}  // namespace

int64_t moe_permute_workspace_ints(int64_t num_tokens, int topk, int num_experts, int64_t rows) {
  return units_for(num_tokens * topk) * num_experts + num_experts + rows;
}

const char* moe_permute_launch(const MoePermuteParams& p, cudaStream_t stream) {
  if (p.num_experts < 1 || p.num_experts > kMoePermuteMaxExperts) return "moe_permute: num_experts must be in [1, 1024]";
  if (p.align < 1 || p.align > 1024) return "moe_permute: align must be in [1, 1024]";
  if (p.rows > INT32_MAX - 1024) return "moe_permute: too many permuted rows for int32 indices";
  if (p.quant && (p.hidden_size % kQuantBlock != 0 || reinterpret_cast<uintptr_t>(p.hidden) % 16 != 0))
    return "moe_permute: quant needs D % 128 == 0 and a 16-byte aligned hidden";
  const int64_t n = p.num_tokens * p.topk;
  const int64_t units = units_for(n);
  int* counts = p.workspace;
  int* totals = counts + units * p.num_experts;
  int* row_src = totals + p.num_experts;
  const unsigned unit_blocks = static_cast<unsigned>((units + kWarps - 1) / kWarps);

  permute_count_kernel<<<unit_blocks, kWarps * 32, 0, stream>>>(p.topk_ids, n, p.num_experts, units, counts, row_src,
                                                               p.rows);
  permute_scan_kernel<<<p.num_experts, kScanThreads, 0, stream>>>(counts, units, p.num_experts, totals);
  permute_place_kernel<<<unit_blocks, kWarps * 32, 0, stream>>>(p.topk_ids, n, p.topk, p.num_experts, p.align, units,
                                                               counts, totals, p.expert_offsets, p.inverse, row_src);
  if (p.rows == 0 || p.hidden_size == 0) return last_error();

  if (p.quant) {
    switch (p.dtype) {
      case FloatType::kFloat32: gather_quant<float>(p, row_src, stream); break;
      case FloatType::kBFloat16: gather_quant<__nv_bfloat16>(p, row_src, stream); break;
      case FloatType::kFloat16: gather_quant<__half>(p, row_src, stream); break;
    }
    return last_error();
  }
  // The widest word (16, 8, 4 or 2 bytes) that divides the row and both base addresses.
  const int64_t elem = p.dtype == FloatType::kFloat32 ? 4 : 2;
  const int64_t row_bytes = p.hidden_size * elem;
  const uintptr_t bits = static_cast<uintptr_t>(row_bytes) | reinterpret_cast<uintptr_t>(p.hidden) |
                         reinterpret_cast<uintptr_t>(p.permuted);
  if (bits % 16 == 0) gather<uint4>(p, row_bytes, row_src, stream);
  else if (bits % 8 == 0) gather<uint2>(p, row_bytes, row_src, stream);
  else if (bits % 4 == 0) gather<unsigned>(p, row_bytes, row_src, stream);
  else gather<unsigned short>(p, row_bytes, row_src, stream);
  return last_error();
}

}  // namespace dsv3::moe
