"""Batched generation on dsv3.model.Transformer, and the `python -m dsv3.generate` command line.

This module is the command line: it loads a model folder (default: the shipped dsv3/default_model),
encodes the prompts, runs them through dsv3.generator.Generator and prints the text (one prompt
streams as it comes) and a stats line on stderr. Under torchrun every rank runs it: --parallel tp
(each rank a slice of every layer, the same steps) or ep (each rank its own prompts); rank 0 prints.
The generation itself is in dsv3/generator.py, the token choice in dsv3/sampling.py.

    python -m dsv3.generate --model DIR --prompt "def fib(n):" [--prompt ...] [--interactive]
"""

import argparse
import logging
import os
import sys

import torch

from .cache import CACHE_DTYPE_HELP, CACHE_DTYPES, CacheFullError
from .generator import GenerationStats, Generator
from .parallel import MODES, Parallel, per_token
from .sampling import SamplingParams

# The model folder the command line uses without --model.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


class TextStream:
    """Turns token ids arriving one at a time into text pieces whose concatenation is the
    tokenizer's decoding of all of them. A byte-level token may end inside a UTF-8 character
    (decoded as U+FFFD); such text is held back until the character is complete."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """The text still held back (at the end of the stream)."""
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text):
        piece, self.shown = text[self.shown:], len(text)
        return piece


def _parser():
    p = argparse.ArgumentParser(prog="python -m dsv3.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"model folder: config.json, safetensors, tokenizer.json "
                                                 f"(default: {DEFAULT_MODEL})")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: the prompts run as one batch)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line, until EOF or "
                                                              "an empty line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backend", choices=["auto", "cuda", "triton", "cpu", "torch"], default="auto",
                   help="dsv3_kernels backend of every op (auto: the dispatch rule)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--fp8", action="store_true", help="quantize a bf16/fp32 checkpoint to FP8 on load")
    p.add_argument("--parallel", choices=MODES, default="tp",
                   help="under torchrun: tp (tensor parallel, default) or ep (each rank its own share of the "
                        "prompts with its own cache, routed experts split over ranks, tokens sent to them all-to-all)")
    p.add_argument("--fp8-dispatch", action="store_true", help="--parallel ep: send the tokens to the experts in "
                                                               "FP8 (e4m3 + 1x128 scales: about half the bytes)")
    p.add_argument("--eplb", metavar="FILE", default=None,
                   help="--parallel ep: redundant experts placed by DeepSeek's EPLB rule from the expert loads in FILE "
                        "(python -m dsv3.evaluate --expert-load FILE)")
    p.add_argument("--redundant-experts", type=int, default=0, help="with --eplb: extra expert slots in all (a "
                                                                    "multiple of the ranks with n_routed_experts)")
    p.add_argument("--kv-cache-dtype", choices=sorted(CACHE_DTYPES), default=None, help=CACHE_DTYPE_HELP)
    p.add_argument("--speculative", choices=["none", "mtp"], default=None,
                   help="mtp: draft with the checkpoint's multi-token-prediction module and verify two tokens per "
                        "step (default when the checkpoint has one); none: one token per step")
    return p


def _option(message: str) -> str:
    """A check's message "field_name must ..." as the option's: "--field-name must ..."."""
    name, _, rest = message.partition(" ")
    return f"--{name.replace('_', '-')} {rest}"


def _not_utf8(text: str):
    """Why a prompt is not UTF-8 text, or None. Undecodable bytes of argv (and of stdin, read with
    surrogateescape) arrive as lone surrogates, which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        byte = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"code point U+{c:04X}"
        return f"is not valid UTF-8 text ({byte} at character {e.start})"
    return None


