// The wrapper of the CUTLASS wgmma kernels (fp8_gemm_cutlass.cu, grouped_gemm_cutlass.cu), which
// exist only for sm_90a.
#pragma once
#include <cutlass/cutlass.h>

// Plain sm_90 cannot encode wgmma: refuse that build rather than ship GEMMs that trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "the CUTLASS wgmma GEMMs must be compiled for sm_90a: use 9.0a (not 9.0) in the CUDA arch list"
#endif

namespace dsv3 {

// Compiles the kernel body only for sm_90a, so adding other archs to the build costs nothing and
// cannot produce a silently wrong kernel: anywhere else (e.g. PTX JIT-compiled on an sm_90
// device) it traps. The host glue also refuses devices other than sm_90.
template <class Kernel>
struct Sm90aOnly : Kernel {
  CUTLASS_DEVICE void operator()(typename Kernel::Params const& params, char* smem) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    Kernel::operator()(params, smem);
#else
    __trap();
#endif
  }
};

}  // namespace dsv3
