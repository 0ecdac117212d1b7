"""Multi-token prediction: the MTP module against the plain PyTorch one of training/ on the same
weights, loading MTP layers, and speculative decoding (greedy identical to non-speculative greedy,
speculative sampling drawing from the target distribution)."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3 import generator as gen
from dsv3.cache import prefill_batch
from dsv3.config import ModelArgs
from dsv3.generate import DEFAULT_MODEL, main
from dsv3.generator import Generator
from dsv3.sampling import probabilities, verify
from training.model import PRESETS, TrainableTransformer
from training.train import losses
from dsv3.load import CheckpointError, load

N = PRESETS["test"]["num_hidden_layers"]  # the MTP layer's checkpoint index


def write_mtp_checkpoint(path, seed=0, std=0.1):
    """A random `test`-preset model with one MTP layer (training's TrainableTransformer, fp32, HF names)."""
    args = ModelArgs(**PRESETS["test"], num_nextn_predict_layers=1)
    torch.manual_seed(seed)
    m = TrainableTransformer(args)
    m.init_weights(std=std)
    for moe in m.moe_layers():
        moe.gate.e_score_correction_bias.uniform_(0, 0.2)
    os.makedirs(path, exist_ok=True)
    save_file(m.hf_state_dict(torch.float32), os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(args.to_hf(), f)
    return m


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mtp") / "ckpt")
    return path, write_mtp_checkpoint(path)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mtp_logits_equal_plain_pytorch(ckpt, backend):
    """Prefill the main model, then the MTP module over positions 0..T-2 (h_i, t_{i+1}): its logits
    equal training's MTP module on the same fp32 weights (loaded from DeepSeek's names)."""
    path, ref_model = ckpt
    ids = torch.randint(0, ref_model.args.vocab_size, (3, 37))
    targets = torch.randint(0, ref_model.args.vocab_size, (3, 37))
    with torch.no_grad():
        ref, (ref_mtp,) = ref_model(ids, targets)
    m = load(path, dtype=torch.float32, device="cpu", backend=backend, progress=False)
    assert len(m.mtp) == 1
    cache = m.new_cache(3, 64, mtp=True)
    blocks = [cache.allocator.allocate(1) for _ in range(3)]
    logits, h = m(ids.flatten(), prefill_batch([(37, b) for b in blocks], cache, all_logits=True), cache, hidden=True)
    torch.testing.assert_close(logits.view(3, 37, -1), ref, rtol=1e-4, atol=1e-4)
    h = h.view(3, 37, -1)[:, :36].reshape(3 * 36, -1)
    mtp, _ = m.mtp_forward(h, targets[:, :36].flatten(), prefill_batch([(36, b) for b in blocks], cache,
                                                                        all_logits=True), cache)
    torch.testing.assert_close(mtp.view(3, 36, -1), ref_mtp, rtol=1e-4, atol=1e-4)


def test_loader_mtp_layers(ckpt, tmp_path, caplog):
    path, _ = ckpt
    tensors = load_file(os.path.join(path, "model.safetensors"))
    cfg = json.load(open(os.path.join(path, "config.json")))

    def write(t, **config):
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, **config}))
        return str(d)

    # DeepSeek's release stores a copy of the embedding per MTP layer: accepted (shape-checked)
    emb = tensors["model.embed_tokens.weight"].clone()
    assert len(load(write({**tensors, f"model.layers.{N}.embed_tokens.weight": emb}), torch.float32,
                        progress=False).mtp) == 1
    with pytest.raises(CheckpointError, match=rf"wrong shape \(1\): model.layers.{N}.embed_tokens.weight"):
        load(write({**tensors, f"model.layers.{N}.embed_tokens.weight": emb[:5]}), torch.float32, progress=False)
    # a missing MTP tensor is named
    part = {k: v for k, v in tensors.items() if k != f"model.layers.{N}.eh_proj.weight"}
    with pytest.raises(CheckpointError, match=rf"missing \(1\): model.layers.{N}.eh_proj.weight"):
        load(write(part), torch.float32, progress=False)
    # the config asks for an MTP layer the checkpoint lacks: loads without it, logged
    main_only = {k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{N}.")}
    with caplog.at_level(logging.INFO, logger="dsv3"):
        assert len(load(write(main_only), torch.float32, progress=False).mtp) == 0
    assert "num_nextn_predict_layers = 1" in caplog.text
    # num_nextn_predict_layers 0, or mtp=False: the MTP tensors are skipped
    assert len(load(write(tensors, num_nextn_predict_layers=0), torch.float32, progress=False).mtp) == 0
    assert len(load(path, torch.float32, progress=False, mtp=False).mtp) == 0


def test_mtp_objective(ckpt):
    """loss = main + lambda * mean MTP loss; the MTP loss of depth 1 predicts targets[:, 1:]."""
    _, m = ckpt
    ids, targets = torch.randint(0, m.args.vocab_size, (2, 2, 16)).unbind(0)
    total, main_loss, (mtp,) = losses(m, ids, targets, 0.3)
    logits, (mtp_logits,) = m(ids, targets)
    assert mtp_logits.shape == (2, 15, m.args.vocab_size)
    want = torch.nn.functional.cross_entropy(mtp_logits.flatten(0, 1), targets[:, 1:].flatten())
    torch.testing.assert_close(mtp, want)
    torch.testing.assert_close(total, main_loss + 0.3 * mtp)


# ---- speculative decoding ----

def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def shipped():
    """The shipped default model (trained MTP module: drafts are often right) in fp32."""
    m = load(DEFAULT_MODEL, dtype=torch.float32, backend="cpu", progress=False, fp8=False)
    if not len(m.mtp):
        pytest.skip("the shipped model has no MTP module")
    return m


def test_greedy_identical_random_model(ckpt):
    """A random MTP module (drafts almost always rejected): batched, varlen, across block edges."""
    m = load(ckpt[0], dtype=torch.float32, backend="cpu", progress=False)
    m.args.eos_token_id = None
    prompts = prompts_of([5, 29, 40, 1], m.args.vocab_size)
    for n in (1, 2, 9):
        want = Generator(m, block_size=16, speculative="none").generate(prompts, max_new_tokens=n)
        assert Generator(m, block_size=16).generate(prompts, max_new_tokens=n) == want


def test_greedy_identical_shipped_model(shipped):
    """Batched requests of different lengths that accept different numbers of drafts; every
    max_new_tokens boundary (odd and even: a kept draft's second token past the limit is dropped)."""
    tok_prompts = [[0, 100, 200, 300], [0] + list(range(500, 540)), [0, 7], [0, 1000, 1001, 1002, 1003, 1004]]
    spec, plain = Generator(shipped, block_size=16), Generator(shipped, block_size=16, speculative="none")
    for n in (1, 2, 3, 24):
        assert spec.generate(tok_prompts, max_new_tokens=n) == plain.generate(tok_prompts, max_new_tokens=n)
    assert spec.last_stats.acceptance_rate > 0.2  # the path that keeps drafts ran
    assert spec.last_stats.tokens_per_step == pytest.approx(
        spec.last_stats.decode_tokens / spec.last_stats.decode_steps)


def test_drafts_are_the_teacher_forced_mtp_drafts(shipped, monkeypatch):
    """Every draft distribution of a speculative run (batched, varlen, requests advancing by 1 or 2)
    equals the MTP module's logits at that position recomputed by one prefill over the final text
    (fp32, 1e-4): the step's MTP pass (both rows write keys, one row per request is queried, per-
    request lengths) sees the same keys and positions. Greedy output alone cannot show this (a
    wrong draft is only rejected); the kept / verified counts replayed from the drafts must match
    last_stats too."""
    monkeypatch.setattr(shipped.args, "eos_token_id", None)
    drawn = []  # the MTP logits of each draw: the prefill's (every request), then each step's (live ones)
    real_draw = gen.draw

    def recording_draw(logits, *args, **kwargs):
        drawn.append(logits.clone())
        return real_draw(logits, *args, **kwargs)

    monkeypatch.setattr(gen, "draw", recording_draw)
    prompts = [[0, 100, 200, 300], [0] + list(range(500, 530)), [0, 7], [0, 1000, 1001, 1002, 1003, 1004]]
    n_new = 20
    spec = Generator(shipped, block_size=16)
    outs = spec.generate(prompts, max_new_tokens=n_new)
    want = []  # per request: position j -> the MTP logits drafting token j (from position j - 2)
    for p, out in zip(prompts, outs):
        seq = torch.tensor(p + out)
        t, nb = len(seq), -(-len(seq) // 16)
        cache = shipped.new_cache(nb, 16, mtp=True)
        blocks = cache.allocator.allocate(nb)
        _, h = shipped(seq, prefill_batch([(t, blocks)], cache, all_logits=True), cache, hidden=True)
        mtp, _ = shipped.mtp_forward(h[:t - 1], seq[1:], prefill_batch([(t - 1, blocks)], cache, all_logits=True),
                                     cache)
        want.append((seq, {i + 2: row for i, row in enumerate(mtp)}))
    done = [1] * len(prompts)  # tokens each request has; the prefill drafted the next one
    calls = iter(drawn)
    pending = dict(enumerate(next(calls)))
    kept = drafts = 0
    while live := [r for r in range(len(prompts)) if done[r] < n_new]:
        for r in live:
            seq, at = want[r]
            j = len(prompts[r]) + done[r]
            torch.testing.assert_close(pending[r], at[j], atol=1e-4, rtol=1e-4)
            drafts += 1
            if pending[r].argmax() == seq[j]:
                kept, done[r] = kept + 1, min(done[r] + 2, n_new)
            else:
                done[r] += 1
        pending = dict(zip(live, next(calls)))
    assert spec.last_stats.drafts == drafts
    assert round(spec.last_stats.acceptance_rate * drafts) == kept
    assert 0 < kept < drafts


def test_greedy_identical_with_eos_mid_draft(shipped, monkeypatch):
    """Each token of a greedy run made the EOS in turn: the run stops there with and without MTP,
    also where the EOS is a kept draft followed by a second token (which must be dropped)."""
    prompts = [[0, 100, 200, 300], [0, 7, 8]]
    ref = Generator(shipped, speculative="none").generate(prompts, max_new_tokens=16)
    kept_eos = 0
    seen = {}
    real_verify = gen.verify

    def spy(target, draft, *a):
        new = real_verify(target, draft, *a)
        for t in new:
            if len(t) == 2:
                seen.setdefault(t[0], 0)
                seen[t[0]] += 1
        return new
    monkeypatch.setattr(gen, "verify", spy)
    for eos in sorted({t for r in ref for t in r}):
        monkeypatch.setattr(shipped.args, "eos_token_id", eos)
        want = [r[:r.index(eos)] if eos in r else r for r in ref]
        seen.clear()
        assert Generator(shipped).generate(prompts, max_new_tokens=16) == want, eos
        kept_eos += eos in seen
    assert kept_eos > 0  # some EOS came as a kept draft


def test_speculative_sampling_draws_from_the_target():
    """verify() with a draft distribution q far from the target p: over 200,000 requests the first
    new token is distributed as p (temperature and top_p applied), chi-square test; kept drafts'
    second token comes from the target's second row."""
    torch.manual_seed(0)
    v, n = 8, 200_000
    target_logits = torch.randn(2, v) * 2
    q = torch.softmax(torch.randn(v) * 2, dim=-1)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8)):
        g = torch.Generator().manual_seed(1)
        qs = q.expand(n, v).contiguous()
        draft = torch.multinomial(qs, 1, replacement=True, generator=g).squeeze(-1)
        new = verify(target_logits.expand(n, 2, v), draft, qs, temperature, top_p, g)
        first = torch.tensor([t[0] for t in new])
        p = probabilities(target_logits[:1], temperature, top_p)[0]
        counts = torch.bincount(first, minlength=v).double()
        support = p > 0
        assert counts[~support].sum() == 0  # nothing outside the top_p set
        expected = p[support].double() * n
        chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
        assert chi2 < 30, (chi2, counts / n, p)  # df <= 7: p-value of 30 is ~1e-4
        kept = [t for t in new if len(t) == 2]
        assert 0.05 * n < len(kept) < 0.95 * n  # both branches ran
        second = torch.bincount(torch.tensor([t[1] for t in kept]), minlength=v).double() / len(kept)
        p2 = probabilities(target_logits[1:], temperature, top_p)[0].double()
        assert (second - p2).abs().sum() < 0.02


