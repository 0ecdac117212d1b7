"""The ceilings each benchmark result is compared with, and the bytes/FLOPs of the FP8 ops.

GPU: peak matrix rates from the vendor's datasheet (dense, no sparsity) and the copy
bandwidth *measured* on the device (a device-to-device copy; achievable, unlike the datasheet's).
CPU: every ceiling measured here: the copy bandwidth of a 256 MB tensor and the rates of large
fp32 and bf16 matmuls. The CPU has no fp8 arithmetic: the FP8 CPU kernels widen e4m3 exactly to
bf16 and use bf16 dot products, so their compute ceiling is the bf16 rate.
"""

import functools
import os
import time

import torch

# (fp8 dense TFLOP/s, bf16 dense TFLOP/s, memory TB/s) from NVIDIA datasheets, SXM parts.
_DATASHEET = {"H200": (1979.0, 989.0, 4.8), "H100": (1979.0, 989.0, 3.35), "H800": (1979.0, 989.0, 3.35)}


def _time(fn, reps):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _copy_gbps(device, nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / min(_time(lambda: dst.copy_(src), 5) for _ in range(3)) / 1e9


@functools.lru_cache(maxsize=None)
def hardware(device_type: str) -> dict:
    """Name and ceilings of the device benchmarks run on: peak_gbps, peak_tflops_{fp8,bf16,fp32}."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name(0)
        fp8, bf16, _ = next((v for k, v in _DATASHEET.items() if k in name), (None, None, None))
        return {"name": name, "peak_gbps": _copy_gbps("cuda", 2 << 30), "peak_tflops_fp8": fp8,
                "peak_tflops_bf16": bf16, "peak_tflops_fp32": None,
                "ceilings": "copy bandwidth measured; matrix rates from the datasheet"}
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048).to(dtype)
        rates[dtype] = 2 * 2048**3 / min(_time(lambda: a @ a, 3) for _ in range(3)) / 1e12
    bf16 = max(rates.values())  # a CPU without fast bf16 computes it no faster than fp32
    return {"name": _cpu_name(), "peak_gbps": _copy_gbps("cpu", 256 << 20), "peak_tflops_fp8": bf16,
            "peak_tflops_bf16": bf16, "peak_tflops_fp32": rates[torch.float32],
            "ceilings": f"measured: 256 MB copy, 2048^3 fp32/bf16 matmuls, {torch.get_num_threads()} threads"}


def last_level_cache_bytes(default=64 << 20):
    """The largest CPU cache of this host (Linux sysfs), or `default` where it cannot be read."""
    root, sizes = "/sys/devices/system/cpu/cpu0/cache", []
    for index in os.listdir(root) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, index, "size")) as f:
                text = f.read().strip()  # "491520K"
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
        except (OSError, ValueError):
            pass
    return max(sizes, default=default)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return "cpu"


def roofline_fraction(seconds, flops, nbytes, device_type, precision):
    """Achieved fraction of the roofline: the time the op cannot beat over the time it took."""
    hw = hardware(device_type)
    peak = hw[f"peak_tflops_{precision}"] or hw["peak_tflops_fp32"]
    floor = nbytes / (hw["peak_gbps"] * 1e9)
    if peak:
        floor = max(floor, flops / (peak * 1e12))
    return floor / seconds


# ---- bytes and FLOPs of the ops (inputs read once, outputs written once) ----

def gemm_cost(m, n, k, out_bytes=2, a_bytes=1, b_bytes=1):
    """An fp8 (1-byte) operand also reads its fp32 block scales: 1x128 for A, 128x128 for B."""
    scales = 4 * (m * k // 128 if a_bytes == 1 else 0) + 4 * (-(-n // 128) * k // 128 if b_bytes == 1 else 0)
    return 2 * m * n * k, m * k * a_bytes + n * k * b_bytes + scales + m * n * out_bytes


def act_quant_cost(m, k, in_bytes=2):
    return m * k, m * k * (in_bytes + 1) + 4 * m * -(-k // 128)


def weight_dequant_cost(n, k, out_bytes=2):
    return n * k, n * k * (1 + out_bytes) + 4 * -(-n // 128) * -(-k // 128)


def mla_decode_cost(batch, s_q, heads, seqlen, elt=2, head_dim=576, dv=512, token_bytes=None):
    """Absorbed MLA decode: scores (576 wide) and P @ V (512 wide) for every query row and key;
    bytes as FlashMLA counts them: the cache of every key once + q + out. token_bytes: one cached
    token's (default elt * head_dim; the FP8 cache: 656)."""
    flops = 2 * batch * s_q * heads * seqlen * (head_dim + dv)
    token_bytes = elt * head_dim if token_bytes is None else token_bytes
    nbytes = batch * seqlen * token_bytes + elt * batch * s_q * heads * (head_dim + dv)
    return flops, nbytes


def moe_route_cost(tokens, experts, topk, logit_bytes=4):
    """Routing reads the logits and the bias and writes weights and ids; its arithmetic (a sigmoid
    and a few comparisons per logit) is counted as one op per logit: it is memory-bound."""
    return tokens * experts, tokens * experts * logit_bytes + 4 * experts + 8 * tokens * topk


def experts_touched(tokens, topk, experts):
    """Expected number of distinct experts T tokens route to, each picking topk of E uniformly."""
    return experts * (1 - (1 - topk / experts) ** tokens)


def grouped_gemm_cost(tokens, topk, experts, n, k, elt=1):
    """tokens * topk rows through [N, K] expert weights: the weights of the touched experts read
    once (plus 128x128 scales for fp8), the rows read and the bf16 output written once."""
    rows = tokens * topk
    weights = experts_touched(tokens, topk, experts) * n * k * elt
    scales = 4 * (rows * k // 128 + experts_touched(tokens, topk, experts) * -(-n // 128) * (k // 128)) if elt == 1 else 0
    return 2 * rows * n * k, weights + scales + rows * k * elt + rows * n * 2


def fused_moe_cost(tokens, topk, experts, d, inter, elt=1):
    """A MoE layer's routed experts: 3 GEMMs of D x I per (token, choice). Bytes are the floor the
    issue's decode goal names: the selected experts' weights read once (+ fp8 scales), hidden
    read and the output written once (intermediates that stay on chip are not counted)."""
    flops = 6 * tokens * topk * d * inter
    touched = experts_touched(tokens, topk, experts)
    scales = 4 * touched * 3 * (d // 128) * (inter // 128) if elt == 1 else 0
    return flops, touched * 3 * d * inter * elt + scales + 4 * tokens * d


def moe_permute_cost(tokens, topk, d, in_bytes=2, out_bytes=2):
    """Each (token, choice) row read and written once, plus the ids and the inverse map."""
    rows = tokens * topk
    return rows, rows * d * (in_bytes + out_bytes) + 8 * rows


def rms_norm_cost(rows, d, elt=2, residual=False):
    """x (and residual) read, out (and residual_out) written once, the weight read once; FLOPs: the
    square-add and the two products per element (and the residual add)."""
    streams = 4 if residual else 2
    return rows * d * (4 if residual else 3), (rows * streams + 1) * d * elt


def model_step_cost(args, batch, new_tokens, context, weight_elt=2, cache_elt=2):
    """One forward step of a dsv3 Transformer over `batch` requests of `new_tokens` new tokens each,
    `context` tokens cached before them (args: dsv3.config.ModelArgs). Bytes: every weight a step
    touches read once (attention, dense MLPs, shared experts, gates, lm_head, and only the
    distinct routed experts the batch's tokens choose, uniform routes assumed; FP8 weights
    weight_elt=1 plus their 128x128 scales), the latent cache read once per request
    (576 x cache_elt per token and layer) and written for the new tokens. FLOPs: 2 per weight per
    token, plus the attention (scores over 576 and values over 512 per head and key)."""
    a = args
    t, h, d = batch * new_tokens, a.num_attention_heads, a.hidden_size
    q = d * a.q_lora_rank + a.q_lora_rank * h * a.qk_head_dim if a.q_lora_rank else d * h * a.qk_head_dim
    attn = q + d * 576 + 512 * h * (a.qk_nope_head_dim + a.v_head_dim) + h * a.v_head_dim * d
    dense = 3 * d * a.intermediate_size
    expert = 3 * d * a.moe_intermediate_size
    moe_layers = a.num_hidden_layers - a.first_k_dense_replace
    touched = experts_touched(t, a.num_experts_per_tok, a.n_routed_experts)
    scale = 4 / (128 * 128) if weight_elt == 1 else 0  # fp32 block scales per weight
    per_layer_weights = attn * a.num_hidden_layers + dense * a.first_k_dense_replace \
        + moe_layers * (a.n_shared_experts * expert + touched * expert)
    head = d * a.vocab_size
    gate = moe_layers * a.n_routed_experts * d * 4
    keys = context + new_tokens
    cache = a.num_hidden_layers * batch * (keys * 576 + new_tokens * 576) * cache_elt
    nbytes = per_layer_weights * (weight_elt + scale) + head * 2 + gate + cache
    used_per_token = attn * a.num_hidden_layers + dense * a.first_k_dense_replace \
        + moe_layers * (a.n_shared_experts + a.num_experts_per_tok) * expert + head + gate / 4
    flops = 2 * t * used_per_token + a.num_hidden_layers * t * h * keys * 2 * (576 + 512)
    return flops, nbytes
