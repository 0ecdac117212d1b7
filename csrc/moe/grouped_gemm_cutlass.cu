// Grouped (per-expert) GEMMs on sm90a: CUTLASS's ptr-array warp-specialised wgmma kernels, one
// group per expert, with the group arguments built on the device from expert_offsets.
//
// Two instantiations (each costs about a minute of nvcc on CI):
//   bf16  KernelPtrArrayTmaWarpSpecializedCooperative, tile 128x256x64, cluster 1x2 (A multicast).
//   e4m3  KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise, tile 128x128x128, cluster 1x2,
//         fp32 promotion per 128-wide K block with Sm90BlockwiseScaleConfig<1, 128, 128>:
//         A's scales 1x128 (one per row and K block), B's 128x128.
// Both write bf16 rows straight from the fp32 accumulators (D = acc, no C operand).
//
// Per call, in stream order:
//   1. build_group_args_kernel (one thread per expert): the group's problem shape (M_e, N, K) with
//      M_e = hi_e - lo_e (0 for an empty expert: the persistent scheduler then gives it no tile),
//      the A/B/D pointers (a + lo_e K, b + e N K, out + lo_e N), the strides and, for e4m3, the
//      scale pointers. The host passes only device pointers (no host problem shapes),
//      so the launch needs no synchronisation and the grid is one CTA per SM.
//   2. e4m3 only: sfa_to_m_major_kernel. The grouped mainloop loads a tile's 128 row scales per
//      K block with one warp of 4-byte cp.async; M-major SFA makes them contiguous (coalesced),
//      while a_scale as given ([M, K/128] row-major, K-major) would scatter them K/128 floats
//      apart. In grouped mode CUTLASS rebuilds each group's scale layout from its (M_e, N, K)
//      (the layout arguments are not read), which for M-major is [K/128, M_e] with row stride
//      M_e: so each expert's block is transposed into the workspace at offset lo_e * K/128 (the
//      blocks of non-overlapping segments are disjoint). B's scales [E, ceil(N/128), K/128] are
//      K-major per expert (one scale per tile and K block) and are read as stored.
//   3. zero_uncovered_rows_kernel: rows no segment covers (before offsets[0], past offsets[E],
//      gaps) are zeroed; the GEMM writes every covered row.
//   4. the grouped GEMM.
#include "moe/grouped_gemm_cutlass.h"

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include <cute/tensor.hpp>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "common/sm90a_only.cuh"

namespace dsv3::moe {
namespace {

using namespace cute;

constexpr int kBlock = 128;  // the FP8 scale block along K (and along N for the weights)

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M_e, N, K) per group
using GroupShape = ProblemShape::UnderlyingProblemShape;
using ElementD = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;     // a [M, K]
using LayoutB = cutlass::layout::ColumnMajor;  // b[e] [N, K] row-major = K-major B
using LayoutD = cutlass::layout::RowMajor;     // out [M, N]
constexpr int kAlignD = 16 / sizeof(ElementD);

// The mainloop of each variant (a specialisation each: the FP8 builder rejects bf16 operands, so
// both must not be instantiated).
template <bool kFp8, class ElementAB, class TileShape, class ClusterShape, class StageCount, class LayoutSFA,
          class LayoutSFB>
struct Mainloop {
  static constexpr int kAlign = 16 / sizeof(ElementAB);
  using type = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, cute::tuple<LayoutA*, LayoutSFA*>, kAlign,
      ElementAB, cute::tuple<LayoutB*, LayoutSFB*>, kAlign,
      float, TileShape, ClusterShape, StageCount,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;
};

template <class ElementAB, class TileShape, class ClusterShape, class StageCount, class LayoutSFA, class LayoutSFB>
struct Mainloop<false, ElementAB, TileShape, ClusterShape, StageCount, LayoutSFA, LayoutSFB> {
  static constexpr int kAlign = 16 / sizeof(ElementAB);
  using type = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, LayoutA*, kAlign, ElementAB, LayoutB*, kAlign,
      float, TileShape, ClusterShape, StageCount,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
};

template <bool kFp8>
struct GroupedConfig {
  using ElementAB = std::conditional_t<kFp8, cutlass::float_e4m3_t, cutlass::bfloat16_t>;
  using TileShape = std::conditional_t<kFp8, Shape<_128, _128, _128>, Shape<_128, _256, _64>>;
  using ClusterShape = Shape<_1, _2, _1>;

