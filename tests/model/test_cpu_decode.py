"""The C++ CPU decode step (dsv3/cpu_decode.py, csrc/model/decode_step_cpu.cpp) against the Python
forward of the same model: the same logits and hidden states for batched decode steps and
speculative verify steps, bf16 and FP8 weights, bf16 and FP8 caches, with the cache's unused blocks
poisoned (NaN); and the batches and models it must leave to the Python forward."""

import pytest
import torch

from dsv3.cache import decode_batch, draft_batch, prefill_batch, verify_batch
from dsv3.config import ModelArgs
from dsv3.cpu_decode import _why_not
from dsv3.model import Transformer
from dsv3.testing import init_random_
from training.model import PRESETS

LENGTHS = (5, 37, 70)  # prompts of three requests; 70 crosses a 64-token block
VARIANTS = {
    "sigmoid": {},  # the test preset: group-limited sigmoid routing, one shared expert
    "softmax": dict(scoring_func="softmax", n_group=1, topk_group=1, n_shared_experts=0, norm_topk_prob=False),
}


def _model(fp8, variant="sigmoid", backend=None):
    args = ModelArgs(**(PRESETS["test"] | VARIANTS[variant]))
    model = init_random_(Transformer(args, torch.bfloat16, fp8=fp8, backend=backend), seed=3)
    if _why_not(model):
        pytest.skip(f"no C++ decode step: {_why_not(model)}")
    return model


def _prefilled(model, cache_dtype):
    """A cache holding LENGTHS random prompts, unused blocks NaN (0xFF: e4m3 NaN in the FP8 cache)."""
    cache = model.new_cache(8, 64, dtype=cache_dtype)
    cache.kv.fill_(255 if cache.kv.dtype == torch.uint8 else float("nan"))
    g = torch.Generator().manual_seed(1)
    requests = []
    for n in LENGTHS:
        blocks = cache.allocator.allocate(cache.blocks_for(n + 8))
        ids = torch.randint(2, model.args.vocab_size, (n,), generator=g)
        model(ids, prefill_batch([(n, blocks)], cache), cache)
        requests.append([n, blocks])
    return cache, requests


def _both(model, ids, batch, cache, hidden=False):
    """(C++ step's output, Python forward's), each on its own copy of the cache (both write it)."""
    kv = cache.kv.clone()
    model.cpu_decode_step = False
    slow = model(ids, batch, cache, hidden=hidden)
    slow_kv, cache.kv = cache.kv, kv
    model.cpu_decode_step = True
    assert model._cpu_decode(batch, cache) is not None
    fast = model(ids, batch, cache, hidden=hidden)
    assert torch.equal(cache.kv.view(torch.uint8), slow_kv.view(torch.uint8))  # the same keys written
    return fast, slow


def _close(fast, slow):
    assert fast.dtype == slow.dtype and fast.shape == slow.shape and fast.isfinite().all()
    # RoPE of q_pe is rounded as the C++ loop computes it (cpu_decode.py): at most a bf16 ulp there
    torch.testing.assert_close(fast, slow, rtol=1e-2, atol=1e-3 * slow.abs().max().item())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cache_dtype", [None, "fp8"], ids=["bf16-cache", "fp8-cache"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_steps_match_python_forward(fp8, cache_dtype, variant):
    model = _model(fp8, variant)
    cache, requests = _prefilled(model, cache_dtype)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        ids = torch.randint(2, model.args.vocab_size, (len(requests),), generator=g)
        fast, slow = _both(model, ids, decode_batch(requests, cache), cache)
        _close(fast, slow)
        for r in requests:
            r[0] += 1
    one = decode_batch(requests[1:2], cache)  # B = 1, the shipped model's generate
    _close(*_both(model, ids[:1], one, cache))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_verify_step_matches_with_hidden(fp8):
    """Speculative decoding's target step: s_q = 2 per request, causal, all logits and the hidden states."""
    model = _model(fp8)
    cache, requests = _prefilled(model, None)
    ids = torch.randint(2, model.args.vocab_size, (2 * len(requests),), generator=torch.Generator().manual_seed(4))
    (logits, h), (want_logits, want_h) = _both(model, ids, verify_batch(requests, cache), cache, hidden=True)
    assert logits.shape == (2 * len(requests), model.args.vocab_size)
    _close(logits, want_logits)
    _close(h, want_h)


