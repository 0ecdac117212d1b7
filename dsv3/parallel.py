"""Tensor and expert parallelism over torch.distributed (gloo on CPU, NCCL on GPU), launched with
torchrun. A `Parallel` says how the model is split over the processes; the model gets one when it
is built (`dsv3.load(..., parallel=)`, `Transformer(..., parallel=)`: what each rank holds depends
on it) and its layers run their collectives through it. `Parallel()` is one process.

Two modes (`Parallel.from_env(..., mode=)`, `--parallel` of dsv3.generate):
- "tp", tensor parallelism: every rank sees every token and holds 1/world of the attention heads,
  of the dense MLP's and shared expert's intermediate columns, of the routed experts and of the
  vocabulary; the latent KV cache (shared by all heads in MLA) is replicated; row-parallel outputs
  are all-reduced. A token's choices of another rank's experts cost nothing on this rank (the id
  NO_EXPERT), the all-reduce adds the owner's result.
- "ep", data-parallel attention with expert parallelism (DeepSeek-V3's serving layout): each rank
  runs its own requests with its own latent cache and holds everything but the routed experts
  whole; the routed experts are split E/world per rank. Each MoE layer packs every token once per
  rank that owns one of its experts (dsv3_kernels.ep_dispatch), exchanges the rows with one
  all_to_all_single (uneven splits; optionally FP8 rows: e4m3 + 1x128 scales), runs the received
  rows through this rank's experts, sends the results back the same way and sums them per token
  (ep_combine). The split sizes are host values (a small all-to-all of the counts first, which on
  a GPU costs one device sync per MoE layer; the decode is therefore not CUDA-graph captured).
  Every rank takes part in every collective, also with no tokens (Transformer.idle).

    torchrun --nproc_per_node 2 -m dsv3.generate --model DIR --prompt "..."                  # tp
    torchrun --nproc_per_node 8 -m dsv3.generate --parallel ep --model DIR --prompt ... --prompt ...
Each rank memory-maps the checkpoint and reads only what it holds (dsv3/load.py). With tp, N must
divide num_attention_heads, vocab_size, n_routed_experts, intermediate_size and
moe_intermediate_size * n_shared_experts; with ep, n_routed_experts (else a ValueError names the
field). A script of one's own builds `Parallel.from_env()`, passes it to dsv3.load(...) and runs
the same steps on every rank (tests/model/tp_worker.py and ep_worker.py are two).
"""

import dataclasses
import math
import os

import torch
import torch.distributed as dist

MODES = ("tp", "ep")


@dataclasses.dataclass
class Traffic:
    """Expert-parallel traffic of one process, summed over MoE layers and steps: tokens through the
    MoE layers, rows and bytes sent (dispatch and return), bytes to other ranks."""
    tokens: int = 0
    rows: int = 0
    bytes: int = 0
    bytes_to_other_ranks: int = 0


