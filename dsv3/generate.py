"""Batched generation on dsv3.model.Transformer, and the `python -m dsv3.generate` command line.

Generator.generate runs every prompt's prefill together in one packed batch, then one decode step
(s_q = 1) per new token over the requests still running; a request ends at an EOS id or after
max_new_tokens, and its cache blocks go back to the pool then. On a GPU the decode steps replay
CUDA graphs (CudaGraphDecoder): one kernel launch sequence per step instead of one per op.

With a checkpoint that has a multi-token-prediction module (speculative="mtp", the default then),
each step instead verifies two tokens per request: the MTP module drafts the token after next, and
one target step with s_q = 2 (causal mla_decode) over [last token, draft] checks it. A request
advances by 1 token (draft rejected: the target's own choice replaces it) or 2 (draft accepted, plus
the target's next token); rejected cache slots are overwritten by the next step. Greedy output is
the non-speculative greedy output token for token; sampling is speculative sampling (the draft is
kept with probability min(1, p/q), else the token is drawn from max(p - q, 0) renormalized), which
draws from the same distribution as sample() (not the same draws for a seed). These steps run
eagerly (no CUDA graph: CudaGraphDecoder captures s_q = 1 only).

    python -m dsv3.generate --model DIR --prompt "def fib(n):" [--prompt ...] [--interactive]
"""

import argparse
import logging
import os
import sys
import time

import torch

from .cache import CACHE_DTYPES, Batch, CacheFullError, decode_batch, prefill_batch
from .parallel import MODES, Parallel, per_token

# The model folder the command line uses without --model.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")

# Decode batch sizes captured as CUDA graphs; a step of B requests replays the smallest size >= B.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits float32 [B, vocab] -> token ids int64 [B].

    temperature 0: argmax. Else a draw from softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches top_p (the most likely token is
    always in it, so a tiny top_p is greedy). generator: a torch.Generator on logits' device.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # stable: equal probabilities stay in id order, as argmax breaks ties
    probs, ids = probs.sort(dim=-1, descending=True, stable=True)
    keep = probs.cumsum(dim=-1) - probs < top_p  # the mass before a token is still short of top_p
    choice = torch.multinomial(probs * keep, 1, generator=generator)  # multinomial needs no renormalizing
    return ids.gather(-1, choice).squeeze(-1)


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution sample() draws from (temperature > 0): logits float32 [B, vocab] ->
    probabilities float32 [B, vocab] (zero outside the top_p set, renormalized)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return probs
    sorted_probs, ids = probs.sort(dim=-1, descending=True, stable=True)
    kept = sorted_probs * (sorted_probs.cumsum(dim=-1) - sorted_probs < top_p)
    out = torch.zeros_like(probs).scatter_(-1, ids, kept)
    return out / out.sum(dim=-1, keepdim=True)


