"""One decode step (s_q = 1) of the model replayed as a CUDA graph: one kernel launch sequence per
step instead of one launch per op. The Generator (dsv3/generator.py) uses it on a GPU."""

import torch

from .cache import Batch

# Decode batch sizes captured as CUDA graphs; a step of B requests replays the smallest size >= B.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


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
