"""training/ (the trainable model, its corpus, the training loop and export) on a few standard-library
files and the `test` preset: the trainable model against the inference model, the balancing update,
determinism, exact resume, the export."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.cache import prefill_batch
from dsv3.config import ModelArgs
from dsv3.evaluate import evaluate, token_bytes
from dsv3.load import load, load_tokenizer
from training import corpus, train
from training.model import PRESETS, MoE, TrainableTransformer

# a few seconds per run: 48 stdlib files, one in 4 held out, 64-token windows
SMALL = ["--preset", "test", "--max-files", "48", "--heldout-every", "4", "--batch-size", "2", "--seq-len", "64",
         "--eval-every", "2", "--eval-windows", "2", "--save-every", "2"]


def run(out, steps, *extra):
    return train.train(train._parser().parse_args(["--out", str(out), "--steps", str(steps), *SMALL, *extra]))


@pytest.fixture(scope="module")
def texts():
    files = corpus.stdlib_files()[:48]
    return corpus.split(files, 4)


def test_corpus_split_and_tokenizer(texts):
    train_texts, heldout = texts
    assert train_texts and heldout and len(train_texts) + len(heldout) == 48
    tok = corpus.train_tokenizer(train_texts, 384)
    assert tok.token_to_id(corpus.BOS) == 0 and tok.token_to_id(corpus.EOS) == 1
    nbytes = token_bytes(tok)
    for text in heldout[:3]:  # byte-level BPE is lossless and its tokens' bytes add up to the text's
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert int(nbytes[ids].sum()) == len(text.encode())
    stream = corpus.encode_documents(tok, heldout[:2], 0, 1)
    n0 = len(tok.encode(heldout[0], add_special_tokens=False).ids)
    assert stream[0] == 0 and stream[n0 + 1] == 1 and stream[n0 + 2] == 0 and stream[-1] == 1


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_training_model_matches_inference_model(tmp_path, backend):
    """The differentiable model's logits = dsv3.model's on the same fp32 weights (HF names, experts
    split per expert and fused again by the loader), with nonzero balancing biases."""
    args = ModelArgs(**PRESETS["test"])
    torch.manual_seed(0)
    m = TrainableTransformer(args)
    m.init_weights(std=0.1)
    for moe in m.moe_layers():
        moe.gate.e_score_correction_bias.uniform_(0, 0.2)
    save_file(m.hf_state_dict(torch.float32), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf()))
    ids = torch.randint(0, args.vocab_size, (3, 37))
    with torch.no_grad():
        ref = m(ids)
    q = load(str(tmp_path), dtype=torch.float32, device="cpu", backend=backend, progress=False)
    cache = q.new_cache(3, 64)
    blocks = [cache.allocator.allocate(1) for _ in range(3)]
    out = q(ids.flatten(), prefill_batch([(37, b) for b in blocks], cache, all_logits=True), cache)
    torch.testing.assert_close(out.view(3, 37, -1), ref, rtol=1e-4, atol=1e-4)


def test_bias_update_moves_towards_balance():
    args = ModelArgs(**PRESETS["test"])
    moe = MoE(args)
    moe.load.copy_(torch.tensor([10, 0, 5, 5]))
    moe.update_bias(0.01)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert moe.load.sum() == 0  # counted afresh for the next step


def test_balancing_evens_out_a_skewed_router():
    """A router biased towards experts 0 and 1 (one group of the two): the bias updates alone
    spread the load evenly."""
    args = ModelArgs(**PRESETS["test"])
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        p.data.normal_(0, 0.1)
    moe.gate.e_score_correction_bias.copy_(torch.tensor([0.5, 0.5, 0.0, 0.0]))
    x = torch.randn(512, args.hidden_size)
    loads = []
    for _ in range(300):
        with torch.no_grad():
            moe(x)
        loads.append(moe.load.clone())
        moe.update_bias(0.01)
    first, late = loads[0], torch.stack(loads[-50:]).double().mean(0)
    assert first[2:].sum() < first.sum() * 0.1, first  # skewed at first
    uniform = late.sum() / args.n_routed_experts
    assert (late - uniform).abs().max() < 0.1 * uniform, (first, late)


def test_seed_determinism_and_exact_resume(tmp_path):
    a = run(tmp_path / "a", 4, "--no-export")
    b = run(tmp_path / "b", 4, "--no-export")
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["history"][-1]["loss"] < a["history"][0]["loss"] + 1.0  # sane numbers, not NaN
    c = run(tmp_path / "c", 4, "--no-export", "--seed", "1")
    assert [h["loss"] for h in c["history"]] != [h["loss"] for h in a["history"]]
    # stop after 2 steps, resume to 4: the same run as 4 steps at once
    run(tmp_path / "r", 4, "--no-export", "--stop-at", "2")
    r = run(tmp_path / "r", 4, "--no-export", "--resume")
    assert [h["loss"] for h in r["history"]] == [h["loss"] for h in a["history"]]
    sa = torch.load(tmp_path / "a" / "train_state.pt", weights_only=False)["model"]
    sr = torch.load(tmp_path / "r" / "train_state.pt", weights_only=False)["model"]
    for k in sa:
        assert torch.equal(sa[k], sr[k]), k


def test_resume_refuses_other_settings(tmp_path):
    run(tmp_path, 2, "--no-export")
    with pytest.raises(ValueError, match="lr"):
        run(tmp_path, 2, "--no-export", "--resume", "--lr", "1e-4")
    with pytest.raises(ValueError, match="steps"):
        run(tmp_path, 4, "--no-export", "--resume")
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "none", 2, "--resume")


def test_export_is_a_deepseek_v3_fp8_checkpoint(tmp_path):
    r = run(tmp_path, 6)
    fp8 = tmp_path / "fp8"
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    tensors = load_file(str(fp8 / "model.safetensors"))
    w = tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"].shape == (1, 1)
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    m = r["metrics"]
    # the recorded losses are what dsv3.evaluate gives on the exported checkpoints
    model = load(str(fp8), dtype=torch.bfloat16, device="cpu", backend="cpu", progress=False)
    sample = (tmp_path / "heldout_sample.txt").read_text(encoding="utf-8")
    got = evaluate(model, load_tokenizer(str(fp8)), sample, m["window"])["nats_per_byte"]
    assert got == pytest.approx(m["heldout_sample"]["fp8"], rel=1e-6)
    assert abs(m["fp8_vs_bf16"]) < 0.05
    assert json.loads((fp8 / "metrics.json").read_text())["heldout"]["fp8"] == m["heldout"]["fp8"]
    assert os.path.exists(tmp_path / "bf16" / "tokenizer.json")
    # the MTP layer (default --mtp-layers 1) in DeepSeek's names: decoder linears FP8, eh_proj and
    # shared_head.head bf16 (the head a copy of lm_head: shared), and its recorded held-out loss
    assert cfg["num_nextn_predict_layers"] == 1
    assert tensors["model.layers.2.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.2.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.2.eh_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.2.eh_proj.weight"].shape == (128, 256)
    assert torch.equal(tensors["model.layers.2.shared_head.head.weight"], tensors["lm_head.weight"])
    assert m["heldout"]["mtp_fp8"]["nats_per_byte"] > 0


def test_train_only_mtp_from_a_checkpoint(tmp_path):
    """--init-from a run without MTP, --train-only mtp: the main model's tensors are exported as
    they were (bit for bit in bf16), the MTP layer is trained."""
    run(tmp_path / "a", 2, "--mtp-layers", "0")
    run(tmp_path / "b", 3, "--init-from", str(tmp_path / "a" / "bf16"), "--train-only", "mtp", "--no-export")
    before = load_file(str(tmp_path / "a" / "bf16" / "model.safetensors"))
    m = TrainableTransformer(ModelArgs(**PRESETS["test"], num_nextn_predict_layers=1))
    m.load_state_dict(torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["model"])
    after = m.hf_state_dict()
    assert "model.layers.2.eh_proj.weight" in after and "model.layers.2.eh_proj.weight" not in before
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    # the MTP decoder layer started as a copy of the last decoder layer and was trained
    assert not torch.equal(after["model.layers.2.self_attn.o_proj.weight"], before["model.layers.1.self_attn.o_proj.weight"])
    with pytest.raises(ValueError, match="--init-from"):  # another preset's checkpoint
        run(tmp_path / "c", 2, "--init-from", str(tmp_path / "a" / "bf16"), "--preset", "default")


@pytest.mark.parametrize("option, value", [("--seq-len", "100000"), ("--steps", "0"), ("--batch-size", "0"),
                                           ("--lr", "-1"), ("--mtp-layers", "-1"), ("--mtp-lambda", "-0.5")])
def test_bad_options_name_themselves(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        run(tmp_path, 2, option, value)


def test_command_line_reports_errors_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path), "--resume"])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
