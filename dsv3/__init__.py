"""DeepSeek-V3 on dsv3_kernels: the model (MLA + DeepSeekMoE, FP8 linears, tensor parallelism),
Hugging Face checkpoint loading and generation. Every op goes through dsv3_kernels, so every
backend (cuda, triton, cpu, torch) runs the whole model; backend "torch" in float32 is the
reference path the others are checked against.

    model = dsv3.load("path/to/DeepSeek-V3", dtype=torch.bfloat16, device="cuda")
    python -m dsv3.generate --model DIR --prompt "def fib(n):"
"""

from .config import ConfigError, ModelArgs
from .load import CheckpointError, load, load_tokenizer
from .model import Transformer

__all__ = ["CheckpointError", "ConfigError", "ModelArgs", "Transformer", "load", "load_tokenizer"]
