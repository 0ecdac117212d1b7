"""Tensor parallelism over torch.distributed (gloo on CPU, NCCL on GPU), launched with torchrun.

Every rank holds 1/world of the attention heads, of the dense MLP's and shared expert's
intermediate columns, of the routed experts and of the vocabulary; the latent KV cache (shared by
all heads in MLA) is replicated. Without an initialized process group everything is one rank.

    torchrun --nproc_per_node 2 -m dsv3.generate --model DIR --prompt "..."   # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 -m dsv3.generate --model DIR --prompt "..."   # 8 GPUs (NCCL)
Each rank memory-maps the checkpoint and reads only its own slices (dsv3/load.py). N must divide
num_attention_heads, vocab_size, n_routed_experts, intermediate_size and moe_intermediate_size *
n_shared_experts (else a ValueError names the field). A script of one's own calls
init_from_env() before dsv3.load(...) and runs the same steps on every rank
(tests/model/tp_worker.py is one).
"""

import os

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(device_type: str = "cpu") -> int:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's index."""
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
    """Sum of the ranks' partial results (row-parallel outputs), in place."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' column shards along the last dim (vocab-parallel logits)."""
    n = world_size()
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def shard_range(size: int, what: str) -> tuple:
    """This rank's [lo, hi) of `size` split evenly; the split must be exact."""
    n, r = world_size(), rank()
    if size % n:
        raise ValueError(f"{what} = {size} does not split over {n} tensor-parallel ranks")
    return r * size // n, (r + 1) * size // n
