// CUDA implementations of the FP8 ops: argument checks, device/stream, output and workspace
// allocation (all through torch's caching allocator, so the ops are CUDA-graph capturable: no
// cudaMalloc, no host synchronisation), then the torch-free launchers in quant_kernels.cuh and
// fp8_gemm_cutlass.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "fp8/fp8_checks.h"
#include "fp8/fp8_gemm_cutlass.h"
#include "fp8/quant_kernels.cuh"

namespace dsv3::fp8 {
namespace {

std::tuple<at::Tensor, at::Tensor> act_quant_cuda(const at::Tensor& x, int64_t block_size, bool ue8m0) {
  check_act_quant(x, block_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(-1);
  const int64_t rows = k == 0 ? 0 : x.numel() / k;
  auto q = at::empty_like(x, x.options().dtype(at::kFloat8_e4m3fn));
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = cdiv(k, block_size);
  auto scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  check_launch(act_quant_launch(x.data_ptr(), float_type(x.scalar_type()), rows, k, static_cast<int>(block_size),
                                ue8m0, q.data_ptr(), scale.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "act_quant");
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> weight_quant_cuda(const at::Tensor& w, int64_t block_size) {
  check_weight_quant(w, block_size);
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1);
  auto q = at::empty({n, k}, w.options().dtype(at::kFloat8_e4m3fn));
  auto scale_inv = at::empty({cdiv(n, block_size), cdiv(k, block_size)}, w.options().dtype(at::kFloat));
  check_launch(weight_quant_launch(w.data_ptr(), float_type(w.scalar_type()), n, k, static_cast<int>(block_size),
                                   q.data_ptr(), scale_inv.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "weight_quant");
  return {q, scale_inv};
}

at::Tensor weight_dequant_cuda(const at::Tensor& w, const at::Tensor& scale_inv, int64_t block_size,
                               at::ScalarType dtype) {
  check_weight_dequant(w, scale_inv, block_size, dtype);
  const c10::cuda::CUDAGuard guard(w.device());
  auto out = at::empty(w.sizes(), w.options().dtype(dtype));
  check_launch(weight_dequant_launch(w.data_ptr(), scale_inv.data_ptr<float>(), w.size(0), w.size(1),
                                     static_cast<int>(block_size), float_type(dtype), out.data_ptr(),
                                     at::cuda::getCurrentCUDAStream()),
               "weight_dequant");
  return out;
}

// TMA reads need 16-byte aligned base addresses; a view at an odd offset gets an aligned copy.
at::Tensor tma_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

at::Tensor fp8_gemm_cuda(const at::Tensor& a_in, const at::Tensor& a_scale, const at::Tensor& b_in,
                         const at::Tensor& b_scale_inv, at::ScalarType out_dtype) {
  check_fp8_gemm(a_in, a_scale, b_in, b_scale_inv, out_dtype);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major == 9 && prop->minor == 0, "fp8_gemm: the CUDA kernel needs an sm_90 (Hopper) GPU, got ",
              prop->name, " (sm_", prop->major, prop->minor, "); use backend=\"triton\" or \"torch\"");
  const int64_t m = a_in.size(0), n = b_in.size(0), k = a_in.size(1);
  if (m == 0) return at::empty({0, n}, a_in.options().dtype(out_dtype));
  const at::Tensor a = tma_aligned(a_in), b = tma_aligned(b_in);

  // fp16 comes from the fp32 kernel plus a cast (no third output instantiation).
  const bool bf16 = out_dtype == at::kBFloat16;
  const at::ScalarType kernel_dtype = bf16 ? at::kBFloat16 : at::kFloat;
  // The TMA store needs 16-byte aligned row strides: pad the rows when N is not a multiple.
  const int64_t align = 16 / at::elementSize(kernel_dtype);
  const int64_t ldo = cdiv(n, align) * align;
  auto out = at::empty({m, ldo}, a.options().dtype(kernel_dtype));

  Fp8GemmProblem p{a.data_ptr(), a_scale.data_ptr<float>(), b.data_ptr(), b_scale_inv.data_ptr<float>(),
                   out.data_ptr(), m, n, k, ldo,
                   bf16 ? GemmOutType::kBFloat16 : GemmOutType::kFloat32, prop->multiProcessorCount};
  auto workspace = at::empty({static_cast<int64_t>(fp8_gemm_workspace_size(p))}, a.options().dtype(at::kByte));
  check_launch(fp8_gemm_run(p, workspace.data_ptr(), at::cuda::getCurrentCUDAStream()), "fp8_gemm");

  if (out_dtype == at::kHalf) return out.narrow(1, 0, n).to(at::kHalf);
  return ldo == n ? out : out.narrow(1, 0, n).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3_kernels, CUDA, m) {
  m.impl("act_quant", &act_quant_cuda);
  m.impl("weight_quant", &weight_quant_cuda);
  m.impl("weight_dequant", &weight_dequant_cuda);
  m.impl("fp8_gemm", &fp8_gemm_cuda);
}

}  // namespace dsv3::fp8
