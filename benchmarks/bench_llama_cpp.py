"""dsv3 side by side with llama.cpp on the same weights: CPU, B=1, one thread (optional, not in CI).

Skipped unless LLAMA_CPP_DIR names a llama.cpp CMake build directory with bin/llama-bench (the
source tree, for convert_hf_to_gguf.py, is read from its CMakeCache.txt; LLAMA_CPP_CONVERT
overrides it). A run compares one llama.cpp build with the package at one CPU ISA (the kernels
read DSV3_KERNELS_CPU_ISA once per process), so the AVX2 comparison is a second run:
    LLAMA_CPP_DIR=/work/llama/build-native pytest benchmarks/bench_llama_cpp.py -s
    DSV3_KERNELS_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        LLAMA_CPP_DIR=/work/llama/build-avx2 pytest benchmarks/bench_llama_cpp.py -s
(the ATen / oneDNN / MKL caps keep torch's own ops, and so the fp32 reference path, off AVX-512 too).

Pairs: dsv3 cpu backend FP8 (e4m3 + 128x128 scales) vs llama.cpp q8_0, dsv3 cpu bf16 vs llama.cpp
bf16, and dsv3's fp32 `torch` reference path alone. Phases: prefill of a 128-token prompt
(tokens/s = 128 / time to first token) and decode (tokens/s over N steps, one token per step,
from a one-token context; llama-bench's tg N from an empty one). The package runs
dsv3.generate.Generator (speculative "none", EOS ignored so that every run decodes N tokens, as
llama-bench does); llama.cpp runs llama-bench -t 1 -r 1 --repack 0, its defaults otherwise (flash
attention auto, f16 cache). Each pair alternates the two sides for LLAMA_BENCH_ROUNDS rounds
(default 5); rows hold the medians and every sample.
Models: "default" is dsv3/default_model (4.7M, FP8; its bf16 side dequantized on load, the GGUFs
made from an fp32 dequantized copy): it fits in the caches, so it measures per-token overheads.
"v3-1.3b" is V3_1_3B below with random weights (bf16; the FP8 side made by dsv3.quantize):
memory-bound decode. Converted checkpoints are cached in LLAMA_BENCH_CACHE (default: the temp
dir). Decode rows give the bytes of weights a token streams (the tensors it touches as each side
stores them: routed experts top-k of E, no embedding) and the fraction of the one-thread read
bandwidth (an fp32 gemv over 512 MiB, measured every round) they are streamed at ("of read",
median over rounds). The package's bf16 prefill runs F.linear in oneDNN, which uses AMX where the
CPU has it (llama.cpp's q8_0 / bf16 do not), and an AVX2-capped oneDNN's bf16 is slow.
test_llama_cpp_matches_reference (needs llama-debug and llama-simple in the build) checks that
llama.cpp's f32 GGUF of the default model gives the fp32 reference path's logits and greedy text.
"""

import functools
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import save_file

import conftest
import dsv3_kernels as dk
import dsv3_kernels._native as native
import roofline
from dsv3.cache import prefill_batch
from dsv3.config import ModelArgs
from dsv3.generate import DEFAULT_MODEL, Generator
from dsv3.load import _open, checkpoint_files, load, load_tokenizer
from dsv3.quantize import quantize_checkpoint

LLAMA_DIR = os.environ.get("LLAMA_CPP_DIR")
ROUNDS = int(os.environ.get("LLAMA_BENCH_ROUNDS", "5"))
CACHE = os.environ.get("LLAMA_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "dsv3-llama-bench"))
PROMPT = 128
GEN = {"default": 128, "v3-1.3b": 64}  # decode steps (fewer on 1.3B: the fp32 path takes ~1 s each)
# (dsv3 provider, its llama.cpp counterpart's GGUF type or None)
PAIRS = [("cpu-fp8", "q8_0"), ("cpu-bf16", "bf16"), ("torch-fp32", None)]
# DeepSeek-V3's structure at ~1.3B parameters: MLA with q_lora, latent 512 + 64, 3 dense layers then
# MoE (1 shared + 32 routed in 8 groups, top-4 groups, top-4 experts, sigmoid + bias, scaling 2.5).
# 1.30e9 weights; a decode token touches 4.4e8 (attention 1.37e8, dense 0.94e8, shared + top-4
# experts 1.42e8, lm_head 0.67e8).
V3_1_3B = dict(vocab_size=32768, hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
             num_hidden_layers=12, num_attention_heads=16, q_lora_rank=768, qk_nope_head_dim=128, v_head_dim=128,
             n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=8, topk_group=4,
             first_k_dense_replace=3, max_position_embeddings=4096,
             rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                               mscale_all_dim=1.0, original_max_position_embeddings=1024))
