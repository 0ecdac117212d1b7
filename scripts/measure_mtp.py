"""Measure the default model's multi-token prediction: how often the MTP module's draft is kept, and
CPU decode tokens/s with and without speculative decoding, side by side.

    python scripts/measure_mtp.py [--model dsv3/default_model] [--rounds 3] [--threads N] [--depths 3,12,61]
        [--out results.json]

- acceptance: greedy generation of 128 tokens from 16 prompts cut from the held-out sample
  (tests/model/data/heldout_sample.txt, 64 tokens each, at line starts spread over the file), as
  Generator reports it (drafts kept / drafts verified); and teacher-forced over the whole sample in
  512-token windows: at each position the MTP draft for t_{i+2} (given the true t_{i+1}) against the
  main model's greedy choice at i + 1 (the rate greedy decoding would see on that text), and the MTP
  head's loss in nats per token and per byte.
- speed: decode tokens/s, bf16 activations, the checkpoint's FP8 weights, backend cpu; B = 1
  ("def fibonacci(n):") and B = 8 ("import os1" ... "import os8"), 128 new tokens, greedy; the
  two modes alternate for --rounds rounds.
- --depths 3,12,61: what a speculative step costs against a plain one as the model gets deeper:
  random models shaped like the default one but with N decoder layers (one MTP layer, FP8 weights,
  cpu backend), B = 1, 64 new tokens, ms per step with and without MTP (random drafts are rejected,
  so every speculative step pays the draft and the s_q = 2 verify for one token). The speed-up at
  acceptance a is then (1 + a) x t_plain / t_speculative: computed from these measured step costs,
  for the acceptance measured on the default model above.
"""

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.nn.functional as F

from dsv3.cache import prefill_batch
from dsv3.config import ModelArgs
from dsv3.evaluate import token_bytes
from dsv3.generate import DEFAULT_MODEL
from dsv3.generator import Generator
from dsv3.load import load, load_tokenizer
from dsv3.model import Transformer
from dsv3.testing import init_random_

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "tests", "model", "data", "heldout_sample.txt")


