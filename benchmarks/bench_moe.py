"""DeepSeekMoE kernels on DeepSeek-V3's shapes, every backend side by side.

moe_route: E=256 experts in 8 groups (4 kept), top-8, sigmoid with the correction bias; the
`torch` provider is the reference (sort-based, eager PyTorch), the baseline.
The routed experts (random routes, each token 8 distinct experts of 256): on a GPU DeepSeek-V3's
shapes (D=7168, I=2048); on the CPU a reduced layer (E=64, D=1024, I=256, the issue's CPU goal).
  moe_permute   the align + permute step; "D=8" isolates the index work (SGLang's align kernel
                writes no rows), D=7168 adds the row copy
  grouped_gemm  gate_up (N=2I, K=D) and down (N=D, K=I) over the contiguous layout; peers: the
                naive per-expert F.linear loop ("loop") and torch._grouped_mm (bf16, where the
                build has it). On the CPU also one group of M = 1..16 bf16 rows on the shipped
                model's shapes: the model's bf16 decode linears run through it (dsv3/layers.py);
                peer F.linear ("linear", oneDNN)
  fused_moe     the whole routed-expert layer, bf16 and FP8 weights; peers: the naive per-expert
                loop in bf16 ("loop", the baseline) and the fp32 reference ("torch"); the roofline
                is the time to read the touched experts' weights once (the decode goal). On the CPU
                top-6 (the CPU goal's case: T=1..64 at >= 70% of the measured copy bandwidth, the
                "of copy" column), the calls rotating through copies of the whole layer that add up
                to twice the last-level cache, so that the weights come from DRAM as in a model whose
                other layers run between two calls (a flush by writing a buffer instead left dirty
                lines whose write-back the timed call paid, and made code and page tables cold)
  ep_dispatch   expert parallelism's packing by destination rank (E=256 over W=8 ranks, top-8,
                D=7168; bf16 rows or FP8 quantized as packed), GB/s of hidden read + rows,
                scales and local choices written; ep_combine, the per-token sum of the rows that
                come back (bf16), GB/s of rows read + output written
The Triton interpreter on the CPU is a correctness tool and is not timed. The C++ CPU backend's
results are named with the ISA level its kernels use (cpu-avx2, ...: DSV3_KERNELS_CPU_ISA).
Run: pytest benchmarks/bench_moe.py [--device cpu|cuda]
"""

import functools

import torch
import torch.nn.functional as F

import dsv3_kernels as dk
import roofline
from dsv3_kernels import _native
from conftest import device_of
from dsv3_kernels.reference import moe as ref_moe

TOKENS = {"cuda": [1, 16, 128, 1024, 8192], "cpu": [1, 16, 128, 1024, 8192]}


TOPK = 8
# (E, D, I) of the expert benchmarks
LAYER = {"cuda": (256, 7168, 2048), "cpu": (64, 1024, 256)}
EXPERT_TOKENS = {"cuda": [1, 16, 64, 128, 1024, 8192], "cpu": [1, 16, 64, 1024]}
FUSED_TOKENS = {"cuda": EXPERT_TOKENS["cuda"], "cpu": [1, 8, 64, 1024]}
FUSED_TOPK = {"cuda": TOPK, "cpu": 6}
PERMUTE_TOKENS = {"cuda": [1, 128, 1024, 16384], "cpu": [1, 128, 1024]}
EP_TOKENS = {"cuda": [1, 128, 1024, 8192], "cpu": [1, 128, 1024]}
EP_WORLD, EP_D = 8, 7168
# (N, K) of the shipped model's bf16 decode linears: lm_head, kv_a, the dense MLP's gate / up and
# down (and eh_proj), kv_b; rows as dsv3/layers.py's DECODE_ROWS allows
ONE_GROUP_SHAPES = {"cuda": [], "cpu": [(2048, 256), (576, 256), (512, 256), (256, 512), (384, 512)]}
ONE_GROUP_M = [1, 4, 16]


def _backends(op, device):
    return [b for b in dk.available_backends(op, device) if not (b == "triton" and device == "cpu")]