def verify(target: torch.Tensor, draft: torch.Tensor, draft_probs, temperature: float, top_p: float,
           generator=None) -> list:
    """Speculative verification of one draft token per request.

    target: float32 [B, 2, vocab], the target's logits at the last token (they judge the draft) and
    at the draft (the next token if it is kept); draft int64 [B]; draft_probs float32 [B, vocab]:
    the distribution the drafts were drawn from (None when greedy). -> per request the new tokens,
    [draft, next] or [replacement]. Greedy: the draft is kept iff it is the target's argmax.
    Sampling: kept with probability min(1, p(draft) / q(draft)), else replaced by a draw from
    max(p - q, 0) renormalized; the result is distributed as a draw from p.
    """
    if temperature == 0:
        first, second = target[:, 0].argmax(dim=-1), target[:, 1].argmax(dim=-1)
        keep = first == draft
    else:
        p = probabilities(target[:, 0], temperature, top_p)
        rows = torch.arange(draft.shape[0], device=draft.device)
        ratio = p[rows, draft] / draft_probs[rows, draft]
        keep = torch.rand(draft.shape, generator=generator, device=draft.device) < ratio
        residual = (p - draft_probs).clamp_(min=0)
        # a rejection implies p(x) > q(x) somewhere; a row with no mass left is never used
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
        first = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
        second = sample(target[:, 1], temperature, top_p, generator)
    return [[d, s] if k else [f] for k, d, s, f in zip(keep.tolist(), draft.tolist(), second.tolist(),
                                                       first.tolist())]


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """Draft tokens from the MTP module's logits float32 [B, vocab] -> (ids int64 [B], the
    distribution they were drawn from float32 [B, vocab], None when greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1), None
    q = probabilities(logits, temperature, top_p)
    return torch.multinomial(q, 1, generator=generator).squeeze(-1), q


def check_sampling(max_new_tokens, temperature, top_p):
    """Raise ValueError naming the argument that generate() cannot take (the model's limits aside)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class CudaGraphDecoder:
    """model.forward of one decode step (s_q = 1), captured as CUDA graphs for the batch sizes
    GRAPH_BATCH_SIZES up to max_batch, over one cache.

    A graph reads fixed buffers, so a step copies its batch into them and replays the graph of the
    smallest captured size >= B. The extra rows are padding requests: slot_mapping -1 (the cache
    write skips them), cache_seqlens 0 (attention reads nothing and gives 0), block table row and
    position 0 (valid indices), token 0; their logits are dropped.
    """

    def __init__(self, model, cache, max_batch: int = GRAPH_BATCH_SIZES[-1]):
        self.sizes = [s for s in GRAPH_BATCH_SIZES if s <= max_batch]
        n, device = self.sizes[-1], model.device
        max_blocks = min(cache.blocks_for(model.args.max_position_embeddings), cache.kv.shape[1])
        with torch.inference_mode():  # the buffers are written inside generate's inference mode
            self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
            self.positions = torch.zeros(n, dtype=torch.int64, device=device)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
            self.block_table = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
            self.cache_seqlens = torch.zeros(n, dtype=torch.int32, device=device)
            self.logits_index = torch.arange(n, dtype=torch.int64, device=device)
        self.graphs, self.logits = {}, {}
        pool = None
        for bs in reversed(self.sizes):  # largest first: the smaller graphs fit in its memory pool
            batch = Batch(self.positions[:bs], self.slot_mapping[:bs], False, block_table=self.block_table[:bs],
                          cache_seqlens=self.cache_seqlens[:bs], logits_index=self.logits_index[:bs])
            # A plain run first (all padding: it writes nothing): lazy work such as building the
            # absorbed attention weights or compiling kernels must not happen during capture.
            model(self.input_ids[:bs], batch, cache)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = model(self.input_ids[:bs], batch, cache)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """input_ids int64 [B] and a decode Batch of B requests with s_q = 1 (on the CPU, as
        decode_batch builds it; B <= max_batch) -> logits float32 [B, vocab]. The result is a view
        of the graph's output: the next call overwrites it."""
        b = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= b)
        pad = bs - b
        width = batch.block_table.shape[1]
        self.input_ids[:bs].copy_(torch.cat([input_ids, input_ids.new_zeros(pad)]))
        self.positions[:bs].copy_(torch.cat([batch.positions, batch.positions.new_zeros(pad)]))
        self.slot_mapping[:bs].copy_(torch.cat([batch.slot_mapping, batch.slot_mapping.new_full((pad,), -1)]))
        self.cache_seqlens[:bs].copy_(torch.cat([batch.cache_seqlens, batch.cache_seqlens.new_zeros(pad)]))
        # Columns past `width` keep older steps' block ids: valid indices, past every request's length.
        self.block_table[:bs, :width].copy_(torch.cat([batch.block_table, batch.block_table.new_zeros(pad, width)]))
        self.graphs[bs].replay()
        return self.logits[bs][:b]


