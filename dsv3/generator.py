"""Batched generation on dsv3.model.Transformer: the Generator runs requests; dsv3/sampling.py
chooses their tokens, dsv3/cache.py builds every step's Batch, dsv3/cuda_graph.py replays decode
steps on a GPU (nano-vllm's engine / sampler / runner split).

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
"""

import dataclasses
import time

import torch

from dsv3_kernels.utils import cdiv

from .cache import CacheFullError, decode_batch, draft_batch, prefill_batch, verify_batch
from .cuda_graph import CudaGraphDecoder
from .sampling import SamplingParams, draw, sample, verify


@dataclasses.dataclass
class GenerationStats:
    """The timings of one generate call: prefill_tokens, ttft_s (prefill and the first token),
    decode_tokens, decode_s, decode_tokens_per_s (None without a decode step); with speculative
    decoding also decode_steps (request-steps: one draft verified each), drafts (= decode_steps),
    drafts_kept, tokens_per_step and acceptance_rate (None without a step; all None without
    speculation). stats["name"] reads stats.name (for callers written when this was a dict)."""
    prefill_tokens: int
    ttft_s: float
    decode_tokens: int
    decode_s: float
    decode_steps: int | None = None
    drafts_kept: int | None = None
    # derived from the above (fields, so that repr and dataclasses.asdict show them)
    decode_tokens_per_s: float | None = dataclasses.field(init=False)
    drafts: int | None = dataclasses.field(init=False)
    tokens_per_step: float | None = dataclasses.field(init=False)
    acceptance_rate: float | None = dataclasses.field(init=False)

    def __post_init__(self):
        self.decode_tokens_per_s = self.decode_tokens / self.decode_s if self.decode_tokens else None
        self.drafts = self.decode_steps
        self.tokens_per_step = self.decode_tokens / self.decode_steps if self.decode_steps else None
        self.acceptance_rate = self.drafts_kept / self.drafts if self.drafts else None

    def __getitem__(self, name):
        return getattr(self, name)


class _Requests:
    """The requests of one generate call: prompts, their new tokens (outputs), their cache blocks,
    and `running`, the unfinished ones in prompt order. Allocates every request's blocks up front
    (CacheFullError, nothing held, if they do not fit); release() returns what is still held."""

    def __init__(self, prompts, params: SamplingParams, cache, eos, on_token, speculative: bool):
        self.prompts, self.cache, self.eos, self.on_token = prompts, cache, eos, on_token
        self.max_new_tokens = params.max_new_tokens
        # The last new token is never fed back, so a request caches at most prompt + max_new_tokens - 1,
        # or one more with speculation (the draft after the last token but one).
        self.blocks = []
        try:
            for p in prompts:
                self.blocks.append(cache.allocator.allocate(cache.blocks_for(len(p) + self.max_new_tokens - 1
                                                                             + speculative)))
        except CacheFullError:
            self.release()
            raise
        self.outputs = [[] for _ in prompts]
        self.running = list(range(len(prompts)))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def prefill(self, device):
        """(the prompts' token ids int64 [sum of lengths], their prefill Batch)."""
        ids = torch.tensor([t for p in self.prompts for t in p], dtype=torch.int64, device=device)
        return ids, prefill_batch([(len(p), b) for p, b in zip(self.prompts, self.blocks)], self.cache, device)

    def last_tokens(self) -> list:
        """The running requests' latest tokens (the next step's inputs)."""
        return [self.outputs[i][-1] for i in self.running]

    def cached(self) -> list:
        """[(cached_tokens, block_ids)] of the running requests: all but their latest token."""
        return [(len(self.prompts[i]) + len(self.outputs[i]) - 1, self.blocks[i]) for i in self.running]

    def accept(self, new) -> int:
        """Record each running request's new tokens (a list per request, in order, up to an EOS or
        max_new_tokens); finished ones leave `running` and free their blocks. Returns the number of
        tokens taken (an ending EOS counts)."""
        taken = 0
        for i, tokens in zip(list(self.running), new):
            for t in tokens:
                taken += 1
                if t not in self.eos:
                    self.outputs[i].append(t)
                    if self.on_token is not None:
                        self.on_token(i, t)
                if t in self.eos or len(self.outputs[i]) == self.max_new_tokens:
                    self.running.remove(i)
                    self.cache.allocator.free(self.blocks[i])
                    self.blocks[i] = None
                    break
        return taken

    def release(self):
        for i, blocks in enumerate(self.blocks):
            if blocks is not None:
                self.cache.allocator.free(blocks)
                self.blocks[i] = None


