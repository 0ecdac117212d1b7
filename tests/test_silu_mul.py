"""silu_mul on every backend against the fp32 reference (dsv3_kernels/reference/moe.py), plain
and quantized to FP8 (1x128 blocks); and its argument errors."""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import moe as ref
from builders import FP8


def _impl(name, backend):
    return dispatch.implementation(name, backend)


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


# ---- errors ----

def test_silu_mul_errors():
    with pytest.raises(ValueError, match="odd width"):
        dk.silu_mul(torch.randn(3, 7), backend="torch")
    with pytest.raises(ValueError, match="quant=True needs I"):
        dk.silu_mul(torch.randn(3, 200), quant=True, backend="torch")
    with pytest.raises(TypeError, match="x must have dtype"):
        dk.silu_mul(torch.randn(3, 8).to(torch.float8_e4m3fn), backend="torch")
