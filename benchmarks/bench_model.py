"""The whole dsv3 model per backend, side by side with transformers' DeepseekV3 on the same weights.

CPU suite: a small DeepSeek-V3-architecture model (hidden 512, 4 layers of which 1 dense, 8 heads,
q_lora_rank 256, 32 routed experts top-4 in 4 groups + 1 shared, vocab 4096; the latent is the
real 512 + 64) written by transformers' save_pretrained in bf16 and loaded by both.
  prefill  B=1, 128 prompt tokens (one step; tokens/s = 128 / time)
  decode   B=1 and B=8 requests, 128 cached tokens each, one new token per request per step;
           transformers runs its DynamicCache one token at a time (eager attention), the baseline
Providers: dsv3-<backend>-<bf16|fp8> (fp8: quantized on load, 128x128 blocks) and
transformers-<dtype>. The roofline bytes of a decode step are model_step_cost's: the weights the
step touches (only the routed experts chosen) and the latent cache, read once.
Shipped model (CPU): dsv3/default_model's B=1 decode step over 128 cached tokens with its FP8
weights on the cpu backend at every CPU level the host has (cpu-fp8-<level>: no level may be slower
than scalar), bf16 on the cpu backend, and the fp32 torch reference path (the baseline). Threads:
the process's (OMP_NUM_THREADS=1 and =2 for the one- and two-thread rows).
GPU suite (CUDA only): a 4-layer slice of the 671B configuration with random FP8 weights, decode
at batch 1 and 64 over a 4096-token context; the goal is a step within 1.5x of the time to read
the weights and cache it touches once.
Run: pytest benchmarks/bench_model.py [--device cpu|cuda]
"""

import functools

import pytest
import torch

import dsv3_kernels as dk
import dsv3_kernels._native as native
import roofline
from conftest import device_of
from dsv3.cache import decode_batch, prefill_batch
from dsv3.config import ModelArgs, deepseek_v3_671b
from dsv3.generate import DEFAULT_MODEL
from dsv3.load import load
from dsv3.model import Transformer
from dsv3.testing import init_random_

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=64,
             qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
             n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096,
             routed_scaling_factor=2.5)
PROMPT, CONTEXT = 128, 128
BASELINE = "transformers-bf16"


def pytest_generate_tests(metafunc):
    device = device_of(metafunc.config)
    if "provider" in metafunc.fixturenames:
        providers = [] if device != "cpu" else [
            f"dsv3-{b}-{p}" for b in dk.available_backends("fused_moe", "cpu") if b != "triton"
            for p in ("bf16", "fp8")] + ["transformers-bf16", "transformers-fp32"]
        metafunc.parametrize("provider", providers)
        metafunc.parametrize("phase", ["prefill", "decode-B1", "decode-B8"])
    if "shipped_provider" in metafunc.fixturenames:
        levels = native.host_cpu_isa_levels() if native.loaded() else ()
        providers = [] if device != "cpu" else (
            [f"cpu-fp8-{level}" for level in levels] + (["cpu-fp8-python", "cpu-bf16"] if levels else [])
            + ["torch-fp32"])
        metafunc.parametrize("shipped_provider", providers)


@functools.lru_cache(maxsize=None)
def _checkpoint(tmp_dir):
    cfg = transformers.DeepseekV3Config(**SMALL, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.uniform_(0, 0.05)
    hf.to(torch.bfloat16).save_pretrained(tmp_dir)
    return tmp_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(str(tmp_path_factory.mktemp("bench_model")))


def _dsv3_steps(path, backend, precision):
    """(prefill(), decode(B)) closures over a model loaded from `path` and its cache."""
    model = load(path, torch.bfloat16, fp8=precision == "fp8", backend=backend, progress=False)
    cache = model.new_cache(num_blocks=64, block_size=64)
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT,))
    blocks = [cache.allocator.allocate(cache.blocks_for(CONTEXT + 1)) for _ in range(8)]
    for b in blocks:  # every request's context, written by a prefill
        model(ids[:CONTEXT], prefill_batch([(CONTEXT, b)], cache), cache)
    prefill_blocks = cache.allocator.allocate(cache.blocks_for(PROMPT))

    def prefill():
        return model(ids, prefill_batch([(PROMPT, prefill_blocks)], cache), cache)

    def decode(batch):
        step = decode_batch([(CONTEXT, b) for b in blocks[:batch]], cache)
        return lambda: model(ids[:batch], step, cache)
    return prefill, decode


def _hf_steps(path, dtype):
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    ids = torch.randint(0, SMALL["vocab_size"], (8, max(PROMPT, CONTEXT + 1)))

    @torch.no_grad()
    def prefill():
        return hf(ids[:1]).logits

    def decode(batch):
        with torch.no_grad():
            past = hf(ids[:batch, :CONTEXT], use_cache=True).past_key_values  # a DynamicCache
        nxt = ids[:batch, CONTEXT:CONTEXT + 1]

        @torch.no_grad()
        def step():  # one token on a cache of CONTEXT tokens (cropped back, so every step is alike)
            out = hf(nxt, cache=past, use_cache=True).logits
            past.crop(-1)
            return out
        return step
    return prefill, decode


