// The FP8 latent cache's token, FlashMLA's 656-byte layout (torch- and CUDA-free: the CPU, CUDA
// and glue code share it). Bytes of one token:
//   [0, 512)    c_kv in float8_e4m3fn; tile i is c_kv[128 i, 128 i + 128)
//   [512, 528)  4 float32 scales, one per tile: c_kv = e4m3 * scale
//   [528, 656)  k_pe in bfloat16 (64 values)
// mla_cache_write's scale is FlashMLA's: max(amax / 448, 1e-4) rounded up to a power of two, so
// c_kv / scale is exact and e4m3 * scale fits bf16 exactly. Semantics: dsv3_kernels/reference/mla.py.
#pragma once

namespace dsv3::mla {

constexpr int kFp8Tile = 128;  // c_kv values per scale
constexpr int kFp8Scales = 512 / kFp8Tile;
constexpr int kFp8ScaleOffset = 512;
constexpr int kFp8RopeOffset = kFp8ScaleOffset + 4 * kFp8Scales;  // 528
constexpr int kFp8TokenBytes = kFp8RopeOffset + 2 * 64;            // 656

}  // namespace dsv3::mla
