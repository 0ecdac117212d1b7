"""moe_permute on every backend against the fp32 reference (dsv3_kernels/reference/moe.py states
the semantics), bit for bit; and its argument errors.

Token counts include 0, 1, 7 and 1000 with E=256, topk=8, and the routing extremes (all on one
expert, most experts empty); the allocator is poisoned, so a row the kernel leaves unwritten
shows. The E=256 cases are native_only (tests/helpers.py): Triton's interpreter runs the same
kinds of case with E=32 (its cost grows with the expert count even at T=0).
"""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import moe as ref
from builders import PERMUTE_CASES, assert_same, make_ids
from helpers import poison_allocator


def _impl(name, backend):
    return dispatch.implementation(name, backend)


@pytest.mark.ops("moe_permute")
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("align", [1, 4, 128])
@pytest.mark.parametrize("case", PERMUTE_CASES, ids=lambda c: "T{}-k{}-E{}-{}".format(*c))
def test_moe_permute(device, backend, case, align, quant):
    t, topk, e, kind = case
    hidden = torch.randn(t, 256, dtype=torch.bfloat16) * 3
    ids = make_ids(t, topk, e, kind)
    want = ref.moe_permute(hidden, ids, e, align, quant)
    poison_allocator(device)
    got = _impl("moe_permute", backend)(hidden.to(device), ids.to(device), e, align, quant)
    for g, w in zip(got, want):
        assert_same(g, w)


@pytest.mark.ops("moe_permute")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_permute_dtypes_and_odd_width(device, backend, dtype):
    hidden = torch.randn(33, 200).to(dtype)  # D = 200: no multiple of 128 or 16 (no quant)
    ids = make_ids(33, 3, 10)
    want = ref.moe_permute(hidden, ids, 10, 8, False)
    got = _impl("moe_permute", backend)(hidden.to(device), ids.to(device), 10, 8, False)
    for g, w in zip(got, want):
        assert_same(g, w)


# ---- errors ----

T, TOPK, E, D = 9, 4, 16, 256


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_experts=0), ValueError, r"num_experts must be an int in \[1, 2\*\*31 - 1\]"),
    (dict(num_experts=2 ** 31), ValueError, r"num_experts must be an int in \[1, 2\*\*31 - 1\] \(int32 ids\), got 2147483648"),
    (dict(num_experts=2 ** 40), ValueError, r"num_experts must be an int in"),
    (dict(align=0), ValueError, "align must be an int in"),
    (dict(align=3.0), ValueError, "align must be an int in"),
    (dict(quant=True, hidden=torch.randn(T, 200)), ValueError, "quant=True needs D"),
    (dict(hidden=torch.randn(T, D).to(torch.float8_e4m3fn)), TypeError, "hidden must have dtype"),
    (dict(hidden=torch.randn(T + 1, D)), ValueError, "one row per token"),
    (dict(num_experts=E - 1), ValueError, rf"is outside \[0, {E - 1}\)"),
])
def test_moe_permute_errors(kwargs, error, match):
    ids = make_ids(T, TOPK, E)
    ids[0, 0] = E - 1  # so num_experts = E - 1 leaves an id out of range
    args = dict(hidden=torch.randn(T, D), topk_ids=ids, num_experts=E) | kwargs
    with pytest.raises(error, match=match):
        dk.moe_permute(**args, backend="torch")
