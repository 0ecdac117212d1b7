"""torch.compile(fullgraph=True) traces the ops, and on a GPU a CUDA graph captures and replays
them (that every op passes opcheck is test_opcheck.py)."""

import pytest
import torch

import dsv3_kernels as dk
from builders import SCALE, make_cache, make_experts


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


# ---- MLA ----

@pytest.mark.ops("mla_decode", "mla_cache_write")
def test_compile_fullgraph_mla(device, backend):
    torch._dynamo.reset()
    q, kv_cache, block_table, seqlens = make_cache([70, 5], 64, torch.bfloat16, device, s_q=1, h=16)
    kv_cache = kv_cache.nan_to_num()
    kv_c, k_pe = torch.randn(2, 512, device=device).bfloat16(), torch.randn(2, 64, device=device).bfloat16()
    slots = (block_table[:, 0].long() * 64 + 3).to(device)  # position 3 of each request

    def f(q, kv_cache, kv_c, k_pe):
        dk.mla_cache_write(kv_c, k_pe, kv_cache, slots, backend=backend)
        return dk.mla_decode(q, kv_cache, block_table, seqlens, SCALE, backend=backend)

    compiler = "aot_eager" if device == "cpu" else "inductor"
    cache_compiled = kv_cache.clone()
    got = torch.compile(f, fullgraph=True, backend=compiler)(q, cache_compiled, kv_c, k_pe)
    want = f(q, kv_cache, kv_c, k_pe)
    torch.testing.assert_close(cache_compiled, kv_cache, rtol=0, atol=0, equal_nan=True)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.ops("mla_decode")
def test_cuda_graph_capture_mla(device, backend):
    """Capture once, replay on new lengths and queries: no host sync, no data-dependent shapes."""
    q, kv_cache, block_table, seqlens = make_cache([700, 3000, 64, 1], 64, torch.bfloat16, device, h=128)
    out, lse = dk.mla_decode(q, kv_cache, block_table, seqlens, SCALE, backend=backend)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = dk.mla_decode(q, kv_cache, block_table, seqlens, SCALE, backend=backend)
    q.copy_(torch.randn_like(q))
    seqlens.copy_(torch.tensor([650, 2000, 0, 64], dtype=torch.int32))  # within each table
    graph.replay()
    want = dk.mla_decode(q, kv_cache, block_table, seqlens, SCALE, backend=backend)
    torch.testing.assert_close(out_g, want[0], rtol=0, atol=0)
    torch.testing.assert_close(lse_g, want[1], rtol=0, atol=0)


# ---- MoE ----

@pytest.mark.ops("moe_route")
def test_compile_fullgraph_moe_route(device, backend):
    torch._dynamo.reset()
    logits, bias = torch.randn(9, 256, device=device), torch.randn(256, device=device) * 0.1

    def f(logits):
        return dk.moe_route(logits, bias, 8, 4, 8, 2.5, backend=backend)

    compiler = "aot_eager" if device == "cpu" else "inductor"
    for g, e in zip(torch.compile(f, fullgraph=True, backend=compiler)(logits), f(logits)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.ops("moe_route", "fused_moe")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_compile_fullgraph_moe_layer(device, backend, fp8):
    """Routing and the experts in one compiled graph."""
    torch._dynamo.reset()
    hidden = torch.randn(9, 256, device=device, dtype=torch.bfloat16)
    logits, bias = torch.randn(9, 64, device=device), torch.randn(64, device=device) * 0.1
    w13, w2, s13, s2 = (x.to(device) if x is not None else None for x in make_experts(64, 256, 128, fp8))

    def f(hidden, logits):
        weights, ids = dk.moe_route(logits, bias, 8, 4, 6, 2.5, backend=backend)
        return dk.fused_moe(hidden, w13, w2, weights, ids, s13, s2, backend=backend)

    compiler = "aot_eager" if device == "cpu" else "inductor"
    got = torch.compile(f, fullgraph=True, backend=compiler)(hidden, logits)
    torch.testing.assert_close(got, f(hidden, logits), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.ops("moe_route", "fused_moe")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_cuda_graph_capture_moe_layer(device, backend, fp8):
    """Capture once, replay with new tokens and so new routes: no host sync, no data-dependent shapes."""
    hidden = torch.randn(64, 1024, device=device, dtype=torch.bfloat16)
    logits, bias = torch.randn(64, 256, device=device), torch.randn(256, device=device) * 0.1
    w13, w2, s13, s2 = (x.to(device) if x is not None else None for x in make_experts(256, 1024, 256, fp8))

    def f():
        weights, ids = dk.moe_route(logits, bias, 8, 4, 8, 2.5, backend=backend)
        return dk.fused_moe(hidden, w13, w2, weights, ids, s13, s2, backend=backend)

    first = f()  # warm-up (compiles Triton kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    hidden.copy_(torch.randn_like(hidden))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.testing.assert_close(out, f(), rtol=0, atol=0)
    assert not torch.equal(out, first)
