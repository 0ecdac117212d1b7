"""Load Hugging Face DeepSeek-V3 checkpoints into dsv3.model.Transformer.

A model directory holds config.json, model.safetensors (or shards listed by
model.safetensors.index.json) and tokenizer.json. Weights are bf16/fp32, or FP8 (e4m3 `X.weight`
with fp32 `X.weight_scale_inv` over 128x128 blocks, DeepSeek-V3's release). Files are memory-mapped
and every tensor-parallel rank reads only its slices. The per-expert keys
`mlp.experts.N.{gate,up,down}_proj.weight` become the fused w13 / w2 the expert kernels take. The
multi-token-prediction layers (indices num_hidden_layers + k, k < num_nextn_predict_layers) load
into Transformer.mtp, sharded like the decoder layers; eh_proj is replicated, shared_head.head
column-parallel. They share the main embedding: a copy stored per MTP layer (DeepSeek's release
has model.layers.61.embed_tokens) is checked for its shape and not read. A config asking for MTP
layers that the checkpoint does not hold loads without them (logged); MTP tensors beyond the
config's count are skipped (logged). Any missing, unexpected, wrongly shaped or typed tensors
raise one CheckpointError listing them all; a corrupt or truncated file raises CheckpointError
naming it. load's own arguments are checked before anything is read (ValueError naming them).
"""

import json
import logging
import os
import re

import torch
from safetensors import SafetensorError, safe_open

import dsv3_kernels as dk

from dsv3_kernels import dispatch
from dsv3_kernels.utils import GEMM_BLOCK, cdiv

from .config import FP8_CONFIG, ModelArgs
from .layers import Linear, RMSNorm, VocabEmbedding
from .model import Transformer
from .moe import Experts, Gate
from .parallel import Parallel

log = logging.getLogger("dsv3")

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """The checkpoint's files do not hold the tensors the config describes, or are damaged."""


# The activations' and unquantized weights' dtypes the model runs in.
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# safetensors dtypes a weight may be stored in (F8_E4M3: with a float weight_scale_inv beside it).
_FLOAT_STORED = ("F64", "F32", "F16", "BF16")
_WEIGHT_STORED = _FLOAT_STORED + ("F8_E4M3",)