def teacher_forced(model, tokenizer, text, window=512):
    """(draft agrees with the main model's greedy choice, MTP nats per token, MTP nats per byte)."""
    bos, window = model.args.bos_token_id, min(window, model.args.max_position_embeddings)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    nbytes = token_bytes(tokenizer)
    agree = total = 0
    nll = nb = 0.0
    for s in range(0, len(ids), window - 1):
        seq = [bos] + ids[s:s + window - 1]
        if len(seq) < 3:
            break
        t = len(seq)
        cache = model.new_cache(-(-t // 64), 64, mtp=True)
        blocks = cache.allocator.allocate(cache.blocks_for(t))
        x = torch.tensor(seq)
        logits, h = model(x, prefill_batch([(t, blocks)], cache, all_logits=True), cache, hidden=True)
        # MTP at i < t - 1: (h_i, t_{i+1}) -> t_{i+2}
        mtp, _ = model.mtp_forward(h[:t - 1], x[1:], prefill_batch([(t - 1, blocks)], cache, all_logits=True), cache)
        agree += (mtp[:-1].argmax(-1) == logits[1:-1].argmax(-1)).sum().item()
        total += t - 2
        nll += F.cross_entropy(mtp[:-1], x[2:], reduction="sum").item()
        nb += nbytes[x[2:]].sum().item()
    return agree / total, nll / total, nll / nb


def step_costs(model_dir, depth, rounds, new_tokens=64):
    """(ms per plain step, ms per speculative step) at B = 1 of a random model shaped like
    model_dir's with `depth` decoder layers and one MTP layer; the best of `rounds` runs each."""
    args = dataclasses.replace(ModelArgs.from_json(os.path.join(model_dir, "config.json")), num_hidden_layers=depth,
                               num_nextn_predict_layers=1, eos_token_id=None)
    model = init_random_(Transformer(args, torch.bfloat16, fp8=True, backend="cpu"), seed=depth)
    prompt = [[args.bos_token_id] + list(range(10, 26))]
    plain, spec = Generator(model, num_blocks=4, speculative="none"), Generator(model, num_blocks=4, speculative="mtp")
    best = {"none": float("inf"), "mtp": float("inf")}
    for _ in range(rounds + 1):  # the first round warms up
        for name, g in (("none", plain), ("mtp", spec)):
            g.generate(prompt, max_new_tokens=new_tokens)
            steps = g.last_stats.decode_steps or g.last_stats.decode_tokens
            best[name] = min(best[name], 1e3 * g.last_stats.decode_s / steps)
    return best["none"], best["mtp"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--depths", default="", help="comma-separated decoder-layer counts for the step-cost sweep")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.model)
    model = load(a.model, dtype=torch.bfloat16, device="cpu", backend="cpu", progress=False)
    text = open(SAMPLE, encoding="utf-8").read()
    res = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    with torch.inference_mode():
        agree, nats, npb = teacher_forced(model, tok, text)
    res["teacher_forced"] = dict(draft_agrees_with_greedy=agree, mtp_nats_per_token=nats, mtp_nats_per_byte=npb)
    print(f"teacher-forced on the sample: draft = main greedy {agree:.1%}; MTP head {nats:.4f} nats/token, "
          f"{npb:.4f} nats/byte", flush=True)

    spec = Generator(model, tok, num_blocks=128, speculative="mtp")
    plain = Generator(model, tok, num_blocks=128, speculative="none")
    lines = [i for i, c in enumerate(text) if c == "\n" and i + 1 < len(text) and text[i + 1] != "\n"]
    starts = [lines[k * len(lines) // 16] + 1 for k in range(16)]
    bos = model.args.bos_token_id
    prompts = [[bos] + tok.encode(text[s:], add_special_tokens=False).ids[:64] for s in starts]
    a_spec = spec.generate(prompts, max_new_tokens=a.new_tokens)
    stats = spec.last_stats
    # Greedy with MTP keeps a draft iff it is the target's argmax, so the output should be plain
    # greedy's; where batch sizes change a GEMM's summation (the avx2 level's FP8 few-rows and panel
    # paths, benchmarks/README.md) a near-tie can flip, which is reported, not hidden.
    differ = sum(x != y for x, y in zip(a_spec, plain.generate(prompts, max_new_tokens=a.new_tokens)))
    res["generation"] = dict(acceptance_rate=stats.acceptance_rate, tokens_per_step=stats.tokens_per_step,
                             drafts=stats.drafts, prompts_differing_without_mtp=differ)
    same = "output identical without MTP" if differ == 0 else f"output differs without MTP for {differ} of 16"
    print(f"greedy generation from 16 held-out prompts: acceptance {stats.acceptance_rate:.1%}, "
          f"{stats.tokens_per_step:.2f} tokens per step ({same})", flush=True)

    cases = {1: ["def fibonacci(n):"], 8: [f"import os{i}" for i in range(1, 9)]}
    res["speed"] = {}
    for b, texts in cases.items():
        ps = [[bos] + tok.encode(t, add_special_tokens=False).ids for t in texts]
        rows = res["speed"][f"B={b}"] = {"none": [], "mtp": [], "acceptance": []}
        spec.generate(ps, max_new_tokens=8)  # warm-up
        plain.generate(ps, max_new_tokens=8)
        for _ in range(a.rounds):
            for name, g in (("none", plain), ("mtp", spec)):
                g.generate(ps, max_new_tokens=a.new_tokens)
                rows[name].append(g.last_stats.decode_tokens_per_s)
            rows["acceptance"].append(spec.last_stats.acceptance_rate)
        ratio = [m / n for m, n in zip(rows["mtp"], rows["none"])]
        rows["speedup"] = ratio
        print(f"B={b}: decode tokens/s without MTP {', '.join(f'{x:.0f}' for x in rows['none'])}; with MTP "
              f"{', '.join(f'{x:.0f}' for x in rows['mtp'])} (acceptance {rows['acceptance'][-1]:.1%}); "
              f"speed-up per round {', '.join(f'{x:.2f}x' for x in ratio)}", flush=True)
    if a.depths:
        acc = res["speed"]["B=1"]["acceptance"][-1]
        res["depths"] = {}
        for depth in (int(d) for d in a.depths.split(",")):
            t_plain, t_spec = step_costs(a.model, depth, a.rounds)
            res["depths"][depth] = dict(plain_ms=t_plain, speculative_ms=t_spec, cost_ratio=t_spec / t_plain,
                                        speedup_at_b1_acceptance=(1 + acc) * t_plain / t_spec)
            print(f"{depth} layers: plain step {t_plain:.2f} ms, speculative step {t_spec:.2f} ms "
                  f"({t_spec / t_plain:.2f}x); at {acc:.1%} acceptance: {(1 + acc) * t_plain / t_spec:.2f}x",
                  flush=True)
    res["load_after"] = os.getloadavg()
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"load average before / after: {res['load_before'][0]:.1f} / {res['load_after'][0]:.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
