// The floating-point element types the kernels take, named without torch so that the torch-free
// kernel headers (.cuh launchers, CPU inner loops) of every op family share one enum; and an fp32's
// bits, which the CPU kernels' exact roundings work on.
#pragma once

#include <cstdint>
#include <cstring>

namespace dsv3 {

enum class FloatType { kFloat32, kBFloat16, kFloat16 };

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace dsv3
