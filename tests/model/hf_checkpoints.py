"""Tiny DeepSeek-V3 checkpoints written by transformers' save_pretrained (the peer model).

Test modules here import what they use: `from hf_checkpoints import hf_checkpoint, make_hf_checkpoint`
(pytest puts this folder on sys.path; a second conftest.py would clash with tests/conftest.py).
"""

import os

import pytest
import torch
import torch.distributed as dist

from dsv3.cache import decode_batch, prefill_batch

transformers = pytest.importorskip("transformers")

# kv_lora_rank 512 / qk_rope_head_dim 64 are the MLA kernels' latent layout; the rest is tiny.
BASE = dict(vocab_size=320, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, q_lora_rank=64, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64,
            v_head_dim=32, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
            first_k_dense_replace=1, max_position_embeddings=2048, routed_scaling_factor=2.5,
            bos_token_id=0, eos_token_id=1)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
            mscale_all_dim=0.8, original_max_position_embeddings=256)


def write_tokenizer(path, vocab_size):
    """A byte-level BPE tokenizer.json (tokenizers library) with vocab_size tokens, ids 0/1 = <bos>/<eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "for i in range(10):\n    pass\n"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))


def make_hf_checkpoint(path, seed=0, std=0.1, dtype=torch.float32, rope=None, **overrides):
    """Random DeepseekV3ForCausalLM saved to `path` (+ tokenizer.json); returns the HF model (fp32, eval).
    overrides: DeepseekV3Config fields; rope: rope_parameters (None: plain RoPE, theta 10000)."""
    cfg = transformers.DeepseekV3Config(**(BASE | overrides),
                                        rope_parameters=rope or dict(rope_type="default", rope_theta=10000.0))
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, std)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):  # positive: transformers and DeepSeek agree then
                m.e_score_correction_bias.uniform_(0, 0.1)
    model.to(dtype).save_pretrained(path)
    write_tokenizer(path, cfg.vocab_size)
    return model.float()


@pytest.fixture
def hf_checkpoint(tmp_path):
    """make_hf_checkpoint into a fresh directory: hf_checkpoint(**overrides) -> (dir, hf_model)."""
    def make(**kwargs):
        path = str(tmp_path / f"ckpt{len(os.listdir(tmp_path))}")
        return path, make_hf_checkpoint(path, **kwargs)
    return make


def run_prefill_and_decode(model, prompts, steps, follow=None, kv_cache_dtype=None):
    """Prefill `prompts` together, then `steps` greedy decode steps for all of them (feeding the
    tokens of `follow`, another run's token lists, instead of this model's own choices if given),
    over a cache of kv_cache_dtype (model.new_cache's).
    Returns (per-prompt prefill logits [len, V], per-step logits [B, V], the full token lists)."""
    cache = model.new_cache(num_blocks=16, block_size=16, dtype=kv_cache_dtype)
    # every slot read must have been written by then (0xFF bytes: NaN in the FP8 cache too)
    cache.kv.fill_(0xFF if cache.kv.dtype == torch.uint8 else float("nan"))
    blocks = [cache.allocator.allocate(cache.blocks_for(len(p) + steps)) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], device=model.device)
    batch = prefill_batch([(len(p), b) for p, b in zip(prompts, blocks)], cache, model.device, all_logits=True)
    logits = model(ids, batch, cache)
    prefill = list(logits.split([len(p) for p in prompts]))
    seqs = [list(p) + [int(lg[-1].argmax())] for p, lg in zip(prompts, prefill)]
    if follow is not None:
        seqs = [f[:len(p) + 1] for p, f in zip(prompts, follow)]
    step_logits = []
    for _ in range(steps):
        batch = decode_batch([(len(s) - 1, b) for s, b in zip(seqs, blocks)], cache, model.device)
        out = model(torch.tensor([s[-1] for s in seqs], device=model.device), batch, cache)
        step_logits.append(out)
        for i, (s, row) in enumerate(zip(seqs, out)):
            s.append(int(row.argmax()) if follow is None else follow[i][len(s)])
    return [p.cpu() for p in prefill], [s.cpu() for s in step_logits], seqs


def save_gathered(par, result, out):
    """End of a torchrun worker (tp_worker.py, ep_worker.py): every rank's result gathered to rank
    0, which saves the list to `out`; then the process group is shut down."""
    gathered = [None] * par.world
    dist.all_gather_object(gathered, result)
    if par.rank == 0:
        torch.save(gathered, out)
    par.shutdown()
