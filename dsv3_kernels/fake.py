"""Fake (meta) kernels of the _C ops, so torch.compile and CUDA-graph capture can trace them."""

import torch

from . import _native


def _cdiv(a, b):
    return -(-a // b)


if _native.loaded():

    @torch.library.register_fake("dsv3_kernels::act_quant")
    def _(x, block_size, ue8m0):
        scale = x.new_empty((*x.shape[:-1], _cdiv(x.shape[-1], block_size)), dtype=torch.float32)
        return torch.empty_like(x, dtype=torch.float8_e4m3fn), scale

    @torch.library.register_fake("dsv3_kernels::weight_quant")
    def _(w, block_size):
        n, k = w.shape
        scale = w.new_empty((_cdiv(n, block_size), _cdiv(k, block_size)), dtype=torch.float32)
        return torch.empty_like(w, dtype=torch.float8_e4m3fn), scale

    @torch.library.register_fake("dsv3_kernels::weight_dequant")
    def _(w, scale_inv, block_size, dtype):
        return torch.empty_like(w, dtype=dtype)

    @torch.library.register_fake("dsv3_kernels::fp8_gemm")
    def _(a, a_scale, b, b_scale_inv, out_dtype):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
