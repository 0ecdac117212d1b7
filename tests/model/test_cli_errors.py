"""Hostile input to the command lines and the config (issue 24, "Command lines and configs"):
python -m dsv3.generate / dsv3.evaluate / dsv3.quantize / training.train end a user error with
exit status 2 and one line naming the argument or field, and leave no partial or changed file;
config.json fields and the checkpoint's tensor dtypes are checked; dsv3.load checks its own
arguments before reading anything. The command lines run in process on a copy of the shipped
model (one subprocess checks what only a real process shows: undecodable bytes in argv)."""

import copy
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import evaluate as evaluate_cli
from dsv3 import generate as generate_cli
from dsv3 import quantize as quantize_cli
from dsv3.config import ConfigError, ModelArgs
from dsv3.generate import DEFAULT_MODEL
from dsv3.load import CheckpointError
from dsv3.sampling import SamplingParams, sample
from training import train as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A copy of the shipped model; tests that change a file make their own copy of it."""
    path = str(tmp_path_factory.mktemp("cli") / "model")
    shutil.copytree(DEFAULT_MODEL, path)
    return path


@pytest.fixture
def model_copy(shipped, tmp_path):
    path = str(tmp_path / "model")
    shutil.copytree(shipped, path)
    return path


@pytest.fixture(scope="module")
def config():
    with open(os.path.join(DEFAULT_MODEL, "config.json")) as f:
        return json.load(f)


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fails(main, argv, capsys, prog, *names) -> str:
    """Run a command line's main(argv): it must exit with status 2 and a one-line error (the last
    line of stderr; progress bars may come before it) naming each of `names`. Returns the line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    line = err.rstrip("\n").split("\n")[-1]
    assert e.value.code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1 and line.startswith(f"{prog}: error: "), err
    for name in names:
        assert name in line, (name, line)
    return line


def gen_fails(argv, capsys, *names):
    return fails(generate_cli.main, argv, capsys, "python -m dsv3.generate", *names)


def eval_fails(argv, capsys, *names):
    return fails(evaluate_cli.main, argv, capsys, "python -m dsv3.evaluate", *names)


def write_config(folder, cfg):
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))


# ---- config.json ----

def edited(cfg, **fields):
    cfg = copy.deepcopy(cfg)
    for name, value in fields.items():
        if name.startswith("rope_"):  # the shipped config's rope_parameters (transformers 5.x)
            cfg["rope_parameters"][name[len("rope_"):]] = value
        else:
            cfg[name] = value
    return cfg


@pytest.mark.parametrize("fields, names", [
    (dict(rms_norm_eps=-1), ["rms_norm_eps"]),
    (dict(routed_scaling_factor=math.nan), ["routed_scaling_factor"]),
    (dict(rope_factor=0), ["rope_parameters.factor"]),
    (dict(rope_factor=-2.0), ["rope_parameters.factor"]),
    (dict(rope_rope_theta="x"), ["rope_parameters.rope_theta"]),
    (dict(vocab_size=1e12), ["vocab_size"]),
    (dict(num_attention_heads=10 ** 9), ["parameters", "num_attention_heads"]),
    (dict(max_position_embeddings=-1), ["max_position_embeddings"]),
    (dict(max_position_embeddings="2048"), ["max_position_embeddings"]),
    (dict(n_shared_experts=-1), ["n_shared_experts"]),
    (dict(hidden_size=True), ["hidden_size"]),
    (dict(qk_rope_head_dim="64"), ["qk_rope_head_dim"]),
    (dict(eos_token_id=[1, 99999]), ["eos_token_id"]),
    (dict(quantization_config=1), ["quantization_config"]),
    (dict(rms_norm_eps=0, n_shared_experts=-1, scoring_func="relu"),  # one error names them all
     ["rms_norm_eps", "n_shared_experts", "scoring_func"]),
])
def test_config_fields_are_checked(config, fields, names):
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_hf(edited(config, **fields))
    assert "\n" not in str(e.value)
    for name in names:
        assert f"{name}" in str(e.value)


def test_config_that_is_not_an_object_or_lacks_the_shapes(config):
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        ModelArgs.from_hf([1, 2])
    with pytest.raises(ConfigError, match="config fields missing: vocab_size, hidden_size") as e:
        ModelArgs.from_hf({})  # not DeepSeek-V3's 671B defaults
    assert "first_k_dense_replace" in str(e.value)
    partial = {k: v for k, v in config.items() if k != "n_shared_experts"}
    with pytest.raises(ConfigError, match="config fields missing: n_shared_experts \\("):
        ModelArgs.from_hf(partial)