class Generator:
    """Generates from token-id prompts with `model` (dsv3.model.Transformer) over its own paged
    latent cache of num_blocks blocks of block_size tokens (default: room for one request of
    max_position_embeddings tokens, which the requests of a call share).

    tokenizer: kept for callers (the command line); generate works on ids. cuda_graph: replay
    decode steps as CUDA graphs (default: when the model is on a GPU); captured on first use,
    for up to GRAPH_BATCH_SIZES[-1] running requests (larger steps run eagerly). kv_cache_dtype:
    the cache's (model.new_cache: default the activations' dtype, or "fp8"). speculative: "mtp"
    (draft with the model's MTP module, see the module's doc; eager steps, no CUDA graph), "none",
    or None: "mtp" when the model has an MTP module.
    After each generate, last_stats holds its timings: prefill_tokens, ttft_s (prefill and the
    first token), decode_tokens, decode_s and decode_tokens_per_s (None without a decode step);
    with speculative "mtp" also decode_steps (request-steps), tokens_per_step (decode_tokens /
    decode_steps), drafts and acceptance_rate (drafts kept / drafts verified; None without a step).
    With expert parallelism (model.parallel, dsv3/parallel.py) each rank generates its own prompts (maybe none) and
    steps until every rank is done (a finished rank runs Transformer.idle steps), eagerly and
    without speculation.
    """

    def __init__(self, model, tokenizer=None, num_blocks=None, block_size=64, cuda_graph=None, kv_cache_dtype=None,
                 speculative=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_len = model.args.max_position_embeddings
        ep = model.parallel.expert_parallel
        if speculative is None:
            speculative = "mtp" if len(model.mtp) and not ep else "none"
        if speculative not in ("none", "mtp"):
            raise ValueError(f"speculative must be 'none', 'mtp' or None, got {speculative!r}")
        # a speculative step also runs the MTP layer's MoE: an idle rank's steps would have to match it
        # collective for collective (not done)
        if speculative == "mtp" and ep:
            raise ValueError("speculative='mtp' is not supported with expert parallelism; use speculative='none'")
        if speculative == "mtp" and not len(model.mtp):
            raise ValueError("speculative='mtp' needs a model with an MTP module (config num_nextn_predict_layers "
                             ">= 1 and its model.layers.{num_hidden_layers} tensors in the checkpoint)")
        self.speculative = speculative
        if num_blocks is None:
            num_blocks = -(-self.max_len // block_size)
        self.cache = model.new_cache(num_blocks, block_size, kv_cache_dtype, mtp=speculative == "mtp")
        # expert parallelism's all-to-all split sizes are host values: no graph capture
        self.cuda_graph = model.device.type == "cuda" and not ep if cuda_graph is None \
            else cuda_graph
        self._graphs = None
        self.last_stats = {}

    def validate(self, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0):
        """Raise ValueError, naming the argument, where generate() would refuse its arguments."""
        check_sampling(max_new_tokens, temperature, top_p)
        vocab = self.model.args.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty (a prompt needs at least one token)")
            if len(p) + max_new_tokens > self.max_len:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens; with max_new_tokens = {max_new_tokens} that is "
                                 f"{len(p) + max_new_tokens} > max_position_embeddings = {self.max_len}")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompts[{i}] has token id {bad[0]} outside the vocabulary [0, {vocab})")

    def _decode_logits(self, tokens, requests):
        """One decode step: tokens int64 [B] (CPU) after requests [(cached_tokens, block_ids)] ->
        logits float32 [B, vocab]."""
        device = self.model.device
        if self.cuda_graph:
            if self._graphs is None:
                self._graphs = CudaGraphDecoder(self.model, self.cache)
            if len(requests) <= self._graphs.max_batch:
                return self._graphs(tokens, decode_batch(requests, self.cache))
        return self.model(tokens.to(device), decode_batch(requests, self.cache, device), self.cache)

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None, on_token=None):
        """prompts: token-id lists (of different lengths) -> each one's new tokens (list[list[int]]).

        A request stops after max_new_tokens tokens or at a token of model.args.eos_token_ids; the
        EOS token is not returned. temperature 0 is greedy; else sampling with top_p (see sample())
        from a torch.Generator seeded with `seed` (None: a random seed), so a seed reproduces a run.
        on_token(i, token): called for each returned token of prompts[i] as soon as it is chosen.
        Raises ValueError for an invalid argument and CacheFullError when the cache has too few free
        blocks for prompt + max_new_tokens of every prompt (nothing is run then).
        """
        self.validate(prompts, max_new_tokens, temperature, top_p)
        par = self.model.parallel
        ep = par.expert_parallel  # every rank steps until all are done
        if not prompts and not ep:
            return []
        device, cache, eos = self.model.device, self.cache, set(self.model.args.eos_token_ids)
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            if seed is None:
                rng.seed()
            else:
                rng.manual_seed(seed)
        # The last new token is never fed back, so a request caches at most prompt + max_new_tokens - 1,
        # or one more with speculation (the draft after the last token but one).
        spec = self.speculative == "mtp"
        held = []
        try:
            for p in prompts:
                held.append(cache.allocator.allocate(cache.blocks_for(len(p) + max_new_tokens - 1 + spec)))
        except CacheFullError:
            for blocks in held:
                cache.allocator.free(blocks)
            raise
        outputs = [[] for _ in prompts]
        running = list(range(len(prompts)))  # requests not finished, in prompts' order

        def accept(new):
            """Record each running request's new tokens (a list per request, in order, up to an EOS
            or max_new_tokens); finished ones leave `running` and free their blocks. Returns the
            number of tokens taken (an ending EOS counts)."""
            taken = 0
            for i, tokens in zip(list(running), new):
                for t in tokens:
                    taken += 1
                    if t not in eos:
                        outputs[i].append(t)
                        if on_token is not None:
                            on_token(i, t)
                    if t in eos or len(outputs[i]) == max_new_tokens:
                        running.remove(i)
                        cache.allocator.free(held[i])
                        held[i] = None
                        break
            return taken

        try:
            start = time.perf_counter()
            ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
            if not prompts:  # expert parallelism: a rank with no requests
                self.model.idle()
            else:
                batch = prefill_batch([(len(p), held[i]) for i, p in enumerate(prompts)], cache, device)
                if spec:
                    steps = drafts = kept = 0
                    logits, h = self.model(ids, batch, cache, hidden=True)
                    tokens = sample(logits, temperature, top_p, rng)
                    draft, q = self._draft_prefill(prompts, tokens, h, batch, temperature, top_p, rng)
                    live = list(running)  # the requests whose drafts `draft` holds, in its order
                    accept([[t] for t in tokens.tolist()])
                else:
                    logits = self.model(ids, batch, cache)  # [len(prompts), vocab]: each prompt's last token
                    accept([[t] for t in sample(logits, temperature, top_p, rng).tolist()])
            first = time.perf_counter()
            decoded = 0
            while par.any_rank(bool(running), device) if ep else running:
                if not running:
                    self.model.idle()
                    continue
                requests = [(len(prompts[i]) + len(outputs[i]) - 1, held[i]) for i in running]
                if spec:
                    rows = [j for j, i in enumerate(live) if i in running]  # the running requests' drafts
                    live = list(running)
                    draft, q = draft[rows], None if q is None else q[rows]
                    new, draft, q = self._speculative_step(outputs, live, requests, draft, q, temperature, top_p,
                                                           rng)
                    steps += len(live)
                    drafts += len(live)
                    kept += sum(len(t) == 2 for t in new)
                    decoded += accept(new)
                else:
                    tokens = torch.tensor([outputs[i][-1] for i in running], dtype=torch.int64)
                    logits = self._decode_logits(tokens, requests)
                    decoded += len(running)
                    accept([[t] for t in sample(logits, temperature, top_p, rng).tolist()])
            end = time.perf_counter()
        finally:  # an exception (or Ctrl-C) must not leak blocks
            for blocks in held:
                if blocks is not None:
                    cache.allocator.free(blocks)
        self.last_stats = dict(prefill_tokens=ids.numel(), ttft_s=first - start, decode_tokens=decoded,
                               decode_s=end - first, decode_tokens_per_s=decoded / (end - first) if decoded else None)
        if spec:
            self.last_stats.update(decode_steps=steps, tokens_per_step=decoded / steps if steps else None,
                                   drafts=drafts, acceptance_rate=kept / drafts if drafts else None)
        return outputs

    def _draft_prefill(self, prompts, tokens, h, batch, temperature, top_p, rng):
        """The MTP module over the prompts (position j: the main hidden state h_j and token j + 1,
        the last one the first sampled token) -> (drafts int64 [B], their distribution or None)."""
        nxt = []
        for p, t in zip(prompts, tokens.tolist()):
            nxt += p[1:] + [t]
        logits, _ = self.model.mtp_forward(h, torch.tensor(nxt, dtype=torch.int64, device=h.device), batch, self.cache)
        return draw(logits, temperature, top_p, rng)

    def _speculative_step(self, outputs, live, requests, draft, q, temperature, top_p, rng):
        """One verify step of the requests `live` (cached_tokens, blocks as in requests): the
        target over [last token, draft] (s_q = 2), then the MTP module over the same two positions
        for the next drafts: its row 0 takes (h of the last token, the first new token), row 1
        (h of the draft, the second new token). Both rows write the MTP layer's keys, but only the
        request's last row (row 1 where the draft was kept) goes through its attention, MLP and head
        (Batch.query_rows): a rejected draft's row is overwritten by the next step.
        -> (new tokens per request, next drafts int64 [B], their distribution or None)."""
        device, b = self.model.device, len(live)
        draft = draft.to(device)
        tokens = torch.stack([torch.tensor([outputs[i][-1] for i in live], device=device), draft], dim=1)
        batch = decode_batch(requests, self.cache, device, s_q=2)
        batch.logits_index = None
        logits, h = self.model(tokens.flatten(), batch, self.cache, hidden=True)
        new = verify(logits.view(b, 2, -1), draft, q, temperature, top_p, rng)
        nxt = torch.tensor([[t[0], t[-1]] for t in new], dtype=torch.int64, device=device)
        two = torch.tensor([len(t) == 2 for t in new], dtype=torch.int64, device=device)
        batch.query_rows = torch.arange(b, device=device) * 2 + two
        batch.cache_seqlens = batch.cache_seqlens - 1 + two.to(torch.int32)
        logits, _ = self.model.mtp_forward(h, nxt.flatten(), batch, self.cache)
        return (new, *draw(logits, temperature, top_p, rng))


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
    p.add_argument("--kv-cache-dtype", choices=sorted(CACHE_DTYPES), default=None,
                   help="the latent KV cache: bf16, or fp8 (FlashMLA's 656-byte token: e4m3 c_kv with fp32 scales, "
                        "bf16 k_pe); default: the activations' dtype")
    p.add_argument("--speculative", choices=["none", "mtp"], default=None,
                   help="mtp: draft with the checkpoint's multi-token-prediction module and verify two tokens per "
                        "step (default when the checkpoint has one); none: one token per step")
    return p


