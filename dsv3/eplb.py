"""Redundant experts for expert parallelism, placed by DeepSeek's EPLB rule (its global policy)
from measured expert loads (`python -m dsv3.evaluate --expert-load FILE` writes them).

Per MoE layer, with E experts, R redundant slots and W ranks of (E + R) / W slots each:
1. replicate: R times, give one more replica to the expert with the highest load per replica;
2. pack: the replicas, heaviest (load / replicas) first, each to the rank with the least load so
   far among those with a free slot, preferring ranks that do not hold that expert yet.
A token's choice of a replicated expert goes to one of its replicas (dsv3/moe.py), so the heavy
experts' tokens spread over several ranks.
"""

import json


def place(load, world: int, redundant: int) -> list:
    """load: E non-negative numbers (an expert's share of the routed choices) -> for each rank the
    logical expert of each of its (E + redundant) / world slots."""
    e = len(load)
    if redundant < 0 or (e + redundant) % world:
        raise ValueError(f"n_routed_experts + redundant experts = {e} + {redundant} must be a multiple of the "
                         f"{world} ranks")
    replicas = [1] * e
    for _ in range(redundant):
        replicas[max(range(e), key=lambda x: (load[x] / replicas[x], -x))] += 1
    slots = (e + redundant) // world
    ranks = [[] for _ in range(world)]
    totals = [0.0] * world
    pieces = sorted(((load[x] / replicas[x], x) for x in range(e) for _ in range(replicas[x])),
                    key=lambda p: (-p[0], p[1]))
    for share, x in pieces:
        free = [r for r in range(world) if len(ranks[r]) < slots]
        r = min(free, key=lambda r: (x in ranks[r], totals[r], r))
        ranks[r].append(x)
        totals[r] += share
    return ranks


def plan(path: str, moe_layers: list, world: int, redundant: int) -> dict:
    """{layer index: place(...)} for the MoE layers (in order) from the expert loads in `path`
    (JSON {"expert_load": [[share] * E] per MoE layer})."""
    with open(path) as f:
        try:
            loads = json.load(f)["expert_load"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not an expert-load file ({{\"expert_load\": [[share] * E] per MoE layer}}): "
                             f"{e!r}") from None
    if len(loads) != len(moe_layers):
        raise ValueError(f"{path} has the expert loads of {len(loads)} MoE layers; the model has {len(moe_layers)}")
    return {layer: place(load, world, redundant) for layer, load in zip(moe_layers, loads)}
