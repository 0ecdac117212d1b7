"""Write an FP8 copy of a bf16/fp32 DeepSeek-V3 checkpoint in DeepSeek-V3's own format.

Every 2-D linear weight of the decoder layers (attention projections, dense MLP, shared and routed
experts, also those of the multi-token-prediction layers; not the router gate, norms, embedding or
lm_head, nor the MTP layers' eh_proj, shared_head.head and embed_tokens, as in DeepSeek's release) becomes
float8_e4m3fn `X.weight` + float32 `X.weight_scale_inv` [ceil(N/128), ceil(K/128)], and config.json
gets quantization_config (weight_block_size [128, 128]).
Run: python -m dsv3.quantize SRC_DIR DST_DIR
"""

import argparse
import contextlib
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

import dsv3_kernels as dk

from .config import FP8_CONFIG, ModelArgs
from .files import Staged
from .load import CheckpointError, _open, checkpoint_files


# the dtypes a checkpoint's tensors may have (the loader's: dsv3/load.py)
_STORED = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)

# the MTP layers' tensors that DeepSeek's release keeps in bf16 although they are 2-D
_MTP_BF16 = (".eh_proj.", ".shared_head.", ".embed_tokens.")


def is_quantized_weight(name: str, shape) -> bool:
    """DeepSeek-V3's FP8 tensors: the decoder layers' linear weights except the router gate (and,
    in an MTP layer, except eh_proj, shared_head.head and its copy of embed_tokens)."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2
            and ".mlp.gate." not in name  # 2-D: not the norms; kv_a_proj_with_mqa included
            and not any(part in name for part in _MTP_BF16))


def quantize_checkpoint(src, dst):
    """Write the FP8 copy of the checkpoint in `src` to the folder `dst` (made if missing): its
    model.safetensors, config.json and src's tokenizer files. Everything is read and checked first
    (config.json, the safetensors files, every tensor's dtype; dst is not src, nor a folder holding
    a sharded checkpoint that would shadow the new file), then each file is written under a
    temporary name and renamed into place: an error leaves dst as it was. Raises
    FileNotFoundError, ConfigError, CheckpointError or ValueError naming the problem."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source folder {src} does not exist")
    ModelArgs.from_json(src)  # FileNotFoundError, or ConfigError naming every field it cannot run
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    files = checkpoint_files(src)
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            raise ValueError(f"destination {dst} exists and is not a folder")
        if os.path.samefile(src, dst):  # also through a symlink, or another path to the same folder
            raise ValueError(f"destination {dst} is the source folder {src}: the FP8 copy needs a folder of its own")
        if os.path.exists(os.path.join(dst, "model.safetensors.index.json")):
            raise ValueError(f"destination {dst} holds a sharded checkpoint (model.safetensors.index.json), which "
                             f"loaders would read instead of the new model.safetensors: choose another folder")
    out, wrong = {}, []
    for path in sorted(set(files.values())):
        with _open(path) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dtype not in _STORED:
                    wrong.append(f"{name}: {t.dtype}")
                elif t.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
                    out[name] = t  # already FP8
                elif is_quantized_weight(name, t.shape):
                    out[name], out[name + "_scale_inv"] = dk.weight_quant(t.float().contiguous())
                else:
                    out[name] = t.contiguous()
    if wrong:
        raise CheckpointError(f"{src}: tensors of a dtype that is not a weight's (float or float8_e4m3fn) "
                              f"({len(wrong)}): " + ", ".join(wrong[:20]) + (" ..." if len(wrong) > 20 else ""))
    cfg["quantization_config"] = dict(FP8_CONFIG)
    made = not os.path.exists(dst)
    try:
        os.makedirs(dst, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot make the destination folder {dst}: {e.strerror}") from None
    try:
        with Staged() as staged:
            save_file(out, staged.add(os.path.join(dst, "model.safetensors")), metadata={"format": "pt"})
            with open(staged.add(os.path.join(dst, "config.json")), "w") as f:
                json.dump(cfg, f, indent=2)
            for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                if os.path.exists(os.path.join(src, extra)):
                    shutil.copyfile(os.path.join(src, extra), staged.add(os.path.join(dst, extra)))
    except BaseException:
        if made:  # the folder this call made, empty again
            with contextlib.suppress(OSError):
                os.rmdir(dst)
        raise


def main(argv=None):
    """The command line. Returns 0; an unusable source or destination exits with status 2 and a
    one-line message, as argparse does, and leaves DST_DIR as it was."""
    p = argparse.ArgumentParser(prog="python -m dsv3.quantize", description=__doc__.split("\n")[0])
    p.add_argument("src", metavar="SRC_DIR", help="a bf16/fp32 (or FP8) checkpoint folder")
    p.add_argument("dst", metavar="DST_DIR", help="the FP8 copy's folder (made if missing; not SRC_DIR)")
    a = p.parse_args(argv)
    try:
        quantize_checkpoint(a.src, a.dst)
    except (OSError, ValueError) as e:  # ValueError: ConfigError, CheckpointError, the folders
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