class Generator:
    """Generates from token-id prompts with `model` (dsv3.model.Transformer) over its own paged
    latent cache of num_blocks blocks of block_size tokens (default: room for one request of
    max_position_embeddings tokens, which the requests of a call share).

    tokenizer: kept for callers (the command line); generate works on ids. cuda_graph: replay
    decode steps as CUDA graphs (default: when the model is on a GPU); captured on first use,
    for up to cuda_graph.GRAPH_BATCH_SIZES[-1] running requests (larger steps run eagerly). kv_cache_dtype:
    the cache's (model.new_cache: default the activations' dtype, or "fp8"). speculative: "mtp"
    (draft with the model's MTP module, see the module's doc; eager steps, no CUDA graph), "none",
    or None: "mtp" when the model has an MTP module, except where its decode steps run in the C++
    CPU step (Transformer.decodes_in_cpp): the draft pass runs the Python forward, and a
    speculative token costs more than two plain ones there.
    After each generate, last_stats holds its GenerationStats.
    With expert parallelism (model.parallel) each rank generates its own prompts (maybe none) and
    steps until every rank is done (a finished rank runs Transformer.idle steps), eagerly and
    without speculation.
    """

    def __init__(self, model, tokenizer=None, num_blocks=None, block_size=64, cuda_graph=None, kv_cache_dtype=None,
                 speculative=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_len = model.args.max_position_embeddings
        ep = model.parallel.expert_parallel
        if speculative is None:  # not beside the C++ CPU step: a speculative token costs two plain ones there
            speculative = "mtp" if len(model.mtp) and not ep and not model.decodes_in_cpp() else "none"
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
            num_blocks = cdiv(self.max_len, block_size)
        self.cache = model.new_cache(num_blocks, block_size, kv_cache_dtype, mtp=speculative == "mtp")
        # expert parallelism's all-to-all split sizes are host values: no graph capture
        self.cuda_graph = model.device.type == "cuda" and not ep if cuda_graph is None else cuda_graph
        self._graphs = None
        self.last_stats = None

    def check_prompts(self, prompts, max_new_tokens: int):
        """Raise ValueError, naming the prompt, where generate() would refuse it."""
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

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None, on_token=None):
        """prompts: token-id lists (of different lengths) -> each one's new tokens (list[list[int]]).

        A request stops after max_new_tokens tokens or at a token of model.args.eos_token_ids; the
        EOS token is not returned. temperature 0 is greedy; else sampling with top_p (see
        dsv3.sampling.sample) from a torch.Generator seeded with `seed` (None: a random seed), so a
        seed reproduces a run. on_token(i, token): called for each returned token of prompts[i] as
        soon as it is chosen. Raises ValueError for an invalid argument and CacheFullError when the
        cache has too few free blocks for prompt + max_new_tokens of every prompt (nothing is run then).
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, seed)
        self.check_prompts(prompts, max_new_tokens)
        return self.run(prompts, params, on_token)

    @torch.inference_mode()
    def run(self, prompts, params: SamplingParams, on_token=None):
        """generate() of prompts that passed check_prompts (the command line checks them, and every
        rank's with expert parallelism, before it prints anything)."""
        if not prompts and not self.model.parallel.expert_parallel:
            return []
        device = self.model.device
        rng = None
        if params.temperature > 0:
            rng = torch.Generator(device=device)
            if params.seed is None:
                rng.seed()
            else:
                rng.manual_seed(params.seed)
        speculative = self.speculative == "mtp"
        requests = _Requests(prompts, params, self.cache, set(self.model.args.eos_token_ids), on_token, speculative)
        try:  # an exception (or Ctrl-C) must not leak blocks
            loop = self._speculative_loop if speculative else self._plain_loop
            self.last_stats = loop(requests, params, rng)
        finally:
            requests.release()
        return requests.outputs

    def _plain_loop(self, requests, params, rng) -> GenerationStats:
        """The prefill, then one token per running request and step; with expert parallelism until
        every rank is done (idle steps on a rank with no request running)."""
        model, par, device = self.model, self.model.parallel, self.model.device
        start = time.perf_counter()
        if requests.prompts:
            ids, batch = requests.prefill(device)
            logits = model(ids, batch, self.cache)  # [len(prompts), vocab]: each prompt's last token
            requests.accept([[t] for t in sample(logits, params.temperature, params.top_p, rng).tolist()])
        else:  # expert parallelism: a rank with no requests
            model.idle()
        first = time.perf_counter()
        decoded = 0
        while par.any_rank(bool(requests.running), device) if par.expert_parallel else requests.running:
            if not requests.running:
                model.idle()
                continue
            step = None if self.cuda_graph else model.cpu_decoder(self.cache)
            if step is not None:  # the C++ step builds the batch and picks the greedy tokens itself
                logits, new = step.decode(requests.last_tokens(), requests.cached(), self.cache)
                if params.temperature > 0:
                    new = sample(logits, params.temperature, params.top_p, rng).tolist()
            else:
                tokens = torch.tensor(requests.last_tokens(), dtype=torch.int64)
                logits = self._decode_logits(tokens, requests.cached())
                new = sample(logits, params.temperature, params.top_p, rng).tolist()
            decoded += len(requests.running)
            requests.accept([[t] for t in new])
        return GenerationStats(requests.prompt_tokens, first - start, decoded, time.perf_counter() - first)

    def _decode_logits(self, tokens, cached):
        """One decode step: tokens int64 [B] (CPU) after cached [(cached_tokens, block_ids)] ->
        logits float32 [B, vocab]."""
        if self.cuda_graph:
            if self._graphs is None:
                self._graphs = CudaGraphDecoder(self.model, self.cache)
            if len(cached) <= self._graphs.max_batch:
                return self._graphs(tokens, decode_batch(cached, self.cache))
        device = self.model.device
        return self.model(tokens.to(device), decode_batch(cached, self.cache, device), self.cache)

    def _speculative_loop(self, requests, params, rng) -> GenerationStats:
        """The prefill with the first drafts, then verify steps, each advancing a running request by
        1 or 2 tokens and drafting its next one."""
        temperature, top_p = params.temperature, params.top_p
        start = time.perf_counter()
        ids, batch = requests.prefill(self.model.device)
        logits, h = self.model(ids, batch, self.cache, hidden=True)
        tokens = sample(logits, temperature, top_p, rng)
        draft, q = self._draft_prefill(requests.prompts, tokens, h, batch, temperature, top_p, rng)
        drafted = list(requests.running)  # the requests whose drafts `draft` holds, in its order
        requests.accept([[t] for t in tokens.tolist()])
        first = time.perf_counter()
        steps = kept = decoded = 0
        while requests.running:
            rows = [j for j, i in enumerate(drafted) if i in requests.running]  # the running requests' drafts
            draft, q = draft[rows], None if q is None else q[rows]
            drafted = list(requests.running)
            new, draft, q = self._speculative_step(requests, draft, q, temperature, top_p, rng)
            steps += len(new)
            kept += sum(len(t) == 2 for t in new)
            decoded += requests.accept(new)
        return GenerationStats(requests.prompt_tokens, first - start, decoded, time.perf_counter() - first,
                               decode_steps=steps, drafts_kept=kept)

    def _draft_prefill(self, prompts, tokens, h, batch, temperature, top_p, rng):
        """The MTP module over the prompts (position j: the main hidden state h_j and token j + 1,
        the last one the first sampled token) -> (drafts int64 [B], their distribution or None)."""
        nxt = []
        for p, t in zip(prompts, tokens.tolist()):
            nxt += p[1:] + [t]
        logits, _ = self.model.mtp_forward(h, torch.tensor(nxt, dtype=torch.int64, device=h.device), batch, self.cache)
        return draw(logits, temperature, top_p, rng)

    def _speculative_step(self, requests, draft, q, temperature, top_p, rng):
        """One verify step of the running requests: the target over [last token, draft] (s_q = 2),
        then the MTP module over the same two positions for the next drafts: its row 0 takes (h of
        the last token, the first new token), row 1 (h of the draft, the second new token); the
        verify and draft batches: dsv3/cache.py. draft int64 [B] and q (its distribution or None)
        hold the running requests' drafts. -> (new tokens per request, next drafts int64 [B],
        their distribution or None)."""
        device, b = self.model.device, len(requests.running)
        draft = draft.to(device)
        tokens = torch.stack([torch.tensor(requests.last_tokens(), device=device), draft], dim=1)
        batch = verify_batch(requests.cached(), self.cache, device)
        logits, h = self.model(tokens.flatten(), batch, self.cache, hidden=True)
        new = verify(logits.view(b, 2, -1), draft, q, temperature, top_p, rng)
        nxt = torch.tensor([[t[0], t[-1]] for t in new], dtype=torch.int64, device=device)
        kept = torch.tensor([len(t) == 2 for t in new], dtype=torch.int64, device=device)
        logits, _ = self.model.mtp_forward(h, nxt.flatten(), draft_batch(batch, kept), self.cache)
        return (new, *draw(logits, temperature, top_p, rng))

