"""DeepSeekMoE: the group-limited sigmoid gate, the routed experts and the shared experts.

gate (Hugging Face's `mlp.gate`): router logits = x @ weight.T in fp32, then dsv3_kernels.moe_route
(scores + e_score_correction_bias choose topk_group groups and num_experts_per_tok experts; the
unbiased scores, renormalized, times routed_scaling_factor weigh them).
experts: each expert's gate_proj/up_proj rows fused into w13 [E, 2I, D] and down_proj into
w2 [E, D, I] (bf16 or FP8 + weight_scale_inv), run by dsv3_kernels.fused_moe.
With more than one rank each holds E/world experts (the model's dsv3.parallel.Parallel). Tensor parallel: every rank
sees every token; its choices of other ranks' experts get the id NO_EXPERT (no work here) and the
all-reduce of the layer output adds the owners' results. Expert parallel: the tokens travel to the
ranks that own their experts and back (Experts.expert_parallel).
"""

import torch
import torch.nn.functional as F

import dsv3_kernels as dk
from dsv3_kernels.utils import GEMM_BLOCK

from .config import ModelArgs
from .layers import MLP, Module, _param
from .parallel import Parallel


class Gate(Module):
    def __init__(self, args: ModelArgs, device=None):
        super().__init__()
        self.args = args
        self.weight = _param(args.n_routed_experts, args.hidden_size, dtype=torch.float32, device=device)
        self.e_score_correction_bias = _param(args.n_routed_experts, dtype=torch.float32, device=device)

    def forward(self, x):
        """x [T, D] -> (topk_weights float32 [T, k], topk_ids int32 [T, k]) over all experts."""
        a = self.args
        logits = F.linear(x.float(), self.weight)
        return dk.moe_route(logits, self.e_score_correction_bias, a.n_group, a.topk_group, a.num_experts_per_tok,
                            a.routed_scaling_factor, a.scoring_func, a.norm_topk_prob, backend=self.backend)