def _label(provider, device):
    return f"cpu-{_native.cpu_isa()}" if provider == "cpu" and device == "cpu" else provider


def _grouped_mm_works(device):
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a, b = torch.randn(4, 16, device=device).bfloat16(), torch.randn(2, 16, 8, device=device).bfloat16()
        torch._grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def pytest_generate_tests(metafunc):
    device = device_of(metafunc.config)
    if "route_case" in metafunc.fixturenames:
        cases = [(t, p) for t in TOKENS[device] for p in _backends("moe_route", device)]
        metafunc.parametrize("route_case", cases, ids=[f"T{t}-{p}" for t, p in cases])
    if "permute_case" in metafunc.fixturenames:
        cases = [(t, d, p) for t in PERMUTE_TOKENS[device] for d in (8, 7168) for p in _backends("moe_permute", device)
                 if not (p == "torch" and t > 1024)]
        metafunc.parametrize("permute_case", cases, ids=[f"T{t}-D{d}-{p}" for t, d, p in cases])
    if "ep_case" in metafunc.fixturenames:
        cases = [(t, q, p) for t in EP_TOKENS[device] for q in (False, True) for p in _backends("ep_dispatch", device)
                 if not (p == "torch" and t > 128)]
        metafunc.parametrize("ep_case", cases, ids=[f"T{t}-{'fp8' if q else 'bf16'}-{p}" for t, q, p in cases])
    if "combine_case" in metafunc.fixturenames:
        cases = [(t, p) for t in EP_TOKENS[device] for p in _backends("ep_combine", device)
                 if not (p == "torch" and t > 128)]
        metafunc.parametrize("combine_case", cases, ids=[f"T{t}-{p}" for t, p in cases])
    if "gemm_case" in metafunc.fixturenames:
        e, d, i = LAYER[device]
        peers = ["loop"] + (["grouped_mm"] if _grouped_mm_works(device) else [])
        cases = [(t, n, k, fp8, p) for t in EXPERT_TOKENS[device] for n, k in ((2 * i, d), (d, i))
                 for fp8 in (True, False) for p in _backends("grouped_gemm", device) + (peers if not fp8 else [])
                 if p != "torch"]
        metafunc.parametrize("gemm_case", cases, ids=[f"T{t}-N{n}-K{k}-{'fp8' if f else 'bf16'}-{p}"
                                                      for t, n, k, f, p in cases])
    if "one_group_case" in metafunc.fixturenames:
        cases = [(m, n, k, p) for n, k in ONE_GROUP_SHAPES[device] for m in ONE_GROUP_M
                 for p in _backends("grouped_gemm", device) + ["linear"] if p != "torch"]
        metafunc.parametrize("one_group_case", cases, ids=[f"M{m}-N{n}-K{k}-{p}" for m, n, k, p in cases])
    if "fused_case" in metafunc.fixturenames:
        cases = [(t, fp8, p) for t in FUSED_TOKENS[device] for fp8 in (True, False)
                 for p in _backends("fused_moe", device) + ["loop"]
                 if not (p == "torch" and (device == "cuda" or t != 64))]  # the fp32 loop: the CPU goal's peer
        metafunc.parametrize("fused_case", cases, ids=[f"T{t}-{'fp8' if f else 'bf16'}-{p}" for t, f, p in cases])


def test_moe_route(bench, device, route_case):
    tokens, provider = route_case
    flops, nbytes = roofline.moe_route_cost(tokens, 256, 8)

    def make_args():
        return torch.randn(tokens, 256, device=device), torch.randn(256, device=device) * 0.1

    def fn(logits, bias):
        return dk.moe_route(logits, bias, 8, 4, 8, 2.5, backend=provider)

    bench(fn, make_args, op="moe_route", shape=f"T={tokens} E=256", provider=provider, flops=flops,
          nbytes=nbytes, precision="fp32", baseline="torch")


def _routes(tokens, experts, device, topk=TOPK):
    ids = torch.rand(tokens, experts, device=device).argsort(1)[:, :topk].to(torch.int32)
    return torch.rand(tokens, topk, device=device) * 2.5 / topk, ids


