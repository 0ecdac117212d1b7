// MLA absorbed-attention decode over a paged latent cache on Hopper (sm_90a, wgmma through CuTe).
// Semantics: dsv3_kernels/reference/mla.py (masking, invalid metadata -> NaN, empty -> 0 / -inf).
//
// Shape of the work (MQA view): q [B, s_q, H, 576] is [B, s_q*H, 576]; row r = s*H + h. All rows of
// a request share the one latent key/value head, so a CTA takes 64 rows (one wgmma M) of one request
// and one split of its key range: grid (ceil(s_q*H / 64), num_splits, B), 256 threads = two
// warpgroups (WG0: threads 0-127, WG1: 128-255), one CTA per SM (225 KiB of shared memory).
//
// Per key tile of 64 tokens (kMlaBlockN; the tile lies inside one cache block because block_size is
// a multiple of 64):
//   S = Q K^T      each WG computes 64 rows x 32 of the 64 keys (SS wgmma m64n32k16, 36 k-steps)
//   row max        quad shuffles, then the two WGs swap their halves' maxima through smem
//   P = exp2(S * scale * log2e - m)   fp32; each WG keeps the row sum of its own 32 columns
//   P -> smem      (q dtype), both halves, then O[:, WG's 256 columns] += P V with SS wgmma
//                  m64n256k16 where V^T is the first 512 columns of the same K tile read MN-major.
// K tiles are double-buffered and loaded with 16-byte cp.async; token rows past seqlen are
// zero-filled (the cache's unused slots may hold NaN, and 0 * NaN = NaN).
// Synchronisation per tile (all 256 threads): (1) cp.async wait + proxy fence + barrier: the tile is
// in smem and both WGs are done with the other stage and with sP, so the next tile's copies start;
// (2) barrier after the row maxima are in smem; (3) proxy fence + barrier after P is in smem.
// Every wgmma batch is waited for (wait<0>) before the next barrier, so no smem is overwritten
// while a wgmma may still read it.
// Non-finite scores (reference/mla.py): a row that sees one is flagged (its row sum is made NaN
// before the two WGs' sums meet, so both see it) and gets out = lse = NaN. A key tile that a row of
// the CTA does not wholly see (the causal tail) has the non-finite values of its V part set to 0
// in smem between S and P V, so that P = 0 times NaN never reaches a row that does not see the key.
// Split-KV: split i covers an equal share of the request's ceil(seqlen / 64) tiles (seqlen read on
// the device, so varlen batches stay balanced and CUDA-graph replays with new lengths are right).
// num_splits == 1 writes out/lse directly; otherwise each CTA writes its normalized partial O and
// its lse to the fp32 workspace, and mla_combine_kernel merges the splits by their lse.
//
// The FP8 cache (kFp8, bf16 q; layout in mla_fp8_layout.h): a key tile's 64 tokens are 64 x 656
// contiguous bytes, copied raw (16-byte cp.async, rows past seqlen zero-filled) into the K stage 1
// region (41,984 of its 73,728 bytes), then dequantized by all 256 threads into K stage 0 in the
// same swizzled bf16 layout: e4m3 -> f16 (exact) -> fp32, times the tile's scale, -> bf16 (exact
// for the power-of-two scales mla_cache_write writes). The S and P V wgmmas then run unchanged.
// Per tile: (1) raw tile in smem + barrier, (2) dequantize, proxy fence + barrier (K visible to
// wgmma, the raw region free), then the next raw tile's copies start and overlap this tile's
// math. One K stage instead of two: the dequantization is not overlapped with the wgmmas.
#include <cmath>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include "mla/mla_decode_sm90_layouts.cuh"
#include "mla/mla_kernels.cuh"

// The wgmma kernel exists only for sm_90a (plain sm_90 cannot encode wgmma).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "mla_decode_sm90.cu must be compiled for sm_90a: use 9.0a (not 9.0) in the CUDA arch list"
#endif