HOSTILE = [None, -1, 0, 0.5, math.inf, math.nan, "x", [], {}, True, 2 ** 70, [1], {"a": 1}, 1e12]


def test_no_field_value_crashes_the_check(config):
    """Every field of the shipped config (and of its rope_parameters and quantization_config),
    given each hostile value: a ConfigError or a config that runs, never another exception."""
    places = [(name,) for name in config] + [(outer, name) for outer in ("rope_parameters", "quantization_config")
                                             for name in config[outer]]
    refused = 0
    for place in places:
        for value in HOSTILE:
            cfg = copy.deepcopy(config)
            (cfg[place[0]] if len(place) == 2 else cfg)[place[-1]] = value
            try:
                ModelArgs.from_hf(cfg)
            except ConfigError:
                refused += 1
    assert refused > len(places) * len(HOSTILE) // 2  # (the check refuses most of them)


def test_cli_names_the_config_file_and_field(model_copy, config, capsys):
    write_config(model_copy, edited(config, rms_norm_eps=-1, routed_scaling_factor=math.nan))
    gen_fails(["--model", model_copy, "--prompt", "x"], capsys, "rms_norm_eps = -1", "routed_scaling_factor = nan",
              os.path.join(model_copy, "config.json"))
    write_config(model_copy, "{}")
    gen_fails(["--model", model_copy, "--prompt", "x"], capsys, "config fields missing")
    write_config(model_copy, "[1, 2]")
    eval_fails(["--model", model_copy, "--text", os.path.join(model_copy, "config.json")], capsys, "JSON object")


# ---- the checkpoint's files ----

def test_tensor_of_a_wrong_dtype_is_named(model_copy, capsys):
    path = os.path.join(model_copy, "model.safetensors")
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = tensors[
        "model.layers.0.mlp.down_proj.weight_scale_inv"].to(torch.bfloat16)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"wrong dtype \(2\): ") as e:
        dsv3.load(model_copy, torch.float32, device="cpu", backend="torch", progress=False)
    assert "model.norm.weight: I32" in str(e.value) and "down_proj.weight_scale_inv: BF16, expected F32" in str(e.value)
    gen_fails(["--model", model_copy, "--prompt", "x"], capsys, "model.norm.weight")


@pytest.mark.parametrize("content", [b"", b'{"version": "1.0", "trunc', bytes(range(256))])
def test_damaged_tokenizer_json(model_copy, capsys, content):
    with open(os.path.join(model_copy, "tokenizer.json"), "wb") as f:
        f.write(content)
    gen_fails(["--model", model_copy, "--prompt", "x"], capsys, "tokenizer.json is not a readable tokenizer.json")


@pytest.mark.parametrize("index", [b'{"weight_map": ["model.safetensors"]}', b'{"weight_map": {"a": 1}}', b"[]",
                                   b"\xff"])
def test_index_json_without_a_weight_map_object(model_copy, capsys, index):
    with open(os.path.join(model_copy, "model.safetensors.index.json"), "wb") as f:
        f.write(index)
    gen_fails(["--model", model_copy, "--prompt", "x"], capsys, "model.safetensors.index.json is not")


@pytest.mark.parametrize("kwargs, name", [(dict(dtype=torch.int32), "dtype"), (dict(dtype="bfloat16"), "dtype"),
                                          (dict(backend="gpu"), "backend"), (dict(device="meta"), "device"),
                                          (dict(device="foo"), "device"), (dict(fp8="yes"), "fp8")])
def test_load_checks_its_arguments_before_reading(tmp_path, kwargs, name):
    # a folder that does not exist: the argument is named first, before any file is looked at
    with pytest.raises(ValueError, match=name):
        dsv3.load(str(tmp_path / "nothing"), **kwargs)


# ---- python -m dsv3.generate ----

