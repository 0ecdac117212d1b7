"""dsv3.generator and dsv3.generate (the command line): the Generator against a naive full-recompute loop, batching, EOS, sampling, errors,
the command line on a tiny checkpoint, and CUDA-graph decode against eager decode (GPU only)."""

import collections
import io
import os

import pytest
import torch
from hf_checkpoints import hf_checkpoint, make_hf_checkpoint  # noqa: F401 (hf_checkpoint is a fixture)

from dsv3 import generate as gen
from dsv3.cache import CacheFullError, decode_batch, prefill_batch
from dsv3.cuda_graph import CudaGraphDecoder
from dsv3.generate import TextStream, main
from dsv3.generator import Generator
from dsv3.sampling import sample
from dsv3.load import load, load_tokenizer

# std 0.2: weights large enough that greedy decoding does not settle on one repeated token
STD = 0.2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gen") / "ckpt")
    make_hf_checkpoint(path, std=STD)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load(ckpt, dtype=torch.float32, backend="torch", progress=False)


@pytest.fixture
def no_eos(model, monkeypatch):
    """The model with no EOS id: every request runs max_new_tokens."""
    monkeypatch.setattr(model.args, "eos_token_id", None)
    return model


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def naive_greedy(model, prompt, n):
    """n greedy tokens, each from a fresh full prefill of prompt + the tokens so far."""
    seq = list(prompt)
    for _ in range(n):
        cache = model.new_cache(-(-len(seq) // 64), 64)
        batch = prefill_batch([(len(seq), list(range(cache.kv.shape[1])))], cache)
        logits = model(torch.tensor(seq), batch, cache)
        seq.append(int(logits[-1].argmax()))
    return seq[len(prompt):]


def test_greedy_matches_full_recompute(no_eos):
    # block_size 16: requests span several blocks; the 29-token prompt crosses a block edge while decoding
    prompts = prompts_of([5, 29, 40], no_eos.args.vocab_size)
    out = Generator(no_eos, block_size=16).generate(prompts, max_new_tokens=10)
    assert out == [naive_greedy(no_eos, p, 10) for p in prompts]
    assert len(set(out[0])) > 1  # the check is not trivially met by a repeated token


def test_batched_equals_alone(no_eos):
    prompts = prompts_of([3, 17, 64, 9], no_eos.args.vocab_size, seed=1)
    g = Generator(no_eos, block_size=16)
    together = g.generate(prompts, max_new_tokens=8)
    assert together == [g.generate([p], max_new_tokens=8)[0] for p in prompts]


def test_eos_stops_a_request(model, monkeypatch):
    prompts = prompts_of([6, 21], model.args.vocab_size, seed=2)
    monkeypatch.setattr(model.args, "eos_token_id", None)
    g = Generator(model, block_size=16)
    full = g.generate(prompts, max_new_tokens=12)
    eos = full[0][4]  # a token request 0 emits at step 4
    monkeypatch.setattr(model.args, "eos_token_id", [eos])
    calls, free = collections.defaultdict(list), []

    def on_token(i, t):
        calls[i].append(t)
        if i == 1:
            free.append(g.cache.allocator.num_free)

    out = g.generate(prompts, max_new_tokens=12, on_token=on_token)

    def until_eos(tokens):
        return tokens[:tokens.index(eos)] if eos in tokens else tokens

    # request 0 ends at its first EOS (not returned); request 1 runs on alone, unchanged
    assert out == [until_eos(t) for t in full]
    assert len(out[0]) <= 4 and len(out[1]) > len(out[0]) + 1
    assert [calls[0], calls[1]] == out
    # blocks: prompt + 11 cached tokens each (6 + 11 -> 2 blocks, 21 + 11 -> 2), request 0's freed
    # in the step that sampled its EOS
    total = g.cache.allocator.num_blocks
    k = len(out[0])
    assert free[:k] == [total - 4] * k and free[k:] == [total - 2] * (len(out[1]) - k)
    assert g.cache.allocator.num_free == total


def test_sampling_seeded(no_eos):
    prompts = prompts_of([4, 11], no_eos.args.vocab_size, seed=3)
    g = Generator(no_eos, block_size=16)
    a = g.generate(prompts, max_new_tokens=12, temperature=1.0, seed=123)
    assert a == g.generate(prompts, max_new_tokens=12, temperature=1.0, seed=123)
    assert a != g.generate(prompts, max_new_tokens=12, temperature=1.0, seed=124)
    greedy = g.generate(prompts, max_new_tokens=12)
    assert g.generate(prompts, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_sample_distribution():
    # probabilities 0.5, 0.3, 0.15, 0.05; top_p 0.7 keeps the first two, renormalized to 5/8, 3/8
    n = 20000
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(n, 4)
    rng = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logits, 1.0, 0.7, rng), minlength=4) / n
    torch.testing.assert_close(freq, torch.tensor([5 / 8, 3 / 8, 0, 0]), atol=0.02, rtol=0)
    # temperature 2: softmax(log p / 2) is proportional to sqrt(p)
    freq = torch.bincount(sample(logits, 2.0, 1.0, rng), minlength=4) / n
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(freq, want / want.sum(), atol=0.02, rtol=0)
    assert torch.equal(sample(logits[:3], 0.0, 1.0), torch.zeros(3, dtype=torch.int64))


def test_blocks_freed_and_stats(no_eos):
    g = Generator(no_eos, num_blocks=12, block_size=16)
    out = g.generate(prompts_of([30, 2], no_eos.args.vocab_size), max_new_tokens=5)
    assert g.cache.allocator.num_free == 12
    s = g.last_stats
    assert s.prefill_tokens == 32 and s.ttft_s > 0
    assert s.decode_tokens == sum(len(o) for o in out) - 2 and s.decode_tokens_per_s > 0
    assert s.decode_steps is s.acceptance_rate is None  # no speculation
    assert s["decode_tokens_per_s"] == s.decode_tokens_per_s  # read as the dict it was
    # 3 prompts of 3 blocks each do not fit 8 blocks: nothing runs, nothing stays allocated
    small = Generator(no_eos, num_blocks=8, block_size=16)
    with pytest.raises(CacheFullError):
        small.generate(prompts_of([40, 40, 40], no_eos.args.vocab_size), max_new_tokens=4)
    assert small.cache.allocator.num_free == 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[5], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[[5] * 2040], max_new_tokens=10), r"2040 tokens.*2050 > max_position_embeddings = 2048"),
    (dict(prompts=[[5, 320]]), r"token id 320 outside the vocabulary \[0, 320\)"),
    (dict(prompts=[[-1]]), r"token id -1"),
    (dict(prompts=[[5]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[5]], temperature=-0.1), "temperature"),
    (dict(prompts=[[5]], top_p=0.0), "top_p"),
    (dict(prompts=[[5]], top_p=1.5), "top_p"),
])
def test_errors(model, kwargs, match):
    g = Generator(model, block_size=16)
    with pytest.raises(ValueError, match=match):
        g.generate(**kwargs)
    assert g.cache.allocator.num_free == g.cache.allocator.num_blocks


