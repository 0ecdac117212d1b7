"""The routed-expert ops (moe_permute, grouped_gemm, silu_mul, moe_unpermute, fused_moe) on every
backend against the fp32 reference (dsv3_kernels/reference/moe.py states the semantics).

Inputs are fresh random values; unused memory (rows no expert covers, the weights of experts
with no tokens) is NaN, so a kernel that reads or leaves it shows; token counts include 0, 1, 7
and 1000 with E=256, topk=8, and the routing extremes (all on one expert, most experts empty).
The E=256 cases are native_only (tests/helpers.py): Triton's interpreter runs the same kinds of
case with E=16 or 32 (the interpreter's cost grows with the expert count even at T=0).
"""

import pytest
import torch
import torch.nn.functional as F

import dsv3_kernels as dk

from dsv3_kernels import dispatch
from dsv3_kernels.reference import fp8 as ref_fp8
from dsv3_kernels.reference import moe as ref
from helpers import native_only, poison_allocator

FP8 = torch.float8_e4m3fn


def _impl(name, backend):
    return dispatch.implementation(name, backend)


def make_ids(t, topk, e, kind="random", generator=None):
    """int32 [T, topk] expert ids, distinct per token (as moe_route gives)."""
    if kind == "one_expert":  # every token's first choice is expert e-1; the rest spread out
        ids = torch.stack([torch.randperm(e - 1)[: topk - 1] for _ in range(t)]) if t else torch.empty(0, topk - 1)
        return torch.cat([torch.full((t, 1), e - 1), ids.long()], 1).to(torch.int32)
    if kind == "few_experts":  # most experts empty: every token picks among the first topk+1 experts
        return torch.stack([torch.randperm(topk + 1)[:topk] for _ in range(t)]).to(torch.int32) if t else \
            torch.empty(t, topk, dtype=torch.int32)
    return torch.rand(t, e).argsort(1)[:, :topk].to(torch.int32)


def poison(t, index):
    """t[index] = NaN (for e4m3fn through its bits: 0xFF is NaN, and masked_fill has no fp8 kernel)."""
    (t.view(torch.uint8) if t.dtype == FP8 else t)[index] = 0xFF if t.dtype == FP8 else float("nan")


def _bits(x):
    return x.view(torch.uint8) if x.dtype == FP8 else x


def assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(_bits(got.cpu()), _bits(want.cpu()))


def quant_experts(w):
    """[E, N, K] -> (e4m3 [E, N, K], weight_scale_inv fp32 [E, N/128, K/128])."""
    pairs = [ref_fp8.weight_quant(x) for x in w]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# ---- moe_permute ----

PERMUTE_CASES = [  # (T, topk, E, kind)
    (0, 8, 256, "random"), (1, 8, 256, "random"), (7, 8, 256, "random"), native_only((1000, 8, 256, "random")),
    native_only((300, 8, 256, "one_expert")), native_only((300, 8, 256, "few_experts")),
    (37, 6, 64, "random"), (5, 1, 3, "random"),
    (100, 8, 32, "random"), (40, 8, 32, "one_expert"), (40, 8, 32, "few_experts"),
]


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


# ---- silu_mul ----

@pytest.mark.ops("silu_mul")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [0, 1, 37])
def test_silu_mul(device, backend, dtype, m):
    x = (torch.randn(m, 2 * 200) * 4).to(dtype)
    want, _ = ref.silu_mul(x)
    got, scale = _impl("silu_mul", backend)(x.to(device), False)
    assert got.dtype == dtype and scale.numel() == 0
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


def assert_quant_close(got, got_scale, want, want_scale):
    """FP8 results of fp32 math that may differ by an ulp between backends: the scales agree to
    fp32 rounding, and each value to one e4m3 step (3 mantissa bits: 1/8 relative, or the
    subnormal step 2^-9 * scale)."""
    got, got_scale = got.cpu(), got_scale.cpu()
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-6, atol=0)
    gd = got.float() * got_scale.repeat_interleave(128, 1)
    wd = want.float() * want_scale.repeat_interleave(128, 1)
    step = torch.maximum(wd.abs() / 8, want_scale.repeat_interleave(128, 1) * 2.0 ** -9)
    assert ((gd - wd).abs() <= step * 1.001).all()
    assert (got.view(torch.uint8) != want.view(torch.uint8)).float().mean() < 0.01


