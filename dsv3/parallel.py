"""Tensor and expert parallelism over torch.distributed (gloo on CPU, NCCL on GPU), launched with
torchrun. Without an initialized process group everything is one rank.

Two modes (`init_from_env(..., mode=)`, `--parallel` of dsv3.generate):
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
field). A script of one's own calls init_from_env() before dsv3.load(...) and runs the same steps
on every rank (tests/model/tp_worker.py and ep_worker.py are two).
"""

import math
import os

import torch
import torch.distributed as dist

MODES = ("tp", "ep")
_config = {"mode": "tp", "fp8_dispatch": False, "placement": None}

# Expert-parallel traffic of this process, summed over MoE layers (bytes_per_token() reads it).
traffic = {"tokens": 0, "rows": 0, "bytes": 0, "bytes_to_other_ranks": 0}


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def set_mode(mode: str = "tp", fp8_dispatch: bool = False, placement: dict = None):
    """Choose the parallel mode (before building the model: it decides what each rank holds).
    fp8_dispatch (ep): send the tokens to the experts as e4m3 + 1x128 scales. placement (ep):
    {layer index: the logical expert of each slot of each rank} with redundant experts
    (dsv3/eplb.py); without it rank r holds experts [r * E/world, (r+1) * E/world)."""
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
    if placement is not None and mode != "ep":
        raise ValueError("a placement of redundant experts needs mode ep")
    _config.update(mode=mode, fp8_dispatch=bool(fp8_dispatch), placement=placement)


def mode() -> str:
    return _config["mode"]


def expert_parallel() -> bool:
    """True where MoE layers exchange tokens between ranks (mode ep with more than one rank)."""
    return _config["mode"] == "ep" and world_size() > 1


def fp8_dispatch() -> bool:
    return _config["fp8_dispatch"]


def tp_size() -> int:
    """The ranks that split the dense weights (1 with ep: attention and dense layers replicated)."""
    return world_size() if _config["mode"] == "tp" else 1


def init_from_env(device_type: str = "cpu", mode: str = "tp", fp8_dispatch: bool = False) -> int:
    """Join the process group torchrun describes (WORLD_SIZE > 1) in `mode`; returns this rank's index."""
    set_mode(mode, fp8_dispatch)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device_type == "cuda":  # before NCCL's init: its communicator binds the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank()


def shutdown():
    """Leave the process group (every rank, before exiting: a rank that exits without it can abort
    in gloo's teardown while the other still talks to it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of the tensor-parallel ranks' partial results (row-parallel outputs), in place."""
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the tensor-parallel ranks' column shards along the last dim (vocab-parallel logits)."""
    n = tp_size()
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def shard_range(size: int, what: str) -> tuple:
    """This rank's [lo, hi) of a dense dimension of `size`: an even tensor-parallel split (which
    must be exact), or all of it with ep."""
    n = tp_size()
    if size % n:
        raise ValueError(f"{what} = {size} does not split over {n} tensor-parallel ranks")
    r = rank() if n > 1 else 0
    return r * size // n, (r + 1) * size // n


def expert_range(n_routed_experts: int) -> tuple:
    """This rank's [lo, hi) of the routed experts: E/world each, in both modes."""
    n, r = world_size(), rank()
    if n_routed_experts % n:
        raise ValueError(f"n_routed_experts = {n_routed_experts} does not split over {n} "
                         f"{'expert' if _config['mode'] == 'ep' else 'tensor'}-parallel ranks")
    return r * n_routed_experts // n, (r + 1) * n_routed_experts // n


def expert_slots(n_routed_experts: int, layer: int) -> list:
    """Every rank's experts in layer `layer` (the logical expert of each of its slots; equal
    counts): the placement's with redundant experts, else E/world consecutive ones each."""
    placement = _config["placement"]
    if placement is not None and expert_parallel():
        slots = placement[layer]
        if (len(slots) != world_size() or len({len(s) for s in slots}) != 1
                or sorted({x for s in slots for x in s}) != list(range(n_routed_experts))):
            raise ValueError(f"the placement of layer {layer} must give {world_size()} ranks equally many slots "
                             f"covering all {n_routed_experts} experts")
        return slots
    n = world_size()
    expert_range(n_routed_experts)  # the split must be exact
    return [list(range(r * n_routed_experts // n, (r + 1) * n_routed_experts // n)) for r in range(n)]


def any_rank(flag: bool, device=None) -> bool:
    """Whether `flag` is true on some rank (every rank calls it: a collective)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_to_all_rows(parts, send_counts: list, recv_counts: list = None) -> tuple:
    """Send rows to ranks: parts are tensors of equal row count whose first sum(send_counts) rows
    go, in order, send_counts[r] of them to rank r. Returns (the received parts, rows grouped by
    source rank; the receive counts: exchanged first unless given, as on the way back). The rows
    travel as bytes in one all_to_all_single (each part viewed as uint8, side by side), so the
    dtypes need no support from the backend (gloo has no e4m3)."""
    if recv_counts is None:
        recv_counts = exchange_counts(send_counts, parts[0].device)
    widths = [math.prod(p.shape[1:]) for p in parts]  # elements per row (explicit: there may be no rows)
    n = sum(send_counts)
    # (an empty part is made anew: its strides may be anything, which view(uint8) refuses)
    rows = torch.cat([(p[:n].reshape(n, w) if n else p.new_empty((0, w))).view(torch.uint8)
                      for p, w in zip(parts, widths)], dim=1)
    out = rows.new_empty((sum(recv_counts), rows.shape[1]))
    dist.all_to_all_single(out, rows, recv_counts, send_counts)
    traffic["rows"] += n
    traffic["bytes"] += rows.numel()
    traffic["bytes_to_other_ranks"] += (n - send_counts[rank()]) * rows.shape[1]
    received = []
    for p, piece in zip(parts, out.split([w * p.element_size() for p, w in zip(parts, widths)], dim=1)):
        received.append(piece.contiguous().view(p.dtype).view(out.shape[0], *p.shape[1:]))
    return received, recv_counts


def exchange_counts(send_counts: list, device) -> list:
    """Every rank's send_counts[r] to rank r: the receive counts (host values: the split sizes)."""
    send = torch.tensor(send_counts, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.tolist()


def per_token(counts: list) -> dict:
    """Expert-parallel traffic per token per MoE layer from the `traffic` counts of some ranks
    (None without tokens): rows sent and bytes sent (dispatch and return; the count exchange's
    8 x world bytes per layer and rank are not in it), all and to other ranks."""
    tokens = sum(c["tokens"] for c in counts)
    return {k: sum(c[k] for c in counts) / tokens for k in ("rows", "bytes", "bytes_to_other_ranks")} if tokens \
        else None
