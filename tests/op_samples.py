"""The opcheck samples of every op with a schema: SAMPLES[op](device, backend) -> [(args, test_utils)],
the arguments of a call of dsv3_kernels::<op> and the torch.library.opcheck checks that call runs.
test_opcheck.py runs every sample on every backend; test_op_completeness.py checks that every op
has samples. A new op adds its function here (docs/adding_an_op.md).
"""

import torch

from dsv3_kernels.reference import fp8 as ref_fp8
from dsv3_kernels.reference import moe as ref_moe
from builders import (make_cache, make_cache_write_case, make_experts, make_fp8_cache, make_fp8_cache_write_case,
                      make_ids, make_rms_norm_inputs, make_routes)

ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# opcheck's test_schema compares outputs with allclose, which has no fp8 kernel.
FP8_UTILS = ALL_UTILS[1:]


# ---- FP8 ----

def _fp8_operands(device):
    """x bf16 [5, 384], w fp32 [200, 384] and their quantized forms (a, a_scale), (b, b_scale_inv)."""
    x = torch.randn(5, 384, device=device, dtype=torch.bfloat16)
    w = torch.randn(200, 384, device=device)
    a, a_s = ref_fp8.act_quant(x.cpu())
    b, b_s = ref_fp8.weight_quant(w.cpu())
    return x, w, *(t.to(device) for t in (a, a_s, b, b_s))


def act_quant(device, backend):
    x = _fp8_operands(device)[0]
    return [((x, 128, False), ALL_UTILS), ((x.float()[:, :300].contiguous(), 64, True), ALL_UTILS)]


def weight_quant(device, backend):
    return [((_fp8_operands(device)[1], 128), ALL_UTILS)]


def weight_dequant(device, backend):
    *_, b, b_s = _fp8_operands(device)
    return [((b, b_s, 128, torch.bfloat16), FP8_UTILS)]


def fp8_gemm(device, backend):
    _, _, a, a_s, b, b_s = _fp8_operands(device)
    return [((a, a_s, b, b_s, torch.bfloat16), FP8_UTILS), ((a, a_s, b, b_s, torch.float32), FP8_UTILS)]


# ---- MLA: the bf16 cache and the FP8 one (uint8: the whole opcheck, test_schema included) ----

def mla_decode(device, backend):
    decode = tuple(make_cache([70, 0, 130], 64, torch.bfloat16, device, s_q=2, h=16))
    fp8_decode = tuple(make_fp8_cache([70, 0, 13], 64, torch.bfloat16, device, s_q=2, h=4)[:4])
    return [(decode + (0.1, True, 0), ALL_UTILS), (decode + (0.1, False, 3), ALL_UTILS),
            (fp8_decode + (0.1, True, 0), ALL_UTILS)]


def mla_cache_write(device, backend):
    return [(tuple(make_cache_write_case(9, torch.bfloat16, device, fused)), ALL_UTILS) for fused in (False, True)] + [
        (tuple(make_fp8_cache_write_case(9, torch.bfloat16, device, True)), ALL_UTILS)]


# ---- MoE ----

def moe_route(device, backend):
    logits, bias = torch.randn(37, 256, device=device), torch.randn(256, device=device) * 0.1
    return [((logits, bias, 8, 4, 8, 2.5, "sigmoid", True), ALL_UTILS),
            ((logits[:, :64].contiguous(), None, 1, 1, 6, 1.0, "softmax", False), ALL_UTILS)]


def _routed(device):
    """11 tokens' bf16 hidden [11, 256], top-4 ids of 16 experts, their weights, and moe_permute's
    (permuted, expert_offsets, inverse) of them."""
    hidden = torch.randn(11, 256, device=device, dtype=torch.bfloat16)
    ids = make_ids(11, 4, 16).to(device)
    weights = torch.rand(11, 4, device=device)
    permuted, _, offsets, inverse = ref_moe.moe_permute(hidden, ids, 16, 1)
    return hidden, ids, weights, permuted, offsets, inverse


def _experts(device, fp8):
    return tuple(x.to(device) if x is not None else None for x in make_experts(16, 256, 128, fp8))


def moe_permute(device, backend):
    hidden, ids, *_ = _routed(device)
    return [((hidden, ids, 16, 1, False), ALL_UTILS), ((hidden, ids, 16, 8, True), FP8_UTILS)]


def grouped_gemm(device, backend):
    _, _, _, permuted, offsets, _ = _routed(device)
    a_q, a_s = ref_fp8.act_quant(permuted)
    w13 = _experts(device, False)[0]
    q13, _, s13, _ = _experts(device, True)
    return [((permuted, w13, offsets, None, None), ALL_UTILS), ((a_q, q13, offsets, a_s, s13), FP8_UTILS)]


def silu_mul(device, backend):
    gate_up = torch.randn(44, 256, device=device, dtype=torch.bfloat16)
    return [((gate_up, False), ALL_UTILS), ((gate_up, True), FP8_UTILS)]


def moe_unpermute(device, backend):
    _, _, weights, permuted, _, inverse = _routed(device)
    return [((permuted, weights, inverse), ALL_UTILS)]


def fused_moe(device, backend):
    hidden, ids, weights, *_ = _routed(device)
    w13, w2, _, _ = _experts(device, False)
    q13, q2, s13, s2 = _experts(device, True)
    samples = [((hidden, w13, w2, weights, ids, None, None), ALL_UTILS),
               ((hidden, q13, q2, weights, ids, s13, s2), FP8_UTILS)]
    if backend != "cuda":  # float32 experts: the CUDA kernel takes bf16 (dispatch sends fp32 to triton)
        samples.append(((hidden.float(), w13.float(), w2.float(), weights, ids, None, None), ALL_UTILS))
    return samples


def ep_dispatch(device, backend):
    ids, weights = make_routes(9, 4, 16)
    ids, weights = ids.to(device), weights.to(device)
    return [((torch.randn(9, 128, dtype=torch.bfloat16, device=device), ids, weights, 16, 4, quant),
             FP8_UTILS if quant else ALL_UTILS) for quant in (False, True)]


# ---- normalization ----

def rms_norm(device, backend):
    samples = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w, r = make_rms_norm_inputs((2, 5, 129), dtype, True, device)
        samples += [((x, w, 1e-6, r), ALL_UTILS), ((x, w, 1e-5, None), ALL_UTILS)]
    x, w, _ = make_rms_norm_inputs((0, 64), torch.bfloat16, False, device)
    return samples + [((x, w, 1e-6, None), ALL_UTILS)]


SAMPLES = {fn.__name__: fn for fn in (
    act_quant, weight_quant, weight_dequant, fp8_gemm,
    mla_decode, mla_cache_write,
    moe_route, moe_permute, grouped_gemm, silu_mul, moe_unpermute, fused_moe, ep_dispatch,
    rms_norm,
)}
