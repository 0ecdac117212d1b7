// CPU kernel of rms_norm (schema in registration.cpp, semantics and rounding points in
// dsv3_kernels/reference/norm.py): the glue, the parallel split and the portable scalar row; the
// AVX2 / AVX-512 rows are in rms_norm_cpu_kernels.h.
//
// The sum of squares is added in fp32 lanes (16 with AVX-512, 8 with AVX2, 8 interleaved sums in
// the scalar loop) and the lanes pairwise at the end, where torch sums in its own order: float32
// results differ from the reference by a few ulps, and a bf16/fp16 value lying close to a rounding
// boundary may round the other way. NaN/inf need no special case: the IEEE arithmetic gives the
// reference's NaNs and zeros.
//
// Rows run in parallel when there are at least kGrainElems elements per thread; a decode call (a
// few rows) stays on the calling thread. DSV3_KERNELS_CPU_ISA picks the level (common/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_isa.h"
#include "common/torch_glue.h"
#include "norm/rms_norm_checks.h"
#include "norm/rms_norm_cpu_kernels.h"

namespace dsv3::norm::cpu {
namespace {

// Elements per parallel_for task: below this a row pass costs less than waking the other threads.
constexpr int64_t kGrainElems = 1 << 16;

// ---------------------------------------------------------------- scalar

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T, bool kResidual>
void rms_norm_row_scalar(const RowArgs& r) {
  const T* x = static_cast<const T*>(r.x);
  const T* w = static_cast<const T*>(r.weight);
  T* out = static_cast<T*>(r.out);
  T* res_out = static_cast<T*>(r.residual_out);
  float acc[8] = {};
  for (int64_t i = 0; i < r.d; ++i) {
    float h = static_cast<float>(x[i]);
    if constexpr (kResidual) {
      h = round_to<T>(h + static_cast<float>(static_cast<const T*>(r.residual)[i]));
      res_out[i] = static_cast<T>(h);
    }
    acc[i % 8] += h * h;  // 8 interleaved sums: shorter chains of rounding than one running sum
  }
  const float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  const float inv = inv_rms(ss, r.d, r.eps);
  const T* h = kResidual ? res_out : x;
  for (int64_t i = 0; i < r.d; ++i)
    out[i] = static_cast<T>(static_cast<float>(w[i]) * round_to<T>(static_cast<float>(h[i]) * inv));
}

// ---------------------------------------------------------------- glue

using RowFn = void (*)(const RowArgs&);

template <typename T, bool kResidual>
RowFn row_fn() {
#if defined(__x86_64__)
  constexpr FloatType D = float_type_of<T>();
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return rms_norm_row_avx512<D, kResidual>;
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return rms_norm_row_avx2<D, kResidual>;
#endif
  return rms_norm_row_scalar<T, kResidual>;
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                   float eps, at::Tensor& out, at::Tensor& residual_out) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const RowFn fn = residual ? row_fn<T, true>() : row_fn<T, false>();
  const T* px = x.const_data_ptr<T>();
  const T* pr = residual ? residual->const_data_ptr<T>() : nullptr;
  T* po = out.data_ptr<T>();
  T* pro = residual ? residual_out.data_ptr<T>() : nullptr;
  const RowArgs first{px, pr, weight.const_data_ptr<T>(), po, pro, d, eps};
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      RowArgs row = first;
      row.x = px + i * d;
      row.out = po + i * d;
      if (pr != nullptr) {
        row.residual = pr + i * d;
        row.residual_out = pro + i * d;
      }
      fn(row);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                const std::optional<at::Tensor>& residual) {
  check_rms_norm(x, weight, residual);
  at::Tensor out = at::empty_like(x);
  at::Tensor residual_out = residual ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {out, residual_out};
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat: rms_norm_rows<float>(x, weight, residual, e, out, residual_out); break;
    case at::kBFloat16: rms_norm_rows<c10::BFloat16>(x, weight, residual, e, out, residual_out); break;
    default: rms_norm_rows<c10::Half>(x, weight, residual, e, out, residual_out); break;
  }
  return {out, residual_out};
}

}  // namespace
}  // namespace dsv3::norm::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) { m.impl("rms_norm", &dsv3::norm::cpu::rms_norm_cpu); }
