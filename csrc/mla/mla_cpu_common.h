// What the CPU mla_decode's inner loops share (torch-free): the work item's shape, where a key
// lives, the exp cutoff, the key prefetch, and the scalar FP8 dequantization. The loops: the
// portable one in mla_cpu.cpp, mla_cpu_avx2.h, mla_cpu_avx512.h.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/float_type.h"
#include "mla/mla_fp8_layout.h"

namespace dsv3::mla::cpu {

constexpr int kGroupRows = 16;  // query rows per work item at most
constexpr int kTile = 8;        // keys per online-softmax step
constexpr int kDim = 576;       // c_kv 512 | k_pe 64
constexpr int kValueDim = 512;

// The vector exps of the online softmax return exactly 0 below this (a masked key, -inf, weighs
// nothing), never a denormal: on Intel every denormal result costs a microcode assist, and the
// masked lanes (rows past a group's last, keys past a row's last) hit one per exp (avx512_bf16,
// B = 8, H = 4, 1024 keys, 1 thread, in cache: 2.0 ms with a cutoff at -110, 1.4 ms so).
// exp(-87) ~ 1.6e-38, below any weight an fp32 sum of weights >= 1 can hold.
constexpr float kExpCutoff = -87.0f;

// Where key j of a request lives: block_row[j >> log2_block] is its block in cache.
struct KeyRange {
  const void* cache;          // [num_blocks, block_size, 576] of the dtype
  const int32_t* block_row;   // the request's block_table row (already checked)
  int log2_block;
  int64_t begin, end;         // [begin, end) of the request's keys
};

// A work item's queries (1..kGroupRows rows of one request; they share the latent key head) and
// their visibility. Entries of `last` past `rows` are -1.
struct RowGroup {
  const void* q;         // laid out as the kernel's layout function left it (mla_cpu.cpp: Attend)
  const int32_t* last;   // [kGroupRows]: the last key each row sees (-1: none)
  int rows;
  float scale;
};

// Bytes of one cached token: 576 values of D, or the FP8 cache's 656.
template <FloatType D, bool Fp8>
constexpr int64_t row_bytes() {
  return Fp8 ? kFp8TokenBytes : kDim * (D == FloatType::kFloat32 ? 4 : 2);
}

template <FloatType D, bool Fp8 = false>
inline const void* key_ptr(const KeyRange& k, int64_t j) {
  const int64_t bs_mask = (int64_t{1} << k.log2_block) - 1;
  const int64_t slot = static_cast<int64_t>(k.block_row[j >> k.log2_block]) * (bs_mask + 1) + (j & bs_mask);
  return static_cast<const char*>(k.cache) + slot * row_bytes<D, Fp8>();
}

// Keeps a loaded vector in a register: GCC otherwise folds its load into every FMA that uses it
// (one load per use), and loads, not FMAs, limit the dot product loops (avx2, 4 rows x 2 keys:
// 10 loads per 8 FMAs so, 6 this way).
#if defined(__x86_64__)
template <typename V>
inline void keep_in_register(V& v) {
  __asm__("" : "+v"(v));
}
#endif

// Software prefetch of the keys of a later tile, a few lines per call of issue() from inside the
// current tile's loops: in a burst, a tile's lines fill the L1 miss buffers and stall the core
// until they drain, and then nothing streams while it computes. The avx2 path at 1 / 4 rows,
// 1,024 bf16 keys out of DRAM, ns per key: 226 / 285 with each key's lines at once, 202 / 265
// with the hardware prefetcher alone, ~160 / ~200 spread out (~95 / ~175 in L2).
template <FloatType D, bool Fp8>
class TilePrefetch {
 public:
  explicit TilePrefetch(const KeyRange& k) : k_(k) {}

  // Issues what is left of the last tile queued, then queues keys [j, j + kTile) (those before k.end).
  void queue(int64_t j) {
    issue(kTile * kLines);
    n_ = static_cast<int>(std::clamp<int64_t>(k_.end - j, 0, kTile));
    for (int t = 0; t < n_; ++t) row_[t] = static_cast<const char*>(key_ptr<D, Fp8>(k_, j + t));
    next_ = 0;
  }

