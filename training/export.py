"""The end of a training run: the trained weights as DeepSeek-V3-format checkpoints (bf16, and FP8
as dsv3/default_model ships), measured through dsv3 (the kernels) into metrics.json."""

import hashlib
import json
import os
import sys

import torch

from dsv3.config import ModelArgs
from dsv3.evaluate import evaluate
from dsv3.load import load
from dsv3.quantize import quantize_checkpoint

from . import corpus


def export(model, margs: ModelArgs, tokenizer, heldout_texts, a, record: dict) -> dict:
    """bf16 and FP8 checkpoints in OUT/bf16, OUT/fp8, evaluated through dsv3 (the kernels) on the
    whole held-out set; OUT/fp8/metrics.json records the numbers, OUT/heldout_sample.txt is the
    fixed sample the tests check the shipped model on."""
    from safetensors.torch import save_file

    bf16_dir, fp8_dir = os.path.join(a.out, "bf16"), os.path.join(a.out, "fp8")
    os.makedirs(bf16_dir, exist_ok=True)
    save_file(model.hf_state_dict(), os.path.join(bf16_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = margs.to_hf()
    cfg["torch_dtype"] = "bfloat16"
    with open(os.path.join(bf16_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tokenizer.save(os.path.join(bf16_dir, "tokenizer.json"))
    with open(os.path.join(bf16_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=corpus.BOS, eos_token=corpus.EOS,
                       model_max_length=margs.max_position_embeddings), f, indent=2)
    quantize_checkpoint(bf16_dir, fp8_dir)

    heldout = "".join(heldout_texts)
    sample = heldout_sample(heldout_texts)
    with open(os.path.join(a.out, "heldout_sample.txt"), "w", encoding="utf-8") as f:
        f.write(sample)
    metrics = dict(window=a.seq_len, heldout=dict(files=len(heldout_texts), bytes=len(heldout.encode())),
                   heldout_sample=dict(bytes=len(sample.encode()),
                                       sha256=hashlib.sha256(sample.encode()).hexdigest()))
    for name, path in (("bf16", bf16_dir), ("fp8", fp8_dir)):
        m = load(path, dtype=torch.bfloat16, device="cpu", backend="cpu", progress=False)
        full, part = evaluate(m, tokenizer, heldout, a.seq_len), evaluate(m, tokenizer, sample, a.seq_len)
        metrics["heldout"][name] = full["nats_per_byte"]
        metrics["heldout_sample"][name] = part["nats_per_byte"]
        if "mtp_nats_per_byte" in full:  # the MTP head (second next token)
            for r, key in ((full, "heldout"), (part, "heldout_sample")):
                metrics[key][f"mtp_{name}"] = {k[4:]: r[k] for k in ("mtp_nats_per_byte", "mtp_nats_per_token",
                                                                     "mtp_agreement")}
        metrics.setdefault("expert_load", {})[name] = full["expert_load"]
        print(f"{name}: held-out {full['nats_per_byte']:.4f} nats/byte", file=sys.stderr)
    metrics["fp8_vs_bf16"] = metrics["heldout"]["fp8"] / metrics["heldout"]["bf16"] - 1
    metrics["train"] = dict(preset=a.preset, seed=a.seed, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                            lr=a.lr, bias_update_rate=a.bias_update_rate, mtp_layers=a.mtp_layers,
                            mtp_lambda=a.mtp_lambda, python=sys.version.split()[0],
                            torch=torch.__version__, threads=torch.get_num_threads(), **record)
    with open(os.path.join(fp8_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return dict(metrics=metrics)


def heldout_sample(heldout_texts, max_bytes: int = 16384) -> str:
    """The held-out files from the first on, cut at the last whole line that fits in max_bytes."""
    out, size = [], 0
    for text in heldout_texts:
        for line in text.splitlines(keepends=True):
            n = len(line.encode())
            if size + n > max_bytes and out:
                return "".join(out)
            out.append(line)
            size += n
    return "".join(out)