@functools.lru_cache(maxsize=1)  # the phases of one provider run one after the other
def _steps(path, provider):
    kind, *rest = provider.split("-")
    if kind == "dsv3":
        return _dsv3_steps(path, rest[0], rest[1])
    return _hf_steps(path, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[rest[0]]))


def test_model_cpu(bench, checkpoint, provider, phase):
    args = ModelArgs.from_json(checkpoint)
    prefill, decode = _steps(checkpoint, provider)
    fp8 = provider.endswith("fp8")
    welt = 1 if fp8 else 4 if provider.endswith("fp32") else 2
    if phase == "prefill":
        fn, batch, new, ctx, shape = prefill, 1, PROMPT, 0, f"B=1 T={PROMPT}"
    else:
        batch = int(phase.split("B")[1])
        fn, new, ctx, shape = decode(batch), 1, CONTEXT, f"B={batch} ctx={CONTEXT}"
    flops, nbytes = roofline.model_step_cost(args, batch, new, ctx, welt)
    row = bench(fn, lambda: (), op=phase.split("-")[0], shape=shape, provider=provider, flops=flops, nbytes=nbytes,
                precision="fp8" if fp8 else "bf16", baseline=BASELINE)
    row["tokens_per_s"] = batch * new / (row["us"] * 1e-6)


@functools.lru_cache(maxsize=1)
def _shipped_step(backend, precision):
    """A B=1 decode step of the shipped model over CONTEXT cached tokens (the same slot each call)."""
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    model = load(DEFAULT_MODEL, dtype, fp8=precision == "fp8", backend=backend, mtp=False, progress=False)
    cache = model.new_cache(num_blocks=8, block_size=64)
    ids = torch.randint(0, model.args.vocab_size, (CONTEXT,), generator=torch.Generator().manual_seed(0))
    blocks = cache.allocator.allocate(cache.blocks_for(CONTEXT + 1))
    model(ids, prefill_batch([(CONTEXT, blocks)], cache), cache)
    return model, lambda: model(ids[:1], decode_batch([(CONTEXT, blocks)], cache), cache)


def test_shipped_decode_cpu(bench, shipped_provider):
    """cpu-fp8-LEVEL: the C++ decode step (dsv3/cpu_decode.py) at that CPU level; cpu-fp8-python:
    the Python forward over the same kernels at the host's level (what the C++ step saves)."""
    backend, precision, *level = shipped_provider.split("-")
    python = level == ["python"]
    level = [] if python else level
    model, step = _shipped_step(backend, precision)
    flops, nbytes = roofline.model_step_cost(model.args, 1, 1, CONTEXT, {"fp8": 1, "bf16": 2, "fp32": 4}[precision])
    before = native.cpu_isa()
    if level:
        native.set_cpu_isa(level[0])
    model.cpu_decode_step = not python
    try:
        row = bench(step, lambda: (), op="shipped-decode", shape=f"B=1 ctx={CONTEXT}", provider=shipped_provider,
                    flops=flops, nbytes=nbytes, precision="bf16" if precision == "fp32" else precision,
                    baseline="torch-fp32")
    finally:
        model.cpu_decode_step = True
        if level:
            native.set_cpu_isa(before)
    row["tokens_per_s"] = 1 / (row["us"] * 1e-6)


# ---- GPU: a 4-layer slice of DeepSeek-V3 671B ----

GPU_CONTEXT = 4096


@pytest.mark.parametrize("batch", [1, 64])
def test_v3_slice_decode_gpu(bench, device, batch):
    if device != "cuda":
        pytest.skip("the 671B slice runs on a GPU")
    args = deepseek_v3_671b()
    args.num_hidden_layers, args.first_k_dense_replace = 4, 1  # 1 dense + 3 MoE layers (V3: 3 + 58)
    model = init_random_(Transformer(args, torch.bfloat16, device="cuda"), seed=0)
    block = 64
    per_req = GPU_CONTEXT // block + 1
    cache = model.new_cache(num_blocks=batch * per_req, block_size=block)
    cache.kv.normal_()  # a full context of random latents
    blocks = [cache.allocator.allocate(per_req) for _ in range(batch)]
    step = decode_batch([(GPU_CONTEXT, b) for b in blocks], cache, "cuda")
    ids = torch.randint(0, args.vocab_size, (batch,), device="cuda")
    flops, nbytes = roofline.model_step_cost(args, batch, 1, GPU_CONTEXT, weight_elt=1)
    graph = _capture(lambda: model(ids, step, cache))
    bench(graph.replay, lambda: (), op="decode", shape=f"V3x4L B={batch} ctx={GPU_CONTEXT}",
          provider="dsv3-auto-fp8-graph", flops=flops, nbytes=nbytes, precision="fp8")


def _capture(fn):
    fn()  # lazy setup (absorbed weights, Triton compiles) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