# convert_hf_to_gguf.py names BPE pre-tokenizers by the hash of its check text's tokens and does not
# know the package's tokenizer (byte-level BPE with GPT-2's regex, no normalizer): llama.cpp's "gpt-2".
PRE_TOKENIZER = {"30cd77f5c57f004ae1a3f625fbb64794f3929c189f441db247d2cd91fb177ec0": "gpt-2"}
# Runs the converter with PRE_TOKENIZER registered (argv: converter, hashes as JSON, its arguments).
_CONVERT = """
import hashlib, json, os, runpy, sys
convert, known = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(convert))
from conversion.base import TextModel
original = TextModel.get_vocab_base_pre
check = next(c for c in original.__code__.co_consts if isinstance(c, str) and c.startswith("\\n \\n\\n \\n"))
def pre(self, tokenizer):
    h = hashlib.sha256(str(tokenizer.encode(check)).encode()).hexdigest()
    return known[h] if h in known else original(self, tokenizer)
TextModel.get_vocab_base_pre = pre
sys.argv = [convert] + sys.argv[3:]
runpy.run_path(convert, run_name="__main__")
"""


def _llama_paths():
    """(bin dir, convert_hf_to_gguf.py, build tag "native" / "avx512" / "avx2" / ..., source dir) of
    LLAMA_DIR."""
    with open(os.path.join(LLAMA_DIR, "CMakeCache.txt")) as f:
        cache = dict(re.findall(r"^(\w+):\w+=(.*)$", f.read(), re.M))
    source = cache["CMAKE_HOME_DIRECTORY"]
    convert = os.environ.get("LLAMA_CPP_CONVERT", os.path.join(source, "convert_hf_to_gguf.py"))
    isa = ["avx512", "avx2", "avx"]
    tag = "native" if cache.get("GGML_NATIVE") == "ON" else \
        next((x for x in isa if cache.get(f"GGML_{x.upper()}") == "ON"), "generic")
    return os.path.join(LLAMA_DIR, "bin"), os.path.abspath(convert), tag, source


pytestmark = pytest.mark.skipif(not LLAMA_DIR or not os.path.exists(os.path.join(LLAMA_DIR or "", "bin/llama-bench")),
                                reason="set LLAMA_CPP_DIR to a llama.cpp build with bin/llama-bench")


def _run(cmd):
    """stdout (bytes) of cmd; on failure an error with the end of its stderr."""
    p = subprocess.run(cmd, capture_output=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... exited with {p.returncode}:\n"
                           + p.stderr.decode(errors="replace")[-3000:])
    return p.stdout


# ---- the checkpoints, converted once ----

def _atomic_dir(path, write):
    """write(tmp) fills a fresh directory that becomes `path` only when complete."""
    if not os.path.isdir(path):
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        os.rename(tmp, path)
    return path


def _write_hf(dst, tensors, config, tokenizer_dir):
    assert config["scoring_func"] == "sigmoid"  # without it the converter silently writes softmax routing
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), dst)
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        tok = json.load(f)
    tok["add_bos_token"] = True  # dsv3's prompts start with BOS; llama.cpp's "gpt-2" default adds none
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(tok, f, indent=2)


def _dequantized(src, dst):
    """An fp32 copy of an FP8 checkpoint (what convert_hf_to_gguf.py reads)."""
    def write(tmp):
        out = {}
        for path in sorted(set(checkpoint_files(src).values())):
            with _open(path) as f:
                for name in f.keys():
                    if name.endswith("_scale_inv"):
                        continue
                    t = f.get_tensor(name)
                    if t.dtype == torch.float8_e4m3fn:
                        t = dk.weight_dequant(t, f.get_tensor(name + "_scale_inv"), torch.float32)
                    out[name] = t.float().contiguous()
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "float32"
        _write_hf(tmp, out, cfg, src)
    return _atomic_dir(dst, write)


def _random_v3(dst):
    """V3_1_3B with random weights in bf16, in Hugging Face's format (training/'s model writes it)."""
    from training.model import TrainableTransformer

    def write(tmp):
        args = ModelArgs(**V3_1_3B)
        torch.manual_seed(0)
        model = TrainableTransformer(args)
        model.init_weights()
        for m in model.moe_layers():  # a non-zero correction bias, as a trained model has
            m.gate.e_score_correction_bias.uniform_(0, 0.05)
        cfg = args.to_hf()
        cfg["torch_dtype"] = "bfloat16"
        _write_hf(tmp, model.hf_state_dict(torch.bfloat16), cfg, DEFAULT_MODEL)
    return _atomic_dir(dst, write)


