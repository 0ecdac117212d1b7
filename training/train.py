"""Train the shipped default model: a small DeepSeek-V3-architecture model on the Python standard
library's own source (training/corpus.py), then export it as a DeepSeek-V3-format checkpoint
(training/export.py).

From the repository root (training/ is not installed with the package):
    python -m training.train --out runs/default            # ~55 min on one CPU thread (--threads 1)
    python -m training.train --out runs/default --resume   # continues from runs/default/train_state.pt
                                                           # (same settings; --stop-at N stops after step N)

The model is training/model.py's TrainableTransformer. Load balance is DeepSeek-V3's
auxiliary-loss-free rule: after every step each MoE layer's e_score_correction_bias moves by
bias_update_rate towards the mean load (+ for an underloaded expert, - for an overloaded one); no
balance loss.

Determinism: --seed fixes the initialization and every step's batch (drawn from a generator
seeded by (seed, step)), so a resumed run continues exactly as an uninterrupted one.
Outputs in --out: tokenizer.json, train_state.pt (resumable), bf16/ (the trained weights in
bf16), fp8/ (e4m3 + weight_scale_inv, 128x128 blocks: what dsv3/default_model ships) with
metrics.json (held-out nats/byte of both, expert load, the training record).
"""

import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
import time

import torch
import torch.nn.functional as F

from dsv3.config import ModelArgs
from dsv3.evaluate import token_bytes
from dsv3.files import Staged
from dsv3.load import load, load_tokenizer

from . import corpus
from .export import export
from .model import PRESETS, MoE, TrainableTransformer


# --seed: every step's batch generator is seeded with seed * 1_000_003 + step, which torch takes below 2**64
MAX_SEED = 2 ** 44

# ---- data and objective ----

def batch_at(stream: torch.Tensor, step: int, seed: int, batch_size: int, seq_len: int, bos: int):
    """The batch of `step`: batch_size windows at random offsets (a generator seeded by (seed, step)),
    each BOS + seq_len - 1 tokens -> (inputs, targets) int64 [B, seq_len]; every window's first
    target is predicted from BOS alone, as at evaluation and generation."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=g)
    win = torch.stack([stream[s:s + seq_len] for s in starts.tolist()]).long()
    inputs = torch.cat([torch.full((batch_size, 1), bos), win[:, :-1]], dim=1)
    return inputs, win


def eval_windows(stream: torch.Tensor, seq_len: int, count: int, bos: int):
    """The first `count` consecutive windows of the held-out stream (BOS + seq_len - 1 tokens each)."""
    n = min(count, stream.numel() // seq_len)
    win = stream[:n * seq_len].view(n, seq_len).long()
    return torch.cat([torch.full((n, 1), bos), win[:, :-1]], dim=1), win


def losses(model, inputs, targets, mtp_lambda: float):
    """(total, main, [mtp depth 1, ...]): cross entropies in nats per token (0-d tensors); total =
    main + mtp_lambda * mean over the depths (DeepSeek-V3's MTP objective)."""
    logits, mtp = model(inputs, targets)
    main = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    extra = [F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten()) for k, lg in enumerate(mtp, start=1)]
    total = main + mtp_lambda * torch.stack(extra).mean() if extra else main
    return total, main, extra


@torch.no_grad()
def heldout_nats_per_byte(model, inputs, targets, nbytes: torch.Tensor, chunk: int = 16) -> list:
    """[main head, MTP depth 1, ...] in nats per byte of the tokens each head predicts."""
    nll = None
    for i in range(0, inputs.shape[0], chunk):
        tg = targets[i:i + chunk]
        logits, mtp = model(inputs[i:i + chunk], tg)
        part = [F.cross_entropy(lg.flatten(0, 1), tg[:, k:].flatten(), reduction="sum").item()
                for k, lg in enumerate([logits, *mtp])]
        nll = part if nll is None else [x + y for x, y in zip(nll, part)]
    return [x / nbytes[targets[:, k:]].sum().item() for k, x in enumerate(nll)]


# ---- training ----

