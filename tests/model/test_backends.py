"""Every backend runs the whole model and agrees with the reference path (float32, torch backend):
bf16 within bf16 tolerance, FP8 within FP8 tolerance; an FP8 checkpoint (DeepSeek-V3's format)
matches its dequantized model; greedy generation is the same token for token on every backend."""

import os

import pytest
import torch
from safetensors import safe_open

from dsv3.load import load
from dsv3.quantize import quantize_checkpoint
from dsv3_kernels.reference.fp8 import calc_diff

from hf_checkpoints import hf_checkpoint, run_prefill_and_decode  # noqa: F401

MODEL_OPS = ("fp8_linear", "mla_cache_write", "mla_decode", "moe_route", "fused_moe")
PROMPTS = [[5, 17, 250, 3, 99, 41, 7], [200, 11, 64, 8, 300, 123, 9, 77, 18, 2, 66]]


def _compare(got, want):
    """calc_diff (DeepGEMM's measure: 0 when equal) over prefill and decode logits."""
    (gp, gs, _), (wp, ws, _) = got, want
    return calc_diff(torch.cat(gp + gs), torch.cat(wp + ws))


@pytest.mark.ops(*MODEL_OPS)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_backend_matches_reference(hf_checkpoint, device, backend, fp8):  # noqa: F811
    path, _ = hf_checkpoint()
    model = load(path, torch.bfloat16, device, fp8=fp8, backend=backend, progress=False)
    assert model.model.layers[1].mlp.experts.fp8 == fp8
    exact = run_prefill_and_decode(load(path, torch.float32, backend="torch", progress=False), PROMPTS, steps=3)
    # every model decodes the same tokens (the fp32 reference's), so all see the same inputs
    got = run_prefill_and_decode(model, PROMPTS, steps=3, follow=exact[2])
    assert not any(t.isnan().any() for t in got[0] + got[1])
    if not fp8:
        assert _compare(got, exact) < 5e-4  # bf16 weights and activations
        return
    # FP8: against the torch backend's ops on the same quantized weights. Not as tight as the ops'
    # own tests (which feed both the same quantized inputs): a 1-ulp bf16 difference upstream moves
    # ~6% of the elements it touches across an e4m3 rounding boundary (one 6% step) in the next
    # act_quant, and 7 GEMMs deep that measures ~2e-3 here (and 5e-5 without FP8).
    same_quant = load(path, torch.bfloat16, fp8=True, backend="torch", progress=False)
    assert _compare(got, run_prefill_and_decode(same_quant, PROMPTS, steps=3, follow=exact[2])) < 5e-3
    # ...and loosely against the unquantized model: the weights' FP8 rounding also moves some
    # near-tied expert choices of this random model (5% of the rows here), hence 3e-2.
    assert _compare(got, exact) < 3e-2


@pytest.mark.ops(*MODEL_OPS)
def test_fp8_checkpoint_matches_its_dequantized_model(hf_checkpoint, tmp_path, device, backend):  # noqa: F811
    path, _ = hf_checkpoint()
    fp8_path = str(tmp_path / "fp8")
    quantize_checkpoint(path, fp8_path)
    with safe_open(os.path.join(fp8_path, "model.safetensors"), "pt") as f:  # every linear, as DeepSeek's
        assert f.get_slice("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() != "F8_E4M3"
    model = load(fp8_path, torch.bfloat16, device, backend=backend, progress=False)
    attn = model.model.layers[0].self_attn
    assert model.fp8 and attn.o_proj.weight.dtype == torch.float8_e4m3fn
    # the stored FP8 blocks are loaded as they are: the same as quantizing on load
    on_load = load(path, torch.bfloat16, fp8=True, backend="torch", progress=False).model.layers[0].self_attn
    assert torch.equal(attn.o_proj.weight.cpu().view(torch.uint8), on_load.o_proj.weight.view(torch.uint8))
    assert torch.equal(attn.o_proj.weight_scale_inv.cpu(), on_load.o_proj.weight_scale_inv)
    dequantized = load(fp8_path, torch.float32, fp8=False, backend="torch", progress=False)
    want = run_prefill_and_decode(dequantized, PROMPTS, steps=3)
    got = run_prefill_and_decode(model, PROMPTS, steps=3, follow=want[2])
    # within FP8 tolerance of its dequantized model (activations are quantized per 1x128 block too)
    assert _compare(got, want) < 3e-2
    # and the dequantized model is the original up to the weights' FP8 rounding, not equal to it
    unquantized = run_prefill_and_decode(load(path, torch.float32, backend="torch", progress=False), PROMPTS, 3,
                                         follow=want[2])
    assert 1e-6 < _compare(want, unquantized) < 3e-2


def _greedy(model, steps):
    return run_prefill_and_decode(model, PROMPTS, steps)[2]


def test_greedy_generation_is_identical_across_backends(hf_checkpoint):  # noqa: F811
    """A tiny fp32 model on every backend here (the kernels' float32 paths): token for token the
    greedy continuation of the torch backend (the reference path)."""
    import dsv3_kernels as dk
    path, _ = hf_checkpoint()
    backends = [b for b in dk.BACKENDS if all(b in dk.available_backends(op, "cpu") for op in MODEL_OPS)]
    assert "torch" in backends and len(backends) >= 2, backends
    runs = {b: _greedy(load(path, torch.float32, backend=b, progress=False), steps=16) for b in backends}
    for b, seqs in runs.items():
        assert seqs == runs["torch"], f"backend {b} generated other tokens than torch"
