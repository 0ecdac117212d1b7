// The floating-point element types the kernels take, named without torch so that the torch-free
// kernel headers (.cuh launchers, CPU inner loops) of every op family share one enum.
#pragma once

namespace dsv3 {

enum class FloatType { kFloat32, kBFloat16, kFloat16 };

}  // namespace dsv3
