"""The shipped default model (dsv3/default_model, trained by `python -m training.train`): a real
DeepSeek-V3-format FP8 checkpoint that loads, generates, and reaches its recorded held-out loss on
the fixed held-out sample shipped here (data/heldout_sample.txt: CPython standard-library source,
PSF License; fixed, so the check is the same on every Python version)."""

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

from dsv3.config import ModelArgs
from dsv3 import evaluate as evaluate_cli
from dsv3.evaluate import evaluate
from dsv3.generate import DEFAULT_MODEL, main
from dsv3.load import load, load_tokenizer
from dsv3.quantize import is_quantized_weight

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "heldout_sample.txt")


@pytest.fixture(scope="module")
def metrics():
    with open(os.path.join(DEFAULT_MODEL, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sample():
    with open(SAMPLE, encoding="utf-8") as f:
        return f.read()


def test_checkpoint_is_deepseek_v3_fp8_with_real_blocks():
    args = ModelArgs.from_json(DEFAULT_MODEL)
    assert args.quantization_config["weight_block_size"] == [128, 128]
    assert args.quantization_config["fmt"] == "e4m3"
    h = args.num_attention_heads
    for width in (args.hidden_size, args.intermediate_size, args.moe_intermediate_size, args.q_lora_rank,
                  h * args.qk_head_dim, h * (args.qk_nope_head_dim + args.v_head_dim), h * args.v_head_dim):
        assert width % 128 == 0
    fp8 = 0
    with safe_open(os.path.join(DEFAULT_MODEL, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in names:
            t = f.get_tensor(name)
            assert torch.isfinite(t.float()).all(), name
            if is_quantized_weight(name, t.shape):  # also the MTP layer's, but its eh_proj and head stay bf16
                assert t.dtype == torch.float8_e4m3fn, name
                s = f.get_tensor(name + "_scale_inv")
                assert s.shape == (-(-t.shape[0] // 128), -(-t.shape[1] // 128)) and (s > 0).all(), name
                fp8 += 1
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # the dense first layer
    # per layer: 5 attention projections; 3 dense MLP ones, or 3 per routed expert and 3 shared;
    # the MTP layer is a MoE layer
    layers = args.num_hidden_layers + args.num_nextn_predict_layers
    dense, moe = args.first_k_dense_replace, layers - args.first_k_dense_replace
    assert fp8 == layers * 5 + dense * 3 + moe * 3 * (args.n_routed_experts + 1)
    assert args.num_nextn_predict_layers == 1
    mtp = f"model.layers.{args.num_hidden_layers}."
    for name in ("eh_proj.weight", "shared_head.head.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        assert mtp + name in names
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL, n)) for n in os.listdir(DEFAULT_MODEL))
    assert size < 9 * 2 ** 20, f"the shipped model takes {size / 2 ** 20:.1f} MiB"


def test_tokenizer_is_byte_level_bpe_with_the_config_ids(sample):
    args = ModelArgs.from_json(DEFAULT_MODEL)
    tok = load_tokenizer(DEFAULT_MODEL)
    assert tok.get_vocab_size() == args.vocab_size
    assert tok.id_to_token(args.bos_token_id) == "<｜begin▁of▁sentence｜>"
    assert tok.id_to_token(args.eos_token_ids[0]) == "<｜end▁of▁sentence｜>"
    ids = tok.encode(sample, add_special_tokens=False).ids
    assert tok.decode(ids) == sample
    assert len(sample.encode()) / len(ids) > 2.5  # BPE merges, not bytes


def test_sample_is_the_recorded_one(sample, metrics):
    assert hashlib.sha256(sample.encode()).hexdigest() == metrics["heldout_sample"]["sha256"], \
        "tests/model/data/heldout_sample.txt is not the sample the default model's metrics.json was measured on"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_reaches_recorded_heldout_loss(backend, sample, metrics):
    """The loss the shipped FP8 model was recorded with (cpu backend, bf16 activations), within
    0.5%: the cpu kernels exactly as recorded up to thread scheduling, the fp32-math reference
    as close as bf16 activations allow."""
    model = load(DEFAULT_MODEL, dtype=torch.bfloat16, device="cpu", backend=backend, progress=False)
    r = evaluate(model, load_tokenizer(DEFAULT_MODEL), sample, metrics["window"])
    assert r["nats_per_byte"] == pytest.approx(metrics["heldout_sample"]["fp8"], rel=5e-3)
    # and the recorded loss is a trained model's: far below a uniform guess (ln(vocab) per token)
    assert r["nats_per_token"] < 0.5 * torch.log(torch.tensor(float(model.args.vocab_size))).item()
    for layer in r["expert_load"]:  # every expert gets work
        assert min(layer) > 0.25 / model.args.n_routed_experts


def test_fp8_within_one_percent_of_bf16(metrics):
    m = metrics["heldout"]
    assert abs(m["fp8"] / m["bf16"] - 1) < 0.01


def test_generate_command_uses_the_default_model(capsys):
    assert main(["--prompt", "import os\n", "--max-new-tokens", "24", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("import os\n")
    assert len(out) > len("import os\n") + 20 and "\ufffd" not in out
    # greedy decoding is deterministic
    assert main(["--prompt", "import os\n", "--max-new-tokens", "24", "--backend", "cpu"]) == 0
    assert capsys.readouterr().out == out


def test_evaluate_command(capsys, metrics, tmp_path):
    """The README's measuring command prints the recorded loss; a bad --text exits 2 naming it."""
    assert evaluate_cli.main(["--model", DEFAULT_MODEL, "--text", SAMPLE, "--backend", "cpu",
                              "--window", str(metrics["window"])]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])
    assert got["nats_per_byte"] == pytest.approx(metrics["heldout_sample"]["fp8"], rel=5e-3)
    assert got["bytes"] == metrics["heldout_sample"]["bytes"]
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main(["--model", DEFAULT_MODEL, "--text", str(tmp_path / "missing.py")])
    assert e.value.code == 2 and "missing.py" in capsys.readouterr().err
