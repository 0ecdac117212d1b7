"""Bad input to the routed-expert ops raises a clear Python error naming the argument (the
routing's own errors are in test_moe_route.py)."""

import pytest
import torch

import dsv3_kernels as dk

from test_moe_experts import make_experts, make_ids, quant_experts

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


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_experts=0), ValueError, "num_experts must be a positive int"),
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


def test_silu_mul_errors():
    with pytest.raises(ValueError, match="odd width"):
        dk.silu_mul(torch.randn(3, 7), backend="torch")
    with pytest.raises(ValueError, match="quant=True needs I"):
        dk.silu_mul(torch.randn(3, 200), quant=True, backend="torch")
    with pytest.raises(TypeError, match="x must have dtype"):
        dk.silu_mul(torch.randn(3, 8).to(torch.float8_e4m3fn), backend="torch")


def test_moe_unpermute_errors():
    out, w, inv = torch.randn(12, 64), torch.rand(3, 4), torch.arange(12, dtype=torch.int32).view(3, 4)
    dk.moe_unpermute(out, w, inv, backend="torch")
    with pytest.raises(ValueError, match=r"inverse\[2, 3\] = 11 is outside expert_out's 11 rows"):
        dk.moe_unpermute(out[:11], w, inv, backend="torch")
    with pytest.raises(ValueError, match="inverse and topk_weights must both be"):
        dk.moe_unpermute(out, w[:, :2].contiguous(), inv, backend="torch")
    with pytest.raises(TypeError, match="inverse must have dtype"):
        dk.moe_unpermute(out, w, inv.long(), backend="torch")