@pytest.mark.ops("silu_mul")
@pytest.mark.parametrize("m", [1, 37])
def test_silu_mul_quant(device, backend, m):
    x = (torch.randn(m, 2 * 384) * 4).to(torch.bfloat16)
    x[0, :384] = 0  # a gate block of zeros: the smallest scale
    want, want_scale = ref.silu_mul(x, True)
    got, got_scale = _impl("silu_mul", backend)(x.to(device), True)
    assert got.dtype == FP8 and got_scale.shape == (m, 3)
    assert_quant_close(got, got_scale, want, want_scale)


# ---- moe_unpermute ----

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


# ---- grouped_gemm ----

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


# ---- fused_moe ----

def make_experts(e, d, i, fp8):
    w13 = torch.randn(e, 2 * i, d, dtype=torch.bfloat16) / d ** 0.5
    w2 = torch.randn(e, d, i, dtype=torch.bfloat16) / i ** 0.5
    if not fp8:
        return w13, w2, None, None
    (w13, s13), (w2, s2) = quant_experts(w13), quant_experts(w2)
    return w13, w2, s13, s2


def _poison_unused_experts(ids, weights):
    used = torch.zeros(weights[0].shape[0], dtype=torch.bool)
    used[ids.long().flatten()] = True
    for w in weights:
        if w is not None:
            poison(w, ~used)


FUSED_CASES = [  # (T, topk, E, D, I, kind)
    *(native_only(c) for c in [(0, 8, 256, 128, 128, "random"), (1, 8, 256, 256, 128, "random"),
                               (7, 8, 256, 128, 256, "random"), (1000, 8, 256, 128, 128, "random"),
                               (64, 8, 64, 256, 128, "few_experts")]),
    (40, 6, 16, 128, 128, "one_expert"),
    (0, 8, 16, 128, 128, "random"), (1, 8, 16, 256, 128, "random"), (7, 8, 16, 128, 256, "random"),
    (100, 8, 16, 128, 128, "random"), (32, 8, 16, 256, 128, "few_experts"),
]


@pytest.mark.ops("fused_moe")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "T{}-k{}-E{}-D{}-I{}-{}".format(*c))
def test_fused_moe(device, backend, case, fp8):
    t, topk, e, d, i, kind = case
    hidden = torch.randn(t, d, dtype=torch.bfloat16)
    ids = make_ids(t, topk, e, kind)
    weights = torch.rand(t, topk) * 2.5 / topk
    experts = make_experts(e, d, i, fp8)
    _poison_unused_experts(ids, experts)
    want = ref.fused_moe(hidden, *experts[:2], weights, ids, *experts[2:])
    args = [x.to(device) if x is not None else None for x in (hidden, *experts[:2], weights, ids, *experts[2:])]
    poison_allocator(device)
    got = _impl("fused_moe", backend)(*args).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (t, d) and not got.isnan().any()
    # bf16 rounding of gate_up and of each expert's output can fall either way between backends
    # (fp32 sums in other orders); with FP8 that can move a quantized intermediate by one step.
    tol = 3e-2 if fp8 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * (float(want.abs().max()) if t else 1))


@pytest.mark.ops("fused_moe")
def test_fused_moe_float32_is_unrounded(device, backend):
    """float32 experts (the fp32 reference precision of the dsv3 model) against a float64 loop."""
    t, topk, e, d, i = 33, 4, 8, 64, 48
    hidden, w13, w2 = torch.randn(t, d), torch.randn(e, 2 * i, d) / d**0.5, torch.randn(e, d, i) / i**0.5
    ids, weights = make_ids(t, topk, e), torch.rand(t, topk)
    want = torch.zeros(t, d, dtype=torch.float64)
    for tok in range(t):
        for j in range(topk):
            gate, up = (w13[ids[tok, j]].double() @ hidden[tok].double()).chunk(2)
            want[tok] += weights[tok, j].double() * (w2[ids[tok, j]].double() @ (F.silu(gate) * up))
    # the CUDA kernel takes bf16 only: auto dispatch sends float32 CUDA tensors to triton
    for impl in ("torch", None if backend == "cuda" else backend):
        got = dk.fused_moe(*(x.to(device) for x in (hidden, w13, w2, weights, ids)), backend=impl).cpu()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.ops("fused_moe")
def test_fused_moe_fp8_near_bf16(device, backend):
    """FP8 experts against the same experts unquantized: close, not equal (DeepGEMM's measure)."""
    t, topk, e, d, i = 64, 8, 16, 256, 256
    hidden = torch.randn(t, d, dtype=torch.bfloat16)
    ids, weights = make_ids(t, topk, e), torch.rand(t, topk)
    w13, w2, _, _ = make_experts(e, d, i, False)
    (q13, s13), (q2, s2) = quant_experts(w13), quant_experts(w2)
    got = _impl("fused_moe", backend)(*(x.to(device) for x in (hidden, q13, q2, weights, ids, s13, s2))).cpu()
    exact = ref.fused_moe(hidden, w13, w2, weights, ids)
    assert ref_fp8.calc_diff(got, exact) < 5e-3


