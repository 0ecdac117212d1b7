"""The peer check: our DeepSeek-V3 (fp32, torch backend = the reference path) loads the checkpoint
transformers' save_pretrained wrote and gives transformers' logits, for prefill and for decode
steps over the paged latent cache (absorbed MLA), on several tiny configurations."""

import json
import os

import pytest
import torch

from dsv3.load import load

from hf_checkpoints import YARN, hf_checkpoint, run_prefill_and_decode  # noqa: F401

CONFIGS = {
    "q_lora-groups": {},
    "no_q_lora": dict(q_lora_rank=None),
    "one_group": dict(n_group=1, topk_group=1),
    "yarn": dict(rope=YARN),
    "all_moe": dict(first_k_dense_replace=0, n_shared_experts=2),
}
TOL = 1e-4


def hf_logits(hf, seq):
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(hf_checkpoint, name):  # noqa: F811
    path, hf = hf_checkpoint(**CONFIGS[name])
    model = load(path, torch.float32, backend="torch", progress=False)
    prompts = [[5, 17, 250, 3, 99, 41, 7], [200, 11, 64, 8, 300, 123, 9, 77, 18, 2, 66]]
    prefill, steps, seqs = run_prefill_and_decode(model, prompts, steps=4)
    for p, got, seq in zip(prompts, prefill, seqs):
        want = hf_logits(hf, seq)
        assert want.abs().max() > 0.5  # logits of a size where 1e-4 means something
        torch.testing.assert_close(got, want[:len(p)], rtol=0, atol=TOL)
        for k, step in enumerate(steps):  # decode step k predicts position len(p) + k
            torch.testing.assert_close(step[prompts.index(p)], want[len(p) + k], rtol=0, atol=TOL)


def test_transformers_4x_config_json(hf_checkpoint):  # noqa: F811
    """config.json as transformers 4.x / DeepSeek's release write it: rope_theta + rope_scaling."""
    path, hf = hf_checkpoint(rope=YARN)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    model = load(path, torch.float32, backend="torch", progress=False)
    seq = [3, 1, 4, 15, 92, 65, 35, 89]
    prefill, _, _ = run_prefill_and_decode(model, [seq], steps=0)
    torch.testing.assert_close(prefill[0], hf_logits(hf, seq), rtol=0, atol=TOL)
