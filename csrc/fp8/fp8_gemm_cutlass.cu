// FP8 block-scaled GEMM (DeepSeek-V3 recipe) on sm90a: CUTLASS's warp-specialised wgmma kernel
// with per-128-K-block fp32 promotion (KernelTmaWarpSpecializedCooperativeFP8Blockwise).
//
// Two kernel shapes, each for a bf16 and an fp32 output (4 instantiations in all):
//   M > 64  "direct":  D[M, N] = A[M, K] . B[N, K]^T, tile 128x128x128, cluster 1x2 (A multicast),
//           persistent scheduler. A's 1x128 scales are read by TMA, which needs them M-major:
//           the launcher first transposes a_scale into the workspace as [K/128, M_pad].
//   M <= 64 "swap-AB": D^T[N, M] = B[N, K] . A[M, K]^T, so N fills the 128-row wgmma dimension
//           and the few tokens sit in a 64-wide tile; D^T is column-major, i.e. out row-major.
//           Stream-K spreads the K loop over the SMs (decode has few output tiles). Both scale
//           tensors are read as stored (K-major) by the scale-producer warp with cp.async.
#include "fp8/fp8_gemm_cutlass.h"

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include <cute/tensor.hpp>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "common/sm90a_only.cuh"

namespace dsv3::fp8 {
namespace {

using namespace cute;

constexpr int kBlock = 128;   // the scale block along K (and along N for b_scale_inv)
constexpr int64_t kSwapMaxM = 64;

template <class ElementD, bool kSwapAB>
struct GemmConfig {
  using ElementAB = cutlass::float_e4m3_t;
  // In the swapped problem the "A" operand is the weight (one scale per 128 rows) and "B" the
  // activation (one scale per row).
  static constexpr int kSfM = kSwapAB ? kBlock : 1;
  static constexpr int kSfN = kSwapAB ? 1 : kBlock;
  // SFA M-major (TMA-loadable) in the direct kernel; K-major (a_scale as stored) when swapped.
  static constexpr auto kMajorSFA = kSwapAB ? cute::GMMA::Major::K : cute::GMMA::Major::MN;
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<kSfM, kSfN, kBlock, kMajorSFA,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using TileShape = std::conditional_t<kSwapAB, Shape<_128, _64, _128>, Shape<_128, _128, _128>>;
  using ClusterShape = std::conditional_t<kSwapAB, Shape<_1, _1, _1>, Shape<_1, _2, _1>>;
  using Scheduler = std::conditional_t<kSwapAB, cutlass::gemm::StreamKScheduler,
                                       cutlass::gemm::PersistentScheduler>;
  using LayoutD = std::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignD = 16 / sizeof(ElementD);

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlignD,  // no C operand: D = acc
      ElementD, LayoutD, kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, cute::tuple<cutlass::layout::RowMajor, LayoutSFA>, 16,
      ElementAB, cute::tuple<cutlass::layout::ColumnMajor, LayoutSFB>, 16,  // [N, K] row-major = K-major B
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Sm90aOnly<Kernel>>;
  using Arguments = typename Gemm::Arguments;

  // sfa_mn: the M-major copy of a_scale (direct kernel only), [K/128, m_pad].
  static Arguments arguments(const Fp8GemmProblem& p, const float* sfa_mn, int64_t m_pad) {
    const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
    const int kb = k / kBlock;
    // The GEMM CUTLASS sees: (rows of its A, rows of its B, K).
    const int gm = kSwapAB ? n : m, gn = kSwapAB ? m : n;
    auto shape = make_shape(gm, gn, k, 1);

    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(gm, k, 1));
    StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(gn, k, 1));
    // out is [M, ldo] row-major: D[m, n] (direct) or D^T[n, m] (swapped, column-major).
    StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(gm, gn, 1));
    if constexpr (kSwapAB) {
      get<1>(stride_d) = p.ldo;
    } else {
      get<0>(stride_d) = p.ldo;
    }
    get<2>(stride_d) = p.ldo * p.m;

    LayoutSFA layout_sfa;
    const float* ptr_sfa;
    const float* ptr_sfb;
    if constexpr (kSwapAB) {
      layout_sfa = ScaleConfig::tile_atom_to_shape_SFA(shape);  // b_scale_inv [ceil(N/128), K/128]
      ptr_sfa = p.b_scale;
      ptr_sfb = p.a_scale;  // a_scale [M, K/128]
    } else {
      // M-major [K/128, m_pad]: its extent is m_pad (not M) so the TMA row stride and CUTLASS's
      // alignment check hold; rows M..m_pad hold zeros and only feed rows that are not stored.
      const int mp = static_cast<int>(m_pad);
      layout_sfa = make_layout(
          make_shape(make_shape(_1{}, mp), make_shape(Int<kBlock>{}, kb), 1),
          make_stride(make_stride(_0{}, _1{}), make_stride(_0{}, mp), mp * kb));
      ptr_sfa = sfa_mn;
      ptr_sfb = p.b_scale;
    }
    LayoutSFB layout_sfb = ScaleConfig::tile_atom_to_shape_SFB(shape);