def _gguf(hf_dir, outtype, convert):
    path = os.path.join(hf_dir, f"llama-{hashlib.sha256(convert.encode()).hexdigest()[:8]}-{outtype}.gguf")
    if not os.path.exists(path):
        _run([sys.executable, "-c", _CONVERT, convert, json.dumps(PRE_TOKENIZER), hf_dir, "--outtype", outtype,
              "--outfile", path + ".tmp"])
        os.rename(path + ".tmp", path)
    return path


@functools.lru_cache(maxsize=None)
def _model(name):
    """{"hf": {precision: checkpoint dir for dsv3}, "gguf_src": the dir the GGUFs are made from}."""
    os.makedirs(CACHE, exist_ok=True)
    if name == "default":
        with open(os.path.join(DEFAULT_MODEL, "model.safetensors"), "rb") as f:
            key = hashlib.sha256(f.read()).hexdigest()[:12]
        f32 = _dequantized(DEFAULT_MODEL, os.path.join(CACHE, f"default-{key}-f32"))
        return {"hf": dict.fromkeys(("fp8", "bf16", "fp32"), DEFAULT_MODEL), "gguf_src": f32}
    key = hashlib.sha256(json.dumps(V3_1_3B, sort_keys=True).encode()).hexdigest()[:12]
    bf16 = _random_v3(os.path.join(CACHE, f"v3-1.3b-{key}-bf16"))
    fp8 = _atomic_dir(os.path.join(CACHE, f"v3-1.3b-{key}-fp8"), lambda tmp: quantize_checkpoint(bf16, tmp))
    return {"hf": {"fp8": fp8, "bf16": bf16, "fp32": bf16}, "gguf_src": bf16}


# ---- bytes a step streams ----

def _expert_fraction(args, tokens):
    return roofline.experts_touched(tokens, args.num_experts_per_tok, args.n_routed_experts) / args.n_routed_experts


def _dsv3_weight_bytes(model, args, tokens):
    """Bytes of the weights a step of `tokens` tokens reads, as the model holds them."""
    total = 0
    for name, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        if "embed_tokens" in name:
            continue  # a row per token
        if ".mlp.experts." in name:
            n *= _expert_fraction(args, tokens)
        if "kv_b_proj" in name and tokens == 1:  # decode reads its absorbed copy, in the activations' dtype
            n = 0 if name.endswith("_scale_inv") else t.numel() * model.lm_head.weight.element_size()
        total += n
    return total


