// moe_route: one warp per token, several tokens per block. Lane `lane` holds the experts
// lane + 32 * i (i < kSlots = ceil(E / 32), coalesced loads) in registers. Every choice (top-2 per
// group, the kept groups, the topk experts) is a warp-wide argmax over (value, index) with a
// __shfl_xor_sync butterfly; the order prefers the higher value (NaN above every number, as in
// torch's descending sort), then the LOWER index, so ties go to the lower index as in
// dsv3_kernels/reference/moe.py and every pick is a distinct existing expert whatever the scores. The butterfly leaves the same winner in
// every lane (a strict order on distinct indices, and commutative fmaxf/fminf/+), so all lanes
// follow the same path. Scores in fp32 with IEEE expf and division (no fast-math), each operation
// rounded as torch does (no product feeds an add, so nothing is contracted to an FMA).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "moe/moe_kernels.cuh"

namespace dsv3::moe {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float load(const void* p, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case FloatType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// (v, i) ranks before (bv, bi): higher value with NaN above everything, then lower index.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  const bool vn = isnan(v), bn = isnan(bv);
  return v > bv || (vn && !bn) || ((v == bv || (vn && bn)) && i < bi);
}

// max / min in that order (NaN highest): a group's top-2 sum is NaN when it holds a NaN, as the
// reference's sorted top-2 is (fmaxf / fminf would drop the NaN).
__device__ __forceinline__ float nan_max(float a, float b) {
  return isnan(a) || isnan(b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
}
__device__ __forceinline__ float nan_min(float a, float b) { return isnan(a) ? b : (isnan(b) ? a : fminf(a, b)); }

template <int kSlots>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) moe_route_kernel(const MoeRouteParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= p.num_tokens) return;  // whole warps leave together: the shuffles below stay full-warp
  const int e_total = p.num_experts;
  const int64_t row = token * e_total;

  // ---- scores (unbiased) and biased choice scores ----
  float score[kSlots], biased[kSlots];
  unsigned valid = 0;  // bit i: expert lane + 32 i exists
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int e = lane + 32 * i;
    score[i] = 0.f;
    if (e < e_total) {
      valid |= 1u << i;
      score[i] = load(p.logits, p.dtype, row + e);
    }
  }
  if (p.softmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (valid >> i & 1u) m = fmaxf(m, score[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, o));
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      if (valid >> i & 1u) {
        score[i] = expf(score[i] - m);
        s += score[i];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
    const float inv = 1.f / s;  // torch's CPU softmax multiplies by 1 / sum
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (valid >> i & 1u) score[i] = score[i] * inv;
  } else {
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (valid >> i & 1u) score[i] = 1.f / (1.f + expf(-score[i]));
  }
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int e = lane + 32 * i;
    biased[i] = (valid >> i & 1u) ? (p.bias != nullptr ? score[i] + p.bias[e] : score[i]) : -INFINITY;
  }

  // ---- group-limited eligibility: bit i of `eligible` = expert lane + 32 i may be chosen ----
  unsigned eligible = valid;
  if (p.n_group > 1 && p.topk_group < p.n_group) {
    const int group_size = e_total / p.n_group;
    int gid[kSlots];
    float gscore[kSlots];  // the score of each held expert's group
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      gid[i] = (valid >> i & 1u) ? (lane + 32 * i) / group_size : -1;  // -1: matches no group
      gscore[i] = -INFINITY;
    }
    for (int g = 0; g < p.n_group; ++g) {
      // Top-2 values of group g (the indices do not matter for the score).
      float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        if (gid[i] == g) {
          const float v = biased[i];
          t2 = nan_max(t2, nan_min(t1, v));
          t1 = nan_max(t1, v);
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float o1 = __shfl_xor_sync(kFull, t1, o), o2 = __shfl_xor_sync(kFull, t2, o);
        t2 = nan_max(nan_min(t1, o1), nan_max(t2, o2));
        t1 = nan_max(t1, o1);
      }
      const float gs = p.bias != nullptr ? t1 + t2 : t1;
#pragma unroll
      for (int i = 0; i < kSlots; ++i)
        if (gid[i] == g) gscore[i] = gs;
    }
    // Keep the topk_group best groups (ties to the lower group index).
    eligible = 0;
    unsigned open = valid;  // experts whose group is not chosen yet
    for (int k = 0; k < p.topk_group; ++k) {
      float bv = -INFINITY;
      int bg = INT_MAX;
#pragma unroll
      for (int i = 0; i < kSlots; ++i)
        if ((open >> i & 1u) && better(gscore[i], gid[i], bv, bg)) {
          bv = gscore[i];
          bg = gid[i];
        }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(kFull, bv, o);
        const int og = __shfl_xor_sync(kFull, bg, o);
        if (better(ov, og, bv, bg)) {
          bv = ov;
          bg = og;
        }
      }