    const auto* a = static_cast<const ElementAB*>(p.a);
    const auto* b = static_cast<const ElementAB*>(p.b);
    Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                   shape,
                   {kSwapAB ? b : a, stride_a, kSwapAB ? a : b, stride_b, ptr_sfa, layout_sfa, ptr_sfb,
                    layout_sfb},
                   {{}, nullptr, {}, static_cast<ElementD*>(p.out), stride_d}};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.hw_info.sm_count = p.sm_count;
    return args;
  }

  // Gemm::can_implement, except that the output's alignment is judged on its padded row
  // length: CUTLASS asks for N % 8 == 0 (bf16), but the TMA store only needs 16-byte row
  // strides (ldo) and clips the partial last 16 bytes of each row itself.
  static bool can_implement(const Fp8GemmProblem& p, const Arguments& args) {
    auto padded = args.problem_shape;
    (kSwapAB ? get<0>(padded) : get<1>(padded)) = static_cast<int>(p.ldo);
    return Kernel::CollectiveMainloop::can_implement(args.problem_shape, args.mainloop) &&
           Kernel::CollectiveEpilogue::can_implement(padded, args.epilogue) &&
           Kernel::TileScheduler::can_implement(args.scheduler);
  }
};

// [M, K/128] -> [K/128, m_pad] through a 32x32 shared-memory tile (coalesced both ways);
// columns M..m_pad are zero.
__global__ void transpose_scales_kernel(const float* __restrict__ src, float* __restrict__ dst,
                                        int m, int m_pad, int kb) {
  __shared__ float tile[32][33];
  const int m0 = blockIdx.x * 32, k0 = blockIdx.y * 32;
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {
    const int row = m0 + r, col = k0 + threadIdx.x;
    tile[r][threadIdx.x] = (row < m && col < kb) ? src[static_cast<int64_t>(row) * kb + col] : 0.0f;
  }
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {
    const int row = k0 + r, col = m0 + threadIdx.x;
    if (row < kb && col < m_pad) dst[static_cast<int64_t>(row) * m_pad + col] = tile[threadIdx.x][r];
  }
}

int64_t pad_m(int64_t m) { return (m + 3) / 4 * 4; }  // 16-byte TMA row stride for fp32 scales
size_t round_up_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

bool use_swap_ab(const Fp8GemmProblem& p) { return p.m <= kSwapMaxM; }

size_t sfa_bytes(const Fp8GemmProblem& p) {
  return use_swap_ab(p) ? 0 : round_up_256(sizeof(float) * pad_m(p.m) * (p.k / kBlock));
}

template <class Config>
size_t workspace_size(const Fp8GemmProblem& p) {
  return sfa_bytes(p) + round_up_256(Config::Gemm::get_workspace_size(Config::arguments(p, nullptr, pad_m(p.m))));
}

template <class Config>
const char* run(const Fp8GemmProblem& p, void* workspace, cudaStream_t stream) {
  auto* ws = static_cast<char*>(workspace);
  const int64_t m_pad = pad_m(p.m);
  float* sfa_mn = nullptr;
  if (!use_swap_ab(p)) {
    sfa_mn = reinterpret_cast<float*>(ws);
    const int kb = static_cast<int>(p.k / kBlock);
    dim3 grid((m_pad + 31) / 32, (kb + 31) / 32);
    transpose_scales_kernel<<<grid, dim3(32, 8), 0, stream>>>(p.a_scale, sfa_mn, static_cast<int>(p.m),
                                                             static_cast<int>(m_pad), kb);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return cudaGetErrorString(e);
  }
  auto args = Config::arguments(p, sfa_mn, m_pad);
  if (!Config::can_implement(p, args)) return "CUTLASS cannot implement this FP8 GEMM (alignment)";
  typename Config::Gemm gemm;
  cutlass::Status status = gemm.initialize(args, ws + sfa_bytes(p), stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return cudaGetErrorString(e);
  return nullptr;
}

using Bf16Direct = GemmConfig<cutlass::bfloat16_t, false>;
using Bf16Swap = GemmConfig<cutlass::bfloat16_t, true>;
using F32Direct = GemmConfig<float, false>;
using F32Swap = GemmConfig<float, true>;

}  // namespace

size_t fp8_gemm_workspace_size(const Fp8GemmProblem& p) {
  if (p.m == 0) return 0;
  const bool swap = use_swap_ab(p);
  if (p.out_type == GemmOutType::kBFloat16) {
    return swap ? workspace_size<Bf16Swap>(p) : workspace_size<Bf16Direct>(p);
  }
  return swap ? workspace_size<F32Swap>(p) : workspace_size<F32Direct>(p);
}

const char* fp8_gemm_run(const Fp8GemmProblem& p, void* workspace, cudaStream_t stream) {
  if (p.m == 0) return nullptr;
  const bool swap = use_swap_ab(p);
  if (p.out_type == GemmOutType::kBFloat16) {
    return swap ? run<Bf16Swap>(p, workspace, stream) : run<Bf16Direct>(p, workspace, stream);
  }
  return swap ? run<F32Swap>(p, workspace, stream) : run<F32Direct>(p, workspace, stream);
}

}  // namespace dsv3::fp8
