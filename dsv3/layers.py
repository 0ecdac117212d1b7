"""The model's building blocks: RMSNorm, linears (bf16/fp32, or FP8 e4m3 + weight_scale_inv per
GEMM_BLOCK x GEMM_BLOCK = 128 x 128 block through dsv3_kernels.fp8_linear), column/row-parallel
linears, the vocab-parallel embedding and head, and the dense SwiGLU MLP. Parameter names are
Hugging Face's."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

import dsv3_kernels as dk
from dsv3_kernels.utils import GEMM_BLOCK, cdiv

from .parallel import Parallel


def _param(*shape, dtype, device):
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Module(nn.Module):
    """nn.Module with `backend`: the dsv3_kernels backend its ops use (None: dispatch's rule);
    Transformer.backend sets it on every module."""
    backend = None


class RMSNorm(Module):
    """Hugging Face's DeepseekV3RMSNorm (normalized in fp32, rounded to x's dtype, times weight), by
    dsv3_kernels.rms_norm. With `residual`, fused with the residual add before it: returns
    (norm(x + residual), x + residual)."""

    def __init__(self, dim, eps=1e-6, dtype=torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype, device=device)

    def forward(self, x, residual=None):
        out, summed = dk.rms_norm(x.contiguous(), self.weight, self.eps, residual, backend=self.backend)
        return out if residual is None else (out, summed)


class Linear(Module):
    """y = x @ weight.T (no bias: DeepSeek-V3 has none).

    weight: [out, in] of `dtype`, or with fp8 float8_e4m3fn plus weight_scale_inv float32
    [ceil(out/128), in/128] (dequantized = block * scale). A linear whose input width is not a
    multiple of 128 cannot run the FP8 GEMM and stays in `dtype` (the loader dequantizes it).
    split: None (replicated); "column": this rank holds out/world rows (outputs); "row": in/world
    columns, and the caller sums the ranks' partial outputs; over the tensor-parallel ranks of
    `parallel` (a dsv3.parallel.Parallel, needed with a split).
    what: the config field the split dimension comes from (named by the error of an uneven split).
    """

    def __init__(self, in_features, out_features, dtype, fp8=False, device=None, *, split=None,
                 parallel: Parallel = None, what=None):
        super().__init__()
        self.full_shape = (out_features, in_features)
        self.split = split
        # the part of the checkpoint's [out, in] weight this rank holds (the loader reads these)
        self.rows, self.cols = slice(0, out_features), slice(0, in_features)
        if split == "column":
            self.rows = slice(*parallel.shard_range(out_features, what or "output features"))
        elif split == "row":
            self.cols = slice(*parallel.shard_range(in_features, what or "input features"))
        elif split is not None:
            raise ValueError(f"split must be None, 'column' or 'row', got {split!r}")
        self.in_features, self.out_features = self.cols.stop - self.cols.start, self.rows.stop - self.rows.start
        in_features, out_features = self.in_features, self.out_features
        self.fp8 = fp8 and in_features % GEMM_BLOCK == 0
        if self.fp8:
            self.weight = _param(out_features, in_features, dtype=torch.float8_e4m3fn, device=device)
            self.weight_scale_inv = _param(cdiv(out_features, GEMM_BLOCK), in_features // GEMM_BLOCK,
                                           dtype=torch.float32, device=device)
        else:
            self.weight = _param(out_features, in_features, dtype=dtype, device=device)
            self.weight_scale_inv = None

    def forward(self, x):
        return linear(x, self.weight, self.weight_scale_inv, self.backend)

    def dequantized(self, dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` (FP8 blocks times their scales)."""
        if not self.fp8:
            return self.weight.to(dtype)
        return dk.weight_dequant(self.weight, self.weight_scale_inv, dtype, backend=self.backend)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, {'fp8' if self.fp8 else self.weight.dtype}"
                + (f", {self.split}-parallel" if self.split else ""))


# Decode-sized bf16 products on the CPU (up to this many rows) run dsv3_kernels.grouped_gemm as one
# group: its C++ kernel streams bf16 weights at 30-60 GB/s where oneDNN's F.linear reaches 14-24
# GB/s (M=1, K 256-512, N 512-4096, 2 threads, measured 2026-11-29); larger M stays with oneDNN.
DECODE_ROWS = 16


