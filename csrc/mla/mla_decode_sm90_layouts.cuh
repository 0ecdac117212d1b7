// Shared-memory layouts and tiled MMAs of the sm_90a MLA decode kernel (mla_decode_sm90.cu).
// Kept apart so that a host-only program can check them with CuTe on the CPU
// (tests/cuda/mla_layouts_check.cu: the V^T view, the accumulator (row, col) maps).
#pragma once
#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include "mla/mla_kernels.cuh"

namespace dsv3::mla {

constexpr int kLoraRank = 512;  // c_kv, also the value
constexpr int kRopeDim = 64;    // k_pe
constexpr int kHeadDim = kLoraRank + kRopeDim;

template <class Element>
struct MlaLayouts {
  using BlockM = cute::Int<kMlaBlockM>;
  using BlockN = cute::Int<kMlaBlockN>;
  using HeadDim = cute::Int<kHeadDim>;
  using DimV = cute::Int<kLoraRank>;

  // Q [64 rows, 576] and each K tile [64 keys, 576]: K-major (the 576 dims contiguous, as in
  // global memory) with the 128-byte swizzle atom (8 rows x 64 elements), tiled rows first.
  // This is the canonical K-major SW128 wgmma operand layout for A (Q) and B (K) of S = Q K^T.
  using SmemLayoutQK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                    cute::Shape<BlockM, HeadDim>{}));
  // P [64 rows, 64 keys]: the A operand of O = P V, K-major (keys contiguous), one SW128 atom wide.
  using SmemLayoutP = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                   cute::Shape<BlockM, BlockN>{}));
  // V^T [512 dims, 64 keys]: the B operand (N = dims, K = keys) of O = P V, read from the same K
  // tile smem. (n, k) -> SmemLayoutQK(k, n): the 1-D index n * 64 + k of a (512, 64):(64, 1)
  // layout is, in the colexicographic order of SmemLayoutQK's (64, 576) shape, exactly (key k,
  // dim n). N (the dims) is the contiguous direction: an MN-major operand, and a K-major SW128
  // atom read transposed is an MN-major SW128 atom, which wgmma takes for 16-bit types.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutQK{}, cute::make_layout(cute::Shape<DimV, BlockN>{}, cute::Stride<BlockN, cute::_1>{})));

  using MmaAtomS = std::conditional_t<
      std::is_same_v<Element, cutlass::bfloat16_t>,
      cute::SM90_64x32x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>,
      cute::SM90_64x32x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>>;
  using MmaAtomO = std::conditional_t<
      std::is_same_v<Element, cutlass::bfloat16_t>,
      cute::SM90_64x256x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::MN>,
      cute::SM90_64x256x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::MN>>;
  // Two warpgroups side by side along N: S tile 64 x 64 (WG w: keys 32w..32w+31), O tile 64 x 512
  // (WG w: dims 256w..256w+255). Thread t belongs to WG t / 128; both WGs hold the same 64 rows.
  using TiledMmaS = decltype(cute::make_tiled_mma(MmaAtomS{}, cute::Layout<cute::Shape<cute::_1, cute::_2, cute::_1>>{}));
  using TiledMmaO = decltype(cute::make_tiled_mma(MmaAtomO{}, cute::Layout<cute::Shape<cute::_1, cute::_2, cute::_1>>{}));
};

// A wgmma accumulator fragment ((2, 2, N/8), MMA_M, MMA_N) viewed as (row, col):
// ((2 rows: +0 / +8, MMA_M), (2 adjacent cols, N/8 col groups, MMA_N)). The same view of the
// thread's identity-tensor partition gives each element's (row, col) in the tile.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout l) {
  using namespace cute;
  static_assert(decltype(rank<0>(l))::value == 3, "expects a wgmma accumulator layout");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

}  // namespace dsv3::mla
