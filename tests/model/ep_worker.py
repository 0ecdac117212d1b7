"""One rank of the expert-parallel test (tests/model/test_expert_parallel.py), run by torchrun:
    torchrun --standalone --nproc_per_node N ep_worker.py MODEL_DIR OUT_FILE
Each rank loads the model in mode ep (attention, dense layers and shared experts whole; routed
experts E/N), takes its own share of REQUESTS (rank 1 takes none) and runs them with run_requests,
then with FP8 dispatch, then with N redundant experts placed by EPLB for skewed loads; rank 0
saves every rank's results to OUT_FILE."""

import sys

import torch

from dsv3 import eplb
from dsv3.cache import decode_batch, prefill_batch
from dsv3.load import load
from dsv3.parallel import Parallel

from hf_checkpoints import save_gathered

# A skewed expert load (16 experts): EPLB replicates the first ones
LOAD = [0.3, 0.2, 0.1] + [0.4 / 13] * 13

# (prompt, decode steps): different lengths, and requests that finish before others
REQUESTS = [([5, 17, 250, 3, 99, 41, 7], 4), ([200, 11, 64, 8, 300, 123, 9, 77, 18, 2, 66], 2),
            ([42, 7, 301], 5), ([9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 15, 16, 17], 1),
            ([123, 45], 3)]


def share(rank, world):
    """The request indices of `rank`: round robin over the ranks other than 1 (which has none)."""
    ranks = [r for r in range(world) if r != 1]
    return [i for i in range(len(REQUESTS)) if ranks[i % len(ranks)] == rank] if rank in ranks else []


def run_requests(model, requests):
    """Prefill the (prompt, steps) requests together, then greedy decode steps, each request
    stopping after its own steps; with expert parallelism until every rank is done (idle steps
    without requests). Returns per request (prefill logits [len, V], its step logits [V] each,
    its tokens)."""
    cache = model.new_cache(num_blocks=16, block_size=16)
    cache.kv.fill_(float("nan"))  # every slot read must have been written
    blocks = [cache.allocator.allocate(cache.blocks_for(len(p) + n)) for p, n in requests]
    results = [[None, [], list(p)] for p, _ in requests]
    if requests:
        ids = torch.tensor([t for p, _ in requests for t in p])
        batch = prefill_batch([(len(p), b) for (p, _), b in zip(requests, blocks)], cache, all_logits=True)
        for r, lg in zip(results, model(ids, batch, cache).split([len(p) for p, _ in requests])):
            r[0] = lg
            r[2].append(int(lg[-1].argmax()))
    else:
        model.idle()
    step = 0
    while True:
        running = [i for i, (_, n) in enumerate(requests) if step < n]
        par = model.parallel
        if not (par.any_rank(bool(running)) if par.expert_parallel else running):
            return results
        if running:
            seqs = [results[i][2] for i in running]
            batch = decode_batch([(len(s) - 1, blocks[i]) for s, i in zip(seqs, running)], cache)
            out = model(torch.tensor([s[-1] for s in seqs]), batch, cache)
            for i, row in zip(running, out):
                results[i][1].append(row)
                results[i][2].append(int(row.argmax()))
        else:
            model.idle()
        step += 1


def main(model_dir, out):
    par = Parallel.from_env("cpu", mode="ep")
    model = load(model_dir, torch.float32, backend="torch", progress=False, parallel=par)
    mine = share(par.rank, par.world)
    requests = [REQUESTS[i] for i in mine]
    experts = model.model.layers[1].mlp.experts
    result = dict(requests=mine, experts=(experts.lo, experts.hi), heads=model.model.layers[0].self_attn.num_heads,
                  run=run_requests(model, requests))
    par.fp8_dispatch = True  # the same model, its tokens sent in FP8 from here on
    result["fp8"] = run_requests(model, requests)
    result["traffic"] = par.traffic
    placement = {1: eplb.place(LOAD, par.world, par.world)}  # layer 1: the MoE layer
    model = load(model_dir, torch.float32, backend="torch", progress=False,
                 parallel=Parallel("ep", par.rank, par.world, placement=placement))
    result["eplb_slots"] = model.model.layers[1].mlp.experts.logical
    result["eplb"] = run_requests(model, requests)
    save_gathered(par, result, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