def grouped_gemm_on_cpu(x: torch.Tensor, backend) -> bool:
    """The rule for the bf16 products of linear() (up to DECODE_ROWS rows) and of MLA's per-head
    products on the CPU: dsv3_kernels.grouped_gemm (its dispatch rule then picks the C++ kernel)
    for bf16 CPU tensors with backend None or "cpu"; else plain PyTorch (F.linear, einsum): the
    torch backend is the reference path, and triton on the CPU is its interpreter."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and backend in (None, "cpu")


@functools.lru_cache(maxsize=DECODE_ROWS)
def _one_segment(rows):
    return torch.tensor([0, rows], dtype=torch.int32)


def linear(x, weight, weight_scale_inv, backend):
    """x [..., in] @ weight[out, in].T -> [..., out] in x's dtype: FP8 (weight_scale_inv given)
    through dsv3_kernels.fp8_linear; bf16 on the CPU up to DECODE_ROWS rows through
    dsv3_kernels.grouped_gemm (grouped_gemm_on_cpu); else F.linear."""
    if weight_scale_inv is not None:
        return dk.fp8_linear(x, weight, weight_scale_inv, out_dtype=x.dtype, backend=backend)
    if x.numel() <= DECODE_ROWS * x.shape[-1] and grouped_gemm_on_cpu(x, backend):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = dk.grouped_gemm(x2, weight[None], _one_segment(x2.shape[0]), backend=backend)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


class FusedLinear:
    """Linears that read the same input, run as one GEMM (DeepSeek-V3's q_a_proj with
    kv_a_proj_with_mqa, an MLP's gate_proj with up_proj): their weights and FP8 scales become
    consecutive row ranges of one tensor, so the loader, which fills each Linear by its
    checkpoint name, fills the fused weight. Not an nn.Module: the loader and state_dict see
    only the Linears. `of(*linears)` returns None where they cannot share one tensor."""

    def __init__(self, weight, weight_scale_inv, sizes, owner):
        self.weight, self.weight_scale_inv, self.sizes, self.owner = weight, weight_scale_inv, sizes, owner

    @staticmethod
    def of(*linears):
        first = linears[0]
        w = first.weight
        same = all(m.in_features == first.in_features and m.weight.dtype == w.dtype and m.fp8 == first.fp8
                   for m in linears)
        # FP8: every part but the last must end on a 128-row scale block
        if not same or (first.fp8 and any(m.out_features % GEMM_BLOCK for m in linears[:-1])):
            return None
        sizes = [m.out_features for m in linears]
        weight = torch.empty(sum(sizes), first.in_features, dtype=w.dtype, device=w.device)
        scale = None
        if first.fp8:
            scale = torch.empty(cdiv(sum(sizes), GEMM_BLOCK), first.in_features // GEMM_BLOCK, dtype=torch.float32,
                                device=w.device)
        row = 0
        for m, n in zip(linears, sizes):
            m.weight = _view_param(weight[row:row + n])
            if scale is not None:
                m.weight_scale_inv = _view_param(scale[row // GEMM_BLOCK:cdiv(row + n, GEMM_BLOCK)])
            row += n
        return FusedLinear(weight, scale, sizes, first)

    def __call__(self, x):
        """x [..., in] -> the linears' outputs, concatenated along the last dim."""
        return linear(x, self.weight, self.weight_scale_inv, self.owner.backend)


def _view_param(t):
    return nn.Parameter(t, requires_grad=False)


class VocabEmbedding(Module):
    """Embedding split over the tensor-parallel ranks by vocabulary rows; each token's row comes
    from its owner rank."""

    def __init__(self, vocab_size, dim, dtype, device=None, *, parallel: Parallel):
        super().__init__()
        self.parallel = parallel
        self.full_shape = (vocab_size, dim)
        self.lo, self.hi = parallel.shard_range(vocab_size, "vocab_size")
        self.rows, self.cols = slice(self.lo, self.hi), slice(0, dim)  # as Linear's, for the loader
        self.weight = _param(self.hi - self.lo, dim, dtype=dtype, device=device)

    def forward(self, ids):
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.lo) & (ids < self.hi)
        out = F.embedding((ids - self.lo).clamp(0, self.hi - self.lo - 1), self.weight)
        return self.parallel.all_reduce(out * mine[:, None].to(out.dtype))


class LMHead(Linear):
    """The output projection, column-parallel over the vocabulary; logits gathered on every rank."""

    def __init__(self, dim, vocab_size, dtype, device=None, *, parallel: Parallel):
        super().__init__(dim, vocab_size, dtype, False, device, split="column", parallel=parallel, what="vocab_size")
        self.parallel = parallel

    def forward(self, x):
        return self.parallel.all_gather_last_dim(super().forward(x))


class MLP(Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)); gate/up column- and down row-parallel,
    so the output is this rank's partial sum (the caller all-reduces). what: inter's config field."""

    def __init__(self, dim, inter, dtype, fp8=False, device=None, *, parallel: Parallel, what="intermediate_size"):
        super().__init__()
        split = dict(parallel=parallel, what=what)
        self.gate_proj = Linear(dim, inter, dtype, fp8, device, split="column", **split)
        self.up_proj = Linear(dim, inter, dtype, fp8, device, split="column", **split)
        self.down_proj = Linear(inter, dim, dtype, fp8, device, split="row", **split)
        self.gate_up = FusedLinear.of(self.gate_proj, self.up_proj)

    def forward(self, x):
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # silu(gate) * up in fp32, rounded once (dsv3_kernels.silu_mul; the routed experts do the same)
        h = dk.silu_mul(self.gate_up(x).reshape(-1, 2 * self.down_proj.in_features), backend=self.backend)
        return self.down_proj(h).view(*x.shape[:-1], self.down_proj.out_features)
