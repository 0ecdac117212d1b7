"""Property-based checks (hypothesis) of the ops against their references over random shapes, storage
offsets, strides and special values (NaN, +-inf, -0, subnormals, huge values), on every kernel
backend of this host. Bounded (max_examples) to keep the suite's time in check; what a failing
example shows is reproduced by hypothesis's printed seed."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import dsv3_kernels as dk  # noqa: E402
from dsv3_kernels.reference import fp8 as ref_fp8, moe as ref_moe, norm as ref_norm  # noqa: E402

SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 1e-40, -3e-39, 1e30, -65504.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy NaN / inf math
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None)


def _backends(op):
    return [b for b in dk.available_backends(op, "cpu") if b != "torch"]


@st.composite
def tensors(draw, shape, dtype):
    """A tensor of `shape` with random values and a few special ones, living at a random storage
    offset of a larger buffer (contiguous: what the kernels take)."""
    n = 1
    for d in shape:
        n *= d
    seed = draw(st.integers(0, 2 ** 31 - 1))
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 2
    for _ in range(draw(st.integers(0, 3)) if n else 0):
        values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    offset = draw(st.integers(0, 37))
    buf = torch.full((offset + n + 5,), float("nan"))
    buf[offset:offset + n] = values
    return buf.to(dtype)[offset:offset + n].view(shape)


def assert_same(got, want):
    """NaN and inf exactly where the reference has them; the rest within a rounding."""
    got, want = got.cpu().float(), want.float()
    assert torch.equal(got.isnan(), want.isnan())
    inf = want.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], want[inf])
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=2 ** -6, atol=1e-5)


@pytest.mark.parametrize("backend", _backends("rms_norm"))
@SETTINGS
@given(data=st.data(), rows=st.integers(0, 5), d=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       residual=st.booleans())
def test_rms_norm_property(backend, data, rows, d, dtype, residual):
    x = data.draw(tensors((rows, d), dtype))
    w = data.draw(tensors((d,), dtype))
    r = data.draw(tensors((rows, d), dtype)) if residual else None
    got = dk.rms_norm(x, w, 1e-6, r, backend=backend)
    want = ref_norm.rms_norm(x, w, 1e-6, r)
    assert_same(got[0], want[0])
    if residual:
        assert torch.equal(got[1].isnan(), want[1].isnan()) and torch.equal(got[1].nan_to_num(), want[1].nan_to_num())


@pytest.mark.parametrize("backend", _backends("act_quant"))
@SETTINGS
@given(data=st.data(), rows=st.integers(0, 4), k=st.integers(1, 400), block=st.sampled_from([32, 128]),
       dtype=st.sampled_from(DTYPES), ue8m0=st.booleans())
def test_act_quant_property(backend, data, rows, k, block, dtype, ue8m0):
    """The reference's bytes and scales (a NaN code's sign aside), NaN / inf blocks included."""
    x = data.draw(tensors((rows, k), dtype))
    q, s = dk.act_quant(x, block, "ue8m0" if ue8m0 else None, backend=backend)
    q_ref, s_ref = ref_fp8.act_quant(x, block, ue8m0)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)
    bits, bits_ref = q.view(torch.uint8), q_ref.view(torch.uint8)
    nan_code = (bits_ref & 0x7F) == 0x7F
    assert torch.equal((bits & 0x7F) == 0x7F, nan_code) and torch.equal(bits[~nan_code], bits_ref[~nan_code])


@pytest.mark.parametrize("backend", _backends("fp8_gemm"))
@SETTINGS
@given(data=st.data(), lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), n=st.integers(1, 140),
       kb=st.integers(1, 2), stride=st.integers(1, 3), dtype=st.sampled_from(DTYPES))
def test_fp8_linear_property(backend, data, lead, n, kb, stride, dtype):
    """fp8_linear takes x of any strides (every `stride`-th row of a larger tensor) at any storage
    offset: the reference's NaN / inf pattern and values within the GEMM's rounding."""
    k = 128 * kb
    big = data.draw(tensors((*lead[:-1], lead[-1] * stride, k), dtype))
    x = big[..., ::stride, :]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))) / k ** 0.5
    wq, ws = ref_fp8.weight_quant(w)
    got = dk.fp8_linear(x, wq, ws, out_dtype=torch.float32, backend=backend)
    want = dk.fp8_linear(x, wq, ws, out_dtype=torch.float32, backend="torch")
    assert torch.equal(got.isnan(), want.isnan())
    fin = want.isfinite()
    if fin.any():
        assert (got[fin] - want[fin]).abs().max() <= 2e-5 * want[fin].abs().max() + 1e-30


@pytest.mark.parametrize("backend", _backends("moe_route"))
@SETTINGS
@given(data=st.data(), rows=st.integers(0, 6), grouping=st.sampled_from([(1, 1, 1, 3), (4, 2, 5, 5), (8, 4, 8, 4)]),
       score_func=st.sampled_from(["sigmoid", "softmax"]), bias=st.booleans(), renormalize=st.booleans())
def test_moe_route_property(backend, data, rows, grouping, score_func, bias, renormalize):
    """The reference's ids (always distinct experts in [0, E)) and weights, special values included."""
    n_group, topk_group, topk, per_group = grouping
    e = n_group * per_group
    x = data.draw(tensors((rows, e), torch.float32))
    b = data.draw(tensors((e,), torch.float32)) if bias else None
    w, ids = dk.moe_route(x, b, n_group, topk_group, topk, 2.5, score_func, renormalize, backend=backend)
    w_ref, ids_ref = ref_moe.moe_route(x, b, n_group, topk_group, topk, 2.5, score_func, renormalize)
    assert torch.equal(ids, ids_ref)
    assert all(len(set(r)) == topk and 0 <= min(r) and max(r) < e for r in ids.tolist())
    assert_same(w, w_ref)