namespace dsv3::mla {
namespace {

using namespace cute;

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared memory (bytes): Q | K stage 0 | K stage 1 | P | row max [2][64] | row sum [2][64], all
// at 1024-byte aligned offsets (the 128-byte swizzle repeats every 1024 bytes: the wgmma
// descriptors assume a 1024-aligned atom base), plus 1 KiB to align the dynamic smem base.
constexpr int kQBytes = kMlaBlockM * kHeadDim * 2;   // 73,728
constexpr int kKBytes = kMlaBlockN * kHeadDim * 2;   // 73,728
constexpr int kPBytes = kMlaBlockM * kMlaBlockN * 2; //  8,192
constexpr int kOffK0 = kQBytes;
constexpr int kOffK1 = kOffK0 + kKBytes;
constexpr int kOffP = kOffK1 + kKBytes;
constexpr int kOffMax = kOffP + kPBytes;
constexpr int kOffSum = kOffMax + 2 * kMlaBlockM * 4;
constexpr int kSmemUsed = kOffSum + 2 * kMlaBlockM * 4;  // 230,400
constexpr int kSmemBytes = kSmemUsed + 1024;              // 231,424 <= 232,448 (227 KiB)
static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");

__device__ __forceinline__ void fence_async_shared() {
  // Makes this thread's generic-proxy smem writes (cp.async, st.shared) visible to wgmma (async proxy).
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <class Element>
__device__ __forceinline__ void store_pair(Element* dst, float a, float b) {
  if constexpr (std::is_same_v<Element, float>) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    const uint32_t lo = static_cast<Element>(a).raw(), hi = static_cast<Element>(b).raw();
    *reinterpret_cast<uint32_t*>(dst) = lo | (hi << 16);
  }
}

// Writes a constant result for this CTA's rows: invalid metadata (NaN) or no key at all (0, -inf).
template <class Element>
__device__ void write_constant(const MlaDecodeParams& p, int b, int row0, int split, float o_value,
                               float lse_value) {
  const int rows = p.s_q * p.heads;
  const int tid = threadIdx.x;
  if (p.num_splits > 1) {
    // The combine kernel turns a NaN lse into NaN out/lse and skips -inf splits (their O unread).
    for (int i = tid; i < kMlaBlockM; i += kThreads) {
      const int r = row0 + i;
      if (r < rows) p.lse_part[(static_cast<int64_t>(b) * rows + r) * p.num_splits + split] = lse_value;
    }
    return;
  }
  for (int i = tid; i < kMlaBlockM; i += kThreads) {
    const int r = row0 + i;
    if (r < rows) p.lse[(static_cast<int64_t>(b) * p.heads + r % p.heads) * p.s_q + r / p.heads] = lse_value;
  }
  Element* out = static_cast<Element*>(p.out);
  for (int i = tid; i < kMlaBlockM * kLoraRank / 2; i += kThreads) {
    const int r = row0 + i / (kLoraRank / 2), c = 2 * (i % (kLoraRank / 2));
    if (r < rows) store_pair(out + (static_cast<int64_t>(b) * rows + r) * kLoraRank + c, o_value, o_value);
  }
}

// Two e4m3 values (low byte first) times scale -> two bf16 (low half first), exactly when scale is
// a power of two.
__device__ __forceinline__ uint32_t dequant_e4m3x2(uint32_t two, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  const float lo = __half2float(__ushort_as_half(h.x)), hi = __half2float(__ushort_as_half(h.y));
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo * scale, hi * scale);
  return *reinterpret_cast<const uint32_t*>(&b);
}

// The V part (the first kLoraRank columns) of a K tile in smem: NaN / inf elements set to 0, by all
// threads. With SmemLayoutQK those columns are the tile's first kMlaBlockN * kLoraRank elements
// (its 64-column blocks are contiguous: tile_to_shape tiles the rows first).
template <class Element>
__device__ void sanitize_values(Element* k) {
  constexpr uint16_t kExp = std::is_same_v<Element, cutlass::half_t> ? 0x7C00 : 0x7F80;  // all-ones exponent
  uint4* chunks = reinterpret_cast<uint4*>(k);
  for (int c = threadIdx.x; c < kMlaBlockN * kLoraRank / 8; c += kThreads) {
    uint4 w = chunks[c];
    uint16_t* h = reinterpret_cast<uint16_t*>(&w);
    bool changed = false;
    CUTE_UNROLL
    for (int e = 0; e < 8; ++e) {
      if ((h[e] & kExp) == kExp) {
        h[e] = 0;
        changed = true;
      }
    }
    if (changed) chunks[c] = w;
  }
}

template <class Element, bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const __grid_constant__ MlaDecodeParams p) {
  static_assert(!kFp8 || std::is_same_v<Element, cutlass::bfloat16_t>, "the FP8 cache is read with bf16 q");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = MlaLayouts<Element>;
  static_assert(typename L::SmemLayoutQK{}(0, kLoraRank) == kMlaBlockN * kLoraRank,
                "sanitize_values: the V columns must be the K tile's first elements");
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int tid = threadIdx.x;
  const int m_block = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int rows = p.s_q * p.heads;
  const int row0 = m_block * kMlaBlockM;
  const int seqlen = p.cache_seqlens[b];
  const int* block_table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;

  // ---- metadata checks: never read out of bounds; the whole request gets NaN if any fails ----
  bool valid = seqlen >= 0 && static_cast<int64_t>(seqlen) <= static_cast<int64_t>(p.max_blocks) * p.block_size;
  int bad = 0;
  if (valid) {
    const int need = static_cast<int>((static_cast<int64_t>(seqlen) + p.block_size - 1) / p.block_size);
    for (int i = tid; i < need; i += kThreads) {
      const int blk = block_table[i];
      bad |= blk < 0 || blk >= p.num_blocks;
    }
  }
  valid = __syncthreads_or(bad) == 0 && valid;  // uniform over the CTA
  const int n_tiles = valid ? (seqlen + kMlaBlockN - 1) / kMlaBlockN : 0;
  const int tile_begin = static_cast<int>(static_cast<int64_t>(n_tiles) * split / p.num_splits);
  const int tile_end = static_cast<int>(static_cast<int64_t>(n_tiles) * (split + 1) / p.num_splits);
  if (!valid || tile_begin >= tile_end) {
    write_constant<Element>(p, b, row0, split, valid ? 0.f : NAN, valid ? -INFINITY : NAN);
    return;
  }

  // ---- shared-memory tensors (layouts and their reasons: mla_decode_sm90_layouts.cuh) ----
  Element* q_smem = reinterpret_cast<Element*>(smem);
  // K stage s at smem + kOffK0 + s * kKBytes (computed, not an array: a runtime-indexed array
  // would live in local memory).
  auto k_smem = [&](int stage) { return reinterpret_cast<Element*>(smem + kOffK0 + stage * kKBytes); };
  Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename L::SmemLayoutQK{});
  Tensor sP = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem + kOffP)), typename L::SmemLayoutP{});
  float* s_max = reinterpret_cast<float*>(smem + kOffMax);  // [2 WGs][64 rows]
  float* s_sum = reinterpret_cast<float*>(smem + kOffSum);  // [2 WGs][64 rows]

  // ---- async loads: a 64 x 576 tile is 64 rows x 9 column blocks of 128 bytes (8 chunks of 16 B).
  // Thread t copies chunk t % 8 of rows t / 8 and t / 8 + 32 in all 9 column blocks (18 copies).
  // Moving 32 rows (4 swizzle atoms of 1024 B) or one 64-column block (64 rows x 128 B) keeps the
  // address bits the 128-byte swizzle reads, so each copy's smem address is this thread's base
  // plus a constant (checked on the host by tests/cuda/mla_layouts_check.cu).
  constexpr int kRowHalf = 32;
  constexpr int kColBlocks = kHeadDim / 64;  // 9
  const int ld_row = tid / 8, ld_col = (tid % 8) * 8;
  const int q_off = &sQ(ld_row, ld_col) - q_smem;  // == SmemLayoutQK{}(ld_row, ld_col), swizzled
  const Element* q_gmem = static_cast<const Element*>(p.q) + (static_cast<int64_t>(b) * rows + row0) * kHeadDim;
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int r = ld_row + h * kRowHalf;
    const bool pred = row0 + r < rows;  // rows past s_q*H: zero (computed, never stored)
    const Element* src = q_gmem + (pred ? r * kHeadDim + ld_col : 0);
    CUTE_UNROLL
    for (int cb = 0; cb < kColBlocks; ++cb) {
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
          *reinterpret_cast<const uint128_t*>(src + (pred ? cb * 64 : 0)),
          *reinterpret_cast<uint128_t*>(q_smem + q_off + h * kRowHalf * 64 + cb * kMlaBlockM * 64), pred);
    }
  }
  const Element* kv = static_cast<const Element*>(p.kv_cache);
  auto load_k_tile = [&](int tile, int stage) {
    const int64_t t0 = static_cast<int64_t>(tile) * kMlaBlockN;
    const int64_t blk = block_table[t0 / p.block_size];  // checked above to be in [0, num_blocks)
    const Element* tile_src = kv + (blk * p.block_size + t0 % p.block_size) * kHeadDim;
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int r = ld_row + h * kRowHalf;
      const bool pred = t0 + r < seqlen;  // slots past the sequence: zero-filled, never read
      const Element* src = tile_src + (pred ? r * kHeadDim + ld_col : 0);
      CUTE_UNROLL
      for (int cb = 0; cb < kColBlocks; ++cb) {
        SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
            *reinterpret_cast<const uint128_t*>(src + (pred ? cb * 64 : 0)),
            *reinterpret_cast<uint128_t*>(k_smem(stage) + q_off + h * kRowHalf * 64 + cb * kMlaBlockN * 64), pred);
      }
    }
  };
  // FP8: raw tokens to the K stage 1 region, then dequantized into K stage 0 (see the header).
  uint8_t* raw = smem + kOffK1;
  auto load_raw_tile = [&](int tile) {
    constexpr int kChunksPerToken = kFp8TokenBytes / 16;  // 41
    const int64_t t0 = static_cast<int64_t>(tile) * kMlaBlockN;
    const int64_t blk = block_table[t0 / p.block_size];
    const uint8_t* src = static_cast<const uint8_t*>(p.kv_cache) + (blk * p.block_size + t0 % p.block_size) * kFp8TokenBytes;
    for (int c = tid; c < kMlaBlockN * kChunksPerToken; c += kThreads) {
      const bool pred = t0 + c / kChunksPerToken < seqlen;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src + (pred ? c * 16 : 0)),
                                                       *reinterpret_cast<uint128_t*>(raw + c * 16), pred);
    }
  };
  auto dequant_tile = [&]() {
    // 64 tokens x 72 chunks of 8 values; a chunk is 16 contiguous bytes of the swizzled layout.
    constexpr int kChunks = kHeadDim / 8;
    Tensor sK0 = make_tensor(make_smem_ptr(k_smem(0)), typename L::SmemLayoutQK{});
    for (int c = tid; c < kMlaBlockN * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      const uint8_t* token = raw + row * kFp8TokenBytes;
      uint4 v;
      if (col < kLoraRank) {
        const float scale = reinterpret_cast<const float*>(token + kFp8ScaleOffset)[col / kFp8Tile];
        const uint2 e = *reinterpret_cast<const uint2*>(token + col);
        v = make_uint4(dequant_e4m3x2(e.x & 0xFFFFu, scale), dequant_e4m3x2(e.x >> 16, scale),
                       dequant_e4m3x2(e.y & 0xFFFFu, scale), dequant_e4m3x2(e.y >> 16, scale));
      } else {
        v = *reinterpret_cast<const uint4*>(token + kFp8RopeOffset + 2 * (col - kLoraRank));
      }
      *reinterpret_cast<uint4*>(&sK0(row, col)) = v;
    }
  };
  if constexpr (kFp8) {
    load_raw_tile(tile_begin);
  } else {
    load_k_tile(tile_begin, 0);
  }
  cp_async_fence();

  // ---- MMAs: both tiled over the two WGs along N (see the layouts header) ----
  typename L::TiledMmaS mma_s;
  typename L::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // (MMA, 1, 36) smem descriptors
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kMlaBlockM>, Int<kMlaBlockN>>{});       // 16 fp32
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kMlaBlockM>, Int<kLoraRank>>{});        // 128 fp32
  Tensor tOrP = thr_o.partition_fragment_A(sP);  // (MMA, 1, 4)
  Tensor tSsP = thr_s.partition_C(sP);           // where this thread's S/P elements live in sP
  // (row, col) of every accumulator element, from CuTe's own partitioning of identity tensors,
  // viewed as (row, col) = ((2, MMA_M), (2, N/8, MMA_N)) (mla_decode_sm90_layouts.cuh).
  Tensor tScS_flat = thr_s.partition_C(make_identity_tensor(Shape<Int<kMlaBlockM>, Int<kMlaBlockN>>{}));
  Tensor tOcO_flat = thr_o.partition_C(make_identity_tensor(Shape<Int<kMlaBlockM>, Int<kLoraRank>>{}));
  Tensor tScS = make_tensor(tScS_flat.data(), acc_rowcol(tScS_flat.layout()));
  Tensor tOcO = make_tensor(tOcO_flat.data(), acc_rowcol(tOcO_flat.layout()));
  Tensor tSrS_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
  Tensor tOrO_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(tSrS_rc))::value;  // 2
  static_assert(kRowsPerThread == decltype(size<0>(tOrO_rc))::value, "S and O rows must coincide");
  clear(tOrO);

  const int wg = tid / 128;
  const float scale_log2 = p.softmax_scale * kLog2e;
  float row_max[kRowsPerThread], row_sum[kRowsPerThread];
  int row_limit[kRowsPerThread];  // keys < row_limit are visible to the row
  bool row_bad[kRowsPerThread];   // the row saw a non-finite score
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
    row_bad[i] = false;
    const int r = row0 + get<0>(tScS(i, 0));
    // causal: new token s = r / H sees keys 0 .. seqlen - s_q + s. Padding rows (s >= s_q): seqlen.
    row_limit[i] = p.causal ? min(seqlen, seqlen - p.s_q + r / p.heads + 1) : seqlen;
  }
  // Keys from here on are hidden from the CTA's first row (the smallest limit), up to seqlen.
  const int hidden_from = p.causal ? min(seqlen, seqlen - p.s_q + row0 / p.heads + 1) : seqlen;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = kFp8 ? 0 : (tile - tile_begin) & 1;
    cp_async_wait<0>();
    if constexpr (kFp8) {
      __syncthreads();  // raw tile (and Q) in smem; every WG is done with K stage 0 and with sP
      dequant_tile();
      fence_async_shared();
      __syncthreads();  // K stage 0 (and Q) visible to wgmma; the raw region is free
      if (tile + 1 < tile_end) load_raw_tile(tile + 1);
    } else {
      fence_async_shared();
      __syncthreads();  // tile (and Q) in smem; every WG is done with the other stage and with sP
      if (tile + 1 < tile_end) load_k_tile(tile + 1, stage ^ 1);
    }
    cp_async_fence();

    Tensor sK = make_tensor(make_smem_ptr(k_smem(stage)), typename L::SmemLayoutQK{});
    Tensor sVt = make_tensor(make_smem_ptr(k_smem(stage)), typename L::SmemLayoutVt{});

    // S = Q K^T (this WG's 32 keys)
    Tensor tSrK = thr_s.partition_fragment_B(sK);
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    // Unrolled by 4 only: a full unroll hoists 36 64-bit descriptors each for Q and K and spills.
#pragma unroll 4
    for (int k = 0; k < size<2>(tSrQ); ++k) {
      cute::gemm(mma_s, tSrQ(_, _, k), tSrK(_, _, k), tSrS);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);

    // mask, scale into the log2 domain, row max of this WG's half
    const int key0 = tile * kMlaBlockN;
    float tile_max[kRowsPerThread];
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      tile_max[i] = -INFINITY;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(tSrS_rc); ++j) {
        const int key = key0 + get<1>(tScS(i, j));
        const float x = tSrS_rc(i, j) * scale_log2;
        row_bad[i] |= key < row_limit[i] && !isfinite(x);
        const float s = key < row_limit[i] ? x : -INFINITY;
        tSrS_rc(i, j) = s;
        tile_max[i] = fmaxf(tile_max[i], s);
      }
      tile_max[i] = quad_max(tile_max[i]);
      if (tid % 4 == 0) s_max[wg * kMlaBlockM + get<0>(tScS(i, 0))] = tile_max[i];
    }
    __syncthreads();  // also: both WGs' S wgmmas are done with sK
    // Keys of this tile some row does not see: their non-finite values must not meet P = 0. Rare
    // (the causal tail of a request); uniform over the CTA. The fence and barrier before P V below
    // make the writes visible to wgmma.
    if (max(key0, hidden_from) < min(key0 + kMlaBlockN, seqlen)) sanitize_values(k_smem(stage));

    // online softmax: both WGs derive the same new max from the two halves
    float correction[kRowsPerThread];
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int row = get<0>(tScS(i, 0));
      const float m_new = fmaxf(row_max[i], fmaxf(s_max[row], s_max[kMlaBlockM + row]));
      const float m_base = m_new == -INFINITY ? 0.f : m_new;  // fully masked row: p = exp2(-inf) = 0
      correction[i] = exp2f(row_max[i] - m_base);              // 0 while nothing was seen (O, l are 0)
      row_max[i] = m_new;
      float sum = 0.f;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(tSrS_rc); ++j) {
        const float pv = exp2f(tSrS_rc(i, j) - m_base);
        tSrS_rc(i, j) = pv;
        sum += pv;
      }
      row_sum[i] = row_sum[i] * correction[i] + sum;  // this thread's columns only; reduced at the end
    }
    // P (q dtype) to smem: both halves are needed by both WGs' P V
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) tSsP(i) = static_cast<Element>(tSrS(i));
    fence_async_shared();
    warpgroup_fence_operand(tOrO);
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      CUTE_UNROLL
      for (int j = 0; j < size<1>(tOrO_rc); ++j) tOrO_rc(i, j) *= correction[i];
    }
    __syncthreads();

    // O[:, this WG's 256 columns] += P V
    Tensor tOrV = thr_o.partition_fragment_B(sVt);
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tOrP); ++k) cute::gemm(mma_o, tOrP(_, _, k), tOrV(_, _, k), tOrO);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
  }

  // ---- epilogue: full row sums from the two WGs, normalize, store ----
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    // A bad row's sum is NaN in every thread of the quad and both WGs once summed.
    const float s = quad_sum(row_bad[i] ? NAN : row_sum[i]);
    if (tid % 4 == 0) s_sum[wg * kMlaBlockM + get<0>(tScS(i, 0))] = s;
  }
  __syncthreads();
  const bool direct = p.num_splits == 1;
  Element* out = static_cast<Element*>(p.out);
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int row = get<0>(tOcO(i, 0));
    const int r = row0 + row;
    const float l = s_sum[row] + s_sum[kMlaBlockM + row];
    // NaN l (a bad row): out and lse NaN (the combine kernel spreads a NaN lse over the splits)
    const float inv = isnan(l) ? NAN : l > 0.f ? 1.f / l : 0.f;
    const float lse = isnan(l) ? NAN : l > 0.f ? (row_max[i] + log2f(l)) * kLn2 : -INFINITY;
    if (r >= rows) continue;
    const int64_t grow = static_cast<int64_t>(b) * rows + r;  // row of [B, s_q*H]
    if (direct) {
      if (wg == 0 && tid % 4 == 0) p.lse[(static_cast<int64_t>(b) * p.heads + r % p.heads) * p.s_q + r / p.heads] = lse;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(tOrO_rc); j += 2) {
        store_pair(out + grow * kLoraRank + get<1>(tOcO(i, j)), tOrO_rc(i, j) * inv, tOrO_rc(i, j + 1) * inv);
      }
    } else {
      const int64_t prow = grow * p.num_splits + split;
      if (wg == 0 && tid % 4 == 0) p.lse_part[prow] = lse;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(tOrO_rc); j += 2) {
        store_pair(p.o_part + prow * kLoraRank + get<1>(tOcO(i, j)), tOrO_rc(i, j) * inv, tOrO_rc(i, j + 1) * inv);
      }
    }
  }
