"""grouped_gemm on every backend against the fp32 reference (dsv3_kernels/reference/moe.py), bf16
and FP8; and its argument errors.

Unused memory (rows no expert covers, the weights of experts with no rows) is NaN, so a kernel
that reads it shows; the segments come from moe_permute's routings: token counts 0 to 1000, E up
to 256 (native_only: Triton's interpreter runs E=16), padded or not, all on one expert, most
experts empty.
"""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import fp8 as ref_fp8
from dsv3_kernels.reference import moe as ref
from builders import make_ids, poison, quant_experts
from helpers import native_only, poison_allocator


def _impl(name, backend):
    return dispatch.implementation(name, backend)


def _segments(t, topk, e, kind, align):
    ids = make_ids(t, topk, e, kind)
    _, _, offsets, _ = ref.moe_permute(torch.zeros(t, 8), ids, e, align)
    return offsets, ref.permuted_rows(t, topk, e, align)


def _poisoned_gemm_inputs(offsets, m, n, k, fp8):
    """a [M, K] with NaN in rows past offsets[E], b [E, N, K] with NaN in experts of no rows."""
    e = offsets.shape[0] - 1
    a = torch.randn(m, k)
    b = torch.randn(e, n, k) / k ** 0.5
    empty = (offsets[1:] == offsets[:-1])
    tail = int(offsets[-1])
    if not fp8:
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        poison(a, slice(tail, None))
        poison(b, empty)
        return a, b, None, None
    a, a_scale = ref_fp8.act_quant(a)
    b, b_scale = quant_experts(b)
    for x in (a, a_scale):
        poison(x, slice(tail, None))
    for x in (b, b_scale):
        poison(x, empty)
    return a, b, a_scale, b_scale


GEMM_CASES = [  # (T, topk, E, kind, align)
    *(native_only(c) for c in [(0, 8, 256, "random", 1), (1, 8, 256, "random", 1), (7, 8, 256, "random", 128),
                               (1000, 8, 256, "random", 1), (200, 8, 256, "one_expert", 1)]),
    (150, 4, 64, "few_experts", 16), (33, 2, 3, "random", 1),
    (0, 8, 16, "random", 1), (1, 8, 16, "random", 1), (7, 8, 16, "random", 128), (100, 8, 16, "random", 1),
    (40, 8, 16, "one_expert", 1),
]


@pytest.mark.ops("grouped_gemm")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "T{}-k{}-E{}-{}-a{}".format(*c))
def test_grouped_gemm(device, backend, case, fp8):
    offsets, m = _segments(*case)
    n, k = (200, 256) if fp8 else (200, 136)
    a, b, a_scale, b_scale = _poisoned_gemm_inputs(offsets, m, n, k, fp8)
    want = ref.grouped_gemm(a, b, offsets, a_scale, b_scale)
    args = [x.to(device) if x is not None else None for x in (a, b, offsets, a_scale, b_scale)]
    poison_allocator(device)
    got = _impl("grouped_gemm", backend)(*args).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert not got.isnan().any()
    tail = int(offsets[-1])
    assert torch.equal(got[tail:], torch.zeros_like(got[tail:]))
    # Same (quantized) inputs, fp32 accumulation in another order: bf16 rounding apart.
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.ops("grouped_gemm")
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 17])
@pytest.mark.parametrize("n,k", [(200, 136), (24, 2056), (136, 264)])
def test_grouped_gemm_one_group_bf16(device, backend, m, n, k):
    """One group of up to 17 rows: the model's bf16 decode linears (dsv3/layers.py cpu_bf16_gemm).
    K % 16 = 8 (the last 8 of a row apart in the CPU kernel's even / odd order), and with 16 rows
    K = 2056 is cut into chunks, the last one 8 long."""
    a = torch.randn(m, k).to(torch.bfloat16)
    b = (torch.randn(1, n, k) / k ** 0.5).to(torch.bfloat16)
    offsets = torch.tensor([0, m], dtype=torch.int32)
    want = ref.grouped_gemm(a, b, offsets)
    got = _impl("grouped_gemm", backend)(a.to(device), b.to(device), offsets.to(device), None, None).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.ops("grouped_gemm")
def test_grouped_gemm_fp8_near_the_unquantized_product(device, backend):
    offsets, m = _segments(64, 8, 16, "random", 1)
    a = torch.randn(m, 512)
    b = torch.randn(16, 256, 512)
    (aq, a_s), (bq, b_s) = ref_fp8.act_quant(a), quant_experts(b)
    got = _impl("grouped_gemm", backend)(*(x.to(device) for x in (aq, bq, offsets, a_s, b_s))).cpu()
    exact = ref.grouped_gemm(a.to(torch.bfloat16), b.to(torch.bfloat16), offsets)
    assert ref_fp8.calc_diff(got, exact) < 1e-3


# ---- errors ----

def _gemm_args(fp8):
    a = torch.randn(20, 256)
    b = torch.randn(3, 64, 256)
    offsets = torch.tensor([0, 5, 5, 20], dtype=torch.int32)
    if not fp8:
        return dict(a=a.bfloat16(), b=b.bfloat16(), expert_offsets=offsets)
    (aq, a_s), (bq, b_s) = dk.act_quant(a, backend="torch"), quant_experts(b)
    return dict(a=aq, b=bq, expert_offsets=offsets, a_scale=a_s, b_scale_inv=b_s)


@pytest.mark.parametrize("fp8, change, error, match", [
    (False, lambda a: a.update(expert_offsets=torch.tensor([0, 5, 3, 20], dtype=torch.int32)), ValueError,
     "never decrease"),
    (False, lambda a: a.update(expert_offsets=torch.tensor([1, 5, 5, 20], dtype=torch.int32)), ValueError,
     "start at 0"),
    (False, lambda a: a.update(expert_offsets=torch.tensor([0, 5, 5, 21], dtype=torch.int32)), ValueError,
     "end <= M = 20"),
    (False, lambda a: a.update(expert_offsets=a["expert_offsets"][:3]), ValueError, r"expert_offsets must be \[E\+1\]"),
    (False, lambda a: a.update(expert_offsets=a["expert_offsets"].long()), TypeError, "expert_offsets must have dtype"),
    (False, lambda a: a.update(a=a["a"].half()), TypeError, "a must have dtype"),
    (False, lambda a: a.update(b=a["b"][:, :, :128].contiguous()), ValueError, "same K"),
    (False, lambda a: a.update(b=a["b"][:, :60].contiguous()), ValueError, "multiples of 8"),
    (False, lambda a: a.update(a_scale=torch.ones(20, 2)), ValueError, "a_scale must be given exactly"),
    (True, lambda a: a.update(a_scale=None), ValueError, "a_scale must be given exactly"),
    (True, lambda a: a.update(b_scale_inv=None), ValueError, "b_scale_inv must be given exactly"),
    (True, lambda a: a.update(a_scale=a["a_scale"][:, :1].contiguous()), ValueError,
     r"a_scale must have shape \(20, 2\)"),
    (True, lambda a: a.update(b=a["b"].to(torch.bfloat16), b_scale_inv=None), TypeError, "both be bfloat16 or both float8_e4m3fn"),
])
def test_grouped_gemm_errors(fp8, change, error, match):
    args = _gemm_args(fp8)
    change(args)
    with pytest.raises(error, match=match):
        dk.grouped_gemm(**args, backend="torch")