  // 1x128 A scales, M-major (see the file comment); 128x128 B scales, K-major as stored.
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock, cute::GMMA::Major::MN,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignD,  // no C operand: D = acc
      ElementD, LayoutD*, kAlignD, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using StageCount = cutlass::gemm::collective::StageCountAutoCarveout<
      static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>;
  using CollectiveMainloop = typename Mainloop<kFp8, ElementAB, TileShape, ClusterShape, StageCount,
                                                LayoutSFA, LayoutSFB>::type;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Sm90aOnly<Kernel>>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // The per-group argument arrays (device memory, [num_experts] each) and, for e4m3, the M-major
  // copy of a_scale ([M * K/128] floats).
  struct GroupArgs {
    GroupShape* shapes;
    const ElementAB** ptr_a;
    const ElementAB** ptr_b;
    ElementD** ptr_d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    const float** ptr_sfa;
    const float** ptr_sfb;
    float* sfa;
  };

  static typename Gemm::Arguments arguments(const GroupedGemmProblem& p, const GroupArgs& g) {
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {p.num_experts, g.shapes, nullptr};  // no host shapes: grid = sm_count CTAs
    if constexpr (kFp8) {
      // No layout arrays: CUTLASS 4.2's grouped mainloop never reads them, it rebuilds each group's
      // scale layouts from the group's (M_e, N, K) (see the file comment).
      args.mainloop = {g.ptr_a, g.stride_a, g.ptr_b, g.stride_b, g.ptr_sfa, nullptr, g.ptr_sfb, nullptr};
    } else {
      args.mainloop = {g.ptr_a, g.stride_a, g.ptr_b, g.stride_b};
    }
    args.epilogue = {{}, nullptr, nullptr, g.ptr_d, g.stride_d};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.hw_info.sm_count = p.sm_count;
    return args;
  }
};

__device__ __forceinline__ int clamp_row(int v, int m) { return v < 0 ? 0 : (v > m ? m : v); }

// One thread per expert: clamp the segment and write the group's CUTLASS arguments.
template <class Cfg>
__global__ void build_group_args_kernel(const GroupedGemmProblem p, const typename Cfg::GroupArgs g) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.num_experts) return;
  const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
  const int lo = clamp_row(p.expert_offsets[e], m), hi = clamp_row(p.expert_offsets[e + 1], m);
  const int rows = hi > lo ? hi - lo : 0;
  using ElementAB = typename Cfg::ElementAB;
  g.shapes[e] = GroupShape(rows, n, k);
  g.ptr_a[e] = static_cast<const ElementAB*>(p.a) + static_cast<int64_t>(lo) * k;
  g.ptr_b[e] = static_cast<const ElementAB*>(p.b) + static_cast<int64_t>(e) * n * k;
  g.ptr_d[e] = static_cast<ElementD*>(p.out) + static_cast<int64_t>(lo) * n;
  g.stride_a[e] = cutlass::make_cute_packed_stride(typename Cfg::StrideA{}, make_shape(rows, k, 1));
  g.stride_b[e] = cutlass::make_cute_packed_stride(typename Cfg::StrideB{}, make_shape(n, k, 1));
  g.stride_d[e] = cutlass::make_cute_packed_stride(typename Cfg::StrideD{}, make_shape(rows, n, 1));
  if constexpr (std::is_same_v<ElementAB, cutlass::float_e4m3_t>) {
    const int kb = k / kBlock;
    g.ptr_sfa[e] = g.sfa + static_cast<int64_t>(lo) * kb;
    g.ptr_sfb[e] = p.b_scale + static_cast<int64_t>(e) * ((n + kBlock - 1) / kBlock) * kb;
  }
}