def test_text_stream(ckpt):
    tok = load_tokenizer(ckpt)
    ids = tok.encode("héllo wörld ✓ def f(x): return x", add_special_tokens=False).ids
    ids += list(range(2, 60))  # byte tokens: some end inside a multi-byte character
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids)
    assert sum(bool(p) for p in pieces) > len(ids) // 2  # text comes out as it goes


# ---- the command line ----

def cli_args(ckpt, *extra):
    return ["--model", ckpt, "--dtype", "float32", "--backend", "torch", "--device", "cpu", *extra]


def expected(ckpt, texts, n):
    """(token ids, text) of the completions of `texts`, computed with the library directly
    (bos + the encoded text, the checkpoint's EOS)."""
    tok, m = load_tokenizer(ckpt), load(ckpt, dtype=torch.float32, backend="torch", progress=False)
    prompts = [[m.args.bos_token_id] + tok.encode(t, add_special_tokens=False).ids for t in texts]
    outputs = Generator(m).generate(prompts, max_new_tokens=n)
    return outputs, [tok.decode(o) for o in outputs]


def test_cli_batch(ckpt, capsys):
    texts = ["def f(x):", "import os\nprint("]
    assert main(cli_args(ckpt, "--prompt", texts[0], "--prompt", texts[1], "--max-new-tokens", "7")) == 0
    out, err = capsys.readouterr()
    _, want = expected(ckpt, texts, 7)
    assert out == "".join(f"--- prompt {i} ---\n{t}{w}\n" for i, (t, w) in enumerate(zip(texts, want)))
    assert "time to first token" in err and "tokens/s" in err


def test_cli_single_prompt_streams(ckpt, capsys, monkeypatch):
    prints = []
    real_print = print
    monkeypatch.setattr("builtins.print", lambda *a, **k: (prints.append(a), real_print(*a, **k)))
    assert main(cli_args(ckpt, "--prompt", "for i in", "--max-new-tokens", "9")) == 0
    monkeypatch.undo()
    out, _ = capsys.readouterr()
    (tokens,), (text,) = expected(ckpt, ["for i in"], 9)
    assert out == "for i in" + text + "\n"
    assert len(prints) == 1 + len(tokens) + 2  # the prompt, one per token, the held-back end, the timings


def test_cli_interactive(ckpt, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("def g\nimport\n\nnot read\n"))
    assert main(cli_args(ckpt, "--interactive", "--max-new-tokens", "4")) == 0
    out, err = capsys.readouterr()
    assert out == "".join(w + "\n" for w in expected(ckpt, ["def g"], 4)[1] + expected(ckpt, ["import"], 4)[1])
    assert err.count("time to first token") == 2