@pytest.mark.parametrize("backend", _backends("moe_permute"))
@SETTINGS
@given(data=st.data(), rows=st.integers(0, 6), topk=st.integers(1, 4), e=st.integers(1, 9), d=st.integers(1, 150),
       align=st.sampled_from([1, 4]), dtype=st.sampled_from(DTYPES))
def test_moe_permute_property(backend, data, rows, topk, e, d, align, dtype):
    """Rows copied bit for bit (NaN / inf too) to the reference's layout, -1 ids skipped."""
    x = data.draw(tensors((rows, d), dtype))
    ids = torch.tensor(data.draw(st.lists(st.integers(-1, e - 1), min_size=rows * topk, max_size=rows * topk)),
                       dtype=torch.int32).view(rows, topk)
    got = dk.moe_permute(x, ids, e, align, backend=backend)
    want = ref_moe.moe_permute(x, ids, e, align)
    for g, w in ((got[0], want[0]), (got[2], want[2]), (got[3], want[3])):
        assert torch.equal(g.view(torch.uint8) if g.is_floating_point() else g,
                           w.view(torch.uint8) if w.is_floating_point() else w)


@pytest.mark.parametrize("backend", _backends("silu_mul"))
@SETTINGS
@given(data=st.data(), rows=st.integers(0, 5), i=st.integers(1, 200), dtype=st.sampled_from(DTYPES))
def test_silu_mul_property(backend, data, rows, i, dtype):
    x = data.draw(tensors((rows, 2 * i), dtype))
    assert_same(dk.silu_mul(x, backend=backend), ref_moe.silu_mul(x)[0])


@pytest.mark.parametrize("backend", _backends("moe_unpermute"))
@SETTINGS
@given(data=st.data(), rows=st.integers(0, 5), topk=st.integers(1, 4), p=st.integers(1, 12), d=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES))
def test_moe_unpermute_property(backend, data, rows, topk, p, d, dtype):
    """Special values in the rows and the weights, -1 entries (skipped whatever their weight)."""
    x = data.draw(tensors((p, d), dtype))
    w = data.draw(tensors((rows, topk), torch.float32))
    inv = torch.tensor(data.draw(st.lists(st.integers(-1, p - 1), min_size=rows * topk, max_size=rows * topk)),
                       dtype=torch.int32).view(rows, topk)
    assert_same(dk.moe_unpermute(x, w, inv, backend=backend), ref_moe.moe_unpermute(x, w, inv))
