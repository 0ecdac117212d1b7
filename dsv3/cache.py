"""The paged latent KV cache of MLA and the batch metadata the attention reads.

Per token and layer the cache holds 576 values (FlashMLA's layout): the normalized latent c_kv
(kv_lora_rank 512, also the value) and the RoPE'd shared key k_pe (64). Tokens live in blocks of
`block_size` slots; a request owns a list of blocks (its block table), so requests of different
lengths share one pool without fragmentation.
With dtype "fp8" a token takes FlashMLA's FP8_TOKEN_BYTES = 656 bytes per layer instead: c_kv in
e4m3 with one fp32 scale per 128 values, k_pe in bf16 (the layout: dsv3_kernels.mla_decode); the
kernels quantize as they write and dequantize as they read.
"""

import dataclasses

import torch

from dsv3_kernels.reference.mla import FP8_TOKEN_BYTES
from dsv3_kernels.utils import cdiv

from .config import KV_LORA_RANK, ROPE_DIM

HEAD_DIM = KV_LORA_RANK + ROPE_DIM
FP8 = "fp8"  # the LatentCache dtype of the FP8 cache
CACHE_DTYPES = {"bf16": torch.bfloat16, FP8: FP8}  # --kv-cache-dtype of the command lines
CACHE_DTYPE_HELP = (f"the latent KV cache: bf16, or fp8 (FlashMLA's {FP8_TOKEN_BYTES}-byte token: e4m3 c_kv with "
                    f"fp32 scales, bf16 k_pe); default: the activations' dtype")


class CacheFullError(RuntimeError):
    """The block pool has too few free blocks for a request."""


class BlockAllocator:
    """A free list of block indices."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list:
        if n > len(self._free):
            raise CacheFullError(f"the KV cache needs {n} more blocks, {len(self._free)} of "
                                 f"{self.num_blocks} are free (raise num_blocks)")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list):
        self._free.extend(reversed(blocks))


class LatentCache:
    """kv: [num_layers, num_blocks, block_size, 576] of `dtype` (a torch float dtype, bf16 by
    default), or for dtype "fp8" the FP8 cache uint8 [num_layers, num_blocks, block_size, FP8_TOKEN_BYTES]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int = 64, dtype=torch.bfloat16, device=None):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if isinstance(dtype, str) and dtype != FP8:
            raise ValueError(f"dtype must be a torch float dtype or {FP8!r}, got {dtype!r}")
        width, dtype = (FP8_TOKEN_BYTES, torch.uint8) if dtype == FP8 else (HEAD_DIM, dtype)
        self.block_size = block_size
        self.kv = torch.zeros(num_layers, num_blocks, block_size, width, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers (671B: 61 x 576 x 2 = 70,272 in bf16,
        61 x 656 = 40,016 in fp8)."""
        return self.kv.shape[0] * self.kv.shape[-1] * self.kv.element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)


@dataclasses.dataclass
class Batch:
    """One forward step over N tokens of B requests, laid out flat (request after request).

    positions: int64 [N]; slot_mapping: int64 [N] (cache slot = block * block_size + offset).
    prefill: the requests start empty and all their tokens are here (materialized causal attention
      over seq_lens); else decode: every request has s_q = N / B new tokens after its cached ones,
      read through block_table int32 [B, max_blocks] and cache_seqlens int32 [B] (counting them).
    logits_index: int64 [B'] rows whose logits are returned (None: all N).
    query_rows: decode only, int64 [B], one row per request (None: all N): every layer writes the
      keys of all N rows but computes attention, MLP and its output for these rows only (each
      attends to its request's keys up to itself: cache_seqlens then count to the query row). The
      speculative step's MTP pass needs the keys of both rows but the output of one.
    """
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    prefill: bool
    seq_lens: list = None
    block_table: torch.Tensor = None
    cache_seqlens: torch.Tensor = None
    logits_index: torch.Tensor = None
    query_rows: torch.Tensor = None


def prefill_batch(requests, cache: LatentCache, device=None, all_logits=False) -> Batch:
    """requests: [(num_tokens, block_ids)] of empty requests -> their prefill Batch."""
    pos, slots, lens = [], [], []
    for n, blocks in requests:
        p = torch.arange(n)
        pos.append(p)
        slots.append(torch.tensor(blocks, dtype=torch.int64)[p // cache.block_size] * cache.block_size
                     + p % cache.block_size)
        lens.append(n)
    ends = torch.tensor(lens).cumsum(0) - 1
    return Batch(torch.cat(pos).to(device), torch.cat(slots).to(device), True, seq_lens=lens,
                 logits_index=None if all_logits else ends.to(device))


def decode_batch(requests, cache: LatentCache, device=None, s_q=1, all_logits=False) -> Batch:
    """requests: [(cached_tokens, block_ids)]; each gets s_q new tokens after its cached ones.
    Logits: of each request's last new token, or with all_logits of all B * s_q tokens."""
    # This runs on the host every decode step: the few numbers per request are computed in Python
    # and become tensors in one call each (whole-batch tensor ops cost more below a few hundred
    # requests: each op is microseconds, each request a handful of integer operations).
    b, bs = len(requests), cache.block_size
    width = max(len(blocks) for _, blocks in requests)
    pos = [n + j for n, _ in requests for j in range(s_q)]
    slots = [blocks[p // bs] * bs + p % bs for (n, blocks) in requests for p in range(n, n + s_q)]
    table = [blocks + [0] * (width - len(blocks)) for _, blocks in requests]

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    return Batch(tensor(pos, torch.int64), tensor(slots, torch.int64), False,
                 block_table=tensor(table, torch.int32), cache_seqlens=tensor([n + s_q for n, _ in requests], torch.int32),
                 logits_index=None if all_logits else tensor([i * s_q + s_q - 1 for i in range(b)], torch.int64))


# ---- speculative decoding (dsv3/generator.py): one draft token per request and step ----

def verify_batch(requests, cache: LatentCache, device=None) -> Batch:
    """The target's step over each request's last token and its draft: requests [(cached_tokens,
    block_ids)], two new tokens each (s_q = 2, causal), the logits of both rows."""
    return decode_batch(requests, cache, device, s_q=2, all_logits=True)


def draft_batch(verify: Batch, kept: torch.Tensor) -> Batch:
    """The MTP module's pass over the same two rows per request after the verify step: kept int64
    [B] (1 where the draft was kept, else 0). Both rows write the MTP layer's keys, but only the
    request's last row (row 1 where the draft was kept, row 0 else) goes through its attention, MLP
    and head (Batch.query_rows; its cache_seqlens count to that row): a rejected draft's row is
    overwritten by the next step."""
    b = kept.shape[0]
    return dataclasses.replace(verify, query_rows=torch.arange(b, device=kept.device) * 2 + kept,
                               cache_seqlens=verify.cache_seqlens - 1 + kept.to(torch.int32))
