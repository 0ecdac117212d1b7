"""rms_norm (optionally fused with the residual add) on every backend against the fp32 reference
(dsv3_kernels/reference/norm.py states the semantics).

Inputs are fresh random values (never zeros) with D = 1, 7, 50, 100, 129, 257 (the vector loops' tails), 512 / 1536
(the latent norms), 7168 (the hidden size), 0 rows and leading dims. What may differ, and why:
residual_out (one rounding of x + residual) is exact; the sum of squares is added in another order
than torch's, so float32 out is within 1e-5 relative and a bfloat16/float16 element lying close to
a rounding boundary (of normed, then of weight * normed) may differ by up to 2 ulps: the tests
allow that on at most 1% of the elements. Which outputs are NaN must match exactly (NaN/inf rows,
overflowing squares, inf + -inf residuals, non-finite weights). On a GPU the allocator is filled
with NaN first, so an output element left unwritten shows.
"""

import pytest
import torch
import torch.nn.functional as F

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import norm as ref
from builders import make_rms_norm_inputs as make_inputs
from helpers import native_only, poison_allocator

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0, 7), (1, 1), (5, 7), (6, 50), (3, 100), (3, 129), (2, 3, 257), (4, 512), (2, 1536), (8, 7168),
          native_only((64, 7168)), native_only((1000, 256))]  # many rows: the CPU kernel's parallel path


def _impl(backend):
    return dispatch.implementation("rms_norm", backend)


def _ulp(want):
    """One unit in the last place of want's dtype at each element (subnormals: the smallest step)."""
    fi = torch.finfo(want.dtype)
    mag = want.float().abs().nan_to_num(posinf=fi.max).clamp_min(fi.smallest_normal)
    return fi.eps * torch.exp2(torch.floor(torch.log2(mag)))


def assert_matches(got, want):
    """got vs the reference output: NaN and inf exactly where the reference has them; float32
    within 1e-5 relative; bf16/fp16 within 2 ulps, and that on at most 1% (+2) of the elements."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    g, w = got.cpu().float(), want.cpu().float()
    assert torch.equal(g.isnan(), w.isnan()), f"NaN at {g.isnan().nonzero()[:5]} vs {w.isnan().nonzero()[:5]}"
    inf = w.isinf()
    assert torch.equal(g.isinf(), inf) and torch.equal(g[inf], w[inf])
    fin = w.isfinite()
    g, w = g[fin], w[fin]
    if want.dtype == torch.float32:
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
        return
    err = (g - w).abs() / _ulp(want.cpu()[fin])
    assert (err <= 2).all(), f"max {err.max():.1f} ulps at {err.argmax()}"
    assert (err > 0).sum() <= w.numel() // 100 + 2, f"{(err > 0).sum()} of {w.numel()} elements differ"


def check(got, want, residual):
    out, res_out = got
    assert_matches(out, want[0])
    if residual:
        torch.testing.assert_close(res_out.cpu(), want[1], rtol=0, atol=0, equal_nan=True)  # exact
    else:
        assert res_out.shape == (0,) and res_out.dtype == want[0].dtype


@pytest.mark.ops("rms_norm")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(device, backend, shape, dtype, residual):
    x, w, r = make_inputs(shape, dtype, residual)
    want = ref.rms_norm(x, w, 1e-6, r)
    poison_allocator(device)
    got = _impl(backend)(x.to(device), w.to(device), 1e-6, None if r is None else r.to(device))
    check(got, want, residual)


@pytest.mark.ops("rms_norm")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_op_and_eps(device, backend, dtype):
    """The public op with leading dims and another eps; without a residual it is the model's
    RMSNorm (dsv3.layers.RMSNorm: weight * F.rms_norm(x.float()).to(dtype)) up to the summation order."""
    x, w, r = make_inputs((2, 3, 1536), dtype, True, device, scale=0.01)  # small values: eps matters
    for eps in (1e-6, 1e-3):
        check(dk.rms_norm(x, w, eps, r, backend=backend), ref.rms_norm(x.cpu(), w.cpu(), eps, r.cpu()), True)
    model = w.cpu() * F.rms_norm(x.cpu().float(), (1536,), eps=1e-6).to(dtype)
    assert_matches(dk.rms_norm(x, w, backend=backend)[0], model)


@pytest.mark.ops("rms_norm")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the overflows made here
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_rows(device, backend, dtype, residual):
    """The reference's NaN rule: a NaN in h makes its row NaN; an inf makes its mean square inf,
    so the row is NaN at the inf and 0 elsewhere; so do squares overflowing fp32. D = 257 puts
    some of them in the vector loops' tails."""
    x, w, r = make_inputs((8, 257), dtype, residual)
    big = torch.finfo(dtype).max if dtype == torch.float16 else 1e20
    x[0, 3] = float("nan")
    x[1, 100] = float("inf")
    x[2, 256] = float("-inf")  # in the tail
    x[3, 5], x[3, 256] = float("inf"), float("nan")
    x[4, 7] = big  # bf16/fp32: the square overflows fp32 (fp16's max does not)
    if residual:
        r[5, 9] = float("-inf")  # x + r = -inf
        r[6, 10], x[6, 10] = float("-inf"), float("inf")  # inf + -inf = NaN
        r[7, 11], x[7, 11] = big, big  # fp16: overflows to inf in h
    w[200] = float("inf")  # column 200: inf * 0 = NaN in the inf rows, +-inf elsewhere
    want = ref.rms_norm(x, w, 1e-6, r)
    assert want[0][0].isnan().all() and want[0][1].isnan().sum() == 2  # column 100 and column 200
    poison_allocator(device)
    got = _impl(backend)(x.to(device), w.to(device), 1e-6, None if r is None else r.to(device))
    check(got, want, residual)