class Experts(Module):
    """This rank's routed experts: w13 [E_local, 2I, D], w2 [E_local, D, I], bf16 (fp32 in the
    float32 reference model) or e4m3 with w13_scale_inv / w2_scale_inv (128x128 blocks).
    logical: the checkpoint's expert in each local slot (the loader reads these): [lo, hi), or
    with redundant experts (expert parallelism, dsv3/eplb.py) the placement's, some twice or more
    over the ranks; `replicas` [E, max replicas] then holds each expert's slots numbered over all
    ranks (rank * slots per rank + slot), repeated to the width, and n_replicas [E] their count."""

    def __init__(self, args: ModelArgs, dtype, fp8=False, device=None, layer=0, *, parallel: Parallel):
        super().__init__()
        self.parallel = parallel
        self.n_routed_experts = args.n_routed_experts
        slots = parallel.expert_slots(args.n_routed_experts, layer)
        self.logical = slots[parallel.rank]
        self.lo, self.hi = self.logical[0], self.logical[-1] + 1  # the range tensor parallelism holds
        self.num_slots = len(slots) * len(self.logical)  # over all ranks
        self.replicas = self.n_replicas = None
        if self.num_slots > args.n_routed_experts:
            where = [[] for _ in range(args.n_routed_experts)]
            for r, s in enumerate(slots):
                for j, x in enumerate(s):
                    where[x].append(r * len(s) + j)
            width = max(len(w) for w in where)
            self.replicas = torch.tensor([w + w[:1] * (width - len(w)) for w in where], dtype=torch.int64,
                                         device=device)
            self.n_replicas = torch.tensor([len(w) for w in where], dtype=torch.int64, device=device)
        e, d, i = len(self.logical), args.hidden_size, args.moe_intermediate_size
        self.fp8 = fp8 and d % GEMM_BLOCK == 0 and i % GEMM_BLOCK == 0
        # the expert kernels take bf16 or FP8; fp32 experts run on the torch backend only
        wdtype = torch.float8_e4m3fn if self.fp8 else (torch.float32 if dtype == torch.float32 else torch.bfloat16)
        self.w13 = _param(e, 2 * i, d, dtype=wdtype, device=device)
        self.w2 = _param(e, d, i, dtype=wdtype, device=device)
        if self.fp8:
            self.w13_scale_inv = _param(e, 2 * i // GEMM_BLOCK, d // GEMM_BLOCK, dtype=torch.float32, device=device)
            self.w2_scale_inv = _param(e, d // GEMM_BLOCK, i // GEMM_BLOCK, dtype=torch.float32, device=device)
        else:
            self.w13_scale_inv = self.w2_scale_inv = None

    def _dtype(self):
        """fused_moe's activations: float32 with float32 experts, else bfloat16."""
        return torch.float32 if self.w13.dtype == torch.float32 else torch.bfloat16

    def forward(self, x, topk_weights, topk_ids):
        """x [T, D], routes over all experts -> the routed output of this rank's experts [T, D]."""
        if self.parallel.world > 1:  # other ranks' experts: no expert here (costs nothing)
            local = (topk_ids >= self.lo) & (topk_ids < self.hi)
            topk_ids = torch.where(local, topk_ids - self.lo, dk.NO_EXPERT).to(torch.int32)
        out = dk.fused_moe(x.to(self._dtype()), self.w13, self.w2, topk_weights, topk_ids, self.w13_scale_inv,
                           self.w2_scale_inv, backend=self.backend)
        return out.to(x.dtype)

    def expert_parallel(self, x, topk_weights, topk_ids):
        """x [T, D] (T may be 0: the collectives still run) -> the routed output over all experts
        [T, D]: each token once to each rank owning one of its experts, through that rank's experts
        (its choices as the rank sees them: local ids, NO_EXPERT for the others), back, summed."""
        par = self.parallel
        world, fp8 = par.world, par.fp8_dispatch
        if self.replicas is not None:  # each choice to one replica of its expert, spread by token and choice
            ids = topk_ids.long()
            t, k = ids.shape
            spread = torch.arange(t, device=ids.device)[:, None] + torch.arange(k, device=ids.device)
            pick = spread % self.n_replicas[ids]
            topk_ids = self.replicas[ids, pick].to(torch.int32)
        send, scale, ids, weights, offsets, inverse = dk.ep_dispatch(
            x.to(self._dtype()), topk_ids, topk_weights, self.num_slots, world, fp8, backend=self.backend)
        counts = offsets.diff().tolist()  # the split sizes are host values (a device sync on a GPU)
        parts = [send, ids, weights] + ([scale] if fp8 else [])
        received, recv_counts = par.all_to_all_rows(parts, counts)
        rows, ids, weights = received[:3]
        if fp8:  # e4m3 x its 1x128 scale (fused_moe takes bf16 rows; FP8 experts requantize them)
            n, d = rows.shape
            rows = (rows.float().view(n, d // GEMM_BLOCK, GEMM_BLOCK) * received[3][..., None]).view(n, d).to(self._dtype())
        out = dk.fused_moe(rows, self.w13, self.w2, weights, ids, self.w13_scale_inv, self.w2_scale_inv,
                           backend=self.backend)
        (back,), _ = par.all_to_all_rows([out], recv_counts, counts)
        par.traffic.tokens += x.shape[0]
        return dk.ep_combine(back, inverse, backend=self.backend).to(x.dtype)


class MoE(Module):
    def __init__(self, args: ModelArgs, dtype, fp8=False, device=None, layer=0, *, parallel: Parallel):
        super().__init__()
        self.expert_parallel = parallel.expert_parallel
        self.gate = Gate(args, device)
        self.experts = Experts(args, dtype, fp8, device, layer, parallel=parallel)
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts, dtype, fp8,
                                   device, parallel=parallel, what="moe_intermediate_size * n_shared_experts")
                               if args.n_shared_experts else None)

    def forward(self, x):
        """x [T, D] -> this rank's partial output [T, D] (routed + shared; the caller all-reduces
        with tp), or with ep the whole output for this rank's tokens."""
        weights, ids = self.gate(x)
        if self.expert_parallel:
            out = self.experts.expert_parallel(x, weights, ids)
        else:
            out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
