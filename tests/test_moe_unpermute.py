"""moe_unpermute on every backend against the fp32 reference (dsv3_kernels/reference/moe.py),
with NaN in the padding rows it must not read; with moe_permute, that the two are inverses, that a
bad id's token combines to NaN and that the id -1 (no expert) gets no row and adds nothing; and
moe_unpermute's argument errors.
"""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import moe as ref
from builders import PERMUTE_CASES, drop_choices, make_ids
from helpers import native_only


def _impl(name, backend):
    return dispatch.implementation(name, backend)


@pytest.mark.ops("moe_unpermute")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PERMUTE_CASES[:5] + PERMUTE_CASES[-3:], ids=lambda c: "T{}-k{}-E{}-{}".format(*c))
def test_moe_unpermute(device, backend, case, dtype):
    t, topk, e, kind = case
    ids = make_ids(t, topk, e, kind)
    _, _, offsets, inverse = ref.moe_permute(torch.zeros(t, 8), ids, e, 4)
    rows = ref.permuted_rows(t, topk, e, 4)
    expert_out = torch.full((rows, 136), float("nan"), dtype=dtype)  # padding rows stay NaN
    used = inverse.long().flatten()
    expert_out[used] = torch.randn(used.numel(), 136).to(dtype)
    weights = torch.rand(t, topk)
    want = ref.moe_unpermute(expert_out, weights, inverse)
    got = _impl("moe_unpermute", backend)(expert_out.to(device), weights.to(device), inverse.to(device))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


# ---- with moe_permute ----

@pytest.mark.ops("moe_permute", "moe_unpermute")
@pytest.mark.parametrize("t, e", [native_only(1000, 256), (100, 16)])
def test_permute_unpermute_are_inverses(device, backend, t, e):
    """One choice of weight 1 per token: unpermute(permute(x)) is x bit for bit; and with topk
    choices every token's rows are copies of it."""
    hidden = torch.randn(t, 256, dtype=torch.bfloat16).to(device)
    ids = make_ids(t, 1, e).to(device)
    permuted, _, _, inverse = _impl("moe_permute", backend)(hidden, ids, e, 16, False)
    back = _impl("moe_unpermute", backend)(permuted, torch.ones(t, 1, device=device), inverse)
    assert torch.equal(back, hidden)
    ids = make_ids(t, 8, e).to(device)
    permuted, _, _, inverse = _impl("moe_permute", backend)(hidden, ids, e, 1, False)
    assert torch.equal(permuted[inverse.long()], hidden[:, None].expand(-1, 8, -1))


@pytest.mark.gpu
@pytest.mark.ops("moe_permute", "moe_unpermute")
def test_bad_ids_on_a_gpu_are_not_routed(device, backend):
    """On a GPU ids are not checked (a sync per call): a bad id is not placed (inverse -2, no
    out-of-bounds write) and its token combines to NaN."""
    hidden = torch.randn(6, 256, dtype=torch.bfloat16, device=device)
    ids = make_ids(6, 4, 16).to(device)
    ids[2, 1], ids[4, 3] = 16, -3
    permuted, _, offsets, inverse = _impl("moe_permute", backend)(hidden, ids, 16, 1, False)
    assert inverse[2, 1] == -2 and inverse[4, 3] == -2 and int(offsets[-1]) == 22
    out = _impl("moe_unpermute", backend)(permuted, torch.rand(6, 4, device=device), inverse)
    bad = torch.tensor([False, False, True, False, True, False])
    assert out[bad.to(device)].isnan().all() and not out[~bad.to(device)].isnan().any()


@pytest.mark.ops("moe_permute", "moe_unpermute")
def test_no_expert_choices_get_no_row(device, backend):
    """A -1 choice is not placed (inverse -1) and adds nothing in moe_unpermute; no NaN."""
    t, topk, e = 37, 4, 16
    hidden = torch.randn(t, 128, dtype=torch.bfloat16)
    ids = drop_choices(make_ids(t, topk, e))
    permuted, _, offsets, inverse = _impl("moe_permute", backend)(hidden.to(device), ids.to(device), e, 1, False)
    assert int(offsets[-1]) == int((ids >= 0).sum())
    assert torch.equal(inverse.cpu() == -1, ids == -1)
    weights = torch.rand(t, topk)
    got = _impl("moe_unpermute", backend)(permuted, weights.to(device), inverse).cpu()
    want = (weights * (ids >= 0)).sum(1, keepdim=True) * hidden.float()
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    assert torch.equal(got, ref.moe_unpermute(permuted.cpu(), weights, inverse.cpu()))


# ---- errors ----

def test_moe_unpermute_errors():
    out, w, inv = torch.randn(12, 64), torch.rand(3, 4), torch.arange(12, dtype=torch.int32).view(3, 4)
    dk.moe_unpermute(out, w, inv, backend="torch")
    with pytest.raises(ValueError, match=r"inverse\[2, 3\] = 11 is outside expert_out's 11 rows"):
        dk.moe_unpermute(out[:11], w, inv, backend="torch")
    with pytest.raises(ValueError, match="inverse and topk_weights must both be"):
        dk.moe_unpermute(out, w[:, :2].contiguous(), inv, backend="torch")
    with pytest.raises(TypeError, match="inverse must have dtype"):
        dk.moe_unpermute(out, w, inv.long(), backend="torch")
