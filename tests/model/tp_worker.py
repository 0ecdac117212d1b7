"""One rank of the tensor-parallel test (tests/model/test_parallel.py), run by torchrun:
    torchrun --standalone --nproc_per_node 2 tp_worker.py MODEL_DIR OUT_FILE
Loads this rank's shard, runs the prefill + greedy decode of hf_checkpoints.run_prefill_and_decode
and (rank 0) saves the logits and tokens to OUT_FILE; with MODEL_DIR "uneven" it saves the error
that an unsplittable vocabulary raises."""

import sys

import torch

from dsv3.config import tiny
from dsv3.load import load
from dsv3.model import Transformer
from dsv3.parallel import Parallel

from hf_checkpoints import run_prefill_and_decode, save_gathered

PROMPTS = [[5, 17, 250, 3, 99, 41, 7], [200, 11, 64, 8, 300, 123, 9, 77, 18, 2, 66]]
STEPS = 3


def main(model_dir, out):
    par = Parallel.from_env("cpu")
    if model_dir == "uneven":
        try:
            Transformer(tiny(vocab_size=321), torch.float32, parallel=par)
            result = "no error"
        except ValueError as e:
            result = str(e)
    else:
        model = load(model_dir, torch.float32, backend="torch", progress=False, parallel=par)
        heads = model.model.layers[0].self_attn.num_heads
        experts = model.model.layers[1].mlp.experts
        result = dict(run=run_prefill_and_decode(model, PROMPTS, STEPS), heads=heads,
                      experts=(experts.lo, experts.hi), vocab=model.model.embed_tokens.weight.shape[0])
    save_gathered(par, result, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
