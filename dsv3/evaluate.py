"""Held-out loss (nats per byte) and expert load of a dsv3 model on a text, through the kernels.

The text's tokens are cut into windows of `window - 1` tokens, each run as its own request after
a BOS token, so every token is predicted exactly once with the context of its window; the windows
run as packed prefill batches with all positions' logits. nats/byte = the summed negative log
likelihood / the text's UTF-8 bytes (byte-level BPE: the same as the predicted tokens' bytes).
The expert load is the fraction of routed (token, choice) pairs each expert of each MoE layer got.
A model with an MTP module is also scored on its second-next-token prediction: in each window the
MTP module at position i (main hidden state h_i, token t_{i+1}) predicts t_{i+2}; its loss is per
byte of the tokens it predicts, and "mtp_agreement" is how often its argmax equals the main model's
argmax at position i + 1 (the draft greedy speculative decoding would keep, on this text).

    python -m dsv3.evaluate --model DIR --text FILE [--backend cpu] [--window 512] [--kv-cache-dtype fp8]
"""

import argparse
import json
import math
import sys

import torch

from dsv3_kernels.utils import cdiv

from .cache import CACHE_DTYPE_HELP, CACHE_DTYPES, prefill_batch
from .files import Staged
from .moe import Gate


@torch.inference_mode()
def evaluate(model, tokenizer, text: str, window: int = 512, windows_per_batch: int = 8, kv_cache_dtype=None) -> dict:
    """-> {"nats_per_byte", "nats_per_token", "tokens", "bytes", "expert_load": [[fraction] * E] per
    MoE layer, "kv_cache_bytes_per_token"}, with an MTP module also "mtp_nats_per_byte",
    "mtp_nats_per_token", "mtp_agreement" (see the module's doc). window: tokens per request, BOS included (at most
    max_position_embeddings). kv_cache_dtype: model.new_cache's (with "fp8" the attention reads
    the quantized latent: dsv3.attention)."""
    bos = model.args.bos_token_id
    if bos is None:
        raise ValueError("evaluate needs a model with a bos_token_id (each window starts with it)")
    if not 2 <= window <= model.args.max_position_embeddings:
        raise ValueError(f"window must be in [2, max_position_embeddings = {model.args.max_position_embeddings}], "
                         f"got {window}")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError("text has no tokens")
    chunks = [ids[i:i + window - 1] for i in range(0, len(ids), window - 1)]
    gates = [m for m in model.model.modules() if isinstance(m, Gate)]  # the decoder layers (not MTP: never run here)
    loads = [torch.zeros(model.args.n_routed_experts, dtype=torch.int64) for _ in gates]

    def count(load):
        def hook(module, inputs, out):  # out: (topk_weights, topk_ids); returns None (keeps the output)
            load.add_(torch.bincount(out[1].flatten().long().cpu(), minlength=load.numel()))
        return hook

    hooks = [g.register_forward_hook(count(c)) for g, c in zip(gates, loads)]
    mtp = len(model.mtp) > 0
    cache = model.new_cache(windows_per_batch * cdiv(window, 64), block_size=64, dtype=kv_cache_dtype, mtp=mtp)
    device, nll = model.device, 0.0
    mtp_nll, mtp_tokens, mtp_bytes, agree = 0.0, 0, 0, 0
    token_nbytes = token_bytes(tokenizer).to(device) if mtp else None
    try:
        for start in range(0, len(chunks), windows_per_batch):
            group = chunks[start:start + windows_per_batch]
            blocks = [cache.allocator.allocate(cache.blocks_for(len(c) + 1)) for c in group]
            batch = prefill_batch([(len(c) + 1, b) for c, b in zip(group, blocks)], cache, device, all_logits=True)
            inputs = torch.tensor([t for c in group for t in [bos] + c], device=device)
            logits, h = model(inputs, batch, cache, hidden=True)
            # each request's rows 0..len-1 predict its tokens; its last row (after the last token) nothing
            rows, targets, at = [], [], 0
            for c in group:
                rows.extend(range(at, at + len(c)))
                targets.extend(c)
                at += len(c) + 1
            rows = torch.tensor(rows, device=device)
            nll += torch.nn.functional.cross_entropy(logits[rows], torch.tensor(targets, device=device),
                                                     reduction="sum").item()
            if mtp:  # request rows 0..len-1: (h_i, token i + 1); rows 0..len-2 predict tokens 2..len
                firsts = [r - 1 for r in _starts([[0] + c for c in group])]  # each request's BOS row - 1
                keep = [f + 1 + i for f, c in zip(firsts, group) for i in range(len(c))]  # not the last rows
                mb = prefill_batch([(len(c), b) for c, b in zip(group, blocks)], cache, device, all_logits=True)
                mlogits, _ = model.mtp_forward(h[keep], inputs[[i + 1 for i in keep]], mb, cache)
                pred = [r for r, c in zip(_starts(group), group) for r in range(r, r + len(c) - 1)]
                # (int64 also when empty: windows of one token have nothing for the MTP module to predict)
                want = torch.tensor([t for c in group for t in c[1:]], dtype=torch.int64, device=device)
                mtp_nll += torch.nn.functional.cross_entropy(mlogits[pred], want, reduction="sum").item()
                mtp_tokens += want.numel()
                mtp_bytes += int(token_nbytes[want].sum())
                main_next = logits[[i + 1 for i in keep]].argmax(-1)
                agree += int((mlogits[pred].argmax(-1) == main_next[pred]).sum())
            for b in blocks:
                cache.allocator.free(b)
    finally:
        for h in hooks:
            h.remove()
    nbytes = len(text.encode("utf-8"))
    r = dict(nats_per_byte=nll / nbytes, nats_per_token=nll / len(ids), tokens=len(ids), bytes=nbytes,
             expert_load=[(c.double() / max(int(c.sum()), 1)).tolist() for c in loads],
             kv_cache_bytes_per_token=cache.bytes_per_token)
    if mtp and mtp_tokens:
        r.update(mtp_nats_per_byte=mtp_nll / mtp_bytes, mtp_nats_per_token=mtp_nll / mtp_tokens,
                 mtp_agreement=agree / mtp_tokens)
    return r


