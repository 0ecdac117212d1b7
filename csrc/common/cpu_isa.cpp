#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
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

// `name` capped at the host's level; `what` names the setting in the error for an unknown name.
CpuIsa capped(const char* name, const char* what) {
  const CpuIsa host = host_cpu_isa();
  for (int level = 0; level < 4; ++level) {
    if (std::strcmp(name, kNames[level]) == 0) return static_cast<int>(host) < level ? host : static_cast<CpuIsa>(level);
  }
  TORCH_CHECK_VALUE(false, what, name, " is not one of scalar, avx2, avx512, avx512_bf16");
}

// -1 until the first use reads DSV3_KERNELS_CPU_ISA. Atomic: set_cpu_isa may change it between
// calls; every kernel reads it when it is called, never caches it.
std::atomic<int> g_level{-1};

// set_cpu_bf16_gemm's choice: -1 the host's, else 0 / 1.
std::atomic<int> g_bf16_gemm{-1};

// The host's rule of cpu_bf16_gemm (cpu_isa.h): vdpbf16ps does not pay on Intel cores.
bool detect_bf16_gemm() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return !__builtin_cpu_is("intel");
#else
  return false;
#endif
}

}  // namespace

CpuIsa host_cpu_isa() {
  static const CpuIsa host = detect();
  return host;
}

CpuIsa cpu_isa() {
  int level = g_level.load(std::memory_order_relaxed);
  if (level < 0) {
    // A bad value throws every time (nothing is stored), so every op call names it.
    const char* want = std::getenv("DSV3_KERNELS_CPU_ISA");
    level = static_cast<int>(want == nullptr || *want == '\0' ? host_cpu_isa() : capped(want, "DSV3_KERNELS_CPU_ISA="));
    g_level.store(level, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(level);
}

CpuIsa set_cpu_isa(const char* name) {
  const CpuIsa level = capped(name, "cpu_isa ");
  g_level.store(static_cast<int>(level), std::memory_order_relaxed);
  return level;
}

const char* cpu_isa_name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

bool cpu_bf16_gemm() {
  static const bool host = detect_bf16_gemm();
  const int choice = g_bf16_gemm.load(std::memory_order_relaxed);
  return choice < 0 ? host : choice != 0;
}

bool set_cpu_bf16_gemm(int choice) {
  g_bf16_gemm.store(choice < 0 ? -1 : choice != 0, std::memory_order_relaxed);
  return cpu_bf16_gemm();
}

}  // namespace dsv3
