"""Choosing tokens from logits: greedy, temperature and top-p sampling (sample), the distribution
sampling draws from (probabilities), and speculative decoding's draft (draw) and verification
(verify). Pure functions of tensors; the Generator (dsv3/generator.py) calls them.

SamplingParams holds a generation's settings and checks them once, when it is made.
"""

import dataclasses
import math
import numbers

import torch

from .config_check import is_int

# Below this a temperature divides the logits past float32's range (inf / inf: NaN probabilities);
# 0 is greedy, which is what such a temperature would approach.
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """max_new_tokens: tokens to generate per request (at most; an EOS ends a request earlier).
    temperature: 0 is greedy; else logits / temperature are sampled (at least MIN_TEMPERATURE).
    top_p: sampling keeps the smallest set of most likely tokens whose probability reaches top_p.
    seed: of the sampling's torch.Generator (None: a random seed; else an int torch takes, in
    [-2**63, 2**64)). Raises ValueError naming a field it cannot take."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not (_is_real(t) and (t == 0 or MIN_TEMPERATURE <= t < math.inf)):  # also refuses NaN
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t!r}")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (is_int(self.seed) and -2 ** 63 <= self.seed < 2 ** 64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch.Generator's), got {self.seed!r}")


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _top_p(probs: torch.Tensor, top_p: float):
    """probs float32 [B, vocab] -> (sorted probs with zeros outside the top_p set, their token ids
    int64), both [B, vocab], most likely first. The set: the smallest prefix whose mass reaches
    top_p (a token is kept while the mass before it is short of top_p, so the most likely one
    always is). The sort is stable: equal probabilities stay in id order, as argmax breaks ties."""
    sorted_probs, ids = probs.sort(dim=-1, descending=True, stable=True)
    # a top_p below float32's smallest normal number would round to 0 in the comparison and keep nothing
    top_p = max(top_p, torch.finfo(probs.dtype).tiny)
    return sorted_probs * (sorted_probs.cumsum(dim=-1) - sorted_probs < top_p), ids


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits float32 [B, vocab] -> token ids int64 [B].

    temperature 0: argmax. Else a draw from softmax(logits / temperature) restricted to the top_p
    set (_top_p: a tiny top_p is greedy). generator: a torch.Generator on logits' device.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    kept, ids = _top_p(probs, top_p)
    choice = torch.multinomial(kept, 1, generator=generator)  # multinomial needs no renormalizing
    return ids.gather(-1, choice).squeeze(-1)


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution sample() draws from (temperature > 0): logits float32 [B, vocab] ->
    probabilities float32 [B, vocab] (zero outside the top_p set, renormalized)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return probs
    kept, ids = _top_p(probs, top_p)
    out = torch.zeros_like(probs).scatter_(-1, ids, kept)
    return out / out.sum(dim=-1, keepdim=True)


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """Draft tokens from the MTP module's logits float32 [B, vocab] -> (ids int64 [B], the
    distribution they were drawn from float32 [B, vocab], None when greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1), None
    q = probabilities(logits, temperature, top_p)
    return torch.multinomial(q, 1, generator=generator).squeeze(-1), q


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
