"""ep_dispatch (expert parallelism's packing by destination rank) on every backend against the
reference, the reference against a plain loop, and one process playing every rank of an
expert-parallel MoE layer (dispatch -> each rank's fused_moe on its rows -> ep_combine) against
fused_moe over all experts. The distributed runs are in tests/model/test_expert_parallel.py."""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import moe as ref
from dsv3_kernels.reference.fp8 import calc_diff
from helpers import native_only, poison_allocator
from builders import assert_same, make_experts, make_routes

CASES = [  # (T, topk, E, world_size, D)
    (0, 4, 16, 4, 128), (1, 4, 16, 2, 128), (7, 2, 8, 4, 256), (37, 4, 16, 4, 128), (37, 8, 16, 2, 128),
    (20, 3, 12, 3, 128), (9, 4, 16, 1, 128), (5, 2, 16, 16, 128),
    native_only((1000, 8, 256, 8, 512)), native_only((300, 8, 256, 64, 256)),
]


def loop_dispatch(hidden, ids, weights, e, w):
    """The semantics spelled out token by token."""
    per_rank, slots = e // w, min(ids.shape[1], w)
    dest = []
    for tok in range(ids.shape[0]):
        ranks = []
        for i in ids[tok].tolist():
            if i >= 0 and i // per_rank not in ranks:
                ranks.append(i // per_rank)
        dest.append(ranks)
    rows = [(r, tok) for r in range(w) for tok in range(ids.shape[0]) if r in dest[tok]]
    return dest, rows, per_rank, slots


def test_reference_against_a_loop():
    t, topk, e, w = 23, 4, 16, 4
    hidden = torch.randn(t, 128)
    ids, weights = make_routes(t, topk, e)
    send, scale, send_ids, send_weights, offsets, inverse = ref.ep_dispatch(hidden, ids, weights, e, w)
    dest, rows, per_rank, slots = loop_dispatch(hidden, ids, weights, e, w)
    assert send.shape == (t * slots, 128) and inverse.shape == (t, slots)
    assert offsets.tolist() == [sum(1 for r, _ in rows if r < q) for q in range(w + 1)]
    for row, (r, tok) in enumerate(rows):
        assert torch.equal(send[row], hidden[tok])
        assert inverse[tok, dest[tok].index(r)] == row
        for j, i in enumerate(ids[tok].tolist()):
            mine = i >= 0 and i // per_rank == r
            assert send_ids[row, j] == (i - r * per_rank if mine else -1)
            assert send_weights[row, j] == (weights[tok, j] if mine else 0)
    for tok in range(t):
        assert (inverse[tok, len(dest[tok]):] == -1).all()
    assert (send[len(rows):] == 0).all() and (send_ids[len(rows):] == -1).all() and (send_weights[len(rows):] == 0).all()


@pytest.mark.ops("ep_dispatch")
@pytest.mark.parametrize("quant", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-k{}-E{}-W{}-D{}".format(*c))
def test_ep_dispatch(device, backend, case, quant):
    """Every output bit-exact against the reference (quant: act_quant's bytes and scales)."""
    t, topk, e, w, d = case
    hidden = torch.randn(t, d, dtype=torch.bfloat16)
    ids, weights = make_routes(t, topk, e)
    want = ref.ep_dispatch(hidden, ids, weights, e, w, quant)
    poison_allocator(device)
    got = dispatch.implementation("ep_dispatch", backend)(hidden.to(device), ids.to(device), weights.to(device),
                                                          e, w, quant)
    for g, x in zip(got, want):
        assert_same(g.cpu(), x)


@pytest.mark.ops("ep_dispatch")
def test_ep_dispatch_float32(device, backend):
    t, topk, e, w = 11, 4, 8, 2
    hidden = torch.randn(t, 64)
    ids, weights = make_routes(t, topk, e)
    want = ref.ep_dispatch(hidden, ids, weights, e, w)
    got = dispatch.implementation("ep_dispatch", backend)(hidden.to(device), ids.to(device), weights.to(device),
                                                          e, w, False)
    for g, x in zip(got, want):
        assert_same(g.cpu(), x)


def _expert_parallel_moe(hidden, w13, w2, ids, weights, world, quant, backend):
    """One process as `world` ranks: what each rank receives is its slice of the packed rows."""
    e = w13.shape[0]
    per_rank = e // world
    send, scale, send_ids, send_weights, offsets, inverse = dk.ep_dispatch(hidden, ids, weights, e, world, quant,
                                                                            backend=backend)
    rows = send.float() if scale is None else (send.float().view(send.shape[0], -1, 128) * scale[..., None]).flatten(1)
    returned = torch.zeros(send.shape[0], hidden.shape[1], dtype=hidden.dtype)
    for r in range(world):
        lo, hi = int(offsets[r]), int(offsets[r + 1])
        experts = slice(r * per_rank, (r + 1) * per_rank)
        returned[lo:hi] = dk.fused_moe(rows[lo:hi].to(hidden.dtype).contiguous(), w13[experts].contiguous(),
                                       w2[experts].contiguous(), send_weights[lo:hi].contiguous(),
                                       send_ids[lo:hi].contiguous(), backend=backend)
    return dk.ep_combine(returned, inverse, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("world, routes", [(1, "random"), (2, "random"), (4, "random"), (4, "rank_0_only")])
def test_expert_parallel_layer_equals_fused_moe(backend, world, routes):
    """fp32: 1e-5 of fused_moe over all experts on one rank; a token with no choices gets 0.
    rank_0_only: every choice is one of rank 0's 2 experts, so the other ranks receive nothing."""
    t, topk, e, d, i = 30, 4, 8, 128, 64
    hidden = torch.randn(t, d)
    w13, w2 = torch.randn(e, 2 * i, d) / d ** 0.5, torch.randn(e, d, i) / i ** 0.5
    ids, weights = make_routes(t, topk, e)
    if routes == "rank_0_only":
        ids = torch.where(ids >= 0, ids % 2, -1).to(torch.int32)
    want = dk.fused_moe(hidden, w13, w2, weights, ids, backend="torch")
    got = _expert_parallel_moe(hidden, w13, w2, ids, weights, world, False, backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], torch.zeros(d))


@pytest.mark.parametrize("world", [2, 4])
def test_fp8_dispatch_within_fp8_tolerance(world):
    """bf16 experts fed the e4m3 rows: within FP8 rounding of the unquantized dispatch."""
    t, topk, e, d, i = 40, 4, 8, 256, 128
    hidden = torch.randn(t, d, dtype=torch.bfloat16)
    w13, w2, _, _ = make_experts(e, d, i, False)
    ids, weights = make_routes(t, topk, e)
    exact = _expert_parallel_moe(hidden, w13, w2, ids, weights, world, False, "cpu")
    got = _expert_parallel_moe(hidden, w13, w2, ids, weights, world, True, "cpu")
    assert calc_diff(got, exact) < 2e-3


@pytest.mark.parametrize("change, error, match", [
    (dict(world_size=3), ValueError, "num_experts = 16 does not split evenly over world_size = 3"),
    (dict(world_size=0), ValueError, "world_size must be a positive int"),
    (dict(num_experts=2 ** 31, world_size=2), ValueError, r"num_experts must be an int in \[1, 2\*\*31 - 1\]"),
    (dict(num_experts=2 ** 32), ValueError, r"num_experts must be an int in \[1, 2\*\*31 - 1\]"),
    (dict(quant=True, hidden=torch.randn(9, 100)), ValueError, "multiple of 128"),
    (dict(topk_weights=torch.rand(9, 3)), ValueError, "one shape"),
    (dict(topk_weights=torch.rand(9, 4).double()), TypeError, "topk_weights must have dtype"),
    (dict(topk_ids=torch.full((9, 4), 16, dtype=torch.int32)), ValueError, r"topk_ids\[0, 0\] = 16 is outside"),
    (dict(hidden=torch.randn(8, 128)), ValueError, "one row per token"),
])
def test_ep_dispatch_errors(change, error, match):
    ids, weights = make_routes(9, 4, 16)
    args = dict(hidden=torch.randn(9, 128), topk_ids=ids, topk_weights=weights, num_experts=16, world_size=4)
    args.update(change)
    with pytest.raises(error, match=match):
        dk.ep_dispatch(**args)


@pytest.mark.ops("ep_dispatch", "ep_combine")
def test_compile_fullgraph(device, backend):
    """Outputs of sizes fixed by the shapes: dispatch and combine trace into one graph."""
    torch._dynamo.reset()
    ids, weights = make_routes(9, 4, 16)
    hidden = torch.randn(9, 128, dtype=torch.bfloat16, device=device)

    def f(hidden, ids, weights):
        send, _, _, _, _, inverse = dk.ep_dispatch(hidden, ids, weights, 16, 4, backend=backend)
        return dk.ep_combine(send * 2, inverse, backend=backend)

    args = (hidden, ids.to(device), weights.to(device))
    assert torch.equal(torch.compile(f, fullgraph=True)(*args), f(*args))


@pytest.mark.ops("ep_dispatch")
def test_ep_dispatch_bf16_subnormals(device, backend):
    """bf16 rows are copied bit for bit, subnormals included, except by Triton's interpreter,
    whose bf16 loads mangle subnormals (tests/test_triton_interpreter.py shows the raw cast): there
    exactly the subnormal values differ and the normal ones are exact."""
    from dsv3_kernels.triton.registration import INTERPRETED
    hidden = torch.randn(6, 128) * 2.0 ** -3
    tiny = torch.rand(6, 128) < 0.3
    hidden[tiny] *= 2.0 ** -130  # bf16 subnormals
    hidden = hidden.bfloat16().to(device)
    ids, weights = make_routes(6, 3, 8)
    got = dispatch.implementation("ep_dispatch", backend)(hidden, ids.to(device), weights.to(device), 8, 2, False)
    want = ref.ep_dispatch(hidden.cpu(), ids, weights, 8, 2)
    bits, want_bits = got[0].cpu().view(torch.int16), want[0].view(torch.int16)
    subnormal = (want_bits & 0x7F80) == 0
    assert torch.equal(bits[~subnormal], want_bits[~subnormal])
    if backend == "triton" and INTERPRETED:
        assert not torch.equal(bits[subnormal], want_bits[subnormal]), \
            "the interpreter now keeps bf16 subnormals: this test can demand bit-exact copies"
    else:
        assert torch.equal(bits, want_bits)


@pytest.mark.parametrize("change, match", [
    (dict(returned=torch.randn(6, 64).double()), "returned must have dtype"),
    (dict(returned=torch.randn(6, 64)[:, ::2]), "returned must be contiguous"),
    (dict(inverse=torch.tensor([[0, 6], [1, -1]], dtype=torch.int32)), r"inverse\[0, 1\] = 6 is outside returned's 6 rows"),
])
def test_ep_combine_errors_name_returned(change, match):
    """ep_combine's errors name its own arguments (not moe_unpermute's expert_out)."""
    args = dict(returned=torch.randn(6, 64), inverse=torch.tensor([[0, 3], [1, -1]], dtype=torch.int32)) | change
    with pytest.raises((TypeError, ValueError), match=match):
        dk.ep_combine(**args)
