"""fused_moe (the routed experts' SwiGLU MLPs) on every backend against the fp32 reference
(dsv3_kernels/reference/moe.py), bf16, FP8 and float32 experts; that it equals the composition
of its parts and skips the id -1 (no expert); and its argument errors.

The weights of experts no token uses are NaN, so a kernel that reads them shows; token counts
include 0, 1, 7 and 1000 with E=256 (native_only, tests/helpers.py: Triton's interpreter runs the
same kinds of case with E=16).
"""

import pytest
import torch
import torch.nn.functional as F

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import fp8 as ref_fp8
from dsv3_kernels.reference import moe as ref
from builders import drop_choices, make_experts, make_ids, poison, quant_experts
from helpers import native_only, poison_allocator


def _impl(name, backend):
    return dispatch.implementation(name, backend)


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

@pytest.mark.ops("fused_moe")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fused_moe_skips_no_expert_choices(device, backend, fp8):
    """fused_moe with -1 choices equals the reference (which never computes them) and the old way
    of not owning a choice, weight 0 on some expert; NaN in every expert no real choice uses shows
    that a -1 choice reads no weights."""
    t, topk, e, d, i = 29, 4, 8, 128, 128
    hidden = torch.randn(t, d, dtype=torch.bfloat16)
    ids = drop_choices(make_ids(t, topk, e))
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


# ---- errors ----

T, TOPK, E, D, I = 9, 4, 16, 256, 128


def _fused_args(fp8=False):
    w13, w2, s13, s2 = make_experts(E, D, I, fp8)
    return dict(hidden=torch.randn(T, D, dtype=torch.bfloat16), w13=w13, w2=w2,
                topk_weights=torch.rand(T, TOPK), topk_ids=make_ids(T, TOPK, E), w13_scale_inv=s13, w2_scale_inv=s2)


def _bad_id(a):
    a["topk_ids"][3, 2] = E


@pytest.mark.parametrize("change, error, match", [
    (_bad_id, ValueError, rf"topk_ids\[3, 2\] = {E} is outside \[0, {E}\)"),
    (lambda a: a["topk_ids"].__setitem__((0, 0), -2), ValueError, r"topk_ids\[0, 0\] = -2 .* not -1"),
    (lambda a: a.update(topk_ids=a["topk_ids"].long()), TypeError, "topk_ids must have dtype torch.int32"),
    (lambda a: a.update(topk_weights=a["topk_weights"].half()), TypeError, "topk_weights must have dtype"),
    (lambda a: a.update(topk_ids=a["topk_ids"][:, :2].contiguous()), ValueError, "one shape"),
    (lambda a: a.update(topk_weights=a["topk_weights"][:5]), ValueError, "one row per token"),
    (lambda a: a.update(hidden=a["hidden"].half()), TypeError, "hidden must have dtype"),
    (lambda a: a.update(hidden=a["hidden"][:, :128].contiguous()), ValueError, "D = hidden.shape"),
    (lambda a: a.update(w2=a["w2"][:, :, :64].contiguous()), ValueError, "w2 \\[E, D, I\\]"),
    (lambda a: a.update(w13=a["w13"][:8].contiguous()), ValueError, "w13 \\[E, 2I, D\\]"),
    (lambda a: a.update(w13=a["w13"].half()), TypeError, "w13 must have dtype"),
    (lambda a: a.update(w13_scale_inv=torch.ones(E, 2, 2)), ValueError, "w13_scale_inv must be given exactly"),
    (lambda a: a.update(hidden=a["hidden"].t().contiguous().t()), ValueError, "hidden must be contiguous"),
])
def test_fused_moe_errors(change, error, match):
    args = _fused_args()
    change(args)
    with pytest.raises(error, match=match):
        dk.fused_moe(**args, backend="torch")


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(w2_scale_inv=None), ValueError, "w2_scale_inv must be given exactly"),
    (lambda a: a.update(w13_scale_inv=a["w13_scale_inv"][:, :1].contiguous()), ValueError,
     r"w13_scale_inv must have shape \(16, 2, 2\)"),
    (lambda a: a.update(w2=a["w2"].to(torch.bfloat16), w2_scale_inv=None), TypeError, "both be bfloat16 or both float8_e4m3fn"),
])
def test_fused_moe_fp8_errors(change, error, match):
    args = _fused_args(fp8=True)
    change(args)
    with pytest.raises(error, match=match):
        dk.fused_moe(**args, backend="torch")


def test_fused_moe_float32_needs_float32_experts():
    args = _fused_args()
    args.update(hidden=args["hidden"].float())
    with pytest.raises(TypeError, match="w13 must have dtype"):
        dk.fused_moe(**args, backend="torch")
    fp8 = _fused_args(fp8=True)
    with pytest.raises(TypeError, match="float32 hidden needs float32 experts"):
        dk.fused_moe(**(fp8 | dict(hidden=fp8["hidden"].float())), backend="torch")


def test_fused_moe_fp8_needs_128_multiples():
    w13 = torch.zeros(2, 2 * 64, 256, dtype=torch.float8_e4m3fn)
    w2 = torch.zeros(2, 256, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="FP8 w2 needs K"):
        dk.fused_moe(torch.randn(3, 256, dtype=torch.bfloat16), w13, w2, torch.rand(3, 1),
                     make_ids(3, 1, 2), torch.ones(2, 1, 2), torch.ones(2, 2, 1), backend="torch")
