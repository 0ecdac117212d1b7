// ep_dispatch's glue shared by the CPU and CUDA implementations: moe_permute of the tokens over
// their destination ranks, called through the dispatcher so that it runs on the tensors' device.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace dsv3::moe {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> permute_by_rank(const at::Tensor& hidden,
                                                                                  const at::Tensor& dest,
                                                                                  int64_t world_size, bool quant) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dsv3_kernels::moe_permute", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                            int64_t, int64_t, bool)>();
  return op.call(hidden, dest, world_size, 1, quant);
}

}  // namespace dsv3::moe
