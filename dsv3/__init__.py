"""DeepSeek-V3 on dsv3_kernels: the model (MLA + DeepSeekMoE, FP8 linears, tensor and expert
parallelism, multi-token prediction), Hugging Face checkpoint loading and generation. Every op goes
through dsv3_kernels, so every backend (cuda, triton, cpu, torch) runs the whole model; backend
"torch" in float32 is the reference path the others are checked against.

    model = dsv3.load("path/to/DeepSeek-V3", dtype=torch.bfloat16, device="cuda")
    outputs = dsv3.Generator(model).generate([[0, 100, 200]], max_new_tokens=32)
    python -m dsv3.generate --model DIR --prompt "def fib(n):"

Where things are:
- the model: config.py (config.json -> ModelArgs; config_check.py: its fields' checks), rope.py
  (YaRN), layers.py (norm, linears, embedding, head, MLP), attention.py (MLA), moe.py (gate,
  experts), model.py (Transformer, MTP), cache.py (paged latent cache, every step's Batch),
  parallel.py (Parallel: tp / ep over processes), eplb.py (redundant expert placement);
- checkpoints: load.py (safetensors -> Transformer), quantize.py (python -m dsv3.quantize), files.py
  (output files that appear whole or not at all);
- generation: sampling.py (SamplingParams, sample, speculative verify), generator.py (Generator),
  cuda_graph.py (decode steps as CUDA graphs), cpu_decode.py (CPU decode steps in one C++ call),
  generate.py (python -m dsv3.generate);
- evaluate.py (held-out loss, expert load), demo.py (python -m dsv3.demo), testing.py (random
  weights), default_model/ (the shipped checkpoint). Training it: training/ at the repository root.
"""

from .config import ConfigError, ModelArgs
from .generator import Generator
from .load import CheckpointError, load, load_tokenizer
from .model import Transformer
from .parallel import Parallel
from .sampling import SamplingParams

__all__ = ["CheckpointError", "ConfigError", "Generator", "ModelArgs", "Parallel", "SamplingParams", "Transformer",
           "load", "load_tokenizer"]