@pytest.mark.parametrize("extra, name", [
    (["--seed", str(2 ** 70)], "--seed"),
    (["--device", "foo"], "--device"),
    (["--device", "meta"], "--device"),
    (["--temperature", "1e-300"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "nan"], "--top-p"),
    (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text (byte 0xe9 at character 3)"),
])
def test_generate_argument_errors(shipped, capsys, extra, name, monkeypatch):
    monkeypatch.setattr(sys.modules["dsv3.load"], "load", None)  # refused before the model is read
    gen_fails(["--model", shipped, "--prompt", "x", *extra], capsys, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_generate_on_cuda_without_a_gpu(shipped, capsys):
    gen_fails(["--model", shipped, "--prompt", "x", "--device", "cuda"], capsys, "--device 'cuda': no CUDA GPU")


def test_tiny_top_p_keeps_the_most_likely_token(shipped, capsys):
    # a top_p below float32's smallest number keeps exactly the most likely token: greedy decoding
    logits = torch.randn(3, 50)
    SamplingParams(temperature=1.0, top_p=1e-300)  # a valid setting
    assert torch.equal(sample(logits, 1.0, 1e-300, torch.Generator().manual_seed(0)), logits.argmax(-1))
    outputs = []
    for extra in ([], ["--temperature", "1", "--top-p", "1e-300", "--seed", "5"]):
        assert generate_cli.main(["--model", shipped, "--prompt", "def f(", "--max-new-tokens", "6", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_interactive_line_that_is_not_utf8_is_skipped(shipped, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\nimport\n\n"), encoding="utf-8"))
    assert generate_cli.main(["--model", shipped, "--interactive", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "error: the line is not valid UTF-8 text (byte 0xe9 at character 3)" in err
    assert err.count("time to first token") == 1 and out  # the next line ran


def test_prompt_bytes_that_are_not_utf8_in_a_real_process(shipped):
    r = subprocess.run([sys.executable, "-m", "dsv3.generate", "--model", shipped, "--prompt", b"x\xff"],
                       cwd=REPO, capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert r.returncode == 2 and r.stderr.decode().splitlines() == [
        "python -m dsv3.generate: error: --prompt is not valid UTF-8 text (byte 0xff at character 1)"], r.stderr


# ---- python -m dsv3.evaluate ----

@pytest.mark.parametrize("text, window", [("x", 512), ("def f(x):\n    return x\n", 2)])
def test_evaluate_one_token_text_and_window_2(shipped, tmp_path, capsys, text, window):
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert evaluate_cli.main(["--model", shipped, "--text", str(path), "--window", str(window)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bytes"] == len(text.encode()) and r["tokens"] >= 1 and math.isfinite(r["nats_per_byte"])


@pytest.mark.parametrize("extra, name", [(["--window", "1"], "--window must be >= 2"),
                                         (["--window", "4096"], "--window must be at most"),
                                         (["--device", "meta"], "--device"),
                                         (["--expert-load", "/nonexistent-folder/load.json"], "--expert-load"),
                                         (["--expert-load", "."], "--expert-load")])
def test_evaluate_argument_errors(shipped, tmp_path, capsys, monkeypatch, extra, name):
    text = tmp_path / "t.txt"
    text.write_text("abc")
    if extra[0] == "--expert-load":  # refused before the model is read and evaluated
        monkeypatch.setattr(sys.modules["dsv3.load"], "load", None)
    before = snapshot(tmp_path)
    eval_fails(["--model", shipped, "--text", str(text), *extra], capsys, name)
    assert snapshot(tmp_path) == before


def test_evaluate_text_errors_and_expert_load(shipped, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ab\xff")
    eval_fails(["--model", shipped, "--text", str(bad)], capsys, f"--text {bad} is not UTF-8 text", "at byte 2")
    eval_fails(["--model", shipped, "--text", str(tmp_path / "none.txt")], capsys, "--text", "cannot be read")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    eval_fails(["--model", shipped, "--text", str(empty)], capsys, "--text", "is empty")
    # the file appears whole, and only after a successful evaluation
    bad.write_text("import os\n")
    load = tmp_path / "load.json"
    assert evaluate_cli.main(["--model", shipped, "--text", str(bad), "--expert-load", str(load)]) == 0
    assert len(json.loads(load.read_text())["expert_load"]) == 2  # the 2 MoE layers of the decoder
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "empty.txt", "load.json"]


# ---- python -m training.train ----

@pytest.mark.parametrize("extra, message", [
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--bias-update-rate", "nan"], "--bias-update-rate must be a finite number >= 0"),
    (["--bias-update-rate=-inf"], "--bias-update-rate must be a finite number >= 0"),
    (["--mtp-lambda", "inf"], "--mtp-lambda must be a finite number >= 0"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--seed", str(2 ** 70)], "--seed must be in"),
    (["--out", "FILE"], "exists and is not a folder"),
])
def test_train_argument_errors(tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("kept")
    extra = [str(tmp_path / "file") if x == "FILE" else x for x in extra]
    before = snapshot(tmp_path)
    fails(train_cli.main, ["--out", str(tmp_path / "run"), *extra], capsys, "python -m training.train", message)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_train_damaged_resume_state(tmp_path, capsys):
    (tmp_path / "train_state.pt").write_bytes(b"not a torch file")
    before = snapshot(tmp_path)
    fails(train_cli.main, ["--out", str(tmp_path), "--resume"], capsys, "python -m training.train",
          "--resume", "is not a training state")
    assert snapshot(tmp_path) == before
    # a state of this run's settings that holds another model: refused before anything is written
    argv = ["--out", str(tmp_path), "--resume", "--preset", "test", "--max-files", "8", "--heldout-every", "4",
            "--seq-len", "64"]
    torch.save({"settings": train_cli._settings(train_cli._parser().parse_args(argv)), "model": {}, "opt": {},
                "step": 1, "history": [], "seconds": 0.0}, tmp_path / "train_state.pt")
    shutil.copy(os.path.join(DEFAULT_MODEL, "tokenizer.json"), tmp_path)  # (the run's own, saved by its start)
    before = snapshot(tmp_path)
    line = fails(train_cli.main, argv, capsys, "python -m training.train", "--resume", "does not fit this run's model")
    assert "Missing key(s)" in line and snapshot(tmp_path) == before


# ---- python -m dsv3.quantize ----

def quant_fails(argv, capsys, *names):
    return fails(quantize_cli.main, argv, capsys, "python -m dsv3.quantize", *names)


def test_quantize_refuses_to_overwrite_its_source(model_copy, capsys):
    before = snapshot(model_copy)
    quant_fails([model_copy, model_copy], capsys, f"destination {model_copy} is the source folder")
    quant_fails([model_copy, model_copy + "/../model"], capsys, "is the source folder")
    assert snapshot(model_copy) == before


def test_quantize_checks_before_writing(model_copy, config, tmp_path, capsys):
    (tmp_path / "file").write_text("kept")
    quant_fails([model_copy, str(tmp_path / "file")], capsys, "exists and is not a folder")
    quant_fails([model_copy, str(tmp_path / "file" / "out")], capsys, "cannot make the destination folder")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text("{}")
    quant_fails([model_copy, str(sharded)], capsys, "holds a sharded checkpoint")
    assert (tmp_path / "file").read_text() == "kept" and os.listdir(sharded) == ["model.safetensors.index.json"]
    dst = str(tmp_path / "out")
    quant_fails([str(tmp_path / "nothing"), dst], capsys, f"source folder {tmp_path / 'nothing'} does not exist")
    os.remove(os.path.join(model_copy, "config.json"))
    quant_fails([model_copy, dst], capsys, "no config.json")
    write_config(model_copy, edited(config, n_shared_experts=-1))
    quant_fails([model_copy, dst], capsys, "n_shared_experts")
    write_config(model_copy, config)
    tensors = load_file(os.path.join(model_copy, "model.safetensors"))
    save_file({**tensors, "model.norm.weight": tensors["model.norm.weight"].to(torch.int64)},
              os.path.join(model_copy, "model.safetensors"))
    quant_fails([model_copy, dst], capsys, "model.norm.weight: torch.int64")
    assert not os.path.exists(dst)  # not even the folder


def test_quantize_writes_whole_files_or_none(shipped, tmp_path, capsys, monkeypatch):
    dst = str(tmp_path / "out")
    assert quantize_cli.main([shipped, dst]) == 0
    written = snapshot(dst)
    assert sorted(written) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]

    def save_part(tensors, path, metadata=None):  # a disk that fills up halfway through the weights
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quantize_cli, "save_file", save_part)
    quant_fails([shipped, dst], capsys, "No space left on device")
    assert snapshot(dst) == written  # the earlier copy, whole, and no temporary file
    quant_fails([shipped, str(tmp_path / "new")], capsys, "No space left on device")
    assert not os.path.exists(tmp_path / "new")