  void issue(int lines) {
    for (; lines > 0 && next_ < n_ * kLines; --lines, ++next_) {
      const int line = next_ % kLines;
      __builtin_prefetch(row_[next_ / kLines] + std::min<int64_t>(64 * line, row_bytes<D, Fp8>() - 1));
    }
  }

 private:
  // A row's lines; a row that does not fill whole lines (the FP8 cache's 656 bytes) may touch one more.
  static constexpr int kLines = (row_bytes<D, Fp8>() + 63) / 64 + (row_bytes<D, Fp8>() % 64 != 0);
  const KeyRange& k_;
  const char* row_[kTile];
  int n_ = 0, next_ = 0;
};

// e4m3 byte -> its value, exactly; the NaN codes 0x7F / 0xFF -> NaN.
inline float e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 7;
  const float mag = (b & 0x7F) == 0x7F ? std::numeric_limits<float>::quiet_NaN()
                    : e ? std::ldexp(static_cast<float>(8 + m), e - 10)
                        : std::ldexp(static_cast<float>(m), -9);
  return b & 0x80 ? -mag : mag;
}

// The vector paths dequantize e4m3 by way of fp16 (e4m3 * 2^-8 exactly, no fp32 denormal on the
// way: an e4m3 subnormal as an fp32 input costs an assist per vector on Intel) and one multiply
// by 2^8 * scale, which rounds e4m3 * scale once as the reference does. That factor overflows
// where scale >= 2^120 (tokens near FLT_MAX): such a tile takes the exact scalar way. So does a
// tile holding a NaN code, which that decode reads as +-480 (the vector loops fold the bytes into
// a running max of x + x, where only 0x7F / 0xFF become 0xFE: two byte ops per 16 bytes).
inline bool fp8_factor_fits(float scale) { return !(std::isinf(256.0f * scale) && !std::isinf(scale)); }

// One 128-value tile of c_kv, the scalar way.
inline void dequant_fp8_tile(const uint8_t* src, float scale, float* dst) {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = e4m3_value(static_cast<uint8_t>(b));
    return t;
  }();
  for (int c = 0; c < kFp8Tile; ++c) dst[c] = table[src[c]] * scale;
}

// Whether a float is NaN or +-inf (its exponent bits all set).
inline bool nonfinite(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return (b & 0x7F800000u) == 0x7F800000u;
}

// A key's values (its first 512 dims) with NaN / inf set to 0, for the P V product of a tile where
// some query does not see this key: there p = 0, and 0 * NaN must not reach that query (the
// queries that see the key get NaN by its score: reference/mla.py). dst may be src.
inline void sanitize_values(const float* src, float* dst) {
  for (int c = 0; c < kValueDim; ++c) dst[c] = nonfinite(src[c]) ? 0.0f : src[c];
}

// The same for a bf16 row (raw bits).
inline void sanitize_values_bf16(const uint16_t* src, uint16_t* dst) {
  for (int c = 0; c < kValueDim; ++c) dst[c] = (src[c] & 0x7F80u) == 0x7F80u ? uint16_t{0} : src[c];
}

// One FP8-cache token -> 576 fp32 values (c_kv = e4m3 * scale | k_pe), the portable way.
inline void dequant_fp8_row(const uint8_t* src, float* dst) {
  for (int t = 0; t < kFp8Scales; ++t) {
    float scale;
    std::memcpy(&scale, src + kFp8ScaleOffset + 4 * t, 4);
    dequant_fp8_tile(src + t * kFp8Tile, scale, dst + t * kFp8Tile);
  }
  for (int c = 0; c < kDim - kValueDim; ++c) {
    uint16_t h;
    std::memcpy(&h, src + kFp8RopeOffset + 2 * c, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    std::memcpy(dst + kValueDim + c, &bits, 4);
  }
}

}  // namespace dsv3::mla::cpu