def _gguf_weight_bytes(path, args, tokens, convert):
    sys.path.insert(0, os.path.join(os.path.dirname(convert), "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    total = 0
    for t in GGUFReader(path).tensors:
        if t.name != "token_embd.weight":
            total += int(t.n_bytes) * (_expert_fraction(args, tokens) if "_exps." in t.name else 1)
    return total


@functools.lru_cache(maxsize=1)
def _read_buffer():
    return torch.ones(32768, 4096), torch.ones(4096)  # 512 MiB, far larger than the last-level cache


def read_gbps():
    """One thread's read bandwidth now (measured every round: on a busy machine it drifts): the best
    of 3 fp32 matrix-vector products over 512 MiB, a decode's access pattern (BLAS's gemv streams
    faster than a sum: 15 vs 11.5 GB/s on a Sapphire Rapids core)."""
    w, v = _read_buffer()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mv(w, v)
        best = min(best, time.perf_counter() - t0)
    return w.numel() * 4 / best / 1e9


# ---- the two sides ----

def _dsv3_rates(gen, prompt, steps):
    """(prefill tokens/s, decode tokens/s) of one round: a prefill of `prompt` after an untimed one
    (llama-bench runs a warm-up first too), then `steps` decode steps from a one-token context."""
    for _ in range(2):
        gen.generate([prompt], max_new_tokens=1)
    prefill = len(prompt) / gen.last_stats["ttft_s"]
    gen.generate([prompt[:1]], max_new_tokens=steps + 1)
    assert gen.last_stats["decode_tokens"] == steps
    return prefill, gen.last_stats["decode_tokens_per_s"]


def _llama_rates(bin_dir, gguf, steps):
    """(prefill tokens/s, decode tokens/s) of one llama-bench run (pp PROMPT, tg steps).
    --repack 0: without it a native build on a CPU with AMX puts the q8_0 weights in its AMX buffer,
    whose matmul does not take MLA's per-head products (attn_k_b / attn_v_b, non-contiguous input),
    and llama.cpp aborts (GGML_ASSERT in ggml_backend_sched_split_graph). On x86 no other repacking
    applies to q8_0 or bf16, and dsv3 uses no AMX either."""
    tests = json.loads(_run([os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-t", "1", "-r", "1", "--repack", "0",
                             "-p", str(PROMPT), "-n", str(steps), "-o", "json"]))
    return next(t for t in tests if t["n_gen"] == 0)["avg_ts"], next(t for t in tests if t["n_prompt"] == 0)["avg_ts"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as llama-bench -t 1
    roofline.hardware("cpu")  # named and measured at one thread
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("pair", PAIRS, ids=[p for p, _ in PAIRS])
@pytest.mark.parametrize("name", ["default", "v3-1.3b"])
def test_vs_llama_cpp(name, pair):
    provider, gguf_type = pair
    bin_dir, convert, build, source = _llama_paths()
    m = _model(name)
    backend, precision = provider.split("-")
    hf = m["hf"][precision]
    gguf = _gguf(m["gguf_src"], gguf_type, convert) if gguf_type else None
    args = ModelArgs.from_json(hf)
    steps = GEN[name]
    model = load(hf, torch.float32 if precision == "fp32" else torch.bfloat16, fp8=precision == "fp8",
                 backend=backend, progress=False, mtp=False)
    model.args.eos_token_id = None  # decode exactly `steps` tokens, as llama-bench does
    gen = Generator(model, speculative="none")
    prompt = torch.randint(2, args.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    _dsv3_rates(gen, prompt[:16], 4)  # warm-up (llama-bench warms up by itself)
    samples = {"dsv3": [], "llama": [], "read": []}
    for r in range(ROUNDS):  # alternate which side goes first, so drift favours neither
        for side in (("dsv3", "llama") if r % 2 == 0 else ("llama", "dsv3")):
            if side == "dsv3":
                samples["dsv3"].append(_dsv3_rates(gen, prompt, steps))
            elif gguf:
                samples["llama"].append(_llama_rates(bin_dir, gguf, steps))
        samples["read"].append(read_gbps())
    # bf16 prefill's F.linear runs in oneDNN, which uses AMX where the CPU has it (unless capped)
    common = dict(model=name, device="cpu", package_isa=native.cpu_isa(),
                  torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                  onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "host's best"), llama_cpp_build=build,
                  llama_cpp_source=source, read_gbps=statistics.median(samples["read"]), rounds=ROUNDS)
    sides = [(f"dsv3-{provider}", samples["dsv3"], lambda t: _dsv3_weight_bytes(model, args, t),
              f"llama.cpp-{gguf_type}" if gguf else None)]
    if gguf:
        sides.append((f"llama.cpp-{gguf_type}", samples["llama"],
                      lambda t: _gguf_weight_bytes(gguf, args, t, convert), None))
    for prov, rates, weight_bytes, baseline in sides:
        for i, (op, tokens, ctx) in enumerate((("prefill", PROMPT, 0), ("decode", 1, steps // 2))):
            tps = statistics.median(x[i] for x in rates)
            seconds = tokens / tps
            nbytes = weight_bytes(tokens)
            flops, _ = roofline.model_step_cost(args, 1, tokens, ctx)
            shape = f"{name} B=1 " + (f"T={PROMPT}" if op == "prefill" else f"gen={steps}")
            # each round's rate over the bandwidth measured in that round (the load drifts), median
            of_read = statistics.median(x[i] * nbytes / tokens / 1e9 / g for x, g in zip(rates, samples["read"]))
            conftest.record(dict(
                op=op, shape=shape, provider=prov, us=seconds * 1e6, tflops=flops / seconds / 1e12,
                mbytes=nbytes / 1e6, gbps=nbytes / seconds / 1e9,
                copy_fraction=nbytes / seconds / 1e9 / roofline.hardware("cpu")["peak_gbps"],
                roofline=roofline.roofline_fraction(seconds, flops, nbytes, "cpu", "bf16"), baseline=baseline,
                tokens_per_s=tps, read_fraction=of_read,
                samples_tokens_per_s=[x[i] for x in rates], **common))


def _markdown(rows):
    rows = [r for r in rows if "llama_cpp_build" in r]
    if not rows:
        return ""
    r0, reads = rows[0], [r["read_gbps"] for r in rows]
    out = [f"\n### dsv3 vs llama.cpp, B=1, one thread ({roofline.hardware('cpu')['name']}; medians of "
           f"{r0['rounds']} rounds)",
           f"package kernels: {r0['package_isa']} (torch ops: {r0['torch_cpu_capability']}, oneDNN: "
           f"{r0['onednn_max_isa']}); llama.cpp build: {r0['llama_cpp_build']} ({r0['llama_cpp_source']}); "
           f"one-thread read {min(reads):.1f}-{max(reads):.1f} GB/s (per pair), copy "
           f"{roofline.hardware('cpu')['peak_gbps']:.1f} GB/s\n",
           "| model | phase | dsv3 | tok/s | llama.cpp | tok/s | dsv3 / llama.cpp | weights MB/token | of read |",
           "|---|---|---|---:|---|---:|---:|---|---|"]
    by = {(r["op"], r["shape"], r["provider"]): r for r in rows}
    for r in rows:
        if not r["provider"].startswith("dsv3"):
            continue
        p = by.get((r["op"], r["shape"], r["baseline"]))
        cells = [r["model"], r["op"], r["provider"].removeprefix("dsv3-"), f"{r['tokens_per_s']:.1f}",
                 p["provider"].removeprefix("llama.cpp-") if p else "-", f"{p['tokens_per_s']:.1f}" if p else "-",
                 f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p else "-"]
        if r["op"] == "decode":  # dsv3 / llama.cpp
            cells += [" / ".join(f"{x['mbytes']:.1f}" for x in (r, p) if x),
                      " / ".join(f"{x['read_fraction']:.0%}" for x in (r, p) if x)]
        else:
            cells += ["-", "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


conftest.SUMMARIES.append(_markdown)


# ---- llama.cpp computes what the reference path computes ----

def test_llama_cpp_matches_reference(tmp_path):
    bin_dir, convert, *_ = _llama_paths()
    if not all(os.path.exists(os.path.join(bin_dir, b)) for b in ("llama-debug", "llama-simple")):
        pytest.skip("the build has no llama-debug / llama-simple")
    gguf = _gguf(_model("default")["gguf_src"], "f32", convert)
    text = "import os\nimport sys\n\n\ndef main(argv):\n"
    # an f32 cache and no flash attention: llama.cpp's defaults (f16 cache; CPU flash attention, which
    # rounds to f16 inside) move the logits by up to ~1e-3
    _run([os.path.join(bin_dir, "llama-debug"), "-m", gguf, "-t", "1", "-ctk", "f32", "-ctv", "f32", "-fa", "off",
          "-p", text, "--save-logits", "--logits-output-dir", str(tmp_path)])
    stem = os.path.join(tmp_path, "llamacpp-" + os.path.basename(gguf).removesuffix(".gguf"))
    ids = torch.from_file(stem + "-tokens.bin", size=os.path.getsize(stem + "-tokens.bin") // 4,
                          dtype=torch.int32).long()
    theirs = torch.from_file(stem + ".bin", size=os.path.getsize(stem + ".bin") // 4, dtype=torch.float32)
    model = load(DEFAULT_MODEL, torch.float32, fp8=False, backend="torch", progress=False, mtp=False)
    tok = load_tokenizer(DEFAULT_MODEL)
    assert ids.tolist() == [model.args.bos_token_id] + tok.encode(text, add_special_tokens=False).ids
    cache = model.new_cache(num_blocks=4, block_size=64)
    with torch.inference_mode():
        ours = model(ids, prefill_batch([(len(ids), cache.allocator.allocate(1))], cache), cache)[0]
    err = (ours - theirs).abs().max().item()
    print(f"\nlast-token logits, llama.cpp f32 vs dsv3 fp32 torch: max |diff| {err:.2e} "
          f"(max |logit| {ours.abs().max().item():.1f})")
    assert err < 2e-5

    # greedy: llama-simple prints the prompt (BOS included), the new tokens up to an EOS, a newline
    steps = 48
    out = _run([os.path.join(bin_dir, "llama-simple"), "-m", gguf, "-n", str(steps), text]).decode(errors="replace")
    new = Generator(model, speculative="none").generate([ids.tolist()], max_new_tokens=steps)[0]
    ours = text + tok.decode(new)
    same = out == tok.id_to_token(ids[0].item()) + ours + "\n"
    print(f"greedy, {len(new)} new tokens, identical: {same}\n{ours}")
    assert same
