"""moe_route on every backend against the reference (DeepSeek-V3's official gate semantics)."""

import pytest
import torch

import dsv3_kernels as dk
from dsv3_kernels import dispatch
from dsv3_kernels.reference import moe as ref

# (E, n_group, topk_group, topk): DeepSeek-V3 / V2-Lite-like / small grouped / one group kept
CONFIGS = [(256, 8, 4, 8), (64, 1, 1, 6), (16, 4, 2, 4), (32, 4, 1, 8)]


def _route(backend, logits, bias, cfg, scale=2.5, score_func="sigmoid", renormalize=True):
    e, n_group, topk_group, topk = cfg
    return dispatch.implementation("moe_route", backend)(logits, bias, n_group, topk_group, topk, scale,
                                                         score_func, renormalize)


def check(got, want):
    (gw, gi), (ww, wi) = got, want
    assert gi.dtype == torch.int32 and gw.dtype == torch.float32 and gi.shape == wi.shape == gw.shape
    gi, gw = gi.cpu().long(), gw.cpu()
    # Ids as a set per token (order among equal scores is not part of the contract), weights by id.
    g_sorted, g_order = gi.sort(dim=-1)
    w_sorted, w_order = wi.long().sort(dim=-1)
    assert torch.equal(g_sorted, w_sorted)
    torch.testing.assert_close(gw.gather(1, g_order), ww.gather(1, w_order), rtol=0, atol=1e-6)


@pytest.mark.ops("moe_route")
@pytest.mark.parametrize("score_func, renormalize, with_bias",
                         [("sigmoid", True, True), ("sigmoid", True, False), ("softmax", False, False),
                          ("softmax", True, True)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "E{}-g{}-kg{}-k{}".format(*c))
@pytest.mark.parametrize("t", [0, 1, 7, 1000])
def test_moe_route(device, backend, t, cfg, score_func, renormalize, with_bias):
    e = cfg[0]
    logits = torch.randn(t, e) * 2
    bias = torch.randn(e) * 0.1 if with_bias else None
    want = ref.moe_route(logits, bias, *cfg[1:], 2.5, score_func, renormalize)
    got = _route(backend, logits.to(device), bias.to(device) if with_bias else None, cfg, 2.5, score_func,
                 renormalize)
    check(got, want)


@pytest.mark.ops("moe_route")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_route_low_precision_logits(device, backend, dtype):
    logits = (torch.randn(100, 256) * 2).to(dtype)
    bias = torch.randn(256) * 0.1
    check(_route(backend, logits.to(device), bias.to(device), CONFIGS[0]),
          ref.moe_route(logits, bias, 8, 4, 8, 2.5))


@pytest.mark.ops("moe_route")
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "E{}-g{}-kg{}-k{}".format(*c))
def test_moe_route_ties_go_to_the_lower_index(device, backend, cfg):
    """Logits from a handful of values: many exact ties among experts and among groups."""
    e = cfg[0]
    logits = torch.randint(-2, 3, (300, e)).float()
    bias = torch.randint(0, 2, (e,)).float() * 0.25
    want = ref.moe_route(logits, bias, *cfg[1:], 2.5)
    check(_route(backend, logits.to(device), bias.to(device), cfg), want)
    want = ref.moe_route(logits, None, *cfg[1:], 2.5)
    check(_route(backend, logits.to(device), None, cfg), want)
    all_equal = torch.zeros(3, e)  # every expert ties: the lowest ids of the lowest groups win
    gi = _route(backend, all_equal.to(device), None, cfg)[1].cpu()
    assert torch.equal(gi.sort(dim=-1)[0], ref.moe_route(all_equal, None, *cfg[1:], 2.5)[1].sort(dim=-1)[0])


@pytest.mark.ops("moe_route")
def test_moe_route_bias_flips_the_choice(device, backend):
    """The bias chooses (expert 5 over 0) but the weight is the unbiased score; a group whose
    biased top-2 sum loses is masked even if one of its experts has the best raw score."""
    logits = torch.zeros(1, 16)
    logits[0, 0] = 1.0  # best raw score, group 0
    logits[0, 5] = 0.9  # group 1
    bias = torch.zeros(16)
    bias[5] = 0.5
    for cfg in [(16, 1, 1, 1), (16, 4, 1, 1)]:
        w, ids = _route(backend, logits.to(device), bias.to(device), cfg, 1.0, "sigmoid", False)
        assert ids.cpu().tolist() == [[5]]
        torch.testing.assert_close(w.cpu(), torch.sigmoid(torch.tensor([[0.9]])), rtol=0, atol=1e-6)
    logits = torch.zeros(1, 16)
    logits[0, 0], logits[0, 4], logits[0, 5] = 3.0, 1.0, 1.0  # biased top-2 sums: group 0 0.95 + 0.5, group 1 2 x (0.73 + 0.3)
    bias = torch.zeros(16)
    bias[4] = bias[5] = 0.3
    w, ids = _route(backend, logits.to(device), bias.to(device), (16, 4, 1, 2), 1.0, "sigmoid", True)
    assert sorted(ids.cpu().tolist()[0]) == [4, 5]  # group 0 (expert 0's best raw score) masked


def test_moe_route_matches_official_topk_semantics():
    """Without ties the reference equals the official gate written with torch.topk."""
    logits, bias = torch.randn(500, 256), torch.randn(256) * 0.1
    scores = logits.sigmoid()
    biased = scores + bias
    group = biased.view(500, 8, 32).topk(2, dim=-1)[0].sum(-1)
    keep = group.topk(4, dim=-1)[1]
    mask = torch.ones(500, 8, dtype=torch.bool).scatter_(1, keep, False)
    biased = biased.masked_fill(mask.repeat_interleave(32, 1), float("-inf"))
    ids = biased.topk(8, dim=-1)[1]
    w = scores.gather(1, ids)
    w = w / w.sum(-1, keepdim=True) * 2.5
    check((w, ids.int()), ref.moe_route(logits, bias, 8, 4, 8, 2.5))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_group": 3}, ValueError, "divisible|multiple of n_group"),
    ({"topk_group": 9}, ValueError, "topk_group"),
    ({"topk": 200}, ValueError, "topk"),
    ({"score_func": "relu"}, ValueError, "score_func"),
    ({"e_score_correction_bias": torch.zeros(255)}, ValueError, "e_score_correction_bias"),
    ({"e_score_correction_bias": torch.zeros(256, dtype=torch.float64)}, TypeError, "e_score_correction_bias"),
    ({"router_logits": torch.zeros(4, 256, dtype=torch.int32)}, TypeError, "router_logits"),
])
def test_moe_route_errors(kwargs, error, match):
    args = {"router_logits": torch.randn(4, 256), "e_score_correction_bias": torch.zeros(256), "n_group": 8,
            "topk_group": 4, "topk": 8, "routed_scaling_factor": 2.5}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        dk.moe_route(**args)