def token_bytes(tokenizer) -> torch.Tensor:
    """int64 [vocab]: the bytes each token of a byte-level BPE tokenizer stands for (the length of
    its vocabulary string: one character per byte; 0 for special tokens)."""
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    n = tokenizer.get_vocab_size()
    out = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        s = tokenizer.id_to_token(i)
        out[i] = 0 if s is None or s in special else len(s)
    return out


def _starts(group):
    """The first MTP row of each request of a window group (request i has len(group[i]) rows)."""
    out, at = [], 0
    for c in group:
        out.append(at)
        at += len(c)
    return out


def main(argv=None):
    """The command line. Returns 0; an unusable argument, model folder or text exits with status 2
    and a one-line message, as argparse does, and writes no --expert-load file."""
    p = argparse.ArgumentParser(prog="python -m dsv3.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--window", type=int, default=512, help="tokens per request, BOS included: from 2 to the "
                                                             "model's max_position_embeddings (default 512)")
    p.add_argument("--backend", choices=["auto", "cuda", "triton", "cpu", "torch"], default="auto")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--kv-cache-dtype", choices=sorted(CACHE_DTYPES), default=None, help=CACHE_DTYPE_HELP)
    p.add_argument("--expert-load", metavar="FILE", default=None,
                   help="write the expert loads ({\"expert_load\": [[share] * E] per MoE layer}) to FILE as JSON "
                        "(what dsv3.generate --eplb reads)")
    a = p.parse_args(argv)
    from .load import check_backend, check_device, load, load_tokenizer

    def fail(message):
        p.exit(2, f"{p.prog}: error: {message}\n")

    backend = None if a.backend == "auto" else a.backend
    try:
        device = check_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_backend(backend, device)
    except ValueError as e:  # "device ...", "backend ..."
        fail(f"--{e}")
    if a.window < 2:
        fail(f"--window must be >= 2 (BOS and a token), got {a.window}")
    staged = Staged()
    try:
        if a.expert_load:
            try:  # now, not after the evaluation
                staged.add(a.expert_load)
            except OSError as e:
                fail(f"--expert-load {a.expert_load} cannot be written: {e.strerror or e}")
        try:
            with open(a.text, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            fail(f"--text {a.text} is not UTF-8 text ({e.reason} at byte {e.start})")
        except OSError as e:
            fail(f"--text {a.text} cannot be read: {e.strerror or e}")
        if not text:
            fail(f"--text {a.text} is empty")
        try:
            tokenizer = load_tokenizer(a.model)
            model = load(a.model, dtype=getattr(torch, a.dtype), device=device, backend=backend)
            if a.window > model.args.max_position_embeddings:
                fail(f"--window must be at most max_position_embeddings = {model.args.max_position_embeddings}, "
                     f"got {a.window}")
            r = evaluate(model, tokenizer, text, a.window, kv_cache_dtype=CACHE_DTYPES.get(a.kv_cache_dtype))
        except (OSError, ValueError) as e:  # ValueError: ConfigError, CheckpointError
            fail(str(e))
        if a.expert_load:
            with open(staged.paths[a.expert_load], "w") as f:
                json.dump({"expert_load": r["expert_load"]}, f)
            staged.commit()
    finally:
        staged.discard()  # what was not committed
    load_max = max((max(x) for x in r["expert_load"]), default=math.nan)
    print(json.dumps({k: r[k] for k in ("nats_per_byte", "nats_per_token", "tokens", "bytes",
                                        "kv_cache_bytes_per_token")}))
    print(f"busiest expert: {load_max:.3f} of routed tokens (uniform: {1 / model.args.n_routed_experts:.3f})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