// Expert blockIdx.z: a_scale rows [lo, hi) x [K/128] -> sfa + lo * kb as [kb, hi - lo] (M-major),
// through a 32x32 shared-memory tile so reads and writes are both coalesced. blockIdx.y picks 32
// K blocks, blockIdx.x strides over the segment's 32-row tiles.
__global__ void sfa_to_m_major_kernel(const float* __restrict__ a_scale, const int* __restrict__ offsets,
                                      float* __restrict__ sfa, int m, int kb) {
  __shared__ float tile[32][33];
  const int e = blockIdx.z;
  const int lo = clamp_row(offsets[e], m), hi = clamp_row(offsets[e + 1], m);
  const int rows = hi - lo;
  const int k0 = blockIdx.y * 32;
  const float* src = a_scale + static_cast<int64_t>(lo) * kb;
  float* dst = sfa + static_cast<int64_t>(lo) * kb;
  for (int r0 = blockIdx.x * 32; r0 < rows; r0 += gridDim.x * 32) {  // uniform in the block
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
      const int row = r0 + r, col = k0 + threadIdx.x;
      tile[r][threadIdx.x] = (row < rows && col < kb) ? src[static_cast<int64_t>(row) * kb + col] : 0.0f;
    }
    __syncthreads();
    for (int c = threadIdx.y; c < 32; c += blockDim.y) {
      const int col = k0 + c, row = r0 + threadIdx.x;
      if (col < kb && row < rows) dst[static_cast<int64_t>(col) * rows + row] = tile[threadIdx.x][c];
    }
    __syncthreads();
  }
}

// Zeroes the rows of out [m, row_vecs x 16 bytes] that no segment covers. Each block owns
// kZeroRows rows, marks the covered ones from every segment (E loads, cached), then zeroes the rest.
constexpr int kZeroRows = 64;
constexpr int kZeroThreads = 256;

__global__ void __launch_bounds__(kZeroThreads)
zero_uncovered_rows_kernel(const int* __restrict__ offsets, int num_experts, int m, uint4* __restrict__ out,
                           int64_t row_vecs) {
  __shared__ int covered[kZeroRows];
  const int r0 = blockIdx.x * kZeroRows;
  for (int i = threadIdx.x; i < kZeroRows; i += blockDim.x) covered[i] = 0;
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const int lo = max(clamp_row(offsets[e], m), r0), hi = min(clamp_row(offsets[e + 1], m), r0 + kZeroRows);
    for (int r = lo; r < hi; ++r) covered[r - r0] = 1;
  }
  __syncthreads();
  const int rows = min(kZeroRows, m - r0);
  for (int r = 0; r < rows; ++r) {
    if (covered[r]) continue;  // the same in every thread
    uint4* row = out + static_cast<int64_t>(r0 + r) * row_vecs;
    for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) row[i] = make_uint4(0, 0, 0, 0);
  }
}

// Sequential 256-byte aligned regions of one workspace; with a null base it only measures.
struct Carver {
  char* base;
  size_t used = 0;
  template <class T>
  T* take(int64_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += (static_cast<size_t>(count) * sizeof(T) + 255) / 256 * 256;
    return p;
  }
};

