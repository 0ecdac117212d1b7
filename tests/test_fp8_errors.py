"""Bad input gets a clear Python error naming the argument, on every backend."""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels.reference import fp8 as ref

FP8 = torch.float8_e4m3fn


def operands(m=4, n=256, k=256):
    a, a_s = ref.act_quant(torch.randn(m, k))
    b, b_s = ref.weight_quant(torch.randn(n, k))
    return a, a_s, b, b_s


@pytest.mark.ops("fp8_gemm")
def test_fp8_gemm_rejects_bad_input(device, backend):
    a, a_s, b, b_s = (t.to(device) for t in operands())
    gemm = lambda *args, **kw: dk.fp8_gemm(*args, backend=backend, **kw)  # noqa: E731
    with pytest.raises(TypeError, match=r"^a must have dtype torch.float8_e4m3fn"):
        gemm(a.float(), a_s, b, b_s)
    with pytest.raises(TypeError, match=r"^b_scale_inv must have dtype torch.float32"):
        gemm(a, a_s, b, b_s.half())
    with pytest.raises(ValueError, match=r"K \(a.shape\[1\]\) must be a positive multiple of 128, got 200"):
        gemm(a[:, :200].contiguous(), a_s, b[:, :200].contiguous(), b_s)
    with pytest.raises(ValueError, match=r"same K"):
        gemm(a, a_s, b[:, :128].contiguous(), b_s)
    with pytest.raises(ValueError, match=r"a_scale must have shape \(4, 2\), got \(4, 1\)"):
        gemm(a, a_s[:, :1].contiguous(), b, b_s)
    with pytest.raises(ValueError, match=r"b_scale_inv must have shape \(2, 2\), got \(1, 2\)"):
        gemm(a, a_s, b, b_s[:1].contiguous())
    with pytest.raises(ValueError, match=r"^b must be contiguous"):
        gemm(a, a_s, b.t().contiguous().t(), b_s)
    with pytest.raises(ValueError, match=r"^a must be 2-D"):
        gemm(a[None], a_s, b, b_s)
    with pytest.raises(TypeError, match=r"^out_dtype must be one of"):
        gemm(a, a_s, b, b_s, torch.int8)
    with pytest.raises(ValueError, match=r"one device, got a on .*, b on meta"):
        gemm(a, a_s, b.to("meta"), b_s)


@pytest.mark.ops("act_quant", "weight_quant", "weight_dequant")
def test_quant_ops_reject_bad_input(device, backend):
    x = torch.randn(4, 256, device=device)
    with pytest.raises(TypeError, match=r"^x must have dtype"):
        dk.act_quant(x.to(torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"^block_size must be a power of two"):
        dk.act_quant(x, 100, backend=backend)
    with pytest.raises(ValueError, match=r"^scale_fmt must be None or 'ue8m0'"):
        dk.act_quant(x, scale_fmt="e8m0", backend=backend)
    with pytest.raises(ValueError, match=r"^x must be contiguous"):
        dk.act_quant(x.t(), backend=backend)
    with pytest.raises(ValueError, match=r"^w must be 2-D"):
        dk.weight_quant(x[None], backend=backend)
    q, s = dk.weight_quant(x, backend=backend)
    with pytest.raises(ValueError, match=r"weight_scale_inv must have shape \(1, 2\), got \(1, 1\)"):
        dk.weight_dequant(q, s[:, :1].contiguous(), backend=backend)
    with pytest.raises(TypeError, match=r"^w must have dtype torch.float8_e4m3fn"):
        dk.weight_dequant(x, s, backend=backend)


def test_fp8_linear_rejects_bad_input():
    a, a_s, b, b_s = operands()
    x = torch.randn(2, 3, 256)
    with pytest.raises(ValueError, match=r"x's last dim must equal weight.shape\[1\] = 256"):
        dk.fp8_linear(torch.randn(2, 100), b, b_s)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(256,\)"):
        dk.fp8_linear(x, b, b_s, bias=torch.randn(3))
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor"):
        dk.fp8_linear([1.0], b, b_s)
    # The weight is checked first and by its own name (not an AttributeError / IndexError of x's check).
    with pytest.raises(TypeError, match=r"^weight must be a torch.Tensor, got list"):
        dk.fp8_linear(x, [[1.0]], b_s)
    with pytest.raises(ValueError, match=r"^weight must be 2-D"):
        dk.fp8_linear(x, b[0, 0], b_s)
    with pytest.raises(ValueError, match=r"^weight \[N, K\] needs N >= 1 and K a positive multiple of 128"):
        dk.fp8_linear(x[..., :0], b[:, :0], b_s)


def test_unknown_backend_is_a_clear_error():
    a, a_s, b, b_s = operands()
    with pytest.raises(ValueError, match=r"backend='gpu' is not a backend; choose one of"):
        dk.fp8_gemm(a, a_s, b, b_s, backend="gpu")