def lr_at(step, steps, lr, warmup):
    """Linear warmup, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _parser():
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (tokenizer, resumable state, exported checkpoints)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="DeepSeek-V3's gamma")
    p.add_argument("--mtp-layers", type=int, default=1, help="multi-token-prediction depth (0: none)")
    p.add_argument("--mtp-lambda", type=float, default=0.3, help="weight of the mean MTP loss")
    p.add_argument("--init-from", default=None, help="start from this checkpoint's weights and tokenizer (its "
                                                     "config must be the preset's; see TrainableTransformer.load_hf)")
    p.add_argument("--train-only", choices=["all", "mtp"], default="all",
                   help="mtp: freeze the main model (embedding, decoder layers, head) and train the MTP layers")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of the periodic evaluation")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--heldout-every", type=int, default=20, help="one stdlib file in N is held out")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N stdlib files (tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (continue later with --resume)")
    p.add_argument("--no-export", action="store_true", help="stop after training (no checkpoints, no evaluation)")
    return p


def _settings(a):
    """The arguments that define the run (a resumed run must have the same)."""
    return {k: v for k, v in vars(a).items() if k not in ("out", "resume", "stop_at", "threads", "no_export",
                                                          "eval_every", "save_every")}


def _save_state(path, model, opt, step, a, history, seconds):
    # No expert loads: update_bias just zeroed them. Staged: a run killed while saving keeps the previous state.
    with Staged() as staged:
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, settings=_settings(a),
                        history=history, seconds=seconds), staged.add(path))


def _check(a, margs: ModelArgs):
    """ValueError naming the option that cannot run (before anything is read or written)."""
    for name in ("steps", "batch_size", "eval_every", "eval_windows", "save_every", "heldout_every"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("max_files", "threads", "stop_at"):  # None: not given
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0 <= a.seed < MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**44) (each step's generator is seeded with seed * 1000003 + step), "
                         f"got {a.seed}")
    if a.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {a.warmup}")
    if not 2 <= a.seq_len <= margs.max_position_embeddings:
        raise ValueError(f"--seq-len must be in [2, max_position_embeddings = {margs.max_position_embeddings}], "
                         f"got {a.seq_len}")
    # finite: an infinite or NaN rate trains to NaN weights without an error
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {a.lr}")
    for name in ("weight_decay", "bias_update_rate", "mtp_lambda"):
        if not (math.isfinite(getattr(a, name)) and getattr(a, name) >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(a, name)}")
    if a.mtp_layers < 0 or a.mtp_layers > a.seq_len - 2:
        raise ValueError(f"--mtp-layers must be in [0, seq_len - 2 = {a.seq_len - 2}], got {a.mtp_layers}")
    if a.train_only == "mtp" and not (a.mtp_layers and a.mtp_lambda):
        raise ValueError("--train-only mtp needs --mtp-layers >= 1 and --mtp-lambda > 0")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out {a.out} exists and is not a folder")
    if a.init_from is not None:
        init = dataclasses.asdict(ModelArgs.from_json(a.init_from))
        want = dataclasses.asdict(margs)
        diff = sorted(k for k in want if k not in ("num_nextn_predict_layers", "quantization_config")
                      and init[k] != want[k])
        if diff:
            raise ValueError(f"--init-from {a.init_from}: its config differs from the preset's in {diff}")
        # every tensor's shape and dtype, and the files, checked by the loader (TrainableTransformer.load_hf
        # reads what it finds)
        load(a.init_from, torch.float32, device="cpu", backend="torch", progress=False)


def _saved_state(a):
    """--resume: the saved run (same settings), or None without --resume. Reads only."""
    if not a.resume:
        return None
    path = os.path.join(a.out, "train_state.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no {path}")
    try:  # weights_only: a state file unpickles nothing but tensors and plain values
        state = torch.load(path, weights_only=True)
        saved = state["settings"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as e:
        # (torch's own message runs over many lines, advising weights_only=False: not for a damaged file)
        raise ValueError(f"--resume: {path} is not a training state (damaged?): {type(e).__name__}") from None
    given = _settings(a)
    if saved != given:
        diff = {k: (v, given.get(k)) for k, v in saved.items() if given.get(k) != v}
        raise ValueError(f"--resume: the saved run has other settings (saved, given): {diff}")
    return state


def train(a) -> dict:
    """The run `a` (the parsed options) asks for. Every option, input file and the corpus are
    checked before anything is written to --out (FileNotFoundError or ValueError naming the
    problem)."""
    from tokenizers import Tokenizer
    from tqdm import tqdm
    margs = ModelArgs(**PRESETS[a.preset])
    _check(a, margs)
    margs.num_nextn_predict_layers = a.mtp_layers
    if a.threads:
        torch.set_num_threads(a.threads)
    state_path = os.path.join(a.out, "train_state.pt")
    state = _saved_state(a)

    files = corpus.stdlib_files()[:a.max_files]
    train_texts, heldout_texts = corpus.split(files, a.heldout_every)
    if not heldout_texts or not train_texts:
        raise ValueError("the corpus split left no training or no held-out file (raise --max-files)")
    tok_path = os.path.join(a.out, "tokenizer.json")
    if state is None:
        if a.init_from is not None:  # its embedding's rows are that tokenizer's ids
            tokenizer = load_tokenizer(a.init_from)
        else:
            tokenizer = corpus.train_tokenizer(train_texts, PRESETS[a.preset]["vocab_size"])
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # as a resumed run reads it from tok_path
    else:
        tokenizer = load_tokenizer(a.out)
    bos, eos = margs.bos_token_id, margs.eos_token_ids[0]
    stream = corpus.encode_documents(tokenizer, train_texts, bos, eos)
    heldout = corpus.encode_documents(tokenizer, heldout_texts, bos, eos)
    if stream.numel() <= a.seq_len or heldout.numel() < a.seq_len:
        raise ValueError(f"--seq-len {a.seq_len} is longer than the training or held-out tokens "
                         f"({stream.numel()}, {heldout.numel()}; raise --max-files)")
    nbytes = token_bytes(tokenizer)
    ev_in, ev_tg = eval_windows(heldout, a.seq_len, a.eval_windows, bos)

    torch.manual_seed(a.seed)
    model = TrainableTransformer(margs)
    model.init_weights()
    if a.init_from is not None:
        absent = model.load_hf(a.init_from)
        print(f"--init-from {a.init_from}: {len(absent)} tensors not in it (MTP layers: from the last "
              f"decoder layer, or initialized)", file=sys.stderr)
    balanced = model.moe_layers()
    if a.train_only == "mtp":
        mine = {id(p) for layer in model.mtp_layers() for p in layer.parameters()} - {id(model.lm_head.weight)}
        for p in model.parameters():
            p.requires_grad_(id(p) in mine)
        balanced = [m for layer in model.mtp_layers() for m in layer.modules() if isinstance(m, MoE)]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "norm" not in n]
    other = [p for n, p in trainable if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=a.weight_decay), dict(params=other, weight_decay=0.0)],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    step, history, seconds = 0, [], 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            step, history, seconds = state["step"], state["history"], state["seconds"]
        except (KeyError, RuntimeError, ValueError) as e:
            detail = " ".join(str(e).split())  # load_state_dict's message runs over several lines
            raise ValueError(f"--resume: {state_path} does not fit this run's model (damaged?): {detail}") from None
    # everything is checked: the run's folder from here on
    os.makedirs(a.out, exist_ok=True)
    if state is None:
        tokenizer.save(tok_path)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"corpus: {len(train_texts)} training files ({stream.numel():,} tokens), {len(heldout_texts)} held out "
          f"({heldout.numel():,} tokens); model: {n_params / 1e6:.2f}M parameters", file=sys.stderr)

    bar = tqdm(total=a.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - seconds
    last_eval = history[-1]["heldout_nats_per_byte"] if history else None
    last = a.steps if a.stop_at is None else min(a.steps, a.stop_at)
    while step < last:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        inputs, targets = batch_at(stream, step, a.seed, a.batch_size, a.seq_len, bos)
        loss, main, mtp = losses(model, inputs, targets, a.mtp_lambda)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for m in balanced:  # a frozen layer's bias stays (its loads are still counted, and dropped)
            m.update_bias(a.bias_update_rate)
        for m in model.moe_layers():
            m.load.zero_()
        step += 1
        record = dict(step=step, loss=main.item())  # the main head's, comparable with runs without MTP
        if mtp:
            record["mtp_loss"] = [m.item() for m in mtp]
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            last_eval, *mtp_eval = heldout_nats_per_byte(model, ev_in, ev_tg, nbytes)
            record["heldout_nats_per_byte"] = last_eval
            if mtp_eval:
                record["heldout_mtp_nats_per_byte"] = mtp_eval
            model.train()
        history.append(record)
        post = dict(loss=f"{record['loss']:.3f}", heldout=f"{last_eval:.4f} nats/B" if last_eval else "-")
        if mtp:
            post["mtp"] = f"{record['mtp_loss'][0]:.3f}"
        bar.set_postfix(**post, refresh=False)
        bar.update(1)
        if step % a.save_every == 0 or step == last:
            _save_state(state_path, model, opt, step, a, history, time.perf_counter() - t0)
    bar.close()
    seconds = time.perf_counter() - t0
    result = dict(steps=step, seconds=round(seconds, 1), tokens=step * a.batch_size * a.seq_len,
                  parameters=n_params, final_loss=history[-1]["loss"] if history else None,
                  heldout_nats_per_byte_subset=last_eval, history=history)
    if step == a.steps and not a.no_export:
        record = {k: result[k] for k in ("seconds", "tokens", "parameters", "final_loss")}
        result.update(export(model, margs, tokenizer, heldout_texts, a, record))
    return result


def main(argv=None):
    """The command line. Returns 0; an unusable option or input exits with status 2 and a one-line
    message, as argparse does, before anything is written to --out."""
    parser = _parser()
    a = parser.parse_args(argv)
    try:
        r = train(a)
    except (OSError, ValueError) as e:  # ValueError: the options, ConfigError, CheckpointError
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps({k: v for k, v in r.items() if k not in ("history", "metrics")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