template <class Cfg>
typename Cfg::GroupArgs carve_group_args(const GroupedGemmProblem& p, Carver& c) {
  typename Cfg::GroupArgs g{};
  const int64_t e = p.num_experts;
  g.shapes = c.take<GroupShape>(e);
  g.ptr_a = c.take<const typename Cfg::ElementAB*>(e);
  g.ptr_b = c.take<const typename Cfg::ElementAB*>(e);
  g.ptr_d = c.take<ElementD*>(e);
  g.stride_a = c.take<typename Cfg::StrideA>(e);
  g.stride_b = c.take<typename Cfg::StrideB>(e);
  g.stride_d = c.take<typename Cfg::StrideD>(e);
  if (p.fp8) {
    g.ptr_sfa = c.take<const float*>(e);
    g.ptr_sfb = c.take<const float*>(e);
    g.sfa = c.take<float>(p.m * (p.k / kBlock));
  }
  return g;
}

template <class Cfg>
size_t workspace_size(const GroupedGemmProblem& p) {
  Carver c{nullptr};
  const auto g = carve_group_args<Cfg>(p, c);
  return c.used + Cfg::Gemm::get_workspace_size(Cfg::arguments(p, g));
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <class Cfg>
const char* run(const GroupedGemmProblem& p, void* workspace, cudaStream_t stream) {
  Carver c{static_cast<char*>(workspace)};
  const auto g = carve_group_args<Cfg>(p, c);
  char* gemm_workspace = static_cast<char*>(workspace) + c.used;
  const int m = static_cast<int>(p.m);

  build_group_args_kernel<Cfg><<<(p.num_experts + 127) / 128, 128, 0, stream>>>(p, g);
  if (p.fp8) {
    const int kb = static_cast<int>(p.k / kBlock);
    // Enough 32-row tiles per expert for an even split, at most 32 blocks per (expert, K range).
    const int64_t tiles = (p.m / p.num_experts + 31) / 32;
    const dim3 grid(static_cast<unsigned>(tiles < 1 ? 1 : (tiles > 32 ? 32 : tiles)), (kb + 31) / 32,
                    static_cast<unsigned>(p.num_experts));
    sfa_to_m_major_kernel<<<grid, dim3(32, 8), 0, stream>>>(p.a_scale, p.expert_offsets, g.sfa, m, kb);
  }
  zero_uncovered_rows_kernel<<<static_cast<unsigned>((p.m + kZeroRows - 1) / kZeroRows), kZeroThreads, 0, stream>>>(
      p.expert_offsets, p.num_experts, m, static_cast<uint4*>(p.out), p.n * sizeof(ElementD) / 16);
  if (const char* e = last_error()) return e;

  const auto args = Cfg::arguments(p, g);
  typename Cfg::Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return "CUTLASS cannot implement this grouped GEMM";
  status = gemm.initialize(args, gemm_workspace, stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  return last_error();
}

using Bf16Grouped = GroupedConfig<false>;
using Fp8Grouped = GroupedConfig<true>;

// Nothing for CUTLASS to do: no rows, no columns, or (K == 0 / no experts) an all-zero result.
bool trivial(const GroupedGemmProblem& p) { return p.m == 0 || p.n == 0 || p.k == 0 || p.num_experts == 0; }

}  // namespace

size_t grouped_gemm_workspace_size(const GroupedGemmProblem& p) {
  if (trivial(p)) return 0;
  return p.fp8 ? workspace_size<Fp8Grouped>(p) : workspace_size<Bf16Grouped>(p);
}

const char* grouped_gemm_run(const GroupedGemmProblem& p, void* workspace, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return nullptr;
  if (p.k == 0 || p.num_experts == 0) {
    const cudaError_t e = cudaMemsetAsync(p.out, 0, static_cast<size_t>(p.m * p.n) * sizeof(ElementD), stream);
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  }
  if (p.m > INT32_MAX || p.n > INT32_MAX || p.k > INT32_MAX) return "grouped_gemm: a dimension exceeds 2^31 - 1";
  if (p.n % 8 != 0 || p.k % 8 != 0 || (p.fp8 && p.k % kBlock != 0)) return "grouped_gemm: unsupported N or K";
  return p.fp8 ? run<Fp8Grouped>(p, workspace, stream) : run<Bf16Grouped>(p, workspace, stream);
}

}  // namespace dsv3::moe
