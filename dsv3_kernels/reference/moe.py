"""Reference DeepSeekMoE routing, in fp32 PyTorch (DeepSeek-V3's official gate semantics).

moe_route, for router logits [T, E]:
1. scores = sigmoid(logits) (or softmax over the experts), fp32.
2. biased = scores + e_score_correction_bias (the bias only steers the choice).
3. With n_group > 1, the experts form n_group equal groups; a group's score is the sum of its two
   highest biased scores (the max when there is no bias); the topk_group best groups stay
   eligible and every other expert's biased score becomes -inf.
4. topk_ids = the topk highest biased scores, best first; topk_weights = the unbiased scores of
   those experts, divided by their sum when renormalize, times routed_scaling_factor.
Ties (groups or experts of equal score) go to the lower index, so every backend picks the same
experts.
"""

import torch


def _top(x: torch.Tensor, k: int):
    """topk along the last dim with ties broken toward the lower index (torch.topk leaves it open)."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def moe_route(router_logits, e_score_correction_bias, n_group, topk_group, topk, routed_scaling_factor,
              score_func="sigmoid", renormalize=True):
    t, e = router_logits.shape
    logits = router_logits.float()
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)
    biased = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if n_group > 1:
        grouped = biased.view(t, n_group, e // n_group)
        if e_score_correction_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = _top(grouped, 2)[0].sum(dim=-1)
        _, keep = _top(group_scores, topk_group)
        eligible = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        biased = biased.masked_fill(~eligible.repeat_interleave(e // n_group, dim=1), float("-inf"))
    _, ids = _top(biased, topk)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)
