#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace dsv3 {
namespace {

constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512_bf16"};

CpuIsa detect() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (!avx2) return CpuIsa::kScalar;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!avx512) return CpuIsa::kAvx2;
  const bool bf16 = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
  return bf16 ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
#else
  return CpuIsa::kScalar;
#endif
}

CpuIsa from_env(CpuIsa host) {
  const char* want = std::getenv("DSV3_KERNELS_CPU_ISA");
  if (want == nullptr || *want == '\0') return host;
  for (int level = 0; level < 4; ++level) {
    if (std::strcmp(want, kNames[level]) == 0) return static_cast<int>(host) < level ? host : static_cast<CpuIsa>(level);
  }
  TORCH_CHECK_VALUE(false, "DSV3_KERNELS_CPU_ISA=", want, " is not one of scalar, avx2, avx512, avx512_bf16");
}

}  // namespace

CpuIsa host_cpu_isa() {
  static const CpuIsa host = detect();
  return host;
}

CpuIsa cpu_isa() {
  // A bad value throws every time (the static stays uninitialized), so every op call names it.
  static const CpuIsa level = from_env(host_cpu_isa());
  return level;
}

const char* cpu_isa_name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

}  // namespace dsv3