#pragma unroll
      for (int i = 0; i < kSlots; ++i)
        if (gid[i] == bg) {
          open &= ~(1u << i);
          eligible |= 1u << i;
        }
    }
  }

  // ---- the topk best experts, best first ----
  // Every existing expert not yet taken is a candidate, those outside the kept groups at -inf (the
  // reference masks them so): an eligible -inf or NaN then ranks against them as it does there.
  // Lane k % 32 keeps pick k in slot k / 32 (topk <= E <= 32 * kSlots) for a coalesced store.
  float w_out[kSlots];
  int id_out[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    w_out[i] = 0.f;
    id_out[i] = 0;
  }
  float sum = 0.f;
  unsigned open = valid;  // not taken yet
  for (int k = 0; k < p.topk; ++k) {
    float bv = -INFINITY, bw = 0.f;
    int bi = INT_MAX;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int e = lane + 32 * i;
      const float v = (eligible >> i & 1u) ? biased[i] : -INFINITY;
      if ((open >> i & 1u) && better(v, e, bv, bi)) {
        bv = v;
        bi = e;
        bw = score[i];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, o), ow = __shfl_xor_sync(kFull, bw, o);
      const int oi = __shfl_xor_sync(kFull, bi, o);
      if (better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
        bw = ow;
      }
    }
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (lane + 32 * i == bi) open &= ~(1u << i);  // taken
    sum += bw;  // best first, the same in every lane
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (lane + 32 * i == k) {
        w_out[i] = bw;
        id_out[i] = bi;
      }
  }

  const float denom = sum + 1e-20f;
  const int64_t out = token * p.topk;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int k = lane + 32 * i;
    if (k < p.topk) {
      const float w = p.renormalize ? w_out[i] / denom : w_out[i];
      p.topk_weights[out + k] = w * p.routed_scaling_factor;
      p.topk_ids[out + k] = id_out[i];
    }
  }
}

template <int kSlots>
void launch(const MoeRouteParams& p, unsigned blocks, cudaStream_t stream) {
  moe_route_kernel<kSlots><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p);
}

}  // namespace

const char* moe_route_launch(const MoeRouteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return nullptr;
  if (p.num_experts < 1 || p.num_experts > kMoeMaxExperts) return "moe_route: the number of experts must be in [1, 512]";
  if (p.n_group < 1 || p.num_experts % p.n_group != 0 || p.topk_group < 1 || p.topk_group > p.n_group ||
      p.topk < 1 || p.topk > p.topk_group * (p.num_experts / p.n_group))
    return "moe_route: invalid n_group / topk_group / topk";
  const int64_t blocks = (p.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return "moe_route: too many tokens";
  const unsigned grid = static_cast<unsigned>(blocks);
  const int slots = (p.num_experts + 31) / 32;
  if (slots <= 1) launch<1>(p, grid, stream);
  else if (slots <= 2) launch<2>(p, grid, stream);
  else if (slots <= 4) launch<4>(p, grid, stream);
  else if (slots <= 8) launch<8>(p, grid, stream);
  else launch<16>(p, grid, stream);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace dsv3::moe