def _encode(generator, tokenizer, texts):
    bos = generator.model.args.bos_token_id
    return [([] if bos is None else [bos]) + tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def _print_stats(s: GenerationStats, generator, out):
    rate = "no decode step" if s.decode_tokens_per_s is None else \
        f"decode {s.decode_tokens_per_s:.1f} tokens/s ({s.decode_tokens} tokens)"
    if s.acceptance_rate is not None:
        rate += f", MTP drafts accepted {s.acceptance_rate:.1%}, {s.tokens_per_step:.2f} tokens per step"
    print(f"time to first token {s.ttft_s * 1e3:.1f} ms ({s.prefill_tokens} prompt tokens), {rate}; "
          f"KV cache {generator.cache.bytes_per_token} bytes per token", file=sys.stderr if out is sys.stdout else out,
          flush=True)


def _run_expert_parallel(generator, tokenizer, texts, params, out):
    """--parallel ep: rank r generates prompts r, r + world, ...; rank 0 prints every text in
    prompt order as one process does (without streaming) and the stats of all ranks together
    (decode tokens/s: all ranks' tokens over the slowest rank's decode time)."""
    import torch.distributed as dist
    par = generator.model.parallel
    prompts = _encode(generator, tokenizer, texts)
    generator.check_prompts(prompts, params.max_new_tokens)  # all ranks, all prompts
    mine = list(range(par.rank, len(texts), par.world))
    outputs = generator.run([prompts[i] for i in mine], params)
    gathered = [None] * par.world
    dist.all_gather_object(gathered, (mine, outputs, generator.last_stats, par.traffic))
    if par.rank != 0:
        return
    new = {i: o for ids, outs, _, _ in gathered for i, o in zip(ids, outs)}
    for i, text in enumerate(texts):
        print(text + tokenizer.decode(new[i]) if len(texts) == 1 else
              f"--- prompt {i} ---\n{text}{tokenizer.decode(new[i])}", file=out, flush=True)
    stats = [g[2] for g in gathered]
    _print_stats(GenerationStats(prefill_tokens=sum(s.prefill_tokens for s in stats),
                                 ttft_s=max(s.ttft_s for s in stats), decode_tokens=sum(s.decode_tokens for s in stats),
                                 decode_s=max(s.decode_s for s in stats)), generator, out)
    traffic = per_token([g[3] for g in gathered])
    if traffic is not None:
        from .moe import Experts
        slots = next(m.num_slots for m in generator.model.modules() if isinstance(m, Experts))
        print(f"expert parallel over {par.world} ranks ({slots} expert slots per MoE layer): "
              f"{traffic['bytes']:.0f} bytes sent per token per MoE layer "
              f"({traffic['rows']:.3f} rows, dispatch and return; {traffic['bytes_to_other_ranks']:.0f} to other "
              f"ranks)", file=sys.stderr if out is sys.stdout else out, flush=True)


def _run(generator, tokenizer, texts, params: SamplingParams, out, echo=True):
    """Generate for the prompt texts and print them to `out`; one prompt streams its tokens as they
    come (after the prompt itself with `echo`)."""
    if generator.model.parallel.expert_parallel:
        return _run_expert_parallel(generator, tokenizer, texts, params, out)
    prompts = _encode(generator, tokenizer, texts)
    generator.check_prompts(prompts, params.max_new_tokens)  # before printing anything
    stream = TextStream(tokenizer) if len(texts) == 1 else None
    if stream is not None and echo:
        print(texts[0], end="", file=out, flush=True)

    def on_token(i, token):
        print(stream.push(token), end="", file=out, flush=True)

    outputs = generator.run(prompts, params, on_token=on_token if stream is not None else None)
    if stream is not None:
        print(stream.flush(), file=out, flush=True)
    else:
        for i, (text, new) in enumerate(zip(texts, outputs)):
            print(f"--- prompt {i} ---\n{text}{tokenizer.decode(new)}", file=out, flush=True)
    _print_stats(generator.last_stats, generator, out)


def _load(args, par: Parallel, device):
    """(tokenizer, model) of --model (default: the shipped one) as args ask; this rank's part of the
    model. Raises FileNotFoundError or ValueError (ConfigError, CheckpointError, --eplb's file)."""
    from .load import load, load_tokenizer
    model_dir = DEFAULT_MODEL if args.model is None else args.model
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    if args.eplb and par.world > 1:
        from . import eplb
        from .config import ModelArgs
        config = ModelArgs.from_json(model_dir)
        moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        par = Parallel("ep", par.rank, par.world, args.fp8_dispatch,
                       eplb.plan(args.eplb, moe_layers, par.world, args.redundant_experts))
    tokenizer = load_tokenizer(model_dir)  # first: a missing tokenizer fails before a long load
    model = load(model_dir, dtype=getattr(torch, args.dtype), device=device, fp8=True if args.fp8 else None,
                 backend=None if args.backend == "auto" else args.backend, mtp=not par.expert_parallel, parallel=par)
    return tokenizer, model


def main(argv=None):
    """The command line (see _parser). Returns 0; an unusable argument, model folder or prompt
    exits with status 2 and a one-line message, as argparse does."""
    parser = _parser()
    args = parser.parse_args(argv)

    def fail(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    logging.basicConfig(format="%(message)s")  # does nothing where the root logger has handlers already
    logging.getLogger("dsv3").setLevel(logging.INFO)  # the loader's progress lines
    if not args.prompt and not args.interactive:
        fail("give --prompt TEXT (repeatable) or --interactive")
    if any(not t for t in args.prompt):
        fail("--prompt is empty")
    for t in args.prompt:
        if why := _not_utf8(t):
            fail(f"--prompt {why}")
    if (args.fp8_dispatch or args.eplb) and args.parallel != "ep":
        fail(f"{'--fp8-dispatch' if args.fp8_dispatch else '--eplb'} needs --parallel ep")
    from .load import check_backend, check_device
    try:  # the arguments' own checks, before the model is read
        device = str(check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        check_backend(None if args.backend == "auto" else args.backend, torch.device(device))
        SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)  # before joining torchrun's group
    except ValueError as e:  # "device ...", "backend ...", "top_p ..."
        fail(_option(str(e)))
    # under torchrun (WORLD_SIZE > 1): tensor parallelism, every rank runs the same steps on the
    # same gathered logits (one seed for all); or expert parallelism, each rank its own prompts
    # (seed + rank). Rank 0 prints.
    par = Parallel.from_env(torch.device(device).type, args.parallel, args.fp8_dispatch)
    seed = args.seed
    if par.world > 1:
        if args.interactive:
            fail("--interactive runs in one process (no torchrun)")
        if torch.device(device).type == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        seed = (0 if seed is None else seed) + (par.rank if args.parallel == "ep" else 0)
    try:  # this rank's seed
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, seed)
    except ValueError as e:
        fail(_option(str(e)))
    if args.model is None and not os.path.isdir(DEFAULT_MODEL):
        fail(f"no --model given and the default model folder {DEFAULT_MODEL} does not exist; "
             f"pass --model DIR (a folder with config.json, safetensors and tokenizer.json)")
    out = sys.stdout if par.rank == 0 else open(os.devnull, "w")
    try:
        tokenizer, model = _load(args, par, device)
    except (OSError, ValueError) as e:  # ValueError: ConfigError, CheckpointError, --eplb's file
        fail(str(e))
    try:
        generator = Generator(model, tokenizer, kv_cache_dtype=CACHE_DTYPES.get(args.kv_cache_dtype),
                              speculative=args.speculative)
    except ValueError as e:  # --speculative mtp without an MTP module, or with --parallel ep
        fail(str(e).replace("speculative=", "--speculative "))
    try:
        if args.prompt:
            _run(generator, tokenizer, args.prompt, params, out)
    except (ValueError, CacheFullError) as e:  # prompts too long for the model or for the cache
        fail(str(e))
    finally:
        par.shutdown()
    if args.interactive and hasattr(sys.stdin, "reconfigure"):
        # a line that is not UTF-8 is reported and skipped (strict decoding would raise and drop the
        # rest of what was read with it)
        sys.stdin.reconfigure(errors="surrogateescape")
    while args.interactive:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            break
        if why := _not_utf8(line):
            print(f"error: the line {why}", file=sys.stderr, flush=True)
            continue
        try:
            _run(generator, tokenizer, [line], params, sys.stdout, echo=False)
        except (ValueError, CacheFullError) as e:  # one bad prompt does not end the session
            print(f"error: {e}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