@pytest.mark.ops("fused_moe", "moe_permute", "grouped_gemm", "silu_mul", "moe_unpermute")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fused_moe_is_the_composition_of_the_parts(device, backend, fp8):
    """fused_moe equals moe_permute -> grouped_gemm -> silu_mul -> grouped_gemm -> moe_unpermute
    run with the same backend (up to fp32 summation order)."""
    t, topk, e, d, i = 50, 8, 32, 256, 128
    hidden = torch.randn(t, d, dtype=torch.bfloat16, device=device)
    ids, weights = make_ids(t, topk, e).to(device), torch.rand(t, topk, device=device)
    w13, w2, s13, s2 = (x.to(device) if x is not None else None for x in make_experts(e, d, i, fp8))
    fused = _impl("fused_moe", backend)(hidden, w13, w2, weights, ids, s13, s2)
    permuted, scale, offsets, inverse = _impl("moe_permute", backend)(hidden, ids, e, 1, fp8)
    gate_up = _impl("grouped_gemm", backend)(permuted, w13, offsets, scale if fp8 else None, s13)
    h, h_scale = _impl("silu_mul", backend)(gate_up, fp8)
    down = _impl("grouped_gemm", backend)(h, w2, offsets, h_scale if fp8 else None, s2)
    parts = _impl("moe_unpermute", backend)(down, weights, inverse)
    torch.testing.assert_close(fused.float(), parts.float(), rtol=1e-2, atol=1e-2 * float(parts.abs().max()))


# ---- the id -1: no expert (expert parallelism's choices of other ranks) ----

def _drop_choices(ids, generator=None):
    """ids with about a third of the choices replaced by -1, and one token with all of them."""
    ids = ids.clone()
    ids[torch.rand(ids.shape, generator=generator) < 0.35] = -1
    if ids.shape[0] > 2:
        ids[2] = -1
    return ids


@pytest.mark.ops("moe_permute", "moe_unpermute")
def test_no_expert_choices_get_no_row(device, backend):
    """A -1 choice is not placed (inverse -1) and adds nothing in moe_unpermute; no NaN."""
    t, topk, e = 37, 4, 16
    hidden = torch.randn(t, 128, dtype=torch.bfloat16)
    ids = _drop_choices(make_ids(t, topk, e))
    permuted, _, offsets, inverse = _impl("moe_permute", backend)(hidden.to(device), ids.to(device), e, 1, False)
    assert int(offsets[-1]) == int((ids >= 0).sum())
    assert torch.equal(inverse.cpu() == -1, ids == -1)
    weights = torch.rand(t, topk)
    got = _impl("moe_unpermute", backend)(permuted, weights.to(device), inverse).cpu()
    want = (weights * (ids >= 0)).sum(1, keepdim=True) * hidden.float()
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    assert torch.equal(got, ref.moe_unpermute(permuted.cpu(), weights, inverse.cpu()))


@pytest.mark.ops("fused_moe")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fused_moe_skips_no_expert_choices(device, backend, fp8):
    """fused_moe with -1 choices equals the reference (which never computes them) and the old way
    of not owning a choice, weight 0 on some expert; NaN in every expert no real choice uses shows
    that a -1 choice reads no weights."""
    t, topk, e, d, i = 29, 4, 8, 128, 128
    hidden = torch.randn(t, d, dtype=torch.bfloat16)
    ids = _drop_choices(make_ids(t, topk, e))
    weights = torch.rand(t, topk)
    experts = make_experts(e, d, i, fp8)
    zeroed = ref.fused_moe(hidden, *experts[:2], weights * (ids >= 0), ids.clamp(min=0), *experts[2:])
    _poison_unused_experts(ids[ids >= 0], experts)
    want = ref.fused_moe(hidden, *experts[:2], weights, ids, *experts[2:])
    args = [x.to(device) if x is not None else None for x in (hidden, *experts[:2], weights, ids, *experts[2:])]
    got = _impl("fused_moe", backend)(*args).cpu()
    assert not got.isnan().any() and torch.equal(got[2], torch.zeros(d, dtype=torch.bfloat16))
    tol = 3e-2 if fp8 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))
    torch.testing.assert_close(want.float(), zeroed.float(), rtol=tol, atol=tol * float(want.abs().max()))