def check_device(device) -> torch.device:
    """device (a str or torch.device) -> the torch.device, if the model can live there: the CPU,
    or a CUDA GPU that exists. Raises ValueError saying why not."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device (cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (use cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif d.type != "cpu":
        raise ValueError(f"device {device!r}: the model runs on cpu or cuda devices")
    return d


def check_backend(backend, device: torch.device):
    """Raise ValueError unless `backend` (None: dispatch's rule) runs every op on `device`."""
    if backend is None:
        return
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend {backend!r} is not a backend; choose one of {dispatch.BACKENDS} (or None: the "
                         f"automatic choice)")
    for op in dispatch.ops():  # the model runs nearly all of them
        here = dk.available_backends(op, device)
        if backend not in here:
            raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors here (op {op}: {here} can)")


def checkpoint_files(model_dir) -> dict:
    """{tensor name: safetensors file} from the index, or from the single model.safetensors."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not valid JSON: {e}") from None
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
            raise CheckpointError(f"{index} is not a safetensors index: it needs \"weight_map\", an object of "
                                  f"tensor names to shard file names")
        missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(model_dir, f))})
        if missing:
            raise CheckpointError(f"{index} lists shard files that are not in {model_dir}: {missing}")
        return {k: os.path.join(model_dir, f) for k, f in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.exists(single):
        raise CheckpointError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    with _open(single) as f:
        return {k: single for k in f.keys()}


def _open(path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


class _Reader:
    """Open shards on demand (a weight's scale may live in another shard)."""

    def __init__(self, files):
        self.files, self._open = files, {}

    def slice(self, name):
        path = self.files[name]
        if path not in self._open:
            self._open[path] = _open(path).__enter__()
        return self._open[path].get_slice(name)

    def close(self):
        for f in self._open.values():
            f.__exit__(None, None, None)
        self._open.clear()


class _Loader:
    def __init__(self, files: dict):
        self.reader = _Reader(files)
        self.errors = {"wrong shape": [], "wrong dtype": [], "missing": [], "unexpected": []}
        self.used = set()

    # -- reading one logical weight as a float tensor or as FP8 blocks --
    def _source(self, name, shape):
        """(weight slice, scale slice or None) of checkpoint tensor `name`, checked against `shape`."""
        if name not in self.reader.files:
            self.errors["missing"].append(name)
            return None, None
        self.used.add(name)
        w = self.reader.slice(name)
        if not self._check(name, w, shape, _WEIGHT_STORED):
            return None, None
        if w.get_dtype() != "F8_E4M3":
            return w, None
        scale_name = name + "_scale_inv"
        want = (cdiv(shape[0], GEMM_BLOCK), cdiv(shape[1], GEMM_BLOCK))
        if scale_name not in self.reader.files:
            self.errors["missing"].append(scale_name)
            return None, None
        self.used.add(scale_name)
        s = self.reader.slice(scale_name)
        if not self._check(scale_name, s, want, ("F32",)):  # what weight_dequant takes
            return None, None
        return w, s

    def _check(self, name, tensor, shape, dtypes) -> bool:
        """Whether the stored tensor has `shape` and one of `dtypes` (else the error is recorded)."""
        if tuple(tensor.get_shape()) != tuple(shape):
            self.errors["wrong shape"].append(f"{name}: {tuple(tensor.get_shape())}, expected {tuple(shape)}")
            return False
        if tensor.get_dtype() not in dtypes:
            self.errors["wrong dtype"].append(f"{name}: {tensor.get_dtype()}, expected {' or '.join(dtypes)}")
            return False
        return True

    def _float(self, w, s, rows, cols):
        """The [rows, cols] part of a source weight as a float32 tensor (FP8 dequantized)."""
        if s is None:
            return w[rows.start:rows.stop, cols.start:cols.stop].float()
        full = dk.weight_dequant(w[:], s[:], torch.float32)
        return full[rows, cols]

    def _store(self, w, s, rows, cols, weight, scale_inv):
        """Copy rows x cols of the source into weight (+ scale_inv when it is FP8)."""
        if weight.dtype != torch.float8_e4m3fn:
            weight.copy_(self._float(w, s, rows, cols))
            return
        if s is not None and rows.start % GEMM_BLOCK == 0 and cols.start % GEMM_BLOCK == 0:  # FP8 as stored
            weight.copy_(w[rows.start:rows.stop, cols.start:cols.stop])
            scale_inv.copy_(s[rows.start // GEMM_BLOCK:cdiv(rows.stop, GEMM_BLOCK),
                              cols.start // GEMM_BLOCK:cols.stop // GEMM_BLOCK])
            return
        q, qs = dk.weight_quant(self._float(w, s, rows, cols).to(weight.device))  # quantize on load
        weight.copy_(q)
        scale_inv.copy_(qs)

    def linear(self, name, mod):
        w, s = self._source(name, mod.full_shape)
        if w is not None:
            self._store(w, s, mod.rows, mod.cols, mod.weight, getattr(mod, "weight_scale_inv", None))

    def plain(self, name, param):
        w, s = self._source(name, param.shape)
        if w is not None:
            param.copy_(w[:] if s is None else dk.weight_dequant(w[:], s[:], torch.float32))

    def experts(self, prefix, mod: Experts, args: ModelArgs):
        d, i = args.hidden_size, args.moe_intermediate_size
        for e in range(args.n_routed_experts):
            local = [j for j, x in enumerate(mod.logical) if x == e]  # its slots here (redundant experts: several)
            for proj, shape in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
                name = f"{prefix}.{e}.{proj}.weight"
                if not local:  # another rank's expert: present, not read
                    if name not in self.reader.files:
                        self.errors["missing"].append(name)
                    self.used.update((name, name + "_scale_inv"))
                    continue
                w, s = self._source(name, shape)
                if w is None:
                    continue
                for el in local:
                    weight, scale = (mod.w2, mod.w2_scale_inv) if proj == "down_proj" else (mod.w13, mod.w13_scale_inv)
                    weight, scale = weight[el], None if scale is None else scale[el]
                    if proj != "down_proj":
                        half = slice(0, i) if proj == "gate_proj" else slice(i, 2 * i)
                        weight = weight[half]
                        if scale is not None:
                            scale = scale[half.start // GEMM_BLOCK:half.stop // GEMM_BLOCK]
                    self._store(w, s, slice(0, shape[0]), slice(0, shape[1]), weight, scale)


def load(model_dir, dtype=torch.bfloat16, device=None, fp8=None, backend=None, progress=True,
         mtp=True, parallel: Parallel = None) -> Transformer:
    """Build the Transformer of `model_dir`'s config.json and load its weights.

    dtype: activations and unquantized weights (bfloat16; float16; float32 for the reference path).
    device: cpu or a CUDA GPU (None: torch's default device). backend: a dsv3_kernels backend that
    runs there, or None (the dispatch rule). fp8: None keeps the checkpoint's format; True
    quantizes a bf16/fp32 checkpoint to FP8 (128x128 blocks) on load; False dequantizes an FP8
    checkpoint. parallel: a dsv3.parallel.Parallel
    (None: one process); this rank's shard only, the progress bar on rank 0. mtp: load the
    multi-token-prediction layers the config and the checkpoint have (False: skip them). Returns
    the model in eval mode on `device`. Raises ValueError naming an argument it cannot take before
    reading anything; FileNotFoundError, ConfigError or CheckpointError for the files.
    """
    if dtype not in DTYPES:
        raise ValueError(f"load: dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype!r}")
    check_backend(backend, check_device(torch.get_default_device() if device is None else device))
    if fp8 is not None and not isinstance(fp8, bool):
        raise ValueError(f"load: fp8 must be None, True or False, got {fp8!r}")
    if parallel is not None and not isinstance(parallel, Parallel):
        raise ValueError(f"load: parallel must be a dsv3.parallel.Parallel or None, got {parallel!r}")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    args = ModelArgs.from_json(model_dir)
    if fp8 is None:
        fp8 = args.fp8
    args.quantization_config = dict(FP8_CONFIG) if fp8 else None
    files = checkpoint_files(model_dir)
    n = args.num_hidden_layers
    stored = {int(m.group(1)) for k in files if (m := _LAYER.match(k)) and int(m.group(1)) >= n}
    wanted = args.num_nextn_predict_layers if mtp else 0
    present = next((k for k in range(wanted) if n + k not in stored), wanted)  # layers n, n+1, ... stored
    if present < wanted:
        log.info("config.json has num_nextn_predict_layers = %d, the checkpoint %d: loading %d MTP layer(s)",
                 wanted, present, present)
    args.num_nextn_predict_layers = present
    model = Transformer(args, dtype, fp8, device=device, backend=backend, parallel=parallel)
    loader = _Loader(files)
    lm_head_name = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    jobs = []  # (checkpoint file of the first tensor read, name, how to load)
    for name, mod in model.named_modules():
        name = model.checkpoint_name(name)
        if isinstance(mod, (Linear, VocabEmbedding)):
            key = lm_head_name if name == "lm_head" else f"{name}.weight"
            jobs.append((key, lambda k=key, m=mod: loader.linear(k, m)))
        elif isinstance(mod, RMSNorm):
            jobs.append((f"{name}.weight", lambda k=f"{name}.weight", m=mod: loader.plain(k, m.weight)))
        elif isinstance(mod, Gate):
            for p in ("weight", "e_score_correction_bias"):
                jobs.append((f"{name}.{p}", lambda k=f"{name}.{p}", t=getattr(mod, p): loader.plain(k, t)))
        elif isinstance(mod, Experts):
            jobs.append((f"{name}.0.gate_proj.weight", lambda k=name, m=mod: loader.experts(k, m, args)))
    # read shard by shard (the progress bar's unit), in the order of the files
    order = {f: i for i, f in enumerate(dict.fromkeys(sorted(files.values())))}
    jobs.sort(key=lambda j: order.get(files.get(j[0]), -1))
    show = progress and model.parallel.rank == 0
    bar = _progress(len(order), show)
    current = None
    try:
        with torch.no_grad():
            for key, job in jobs:
                f = files.get(key)
                if f != current and f is not None:
                    if current is not None:
                        bar.update(1)
                    current = f
                job()
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"reading {current}: {e} (corrupt or truncated file?)") from None
    finally:
        bar.update(len(order) - bar.n)
        bar.close()
        loader.reader.close()
    for k in range(present):  # the shared embedding's copy
        name, shape = f"model.layers.{n + k}.embed_tokens.weight", (args.vocab_size, args.hidden_size)
        if name in files:
            loader.used.add(name)
            loader._check(name, loader.reader.slice(name), shape, _WEIGHT_STORED)
    loader.reader.close()
    skipped = [k for k in files if (m := _LAYER.match(k)) and int(m.group(1)) >= n + present]
    if skipped:
        log.info("skipping %d tensors of the multi-token-prediction layer(s) %s", len(skipped),
                 sorted({int(_LAYER.match(k).group(1)) for k in skipped}))
    loader.errors["unexpected"] = sorted(set(files) - loader.used - set(skipped))
    problems = [f"{kind} ({len(v)}): " + ", ".join(v[:20]) + (" ..." if len(v) > 20 else "")
                for kind, v in loader.errors.items() if v]
    if problems:
        raise CheckpointError(f"{model_dir} does not match its config.json: " + "; ".join(problems))
    model.reset_absorbed()
    return model.eval()


def _progress(total, show):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        show = False
    if not show:
        class _Quiet:
            n = 0

            def update(self, k):
                self.n += k

            def close(self):
                pass
        return _Quiet()
    return tqdm(total=total, desc="loading shards", unit="shard")


def load_tokenizer(model_dir):
    """The `tokenizers` Tokenizer of model_dir/tokenizer.json. Raises FileNotFoundError, or
    CheckpointError for a file it cannot read as one."""
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises plain Exceptions (parse errors, bad UTF-8)
        raise CheckpointError(f"{path} is not a readable tokenizer.json (truncated or damaged?): {e}") from None