#else
  __trap();  // sm_90a only (the host glue refuses other devices)
#endif
}

// Merges the splits of one row of [B, s_q*H]: 128 threads x 4 columns. A NaN lse in any split
// (invalid metadata) makes the row NaN; -inf splits (no visible key) are skipped; none left:
// out 0, lse -inf.
template <class Element>
__global__ void __launch_bounds__(128) mla_combine_kernel(const __grid_constant__ MlaDecodeParams p) {
  const int r = blockIdx.x, b = blockIdx.y;
  const int rows = p.s_q * p.heads, splits = p.num_splits;
  const int64_t grow = static_cast<int64_t>(b) * rows + r;
  const float* lse_part = p.lse_part + grow * splits;
  float m = -INFINITY;
  bool nan = false;
  for (int i = 0; i < splits; ++i) {
    const float v = lse_part[i];
    nan |= isnan(v);
    m = fmaxf(m, v);
  }
  const int c = threadIdx.x * 4;
  Element* out = static_cast<Element*>(p.out) + grow * kLoraRank + c;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.heads + r % p.heads) * p.s_q + r / p.heads;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float sum = 0.f;
  if (!nan && m != -INFINITY) {
    for (int i = 0; i < splits; ++i) {
      const float v = lse_part[i];
      if (v == -INFINITY) continue;  // its O was never written
      const float w = expf(v - m);
      const float4 o = *reinterpret_cast<const float4*>(p.o_part + (grow * splits + i) * kLoraRank + c);
      sum += w;
      acc.x = fmaf(w, o.x, acc.x);
      acc.y = fmaf(w, o.y, acc.y);
      acc.z = fmaf(w, o.z, acc.z);
      acc.w = fmaf(w, o.w, acc.w);
    }
  }
  float value_lse;
  if (nan) {
    acc = make_float4(NAN, NAN, NAN, NAN);
    value_lse = NAN;
  } else if (m == -INFINITY) {
    value_lse = -INFINITY;  // acc stays 0
  } else {
    const float inv = 1.f / sum;
    acc.x *= inv;
    acc.y *= inv;
    acc.z *= inv;
    acc.w *= inv;
    value_lse = m + logf(sum);
  }
  store_pair(out, acc.x, acc.y);
  store_pair(out + 2, acc.z, acc.w);
  if (threadIdx.x == 0) *lse = value_lse;
}

