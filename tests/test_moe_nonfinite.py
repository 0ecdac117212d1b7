"""The MoE ops with NaN / inf in their inputs, on every backend, against the rule of
reference/moe.py: moe_route ranks NaN above every number (ids always distinct experts in [0, E)),
moe_unpermute skips a -1 entry whatever its weight, silu_mul follows its formula in IEEE
arithmetic, and the raw grouped_gemm follows the offset rule (clamped to [0, M], hi <= lo empty)
for offsets the public op would refuse."""

import pytest
import torch

from dsv3_kernels import dispatch
from dsv3_kernels.reference import moe as ref

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # the interpreter's
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),  # NaN math (numpy)
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

NAN, INF = float("nan"), float("inf")


def _nonfinite_logits(t, e, device):
    """Random logits, rows 0-4 poisoned: a NaN, a +inf, a -inf, a row of -inf, two NaNs."""
    x = torch.randn(t, e) * 2
    x[0, 5] = NAN
    x[1, e - 3] = INF
    x[2, 2] = -INF
    x[3] = -INF
    x[4, 1], x[4, e - 1] = NAN, NAN
    return x.to(device)


def _same_route(got, want, e):
    w, ids = (g.cpu() for g in got)
    want_w, want_ids = want
    assert torch.equal(ids, want_ids)
    assert ((ids >= 0) & (ids < e)).all()
    assert all(len(set(row)) == len(row) for row in ids.tolist())  # distinct experts
    assert torch.equal(w.isnan(), want_w.isnan())
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.ops("moe_route")
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("grouping", [(1, 1, 5), (4, 2, 6)], ids=["flat", "grouped"])
@pytest.mark.parametrize("bias", [False, True])
def test_moe_route_nonfinite(device, backend, score_func, grouping, bias):
    """NaN ranks above every number on every backend: the reference's ids (distinct, in range)
    and weights (NaN where the reference has NaN)."""
    n_group, topk_group, topk = grouping
    e = 20
    logits = _nonfinite_logits(7, e, device)
    b = torch.randn(e, device=device) if bias else None
    args = (logits, b, n_group, topk_group, topk, 2.5, score_func, True)
    want = ref.moe_route(logits.cpu(), None if b is None else b.cpu(), *args[2:])
    _same_route(dispatch.implementation("moe_route", backend)(*args), want, e)


@pytest.mark.ops("moe_route")
@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_route_nonfinite_bias(device, backend, renormalize):
    """A NaN / +-inf bias steers the choice as the reference ranks it; the weights stay unbiased."""
    e = 16
    logits = torch.randn(5, e, device=device)
    b = torch.randn(e)
    b[3], b[9], b[12] = NAN, INF, -INF
    args = (logits, b.to(device), 4, 2, 4, 1.0, "sigmoid", renormalize)
    want = ref.moe_route(logits.cpu(), b, *args[2:])
    assert (want[1] == 3).any(dim=1).all() and not want[0].isnan().any()
    _same_route(dispatch.implementation("moe_route", backend)(*args), want, e)


@pytest.mark.ops("moe_unpermute")
def test_moe_unpermute_nonfinite_weight_on_no_expert(device, backend):
    """A NaN or inf weight on a -1 entry adds nothing; one on a row makes the token NaN / inf."""
    expert_out = torch.randn(9, 70, device=device)
    inverse = torch.tensor([[0, -1, 4], [-1, 2, -1], [7, 8, -1], [5, 1, 3]], dtype=torch.int32, device=device)
    w = torch.rand(4, 3)
    w[0, 1], w[1, 0], w[1, 2], w[2, 2] = NAN, INF, -INF, NAN
    w[3, 1] = NAN  # on a row: token 3 is NaN
    w = w.to(device)
    got = dispatch.implementation("moe_unpermute", backend)(expert_out, w, inverse).cpu()
    want = ref.moe_unpermute(expert_out.cpu(), w.cpu(), inverse.cpu())
    assert want[:3].isfinite().all() and want[3].isnan().all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.ops("silu_mul")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_nonfinite(device, backend, dtype):
    """NaN / +-inf in gate or up: silu(gate) * up in IEEE arithmetic (silu(-inf) = NaN)."""
    m, i = 5, 130
    x = torch.randn(m, 2 * i) * 3
    x[0, 3], x[1, 7], x[2, 11], x[3, i + 2], x[4, i + 9] = NAN, INF, -INF, INF, NAN
    x = x.to(dtype).to(device)
    got = dispatch.implementation("silu_mul", backend)(x, False)[0].cpu().float()
    want = ref.silu_mul(x.cpu())[0].float()
    assert want.isnan().sum() >= 3 and want.isinf().any()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[want.isinf()], want[want.isinf()])
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 2 ** -8, atol=0, equal_nan=True)


@pytest.mark.ops("grouped_gemm")
@pytest.mark.parametrize("offsets", [[3, 1, 5, 9], [-4, 2, 2, 4], [0, 0, 7, 6], [2, 2, 2, 2]])
def test_grouped_gemm_offset_rule(device, backend, offsets):
    """Offsets out of order or outside [0, M] (the raw op takes them; the public one refuses them
    on the CPU): clamped to [0, M], a segment with hi <= lo empty, uncovered rows 0."""
    m, k, n = 7, 64, 24
    a = torch.randn(m, k).bfloat16()
    b = torch.randn(3, n, k).bfloat16()
    off = torch.tensor(offsets, dtype=torch.int32)
    got = dispatch.implementation("grouped_gemm", backend)(a.to(device), b.to(device), off.to(device), None, None)
    want = ref.grouped_gemm(a, b, off)
    assert want.abs().sum() > 0 or offsets == [2, 2, 2, 2]
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2 ** -7, atol=1e-2)
