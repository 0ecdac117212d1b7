"""Every op is a real custom op: opcheck passes, torch.compile(fullgraph=True) traces it, and on a
GPU a CUDA graph captures and replays it."""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import fp8 as ref

# opcheck's test_schema compares outputs with allclose, which has no fp8 kernel.
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
FP8_UTILS = ALL_UTILS[1:]


def _op(name, backend):
    impl = dispatch.implementation(name, backend)
    return impl.default if isinstance(impl, torch._ops.OpOverloadPacket) else impl


def _samples(device):
    x = torch.randn(5, 384, device=device, dtype=torch.bfloat16)
    w = torch.randn(200, 384, device=device)
    a, a_s = ref.act_quant(x.cpu())
    b, b_s = ref.weight_quant(w.cpu())
    a, a_s, b, b_s = (t.to(device) for t in (a, a_s, b, b_s))
    return {
        "act_quant": [((x, 128, False), ALL_UTILS), ((x.float()[:, :300].contiguous(), 64, True), ALL_UTILS)],
        "weight_quant": [((w, 128), ALL_UTILS)],
        "weight_dequant": [((b, b_s, 128, torch.bfloat16), FP8_UTILS)],
        "fp8_gemm": [((a, a_s, b, b_s, torch.bfloat16), FP8_UTILS), ((a, a_s, b, b_s, torch.float32), FP8_UTILS)],
    }


@pytest.mark.ops("act_quant", "weight_quant", "weight_dequant", "fp8_gemm")
def test_opcheck(device, backend):
    for name, cases in _samples(device).items():
        for args, utils in cases:
            torch.library.opcheck(_op(name, backend), args, test_utils=utils)


@pytest.mark.ops("act_quant", "weight_quant", "weight_dequant", "fp8_gemm")
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    w = torch.randn(200, 384, device=device)
    x = torch.randn(2, 3, 384, device=device, dtype=torch.bfloat16)

    def f(x, w):
        wq, ws = dk.weight_quant(w, backend=backend)
        y = dk.fp8_linear(x, wq, ws, backend=backend)
        return y, dk.weight_dequant(wq, ws, torch.float32, backend=backend)

    # On the CPU, aot_eager proves the whole graph traces (inductor's CPU codegen adds nothing here).
    compiler = "aot_eager" if device == "cpu" else "inductor"
    got = torch.compile(f, fullgraph=True, backend=compiler)(x, w)
    want = f(x, w)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.ops("act_quant", "fp8_gemm")
def test_cuda_graph_capture(device, backend):
    w = torch.randn(2112, 7168, device=device)
    wq, ws = dk.weight_quant(w, backend=backend)
    x = torch.randn(4, 7168, device=device, dtype=torch.bfloat16)
    y = dk.fp8_linear(x, wq, ws, backend=backend)  # warm-up (compiles Triton kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = dk.fp8_linear(x, wq, ws, backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y_graph, dk.fp8_linear(x, wq, ws, backend=backend), rtol=0, atol=0)
    assert not torch.equal(y_graph, y)