def test_sampling_runs_and_is_seeded(shipped):
    prompts = [[0, 100, 200], [0, 7]]
    g = Generator(shipped)
    a = g.generate(prompts, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    assert g.generate(prompts, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3) == a
    assert all(len(x) <= 12 for x in a)
    assert g.last_stats.drafts > 0


def test_speculative_argument_errors(ckpt):
    m = load(ckpt[0], dtype=torch.float32, progress=False, mtp=False)
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        Generator(m, speculative="mtp")
    with pytest.raises(ValueError, match="speculative must be"):
        Generator(m, speculative="eagle")
    assert Generator(m).speculative == "none"


def test_command_line_stats(shipped, capsys):
    assert main(["--prompt", "def f(x):", "--max-new-tokens", "8", "--speculative", "mtp"]) == 0
    err = capsys.readouterr().err
    assert "MTP drafts accepted" in err and "tokens per step" in err
    assert main(["--prompt", "def f(x):", "--max-new-tokens", "8", "--speculative", "none"]) == 0
    assert "MTP drafts accepted" not in capsys.readouterr().err


def test_default_is_plain_beside_the_cpu_decode_step():
    """Where decode steps run in C++ (bf16 on the cpu backend), the MTP draft pass (Python forward)
    costs more than it saves: speculative=None picks "none" there, "mtp" elsewhere."""
    m = load(DEFAULT_MODEL, dtype=torch.bfloat16, backend="cpu", progress=False)
    if not m.decodes_in_cpp():
        pytest.skip("no C++ decode step in this build")
    assert Generator(m).speculative == "none" and Generator(m, speculative="mtp").speculative == "mtp"
    m.cpu_decode_step = False
    assert Generator(m).speculative == "mtp"
    assert Generator(m.set_backend("torch")).speculative == "mtp"
