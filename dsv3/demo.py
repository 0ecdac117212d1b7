"""A small random DeepSeek-V3-architecture model (MLA with low-rank q/kv and YaRN, a dense layer,
DeepSeekMoE with shared experts) decoding greedily on each kernel backend in fp32, bf16 and FP8,
against the fp32 reference path (the torch backend). The kernels alone have their own demo:
python -m dsv3_kernels.demo.
Run: python -m dsv3.demo [--device cpu|cuda] [--steps N]
"""

import argparse
import time

import torch

import dsv3_kernels as dk
from dsv3_kernels.reference.fp8 import calc_diff
from dsv3_kernels.utils import cdiv

from .cache import decode_batch, prefill_batch
from .config import tiny
from .load import check_device
from .model import Transformer
from .testing import init_random_


# the demo's model and prompt: its steps must fit the model's positions
ARGS = dict(hidden_size=256, q_lora_rank=128, num_hidden_layers=3, vocab_size=1024)
PROMPT_LEN = 24


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dsv3.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=16, help="greedy tokens per model (default 16)")
    args = parser.parse_args(argv)
    most = tiny(**ARGS).max_position_embeddings - PROMPT_LEN
    if not 1 <= args.steps <= most:
        parser.error(f"--steps must be >= 1 and <= {most} (the demo model's positions after its prompt), "
                     f"got {args.steps}")
    try:
        args.device = str(check_device(args.device))
    except ValueError as e:
        parser.error(f"--{e}")
    torch.manual_seed(0)
    print(f"dsv3_kernels {dk.__version__}: {dk._native.status()}; torch {torch.__version__}, device {args.device}")
    model_demo(args.device, args.steps)


def model_demo(dev, steps=16):
    """Greedy decoding of one random model on each backend (fp32, bf16, FP8 weights), fed the
    fp32 reference's tokens so that every step compares logits of the same inputs."""
    args = tiny(**ARGS)
    print(f"Model: DeepSeek-V3 architecture, random weights: {args.num_hidden_layers} layers (MLA with q/kv low rank "
          f"and YaRN, {args.first_k_dense_replace} dense + DeepSeekMoE {args.n_routed_experts} experts top-"
          f"{args.num_experts_per_tok} + shared), hidden {args.hidden_size}, vocab {args.vocab_size}")
    reference = init_random_(Transformer(args, torch.float32, fp8=False, device=dev, backend="torch"), std=0.05)
    prompt = torch.randint(0, args.vocab_size, (PROMPT_LEN,), device=dev)

    def generate(model, follow=None):
        """Greedy decoding (or feeding `follow`'s tokens): (tokens, logits of every step, decode tokens/s)."""
        num_blocks = cdiv(len(prompt) + steps, 64)
        cache = model.new_cache(num_blocks=num_blocks, block_size=64)
        blocks = cache.allocator.allocate(num_blocks)
        logits = [model(prompt, prefill_batch([(len(prompt), blocks)], cache, dev), cache)]
        tokens = [int(logits[-1].argmax())]
        start = time.perf_counter()
        for i in range(steps - 1):
            step = decode_batch([(len(prompt) + i, blocks)], cache, dev)
            fed = tokens[-1] if follow is None else follow[i]
            logits.append(model(torch.tensor([fed], device=dev), step, cache))
            tokens.append(int(logits[-1].argmax()))
        return tokens, torch.cat(logits), (steps - 1) / (time.perf_counter() - start)

    want, exact, rate = generate(reference)
    print(f"greedy tokens of the fp32 reference path: {want}")
    print(f"{'model':>16s} {'decode tokens/s':>16s} {'logits calc_diff':>17s} {'same argmax':>12s}  "
          "(fed the reference's tokens)")
    print(f"{'fp32 reference':>16s} {rate:16.1f} {0:17.1e} {steps:>9d}/{steps}")
    for backend in dk.available_backends("fused_moe", dev):
        if backend == "torch" or (backend == "triton" and dev == "cpu"):
            continue
        for dtype, fp8 in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
            model = Transformer(args, dtype, fp8=fp8, device=dev, backend=backend)
            model.load_state_dict(_converted(reference.state_dict(), model), strict=True)
            model.reset_absorbed()
            got, logits, rate = generate(model, follow=want)
            same = int((logits.argmax(-1) == exact.argmax(-1)).sum())
            name = f"{backend} {'fp8' if fp8 else str(dtype)[6:]}"
            print(f"{name:>16s} {rate:16.1f} {calc_diff(logits, exact):17.1e} {same:>9d}/{steps}")
    print("(FP8 also quantizes the activations; with random weights that moves near-tied expert choices)")


def _converted(state, model):
    """The reference's fp32 weights in `model`'s formats (FP8 quantized with 128x128 scales)."""
    out = {}
    targets = model.state_dict()
    for name, t in targets.items():
        if name.endswith("_scale_inv"):
            continue
        w = state[name]
        if t.dtype == torch.float8_e4m3fn:  # X.weight -> X.weight_scale_inv, experts.w13 -> experts.w13_scale_inv
            scale_name = name + "_scale_inv"
            pairs = [dk.weight_quant(x) for x in (w if w.dim() == 3 else w[None])]
            q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            out[name], out[scale_name] = (q, s) if w.dim() == 3 else (q[0], s[0])
        else:
            out[name] = w.to(t.dtype)
    return out


if __name__ == "__main__":
    main()