@pytest.mark.ops("rms_norm")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_unaligned_views(device, backend, dtype):
    """Contiguous views at an odd element offset (no 16-byte alignment: the scalar CUDA path)."""
    d = 256
    buf = (torch.randn(3 * 4 * d + 1) + 0.5).to(dtype).to(device)
    x, r, w = buf[1:4 * d + 1].view(4, d), buf[4 * d + 1:8 * d + 1].view(4, d), buf[8 * d + 1:9 * d + 1]
    check(_impl(backend)(x, w, 1e-6, r), ref.rms_norm(x.cpu(), w.cpu(), 1e-6, r.cpu()), True)


@pytest.mark.ops("rms_norm")
def test_compile_fullgraph(device, backend):
    """A decoder layer's two norms around a stand-in for attention, in one traced graph."""
    torch._dynamo.reset()
    x, w1, r = make_inputs((3, 512), torch.bfloat16, True, device)
    w2 = w1.flip(0)

    def f(x, r):
        h, r = dk.rms_norm(x, w1, 1e-6, r, backend=backend)
        h, r = dk.rms_norm(h * 2, w2, 1e-6, r, backend=backend)
        return h, r, dk.rms_norm(r, w1, backend=backend)[0]

    compiler = "aot_eager" if device == "cpu" else "inductor"
    got = torch.compile(f, fullgraph=True, backend=compiler)(x, r)
    for g, e in zip(got, f(x, r)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.ops("rms_norm")
def test_cuda_graph_capture(device, backend):
    x, w, r = make_inputs((8, 7168), torch.bfloat16, True, device)
    dk.rms_norm(x, w, 1e-6, r, backend=backend)  # warm-up (compiles the Triton kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, res_out = dk.rms_norm(x, w, 1e-6, r, backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = dk.rms_norm(x, w, 1e-6, r, backend=backend)
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    torch.testing.assert_close(res_out, want[1], rtol=0, atol=0)


# ---- bad input ----

def _args(**change):
    x, w, r = make_inputs((4, 64), torch.bfloat16, True)
    args = dict(x=x, weight=w, eps=1e-6, residual=r)
    args.update(change)
    return args


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.randn(4, 64, dtype=torch.float64)), TypeError, "x must have dtype"),
    (dict(x=[[1.0] * 64] * 4), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.tensor(1.0, dtype=torch.bfloat16)), ValueError, "x must have at least 1 dim"),
    (dict(x=torch.randn(4, 0, dtype=torch.bfloat16), weight=torch.randn(0, dtype=torch.bfloat16),
          residual=None), ValueError, "x must have a last dim D >= 1"),
    (dict(x=torch.randn(64, 4, dtype=torch.bfloat16).t()), ValueError, "x must be contiguous"),
    (dict(weight=torch.randn(64)), TypeError, "weight must have dtype torch.bfloat16"),
    (dict(weight=torch.randn(63, dtype=torch.bfloat16)), ValueError, r"weight must be \[D\] = \[64\]"),
    (dict(weight=torch.randn(1, 64, dtype=torch.bfloat16)), ValueError, "weight must be 1-D"),
    (dict(weight="w"), TypeError, "weight must be a torch.Tensor"),
    (dict(residual=torch.randn(4, 64, dtype=torch.float16)), TypeError, "residual must have dtype torch.bfloat16"),
    (dict(residual=torch.randn(2, 2, 64, dtype=torch.bfloat16)), ValueError, "residual must have x's shape"),
    (dict(residual=torch.randn(4, 128, dtype=torch.bfloat16)[:, :64]), ValueError, "residual must be contiguous"),
    (dict(residual=3.0), TypeError, "residual must be a torch.Tensor"),
    (dict(eps=-1e-6), ValueError, "eps must be a number >= 0"),
    (dict(eps="1e-6"), TypeError, "eps must be a number"),
    (dict(eps=float("nan")), ValueError, "eps must be a number >= 0"),
])
def test_errors_name_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        dk.rms_norm(**_args(**change), backend="torch")


@pytest.mark.ops("rms_norm")
@pytest.mark.parametrize("change", [
    dict(x=torch.randn(4, 64, dtype=torch.float64), weight=torch.randn(64, dtype=torch.float64), residual=None),
    dict(x=torch.randn(64, 4, dtype=torch.bfloat16).t()),
    dict(weight=torch.randn(64)),
    dict(weight=torch.randn(65, dtype=torch.bfloat16)),
    dict(residual=torch.randn(4, 65, dtype=torch.bfloat16)),
    dict(residual=torch.randn(4, 64, dtype=torch.float16)),
    dict(residual=torch.randn(4, 128, dtype=torch.bfloat16)[:, ::2]),
], ids=["float64", "x-strided", "weight-dtype", "weight-length", "residual-shape", "residual-dtype",
        "residual-strided"])
def test_kernels_refuse_what_they_cannot_take(device, backend, change):
    """Called directly (past ops.py's checks), every kernel raises instead of running out of bounds."""
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _args(**change).items()}
    with pytest.raises((TypeError, ValueError, RuntimeError), match="rms_norm"):
        _impl(backend)(args["x"], args["weight"], args["eps"], args["residual"])