@pytest.mark.parametrize("extra, match", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "3000"], "> max_position_embeddings = 2048"),
    (["--prompt", "x", "--top-p", "2"], "--top-p must be in"),
    ([], "--prompt TEXT"),
])
def test_cli_errors(ckpt, capsys, extra, match):
    with pytest.raises(SystemExit) as e:
        main(cli_args(ckpt, *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert match in err[-1] and err[-1].startswith("python -m dsv3.generate: error:")


def test_cli_missing_files(hf_checkpoint, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    monkeypatch.setattr(gen, "DEFAULT_MODEL", str(tmp_path / "default_model"))
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "x"])
    assert e.value.code == 2 and "pass --model" in capsys.readouterr().err
    path, _ = hf_checkpoint(num_hidden_layers=1)
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(SystemExit) as e:
        main(cli_args(path, "--prompt", "x"))
    assert e.value.code == 2 and "no tokenizer.json" in capsys.readouterr().err


# ---- CUDA graphs ----

class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capture records the model call made inside
    torch.cuda.graph(); replay runs it again on the same (static) inputs into the captured output."""
    capturing = None

    def __init__(self):
        self.call = None

    def pool(self):
        return None

    def replay(self):
        forward, args, out = self.call
        out.copy_(forward(*args))


class fake_capture:
    def __init__(self, graph, pool=None):
        self.graph = graph

    def __enter__(self):
        FakeGraph.capturing = self.graph

    def __exit__(self, *exc):
        FakeGraph.capturing = None


def test_graph_decoder_padding_on_cpu(no_eos, monkeypatch):
    """CudaGraphDecoder's buffers and padding (not the capture itself) on the CPU, with the graphs faked."""
    forward = no_eos.forward

    def recording_forward(*args):
        out = forward(*args)
        if FakeGraph.capturing is not None:
            FakeGraph.capturing.call = (forward, args, out)
        return out

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(no_eos, "forward", recording_forward)

    prompts = prompts_of([5, 29, 70, 3, 12], no_eos.args.vocab_size, seed=4)
    cache = no_eos.new_cache(25, 16)
    blocks = [list(range(5 * i, 5 * i + 5)) for i in range(5)]
    ids = torch.tensor([t for p in prompts for t in p])
    no_eos(ids, prefill_batch([(len(p), b) for p, b in zip(prompts, blocks)], cache), cache)
    graphs = CudaGraphDecoder(no_eos, cache, max_batch=8)
    assert graphs.sizes == [1, 2, 4, 8]
    # 3 requests (padded to 4), 5 (to 8), then 1: older steps' rows must not leak into a smaller one
    for rows in ([0, 1, 2], [0, 1, 2, 3, 4], [3]):
        step = [(len(prompts[i]), blocks[i]) for i in rows]
        tokens = torch.tensor([10 + i for i in rows])
        eager = no_eos(tokens, decode_batch(step, cache), cache).clone()
        kv = cache.kv.clone()
        # (batches of 3 and 4 rows round differently in the matmuls)
        torch.testing.assert_close(graphs(tokens, decode_batch(step, cache)), eager, atol=1e-4, rtol=1e-4)
        # the replay rewrote the step's slots alike and the padding rows wrote nothing
        torch.testing.assert_close(cache.kv, kv, atol=1e-5, rtol=1e-5)

    out_graph = Generator(no_eos, block_size=16, cuda_graph=True).generate(prompts, max_new_tokens=6)
    assert out_graph == Generator(no_eos, block_size=16, cuda_graph=False).generate(prompts, max_new_tokens=6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_eager(ckpt):
    m = load(ckpt, dtype=torch.bfloat16, device="cuda", progress=False)
    m.args.eos_token_id = None
    prompts = prompts_of([5, 29, 70], m.args.vocab_size, seed=4)  # 3 requests: the graph of 4 pads one

    # one step's logits: the same decode batch eagerly and by graph replay, over one prefilled cache
    cache = m.new_cache(16, 64)
    blocks = [[0, 1], [2, 3], [4, 5]]
    ids = torch.tensor([t for p in prompts for t in p], device="cuda")
    m(ids, prefill_batch([(len(p), b) for p, b in zip(prompts, blocks)], cache, "cuda"), cache)
    step = [(len(p), b) for p, b in zip(prompts, blocks)]
    tokens = torch.tensor([7, 8, 9])
    eager = m(tokens.cuda(), decode_batch(step, cache, "cuda"), cache).clone()
    graphs = CudaGraphDecoder(m, cache, max_batch=4)
    replayed = graphs(tokens, decode_batch(step, cache)).clone()  # rewrites the same cache slots
    torch.testing.assert_close(replayed, eager, atol=0.05, rtol=0.05)

    # whole generations: greedy tokens agree (graphs for 3, 2 and 1 running requests)
    out_graph = Generator(m, block_size=64, cuda_graph=True).generate(prompts, max_new_tokens=8)
    out_eager = Generator(m, block_size=64, cuda_graph=False).generate(prompts, max_new_tokens=8)
    assert out_graph == out_eager
