"""Plot the default model's expert load on held-out data: the fraction of routed (token, choice)
pairs each expert of each MoE layer gets, with the e_score_correction_bias that training's
auxiliary-loss-free balancing learned, and with that bias zeroed (what the router alone would do).

    pip install matplotlib
    PYTHONPATH=. python scripts/plot_expert_load.py [--model dsv3/default_model] [--out docs/expert_load.png]

The held-out data are the standard-library files training held out (training/corpus.py's split;
training/ is not installed with the package: PYTHONPATH=. from the repository root finds it).
"""

import argparse
import json
import os

import torch

from dsv3.evaluate import evaluate
from dsv3.generate import DEFAULT_MODEL
from dsv3.load import load, load_tokenizer
from dsv3.moe import Gate
from training import corpus


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="docs/expert_load.png")
    p.add_argument("--window", type=int, default=512)
    a = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = "".join(corpus.split(corpus.stdlib_files())[1])
    model = load(a.model, dtype=torch.bfloat16, device="cpu", backend="cpu", progress=False)
    tok = load_tokenizer(a.model)
    trained = evaluate(model, tok, text, a.window)
    for g in model.modules():
        if isinstance(g, Gate):
            g.e_score_correction_bias.zero_()
    zeroed = evaluate(model, tok, text, a.window)

    e = model.args.n_routed_experts
    layers = len(trained["expert_load"])
    fig, axes = plt.subplots(1, layers, figsize=(4.2 * layers, 3.2), sharey=True, squeeze=False)
    x = torch.arange(e).numpy()
    for i, ax in enumerate(axes[0]):
        ax.bar(x - 0.2, zeroed["expert_load"][i], 0.4, label="bias zeroed", color="#bbbbbb")
        ax.bar(x + 0.2, trained["expert_load"][i], 0.4, label="learned bias", color="#3366aa")
        ax.axhline(1 / e, color="black", lw=0.8, ls="--", label="uniform")
        ax.set_title(f"MoE layer {model.args.first_k_dense_replace + i}")
        ax.set_xticks(x)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("fraction of routed tokens")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"default model, held-out stdlib source ({trained['tokens']:,} tokens, top-"
                 f"{model.args.num_experts_per_tok} of {e})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    fig.savefig(a.out, dpi=110)
    summary = {name: dict(max=[max(l) for l in r["expert_load"]], min=[min(l) for l in r["expert_load"]],
                          nats_per_byte=r["nats_per_byte"]) for name, r in (("learned", trained), ("zeroed", zeroed))}
    print(json.dumps(summary, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