def _encode(generator, tokenizer, texts):
    bos = generator.model.args.bos_token_id
    return [([] if bos is None else [bos]) + tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def _print_stats(s, generator, out):
    rate = "no decode step" if s["decode_tokens_per_s"] is None else \
        f"decode {s['decode_tokens_per_s']:.1f} tokens/s ({s['decode_tokens']} tokens)"
    if s.get("acceptance_rate") is not None:
        rate += f", MTP drafts accepted {s['acceptance_rate']:.1%}, {s['tokens_per_step']:.2f} tokens per step"
    print(f"time to first token {s['ttft_s'] * 1e3:.1f} ms ({s['prefill_tokens']} prompt tokens), {rate}; "
          f"KV cache {generator.cache.bytes_per_token} bytes per token", file=sys.stderr if out is sys.stdout else out,
          flush=True)


def _run_expert_parallel(generator, tokenizer, texts, args, out):
    """--parallel ep: rank r generates prompts r, r + world, ...; rank 0 prints every text in
    prompt order as one process does (without streaming) and the stats of all ranks together
    (decode tokens/s: all ranks' tokens over the slowest rank's decode time)."""
    import torch.distributed as dist
    par = generator.model.parallel
    world, rank = par.world, par.rank
    prompts = _encode(generator, tokenizer, texts)
    generator.validate(prompts, args.max_new_tokens, args.temperature, args.top_p)  # all ranks, all prompts
    mine = list(range(rank, len(texts), world))
    outputs = generator.generate([prompts[i] for i in mine], args.max_new_tokens, args.temperature, args.top_p,
                                 args.seed)
    gathered = [None] * world
    dist.all_gather_object(gathered, (mine, outputs, generator.last_stats, par.traffic))
    if rank != 0:
        return
    new = {i: o for ids, outs, _, _ in gathered for i, o in zip(ids, outs)}
    for i, text in enumerate(texts):
        print(text + tokenizer.decode(new[i]) if len(texts) == 1 else
              f"--- prompt {i} ---\n{text}{tokenizer.decode(new[i])}", file=out, flush=True)
    stats = [g[2] for g in gathered]
    decoded, decode_s = sum(s["decode_tokens"] for s in stats), max(s["decode_s"] for s in stats)
    _print_stats(dict(prefill_tokens=sum(s["prefill_tokens"] for s in stats), ttft_s=max(s["ttft_s"] for s in stats),
                      decode_tokens=decoded, decode_tokens_per_s=decoded / decode_s if decoded else None),
                 generator, out)
    traffic = per_token([g[3] for g in gathered])
    if traffic is not None:
        from .moe import Experts
        slots = next(m.num_slots for m in generator.model.modules() if isinstance(m, Experts))
        print(f"expert parallel over {world} ranks ({slots} expert slots per MoE layer): "
              f"{traffic['bytes']:.0f} bytes sent per token per MoE layer "
              f"({traffic['rows']:.3f} rows, dispatch and return; {traffic['bytes_to_other_ranks']:.0f} to other "
              f"ranks)", file=sys.stderr if out is sys.stdout else out, flush=True)


def _run(generator, tokenizer, texts, args, out, echo=True):
    """Generate for the prompt texts and print them to `out`; one prompt streams its tokens as they
    come (after the prompt itself with `echo`)."""
    if generator.model.parallel.expert_parallel:
        return _run_expert_parallel(generator, tokenizer, texts, args, out)
    prompts = _encode(generator, tokenizer, texts)
    generator.validate(prompts, args.max_new_tokens, args.temperature, args.top_p)  # before printing anything
    stream = TextStream(tokenizer) if len(texts) == 1 else None
    if stream is not None and echo:
        print(texts[0], end="", file=out, flush=True)

    def on_token(i, token):
        print(stream.push(token), end="", file=out, flush=True)

    outputs = generator.generate(prompts, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                 on_token=on_token if stream is not None else None)
    if stream is not None:
        print(stream.flush(), file=out, flush=True)
    else:
        for i, (text, new) in enumerate(zip(texts, outputs)):
            print(f"--- prompt {i} ---\n{text}{tokenizer.decode(new)}", file=out, flush=True)
    _print_stats(generator.last_stats, generator, out)


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
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    except ValueError as e:
        fail("--" + str(e).replace("_", "-"))  # the option's name
    model_dir = args.model
    if model_dir is None:
        if not os.path.isdir(DEFAULT_MODEL):
            fail(f"no --model given and the default model folder {DEFAULT_MODEL} does not exist; "
                 f"pass --model DIR (a folder with config.json, safetensors and tokenizer.json)")
        model_dir = DEFAULT_MODEL
    from .load import load, load_tokenizer
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # under torchrun (WORLD_SIZE > 1): tensor parallelism, every rank runs the same steps on the
    # same gathered logits (one seed for all); or expert parallelism, each rank its own prompts
    # (seed + rank). Rank 0 prints.
    if (args.fp8_dispatch or args.eplb) and args.parallel != "ep":
        fail(f"{'--fp8-dispatch' if args.fp8_dispatch else '--eplb'} needs --parallel ep")
    par = Parallel.from_env(torch.device(device).type, args.parallel, args.fp8_dispatch)
    rank = par.rank
    if par.world > 1:
        if args.interactive:
            fail("--interactive runs in one process (no torchrun)")
        if torch.device(device).type == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        args.seed = (0 if args.seed is None else args.seed) + (rank if args.parallel == "ep" else 0)
    out = sys.stdout if rank == 0 else open(os.devnull, "w")
    try:
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
                     backend=None if args.backend == "auto" else args.backend, mtp=not par.expert_parallel,
                     parallel=par)
    except (FileNotFoundError, ValueError) as e:  # ValueError: ConfigError, CheckpointError, --eplb's file
        fail(str(e))
    try:
        generator = Generator(model, tokenizer, kv_cache_dtype=CACHE_DTYPES.get(args.kv_cache_dtype),
                              speculative=args.speculative)
    except ValueError as e:  # --speculative mtp without an MTP module, or with --parallel ep
        fail(str(e).replace("speculative=", "--speculative "))
    try:
        if args.prompt:
            _run(generator, tokenizer, args.prompt, args, out)
    except (ValueError, CacheFullError) as e:  # prompts too long for the model or for the cache
        fail(str(e))
    finally:
        par.shutdown()
    while args.interactive:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            break
        try:
            _run(generator, tokenizer, [line], args, sys.stdout, echo=False)
        except (ValueError, CacheFullError) as e:  # one bad prompt does not end the session
            print(f"error: {e}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