template <class Element, bool kFp8>
const char* launch(const MlaDecodeParams& p, cudaStream_t stream) {
  const int rows = p.s_q * p.heads;
  auto kernel = mla_decode_kernel<Element, kFp8>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  const dim3 grid((rows + kMlaBlockM - 1) / kMlaBlockM, p.num_splits, p.batch);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (p.num_splits > 1) {
    mla_combine_kernel<Element><<<dim3(rows, p.batch), kLoraRank / 4, 0, stream>>>(p);
    e = cudaGetLastError();
  }
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* mla_decode_sm90_launch(const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.s_q * p.heads == 0) return nullptr;
  if (p.block_size % kMlaBlockN != 0) return "mla_decode: block_size must be a multiple of 64";
  if (p.num_splits < 1 || p.num_splits > 65535 || p.batch > 65535) return "mla_decode: grid too large";
  if (p.fp8_cache) {
    if (p.dtype != FloatType::kBFloat16) return "mla_decode: the CUDA kernel reads the FP8 cache with bfloat16 q";
    return launch<cutlass::bfloat16_t, true>(p, stream);
  }
  switch (p.dtype) {
    case FloatType::kBFloat16: return launch<cutlass::bfloat16_t, false>(p, stream);
    case FloatType::kFloat16: return launch<cutlass::half_t, false>(p, stream);
    default: return "mla_decode: the CUDA kernel takes bfloat16 or float16";
  }
}

}  // namespace dsv3::mla