@functools.lru_cache(maxsize=None)  # made once per shape: 256 experts of DeepSeek-V3 take a while
def _expert_weights(experts, n, k, fp8, device):
    """[E, N, K] bf16, or e4m3 with [E, N/128, K/128] scales (quantized on the device, expert by expert)."""
    w = torch.empty(experts, n, k, device=device, dtype=torch.bfloat16)
    scale = torch.empty(experts, n // 128, k // 128, device=device) if fp8 else None
    q = torch.empty(experts, n, k, device=device, dtype=torch.float8_e4m3fn) if fp8 else None
    for e in range(experts):
        w[e] = torch.randn(n, k, device=device) / k ** 0.5
        if fp8:
            q[e], scale[e] = dk.weight_quant(w[e])
    return (q, scale) if fp8 else (w, None)


def test_moe_permute(bench, device, permute_case):
    tokens, d, provider = permute_case
    e = 256
    flops, nbytes = roofline.moe_permute_cost(tokens, TOPK, d)

    def make_args():
        return torch.randn(tokens, d, device=device, dtype=torch.bfloat16), _routes(tokens, e, device)[1]

    def fn(hidden, ids):
        return dk.moe_permute(hidden, ids, e, 1, backend=provider)

    bench(fn, make_args, op="moe_permute", shape=f"T={tokens} E={e} D={d}", provider=provider, flops=flops,
          nbytes=nbytes, precision="bf16", baseline="torch")


def _loop_gemm(a, b, offsets):
    """The naive peer: one F.linear per expert with rows (offsets read on the host)."""
    out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=torch.bfloat16)
    bounds = offsets.tolist()
    for e in range(b.shape[0]):
        if bounds[e + 1] > bounds[e]:
            out[bounds[e]:bounds[e + 1]] = F.linear(a[bounds[e]:bounds[e + 1]], b[e])
    return out


def test_grouped_gemm(bench, device, gemm_case):
    tokens, n, k, fp8, provider = gemm_case
    e = LAYER[device][0]
    weight, weight_scale = _expert_weights(e, n, k, fp8, device)
    flops, nbytes = roofline.grouped_gemm_cost(tokens, TOPK, e, n, k, 1 if fp8 else 2)

    def make_args():
        _, ids = _routes(tokens, e, device)
        a = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        permuted, scale, offsets, _ = dk.moe_permute(a, ids, e, 1, fp8)
        return permuted, offsets, scale

    if provider == "loop":
        def fn(a, offsets, _):
            return _loop_gemm(a, weight, offsets)
    elif provider == "grouped_mm":
        w_t = weight.transpose(1, 2)

        def fn(a, offsets, _):
            return torch._grouped_mm(a, w_t, offs=offsets[1:])
    else:
        def fn(a, offsets, scale):
            return dk.grouped_gemm(a, weight, offsets, scale, weight_scale, backend=provider)

    bench(fn, make_args, op="grouped_gemm", shape=f"T={tokens} E={e} N={n} K={k} {'fp8' if fp8 else 'bf16'}",
          provider=_label(provider, device), flops=flops, nbytes=nbytes, precision="fp8" if fp8 else "bf16",
          baseline="loop")


def test_grouped_gemm_one_group(bench, device, one_group_case):
    """x [M, K] bf16 times one bf16 weight [N, K]^T: the kernel with a single group vs F.linear."""
    m, n, k, provider = one_group_case
    flops, nbytes = roofline.gemm_cost(m, n, k, a_bytes=2, b_bytes=2)
    offsets = torch.tensor([0, m], dtype=torch.int32, device=device)

    def make_args():
        w = torch.randn(1, n, k, device=device) / k ** 0.5
        return torch.randn(m, k, device=device, dtype=torch.bfloat16), w.to(torch.bfloat16)

    if provider == "linear":
        def fn(x, w):
            return F.linear(x, w[0])
    else:
        def fn(x, w):
            return dk.grouped_gemm(x, w, offsets, backend=provider)

    bench(fn, make_args, op="grouped_gemm", shape=f"one group M={m} N={n} K={k} bf16", provider=_label(provider, device),
          flops=flops, nbytes=nbytes, precision="bf16", baseline="linear")


