"""Write an FP8 copy of a bf16/fp32 DeepSeek-V3 checkpoint in DeepSeek-V3's own format.

Every 2-D linear weight of the decoder layers (attention projections, dense MLP, shared and routed
experts, also those of the multi-token-prediction layers; not the router gate, norms, embedding or
lm_head, nor the MTP layers' eh_proj, shared_head.head and embed_tokens, as in DeepSeek's release) becomes
float8_e4m3fn `X.weight` + float32 `X.weight_scale_inv` [ceil(N/128), ceil(K/128)], and config.json
gets quantization_config (weight_block_size [128, 128]).
Run: python -m dsv3.quantize SRC_DIR DST_DIR
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

import dsv3_kernels as dk

from .config import FP8_CONFIG
from .load import _open, checkpoint_files


# the MTP layers' tensors that DeepSeek's release keeps in bf16 although they are 2-D
_MTP_BF16 = (".eh_proj.", ".shared_head.", ".embed_tokens.")


def is_quantized_weight(name: str, shape) -> bool:
    """DeepSeek-V3's FP8 tensors: the decoder layers' linear weights except the router gate (and,
    in an MTP layer, except eh_proj, shared_head.head and its copy of embed_tokens)."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2
            and ".mlp.gate." not in name  # 2-D: not the norms; kv_a_proj_with_mqa included
            and not any(part in name for part in _MTP_BF16))


def quantize_checkpoint(src, dst):
    files = checkpoint_files(src)
    out = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
                    out[name] = t  # already FP8
                elif is_quantized_weight(name, t.shape):
                    out[name], out[name + "_scale_inv"] = dk.weight_quant(t.float().contiguous())
                else:
                    out[name] = t.contiguous()
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = dict(FP8_CONFIG)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, extra)):
            shutil.copy(os.path.join(src, extra), dst)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    a = p.parse_args(argv)
    quantize_checkpoint(a.src, a.dst)
    print(f"wrote {a.dst}")


if __name__ == "__main__":
    main()
