// CPU kernel of silu_mul (schema in registration.cpp, semantics in dsv3_kernels/reference/moe.py):
// silu(gate) * up per row in fp32, stored in x's dtype or quantized per 1x128 block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "moe/expert_rows_cpu.h"
#include "moe/moe_checks.h"

namespace dsv3::moe::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> silu_mul_cpu(const at::Tensor& x, bool quant) {
  check_silu_mul(x, quant);
  const int64_t m = x.size(0), inter = x.size(1) / 2, kblocks = inter / kBlock;
  at::Tensor y = at::empty({m, inter}, x.options().dtype(quant ? at::kFloat8_e4m3fn : x.scalar_type()));
  at::Tensor scale = at::empty({quant ? m : 0, quant ? kblocks : 0}, x.options().dtype(at::kFloat));
  if (!quant) scale = scale.view({0});
  if (y.numel() == 0) return {y, scale};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, m, grain_for(2 * inter), [&](int64_t begin, int64_t end) {
      std::vector<float> row(2 * inter), h(inter);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < 2 * inter; ++i) row[i] = static_cast<float>(px[r * 2 * inter + i]);
        silu_mul_f32(row.data(), row.data() + inter, h.data(), inter);
        if (quant) {
          auto* q = reinterpret_cast<uint8_t*>(y.data_ptr()) + r * inter;
          float* s = scale.data_ptr<float>() + r * kblocks;
          for (int64_t blk = 0; blk < kblocks; ++blk)
            s[blk] = quantize_block(h.data() + blk * kBlock, q + blk * kBlock, kBlock);
        } else {
          store_cols(h.data(), y.data_ptr<scalar_t>() + r * inter, 1, inter, 0, inter);
        }
      }
    });
  });
  return {y, scale};
}

}  // namespace
}  // namespace dsv3::moe::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) { m.impl("silu_mul", &dsv3::moe::cpu::silu_mul_cpu); }