def test_fused_moe(bench, device, fused_case):
    tokens, fp8, provider = fused_case
    e, d, i = LAYER[device]
    w13, s13 = _expert_weights(e, 2 * i, d, fp8, device)
    w2, s2 = _expert_weights(e, d, i, fp8, device)
    topk = FUSED_TOPK[device]
    flops, nbytes = roofline.fused_moe_cost(tokens, topk, e, d, i, 1 if fp8 else 2)

    def make_args():
        # On the CPU every copy has its own weights (DeepSeek-V3's layer on a GPU is 11 GB in FP8).
        layer = [w13, w2, s13, s2] if device == "cuda" else [None if w is None else w.clone() for w in (w13, w2, s13, s2)]
        return (torch.randn(tokens, d, device=device, dtype=torch.bfloat16), *_routes(tokens, e, device, topk), *layer)

    def fn(hidden, weights, ids, w13, w2, s13, s2):
        if provider == "loop":
            return ref_moe.naive_fused_moe(hidden, w13, w2, weights, ids, s13, s2)
        return dk.fused_moe(hidden, w13, w2, weights, ids, s13, s2, backend=provider)

    bench(fn, make_args, op="fused_moe", shape=f"T={tokens} E={e} k={topk} D={d} I={i} {'fp8' if fp8 else 'bf16'}",
          provider=_label(provider, device), flops=flops, nbytes=nbytes, precision="fp8" if fp8 else "bf16", baseline="loop",
          rotate_bytes=max(128 << 20, 2 * roofline.last_level_cache_bytes()) if device == "cpu" else None)


def _ep_routes(tokens, device):
    """Random top-8 routes over 256 experts and the rows they make over EP_WORLD ranks (a token's
    distinct destination ranks, measured on these routes)."""
    weights, ids = _routes(tokens, 256, device)
    rows = int((ref_moe.ep_destinations(ids.cpu(), 256, EP_WORLD) >= 0).sum())
    return weights, ids, rows


def test_ep_dispatch(bench, device, ep_case):
    tokens, quant, provider = ep_case
    torch.manual_seed(0)
    _, _, rows = _ep_routes(tokens, device)
    row_bytes = EP_D * (1 if quant else 2) + (EP_D // 128 * 4 if quant else 0) + TOPK * 8
    nbytes = tokens * EP_D * 2 + rows * row_bytes

    def make_args():
        torch.manual_seed(0)  # the same routes (and row count) in every copy
        weights, ids, _ = _ep_routes(tokens, device)
        return torch.randn(tokens, EP_D, device=device, dtype=torch.bfloat16), ids, weights

    def fn(hidden, ids, weights):
        return dk.ep_dispatch(hidden, ids, weights, 256, EP_WORLD, quant, backend=provider)

    bench(fn, make_args, op="ep_dispatch", shape=f"T={tokens} E=256 W={EP_WORLD} k={TOPK} D={EP_D} "
          f"{'fp8' if quant else 'bf16'} ({rows / max(tokens, 1):.2f} rows/token)", provider=_label(provider, device), flops=0,
          nbytes=nbytes, precision="fp8" if quant else "bf16", baseline="torch")


def test_ep_combine(bench, device, combine_case):
    tokens, provider = combine_case
    torch.manual_seed(0)
    _, ids, rows = _ep_routes(tokens, device)
    inverse = dk.ep_dispatch(torch.zeros(tokens, 128, device=device), ids, torch.ones(ids.shape, device=device),
                             256, EP_WORLD)[5]
    nbytes = (rows + tokens) * EP_D * 2

    def make_args():
        return torch.randn(rows, EP_D, device=device, dtype=torch.bfloat16), inverse

    def fn(returned, inv):
        return dk.ep_combine(returned, inv, backend=provider)

    bench(fn, make_args, op="ep_combine", shape=f"T={tokens} W={EP_WORLD} D={EP_D} bf16 "
          f"({rows / max(tokens, 1):.2f} rows/token)", provider=provider, flops=0, nbytes=nbytes, precision="bf16",
          baseline="torch")
