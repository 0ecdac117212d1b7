// The x86 instruction-set level the CPU kernels use, one switch for every op family.
//
// The extension is compiled for the x86-64 baseline; the faster inner loops are functions with
// __attribute__((target(...))) that run only when cpu_isa() is at least their level. The level
// is the best the host has, capped by DSV3_KERNELS_CPU_ISA (read at the first use; set_cpu_isa changes it):
//   scalar       the portable loops (what the compiler makes of plain C++ for the baseline)
//   avx2         AVX2 + FMA + F16C (AMD Zen 2/3, Intel Haswell and later, client CPUs since Alder Lake)
//   avx512       AVX-512 F/BW/VL/DQ on top of avx2
//   avx512_bf16  avx512 + AVX512_BF16 + AVX512_VBMI (Intel Cooper Lake / Sapphire Rapids, AMD Zen 4+)
// Asking for more than the host has gives the host's best: the switch only ever lowers the level.
#pragma once

namespace dsv3 {

enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The level in use (raises an error naming DSV3_KERNELS_CPU_ISA if its value is not a level).
CpuIsa cpu_isa();

// Use `name`'s level from now on (capped at the host's; tests and benchmarks run every level in
// one process this way); returns the level set. Raises for a name that is not a level.
CpuIsa set_cpu_isa(const char* name);

// The best level the host supports, whatever DSV3_KERNELS_CPU_ISA says.
CpuIsa host_cpu_isa();

const char* cpu_isa_name(CpuIsa isa);

inline bool cpu_isa_at_least(CpuIsa level) { return static_cast<int>(cpu_isa()) >= static_cast<int>(level); }

// Whether the avx512_bf16 level's compute-bound GEMMs (fp8_gemm above its few-rows path) multiply
// with vdpbf16ps rather than in fp32. vdpbf16ps pays on AMD Zen 4, where the avx512_bf16 paths
// were measured faster, not on Intel cores: on the Xeon of benchmarks/README.md a zmm vdpbf16ps
// issues at 1.6 G/s against 6.4 G/s for a zmm FMA, half the products a second, and fp8_linear at
// M = 128 runs 1.1-1.45x faster in fp32. So: false on Intel hosts, true elsewhere, unless
// set_cpu_bf16_gemm chose (tests run both paths on one host).
bool cpu_bf16_gemm();

// 1: vdpbf16ps, 0: fp32, -1: the host's choice (cpu_bf16_gemm). Returns cpu_bf16_gemm() after it.
bool set_cpu_bf16_gemm(int choice);

}  // namespace dsv3

// The target attribute of the avx2 level's functions. Lambdas do not inherit target attributes:
// inner loops are plain functions (or templates) carrying it.
#define DSV3_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
