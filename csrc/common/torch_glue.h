// Small helpers of the torch-side glue (the *_cpu.cpp / *_cuda.cpp files) shared by the op families.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "common/float_type.h"

namespace dsv3 {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

// The FloatType of a C++ element type (float, c10::BFloat16, c10::Half), for kernel templates.
template <typename T>
constexpr FloatType float_type_of() {
  if constexpr (std::is_same_v<T, float>) return FloatType::kFloat32;
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return FloatType::kBFloat16;
  else return FloatType::kFloat16;
}

// The torch-free launchers (the .cu side) report a failure as a message, nullptr on success; the
// glue turns it into a torch error named after the op.
inline void check_launch(const char* error, const char* op) { TORCH_CHECK(error == nullptr, op, ": ", error); }

}  // namespace dsv3
