"""The model with the FP8 latent cache (FlashMLA's 656-byte token, dsv3.cache): close to the bf16
cache on a random model on every backend, within 0.5% held-out loss on the shipped default model,
and the command lines' --kv-cache-dtype fp8 (the stats line shows the bytes per token)."""

import json

import pytest
import torch

from dsv3 import evaluate as evaluate_cli
from dsv3.evaluate import evaluate
from dsv3.generate import DEFAULT_MODEL, main
from dsv3.load import load, load_tokenizer
from dsv3_kernels.reference.fp8 import calc_diff

from hf_checkpoints import hf_checkpoint, run_prefill_and_decode  # noqa: F401
from test_backends import MODEL_OPS, PROMPTS
from test_default_model import SAMPLE, metrics, sample  # noqa: F401


def test_cache_sizes():
    from dsv3.cache import LatentCache
    assert LatentCache(61, 1, dtype=torch.bfloat16).bytes_per_token == 70_272  # DeepSeek-V3, bf16
    fp8 = LatentCache(61, 2, block_size=16, dtype="fp8")
    assert fp8.bytes_per_token == 61 * 656 and fp8.kv.dtype == torch.uint8 and fp8.kv.shape == (61, 2, 16, 656)
    with pytest.raises(ValueError, match="dtype"):
        LatentCache(1, 1, dtype="int4")


@pytest.mark.ops(*MODEL_OPS)
def test_random_model_fp8_cache_close_to_bf16_cache(hf_checkpoint, device, backend):  # noqa: F811
    """Prefill and decode logits with the FP8 cache against the bf16 cache, same backend, same
    tokens. calc_diff measured 3.5e-3 (cpu, bf16); the fp32 reference model gives 2.6e-3 (prefill)
    and 1.2e-3 (decode) for fp32 vs FP8 cache: e4m3's 3 mantissa bits, not the kernels."""
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter takes 15 s here; its FP8 ops are checked in tests/test_mla_fp8_cache.py")
    path, _ = hf_checkpoint()
    model = load(path, torch.bfloat16, device, backend=backend, progress=False)
    want = run_prefill_and_decode(model, PROMPTS, steps=3)
    got = run_prefill_and_decode(model, PROMPTS, steps=3, follow=want[2], kv_cache_dtype="fp8")
    assert not any(t.isnan().any() for t in got[0] + got[1])
    diff = calc_diff(torch.cat(got[0] + got[1]), torch.cat(want[0] + want[1]))
    assert 0 < diff < 1e-2, diff


def test_default_model_heldout_loss_within_half_percent(sample):  # noqa: F811
    """The issue's goal: held-out nats/byte of the shipped model with the FP8 cache within 0.5%
    of the bf16 cache (measured: 0.99906 bf16, 0.99911 fp8, +0.005%)."""
    model = load(DEFAULT_MODEL, dtype=torch.bfloat16, device="cpu", backend="cpu", progress=False)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    bf16 = evaluate(model, tokenizer, sample, kv_cache_dtype=torch.bfloat16)
    fp8 = evaluate(model, tokenizer, sample, kv_cache_dtype="fp8")
    assert fp8["nats_per_byte"] != bf16["nats_per_byte"]  # the FP8 cache is read (prefill too)
    assert abs(fp8["nats_per_byte"] / bf16["nats_per_byte"] - 1) < 5e-3
    layers = model.args.num_hidden_layers + len(model.mtp)  # the MTP layer has its cache layer too
    assert (bf16["kv_cache_bytes_per_token"], fp8["kv_cache_bytes_per_token"]) == (layers * 1152, layers * 656)


def test_commands_take_kv_cache_dtype(capsys):
    model = load(DEFAULT_MODEL, dtype=torch.bfloat16, device="cpu", backend="cpu", progress=False)
    layers = model.args.num_hidden_layers + len(model.mtp)  # generate and evaluate run the MTP layer too
    assert main(["--prompt", "import os\n", "--max-new-tokens", "8", "--backend", "cpu", "--kv-cache-dtype", "fp8",
                 "--speculative", "mtp"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("import os\n")
    assert f"KV cache {layers * 656} bytes per token" in captured.err
    assert evaluate_cli.main(["--model", DEFAULT_MODEL, "--text", SAMPLE, "--backend", "cpu", "--window", "128",
                              "--kv-cache-dtype", "fp8"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["kv_cache_bytes_per_token"] == layers * 656
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "x", "--kv-cache-dtype", "fp4"])
    assert e.value.code == 2
