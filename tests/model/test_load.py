"""Loading Hugging Face checkpoints: shards, FP8, the MTP layer, and clear errors for every way a
checkpoint can be wrong (missing, unexpected, wrongly shaped tensors; corrupt or truncated files;
unsupported config fields)."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.config import ConfigError, ModelArgs, deepseek_v3_671b, tiny
from dsv3.load import CheckpointError, checkpoint_files, load

from hf_checkpoints import hf_checkpoint, run_prefill_and_decode  # noqa: F401

PROMPTS = [[5, 17, 250, 3, 99, 41, 7]]


def _logits(model):
    return torch.cat(run_prefill_and_decode(model, PROMPTS, steps=0)[0])


def _rewrite(path, change):
    """Apply change(tensors dict) to path/model.safetensors."""
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_sharded_checkpoint_equals_single_file(hf_checkpoint):  # noqa: F811
    path, _ = hf_checkpoint()
    want = _logits(load(path, torch.float32, backend="torch", progress=False))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):  # three shards, an index naming each tensor's file
        part = names[i::3]
        save_file({k: tensors[k] for k in part}, os.path.join(path, f"model-{i + 1:05d}-of-00003.safetensors"))
        weight_map.update({k: f"model-{i + 1:05d}-of-00003.safetensors" for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    torch.testing.assert_close(_logits(load(path, torch.float32, backend="torch", progress=False)), want,
                               rtol=0, atol=0)


def test_mtp_layer_is_skipped_with_a_log_line(hf_checkpoint, caplog):  # noqa: F811
    """MTP tensors the model does not load (load(mtp=False), or num_nextn_predict_layers 0) are
    skipped with a log line; the model is the same (tests/model/test_mtp.py loads them)."""
    path, _ = hf_checkpoint()
    want = _logits(load(path, torch.float32, backend="torch", progress=False))
    _rewrite(path, lambda t: t.update({"model.layers.2.eh_proj.weight": torch.randn(128, 256),
                                       "model.layers.2.enorm.weight": torch.ones(128)}))
    with caplog.at_level(logging.INFO, logger="dsv3"):
        model = load(path, torch.float32, backend="torch", progress=False, mtp=False)
    assert "multi-token-prediction" in caplog.text and "[2]" in caplog.text
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    cfg = os.path.join(path, "config.json")
    with open(cfg) as f:
        config = json.load(f)
    with open(cfg, "w") as f:
        json.dump({**config, "num_nextn_predict_layers": 0}, f)
    assert len(load(path, torch.float32, backend="torch", progress=False).mtp) == 0
    # asked for, the partial layer is an error naming what is missing
    with open(cfg, "w") as f:
        json.dump({**config, "num_nextn_predict_layers": 1}, f)
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.o_proj.weight"):
        load(path, torch.float32, backend="torch", progress=False)


def test_all_problems_in_one_error(hf_checkpoint):  # noqa: F811
    path, _ = hf_checkpoint()

    def damage(t):
        del t["model.layers.0.self_attn.o_proj.weight"]
        del t["model.layers.1.mlp.experts.3.up_proj.weight"]
        t["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
        t["model.layers.1.mlp.gate.weight"] = torch.zeros(15, 128)
    _rewrite(path, damage)
    with pytest.raises(CheckpointError) as e:
        load(path, torch.float32, progress=False)
    msg = str(e.value)
    for part in ("missing (2)", "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                 "unexpected (1)", "surprise", "wrong shape (1)", "mlp.gate.weight: (15, 128), expected (16, 128)"):
        assert part in msg, (part, msg)


def test_fp8_weight_without_its_scale(hf_checkpoint, tmp_path):  # noqa: F811
    from dsv3.quantize import quantize_checkpoint
    path, _ = hf_checkpoint()
    quantize_checkpoint(path, str(tmp_path / "fp8"))
    _rewrite(str(tmp_path / "fp8"), lambda t: t.pop("model.layers.0.mlp.down_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): model.layers.0.mlp.down_proj.weight_scale_inv"):
        load(str(tmp_path / "fp8"), progress=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_file_raises_a_clear_error(hf_checkpoint, damage):  # noqa: F811
    path, _ = hf_checkpoint()
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    with open(f, "wb") as out:
        out.write({"garbage": b"\x00\x01not a safetensors file" * 10, "truncated": data[:len(data) // 2],
                   "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(path, progress=False)


def test_missing_files(tmp_path, hf_checkpoint):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(str(tmp_path / "nowhere"))
    path, _ = hf_checkpoint()
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="shard files that are not in"):
        checkpoint_files(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(path)


def test_bf16_checkpoint_and_quantize_on_load(hf_checkpoint):  # noqa: F811
    path, hf = hf_checkpoint(dtype=torch.bfloat16)
    model = load(path, torch.bfloat16, backend="torch", progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.o_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(attn.o_proj.weight, hf.model.layers[0].self_attn.o_proj.weight.to(torch.bfloat16),
                               rtol=0, atol=0)
    fp8 = load(path, torch.bfloat16, fp8=True, backend="torch", progress=False)
    o = fp8.model.layers[0].self_attn.o_proj
    assert o.weight.dtype == torch.float8_e4m3fn and o.weight_scale_inv.shape == (1, 1)
    deq = o.dequantized(torch.float32)
    ref = hf.model.layers[0].self_attn.o_proj.weight.to(torch.bfloat16).float()
    assert 0 < (deq - ref).abs().max() <= ref.abs().max() / 8  # e4m3: 3 mantissa bits


# ---- config.json ----

def test_config_presets():
    v3 = deepseek_v3_671b()
    assert abs(v3.softmax_scale() - 0.1352) < 1e-4  # 192**-0.5 * (0.1 ln 40 + 1)**2
    assert v3.fp8 and v3.n_routed_experts == 256 and v3.first_k_dense_replace == 3
    cache_bytes = 61 * 576 * 2
    assert cache_bytes == 70272  # bf16 latent cache per token, all 61 layers
    assert tiny().num_hidden_layers == 2


@pytest.mark.parametrize("field, value, match", [
    ("kv_lora_rank", 256, "kv_lora_rank = 256: the MLA kernels"),
    ("qk_rope_head_dim", 32, "qk_rope_head_dim = 32"),
    ("hidden_act", "gelu", "hidden_act = 'gelu'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope_type 'linear'"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size"),
    ("n_group", 3, "n_group = 3: must divide n_routed_experts"),
    ("topk_group", 9, "topk_group = 9"),
    ("num_experts_per_tok", 100, "num_experts_per_tok = 100"),
    ("rope_interleave", False, "rope_interleave = False"),
    ("model_type", "llama", "model_type = 'llama'"),
])
def test_unsupported_config_fields(field, value, match):
    cfg = tiny().to_hf() | {field: value}
    with pytest.raises(ConfigError, match=match):
        ModelArgs.from_hf(cfg)


def test_config_round_trip_and_formats():
    args = tiny()
    again = ModelArgs.from_hf(args.to_hf())
    assert again == args
    v4 = args.to_hf()
    rope = v4.pop("rope_parameters")
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))
    assert ModelArgs.from_hf(v4) == args
    plain = tiny(rope_scaling=None)
    assert ModelArgs.from_hf(plain.to_hf()).rope_scaling is None


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_json(str(tmp_path))