def test_python_forward_runs_what_the_step_does_not_take(monkeypatch):
    model = _model(True)
    cache, requests = _prefilled(model, None)
    batch = decode_batch(requests, cache)
    assert model._cpu_decode(batch, cache) is not None
    kept = torch.zeros(len(requests), dtype=torch.int64)
    assert model._cpu_decode(draft_batch(verify_batch(requests, cache), kept), cache) is None  # query_rows
    assert model._cpu_decode(prefill_batch([(4, requests[0][1])], cache), cache) is None
    monkeypatch.setenv("DSV3_KERNELS_BACKEND", "torch")
    assert model._cpu_decode(batch, cache) is None
    monkeypatch.delenv("DSV3_KERNELS_BACKEND")
    model.set_backend("torch")
    assert model._cpu_decode(batch, cache) is None
    fp32 = Transformer(ModelArgs(**PRESETS["test"]), torch.float32)
    assert _why_not(fp32) == "it runs bfloat16 models on the CPU"


def test_bad_token_and_position_raise():
    model = _model(False)
    cache, requests = _prefilled(model, None)
    batch = decode_batch(requests[:1], cache)
    with pytest.raises(RuntimeError, match=r"input_ids\[0\] = 384 is out of range \[0, 384\)"):
        model(torch.tensor([model.args.vocab_size]), batch, cache)
    batch.positions[0] = model.args.max_position_embeddings
    with pytest.raises(RuntimeError, match="positions"):
        model(torch.tensor([3]), batch, cache)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_from_lists_is_forward_on_decode_batch(fp8):
    """DecodeStep.decode builds decode_batch's tensors in C++: the same logits bit for bit, the
    same cache bytes written, and torch.argmax's choice of each row."""
    model = _model(fp8)
    cache, requests = _prefilled(model, "fp8" if fp8 else None)
    step = model.cpu_decoder(cache)
    tokens = [7, 300, 41]
    kv = cache.kv.clone()
    want = model(torch.tensor(tokens), decode_batch(requests, cache), cache)
    want_kv, cache.kv = cache.kv, kv
    logits, greedy = step.decode(tokens, requests, cache)
    assert torch.equal(logits, want) and greedy == want.argmax(-1).tolist()
    assert torch.equal(cache.kv.view(torch.uint8), want_kv.view(torch.uint8))


def test_decode_greedy_takes_torch_argmax_ties_and_nan():
    model = _model(False)
    cache, requests = _prefilled(model, None)
    logits, _ = model.cpu_decoder(cache).decode([3], requests[:1], cache)
    assert logits.max() > 0
    w = model.lm_head.weight
    w[5] = w[9] = 4 * w[logits.argmax()]  # two rows tied for the largest logit
    logits, greedy = model.cpu_decoder(cache).decode([3], requests[:1], cache)
    assert logits[0, 5] == logits[0, 9] == logits.max() and greedy == [5] == logits.argmax(-1).tolist()
    w[200] = float("nan")
    logits, greedy = model.cpu_decoder(cache).decode([3], requests[:1], cache)
    assert greedy == [200] == logits.argmax(-1).tolist()


def test_decode_from_lists_bad_requests_raise():
    model = _model(False)
    cache, requests = _prefilled(model, None)
    step = model.cpu_decoder(cache)
    n, blocks = requests[0]
    msg = r"request 0's new token at position 64 needs block 1 of 64 slots, and the request has 1 blocks"
    with pytest.raises(RuntimeError, match=msg):
        step.decode([3], [(64, blocks[:1])], cache)
    with pytest.raises(RuntimeError, match="one entry per request"):
        step._step.decode([3, 4], [n], blocks, [len(blocks)], cache.kv)
    with pytest.raises(RuntimeError, match="block_ids has"):
        step._step.decode([3], [n], blocks, [len(blocks) + 1], cache.kv)
    with pytest.raises(RuntimeError, match=r"input_ids\[0\] = 384 is out of range"):
        step.decode([model.args.vocab_size], requests[:1], cache)


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_generator_plain_loop_runs_decode(monkeypatch, temperature):
    """Generator's plain loop takes DecodeStep.decode; its tokens are those of decode_batch + the C++
    forward + sample, the loop's other path."""
    from dsv3.cpu_decode import DecodeStep
    from dsv3.generator import Generator

    model = _model(True)
    prompts = [[5, 9, 17], list(range(2, 70))]

    def run():
        return Generator(model, num_blocks=8, speculative="none").generate(prompts, 6, temperature=temperature, seed=1)

    calls = []
    decode = DecodeStep.decode
    monkeypatch.setattr(DecodeStep, "decode", lambda self, *a: calls.append(1) or decode(self, *a))
    fast = run()
    assert len(calls) == 5  # the 5 steps after the prefill's token

    def via_batch(self, tokens, cached, cache):
        logits = self(torch.tensor(tokens), decode_batch(cached, cache), cache)[0]
        return logits, logits.argmax(-1).tolist()

    monkeypatch.setattr(DecodeStep, "decode", via_batch)
    assert run() == fast