class Parallel:
    """How the model is split over `world` processes, as seen by process `rank`.

    mode: "tp" or "ep" (see the module's doc). fp8_dispatch (ep): send the tokens to the experts as
    e4m3 + 1x128 scales (read at each step: may change between steps). placement (ep): {layer
    index: the logical expert of each slot of each rank} with redundant experts (dsv3/eplb.py);
    without it rank r holds experts [r * E/world, (r+1) * E/world). rank and world are given, not
    read from torch.distributed: `Parallel(rank=1, world=4)` describes rank 1 of 4 without a process
    group (the collectives need one). traffic: this process's expert-parallel Traffic.
    """

    def __init__(self, mode: str = "tp", rank: int = 0, world: int = 1, fp8_dispatch: bool = False,
                 placement: dict = None):
        if mode not in MODES:
            raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
        if placement is not None and mode != "ep":
            raise ValueError("a placement of redundant experts needs mode ep")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world = {world}), got {rank}")
        self.mode, self.rank, self.world = mode, rank, world
        self.fp8_dispatch, self.placement = bool(fp8_dispatch), placement
        # expert parallelism: MoE layers exchange tokens between ranks
        self.expert_parallel = mode == "ep" and world > 1
        # the ranks that split the dense weights (1 with ep: attention and dense layers replicated)
        self.tp_size = world if mode == "tp" else 1
        self.traffic = Traffic()

    @classmethod
    def from_env(cls, device_type: str = "cpu", mode: str = "tp", fp8_dispatch: bool = False,
                 placement: dict = None) -> "Parallel":
        """Join the process group torchrun describes (WORLD_SIZE > 1; NCCL for device_type "cuda",
        which also selects this rank's LOCAL_RANK GPU, else gloo) -> this process's Parallel."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            if device_type == "cuda":  # before NCCL's init: its communicator binds the current device
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        if dist.is_available() and dist.is_initialized():
            return cls(mode, dist.get_rank(), dist.get_world_size(), fp8_dispatch, placement)
        return cls(mode, 0, 1, fp8_dispatch, placement)

    def __repr__(self):
        return f"Parallel({self.mode!r}, rank={self.rank}, world={self.world}, fp8_dispatch={self.fp8_dispatch})"

    def shutdown(self):
        """Leave the process group (every rank, before exiting: a rank that exits without it can abort
        in gloo's teardown while the other still talks to it)."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ---- what this rank holds ----

    def shard_range(self, size: int, what: str) -> tuple:
        """This rank's [lo, hi) of a dense dimension of `size`: an even tensor-parallel split (which
        must be exact), or all of it with ep."""
        n = self.tp_size
        if size % n:
            raise ValueError(f"{what} = {size} does not split over {n} tensor-parallel ranks")
        r = self.rank if n > 1 else 0
        return r * size // n, (r + 1) * size // n

    def expert_slots(self, n_routed_experts: int, layer: int) -> list:
        """Every rank's experts in layer `layer` (the logical expert of each of its slots; equal
        counts): the placement's with redundant experts, else E/world consecutive ones each."""
        n = self.world
        if self.placement is not None and self.expert_parallel:
            slots = self.placement[layer]
            if (len(slots) != n or len({len(s) for s in slots}) != 1
                    or sorted({x for s in slots for x in s}) != list(range(n_routed_experts))):
                raise ValueError(f"the placement of layer {layer} must give {n} ranks equally many slots "
                                 f"covering all {n_routed_experts} experts")
            return slots
        if n_routed_experts % n:
            raise ValueError(f"n_routed_experts = {n_routed_experts} does not split over {n} "
                             f"{'expert' if self.mode == 'ep' else 'tensor'}-parallel ranks")
        return [list(range(r * n_routed_experts // n, (r + 1) * n_routed_experts // n)) for r in range(n)]

    # ---- collectives (every rank calls them) ----

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the tensor-parallel ranks' partial results (row-parallel outputs), in place."""
        if self.tp_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the tensor-parallel ranks' column shards along the last dim (vocab-parallel logits)."""
        n = self.tp_size
        if n == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def any_rank(self, flag: bool, device=None) -> bool:
        """Whether `flag` is true on some rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_to_all_rows(self, parts, send_counts: list, recv_counts: list = None) -> tuple:
        """Send rows to ranks: parts are tensors of equal row count whose first sum(send_counts) rows
        go, in order, send_counts[r] of them to rank r. Returns (the received parts, rows grouped by
        source rank; the receive counts: exchanged first unless given, as on the way back). The rows
        travel as bytes in one all_to_all_single (each part viewed as uint8, side by side), so the
        dtypes need no support from the backend (gloo has no e4m3). Counted in self.traffic."""
        if recv_counts is None:
            recv_counts = self.exchange_counts(send_counts, parts[0].device)
        widths = [math.prod(p.shape[1:]) for p in parts]  # elements per row (explicit: there may be no rows)
        n = sum(send_counts)
        # (an empty part is made anew: its strides may be anything, which view(uint8) refuses)
        rows = torch.cat([(p[:n].reshape(n, w) if n else p.new_empty((0, w))).view(torch.uint8)
                          for p, w in zip(parts, widths)], dim=1)
        out = rows.new_empty((sum(recv_counts), rows.shape[1]))
        dist.all_to_all_single(out, rows, recv_counts, send_counts)
        self.traffic.rows += n
        self.traffic.bytes += rows.numel()
        self.traffic.bytes_to_other_ranks += (n - send_counts[self.rank]) * rows.shape[1]
        received = []
        for p, piece in zip(parts, out.split([w * p.element_size() for p, w in zip(parts, widths)], dim=1)):
            received.append(piece.contiguous().view(p.dtype).view(out.shape[0], *p.shape[1:]))
        return received, recv_counts

    @staticmethod
    def exchange_counts(send_counts: list, device) -> list:
        """Every rank's send_counts[r] to rank r: the receive counts (host values: the split sizes)."""
        send = torch.tensor(send_counts, dtype=torch.int64, device=device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return recv.tolist()


def per_token(counts: list) -> dict:
    """Expert-parallel traffic per token per MoE layer from the Traffic of some ranks (None without
    tokens): rows sent and bytes sent (dispatch and return; the count exchange's 8 x world bytes per
    layer and rank are not in it), all and to other ranks."""
    tokens = sum(c.tokens for c in counts)
    if not tokens:
        return None
    return {k: sum(getattr(c, k) for c in counts) / tokens for k in ("rows", "bytes", "bytes_to_other_ranks")}
