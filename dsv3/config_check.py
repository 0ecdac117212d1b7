"""The checks of a DeepSeek-V3 config's fields (dsv3.config.ModelArgs): each field's type and
range, their consistency, and that the sizes fit in memory at all. One ConfigError names every
problem found. Also the constants they check against: the MLA kernels' latent layout and the FP8
checkpoint format."""

import math
import numbers

from dsv3_kernels.utils import GEMM_BLOCK


class ConfigError(ValueError):
    """config.json fields this package cannot run. `problems`: one line each ("config field NAME =
    VALUE: what it must be"); the message (one line) holds them all, after the file's path when
    the config came from one."""

    def __init__(self, problems, path=None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.path = path
        text = "; ".join(self.problems)
        super().__init__(text if path is None else f"{path}: {text}")


# The MLA kernels' fixed latent layout: 512 compressed kv values + 64 RoPE values per token.
KV_LORA_RANK = 512
ROPE_DIM = 64

# quantization_config of an FP8 checkpoint in DeepSeek-V3's format: e4m3 weights with one scale per
# GEMM_BLOCK x GEMM_BLOCK (128 x 128) block, activations quantized per 1 x 128 as they come.
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [GEMM_BLOCK, GEMM_BLOCK]}


# The fields that fix the tensors' shapes: a config.json must give them (see the module's doc).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace")

# Sizes beyond any model this package could hold: 2**40 parameters (DeepSeek-V3 with its MTP layer
# has 6.9e11), and 2**24 positions (RoPE's cos/sin tables take 256 bytes per position: 4 GiB).
MAX_PARAMETERS = 2 ** 40
MAX_POSITIONS = 2 ** 24


def problems(args) -> list:
    """Every field this package cannot run, as "config field NAME = VALUE: what it must be"
    (empty: the config runs). A field whose own value is wrong is named alone, not again by the
    checks that relate it to others."""
    out = []

    def bad(name, why, value=_UNSET):
        out.append(f"config field {name} = {show(getattr(args, name) if value is _UNSET else value)}: {why}")

    def int_in(name, lo, hi=None, why=None) -> bool:
        v = getattr(args, name)
        if is_int(v) and v >= lo and (hi is None or v <= hi):
            return True
        bad(name, why or (f"must be an int in [{lo}, {hi}]" if hi is not None else
                          "must be a positive int" if lo == 1 else f"must be an int >= {lo}"))
        return False

    def number(name, value, lo, strict) -> bool:
        """A finite number > lo (strict) or >= lo."""
        if is_finite(value) and (value > lo if strict else value >= lo):
            return True
        bad(name, f"must be a finite number {'>' if strict else '>='} {lo}", value)
        return False

    ok = {name: int_in(name, 1) for name in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "qk_nope_head_dim", "v_head_dim")}
    ok["kv_lora_rank"] = int_in("kv_lora_rank", KV_LORA_RANK, KV_LORA_RANK,
                                f"the MLA kernels' latent cache holds {KV_LORA_RANK} values (DeepSeek-V2/V3's)")
    ok["qk_rope_head_dim"] = int_in("qk_rope_head_dim", ROPE_DIM, ROPE_DIM,
                                    f"the MLA kernels' latent cache holds {ROPE_DIM} RoPE values")
    ok["q_lora_rank"] = args.q_lora_rank is None or int_in(
        "q_lora_rank", 1, why="must be a positive int or null (then q_proj)")
    for name in ("n_shared_experts", "num_nextn_predict_layers"):
        ok[name] = int_in(name, 0)
    layers = args.num_hidden_layers if ok["num_hidden_layers"] else None
    ok["first_k_dense_replace"] = int_in("first_k_dense_replace", 0, layers, why=None if layers is None else
                                         f"must be an int in [0, num_hidden_layers = {layers}]")
    # MoE layers: those from first_k_dense_replace on, and the MTP layers
    known = all(ok[k] for k in ("num_hidden_layers", "first_k_dense_replace", "num_nextn_predict_layers"))
    moe = not known or args.first_k_dense_replace < args.num_hidden_layers or args.num_nextn_predict_layers > 0
    if moe:
        ok["n_routed_experts"] = int_in("n_routed_experts", 1)
        e = args.n_routed_experts
        if int_in("n_group", 1) and ok["n_routed_experts"]:
            g = args.n_group
            # moe_route: a group is scored by its top-2 experts' sum
            if e % g or (g > 1 and e // g < 2):
                bad("n_group", f"must divide n_routed_experts = {e} into groups of at least 2 experts")
            elif int_in("topk_group", 1, g, f"must be in [1, n_group = {g}]"):
                int_in("num_experts_per_tok", 1, args.topk_group * (e // g),
                       "must be >= 1 and at most the experts of the topk_group groups")
        if ok["moe_intermediate_size"] and ok["hidden_size"] and (args.moe_intermediate_size % 8
                                                                   or args.hidden_size % 8):
            bad("moe_intermediate_size", "the expert kernels need moe_intermediate_size and hidden_size "
                                         "to be multiples of 8")
        number("routed_scaling_factor", args.routed_scaling_factor, 0, strict=True)
        if args.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", "must be 'sigmoid' or 'softmax'")
        if not isinstance(args.norm_topk_prob, bool):
            bad("norm_topk_prob", "must be true or false")
    if not isinstance(args.tie_word_embeddings, bool):
        bad("tie_word_embeddings", "must be true or false")
    number("rms_norm_eps", args.rms_norm_eps, 0, strict=True)
    int_in("max_position_embeddings", 1, MAX_POSITIONS)
    number("rope_theta", args.rope_theta, 1, strict=True)  # YaRN divides by log(rope_theta)
    _rope_problems(args, bad, number)
    if ok["vocab_size"]:
        v = args.vocab_size
        if args.bos_token_id is not None and not (is_int(args.bos_token_id) and 0 <= args.bos_token_id < v):
            bad("bos_token_id", f"must be null or a token id in [0, vocab_size = {v})")
        eos = args.eos_token_id if isinstance(args.eos_token_id, (list, tuple)) else [args.eos_token_id]
        if args.eos_token_id is not None and not all(is_int(t) and 0 <= t < v for t in eos):
            bad("eos_token_id", f"must be null, a token id or a list of token ids in [0, vocab_size = {v})")
    _quantization_problems(args, bad)
    if all(ok.values()):
        total, (what, most) = args.num_parameters(), max(parameter_groups(args).items(), key=lambda kv: kv[1])
        if total > MAX_PARAMETERS:
            out.append(f"config sizes describe {total:.2e} parameters, more than the {MAX_PARAMETERS:.2e} "
                       f"this package can hold (DeepSeek-V3: 6.9e11); most of them ({most:.2e}) in {what}")
    return out

def _optional_object(args, name, bad):
    """The config's field `name` when it is an object (a dict), else None; anything but an object
    or null is reported."""
    value = getattr(args, name)
    if value is not None and not isinstance(value, dict):
        bad(name, "must be an object or null")
        return None
    return value

def _rope_problems(args, bad, number):
    rs = _optional_object(args, "rope_scaling", bad)
    if rs is None:
        return
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ("yarn", "default", None):
        bad("rope_scaling", f"rope_type {kind!r} is not supported (yarn or default)")
    if kind != "yarn":
        return
    for key in ("factor", "original_max_position_embeddings"):
        if rs.get(key) is None:
            bad("rope_scaling", f"yarn needs {key!r}")
    if rs.get("factor") is not None:
        number("rope_scaling.factor", rs["factor"], 1, strict=False)
    original = rs.get("original_max_position_embeddings")
    if original is not None and not (is_int(original) and 1 <= original <= MAX_POSITIONS):
        bad("rope_scaling.original_max_position_embeddings", f"must be an int in [1, {MAX_POSITIONS}]", original)
    # None: the defaults; mscale 0 is allowed (softmax_scale then leaves the scale alone)
    for key, strict in (("beta_fast", True), ("beta_slow", True), ("mscale", False), ("mscale_all_dim", False),
                        ("attention_factor", True)):
        if rs.get(key) is not None:
            number(f"rope_scaling.{key}", rs[key], 0, strict)
    if not isinstance(rs.get("truncate", True), bool):
        bad("rope_scaling.truncate", "must be true or false", rs["truncate"])

def _quantization_problems(args, bad):
    q = _optional_object(args, "quantization_config", bad)
    if q is None:
        return
    if q.get("quant_method", "fp8") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        bad("quantization_config", "only quant_method 'fp8' with fmt 'e4m3' is supported")
    blocks = FP8_CONFIG["weight_block_size"]
    size = q.get("weight_block_size", blocks)
    if not isinstance(size, (list, tuple)) or list(size) != blocks:
        bad("quantization_config", f"weight_block_size must be {blocks} (DeepSeek-V3's blocks)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        bad("quantization_config", "activation_scheme must be 'dynamic'")


def parameter_groups(args) -> dict:
    """The parameters of the model, about, in groups named by the fields that size them."""
    h, heads, mtp = args.hidden_size, args.num_attention_heads, args.num_nextn_predict_layers
    layers = args.num_hidden_layers + mtp
    q = h * heads * args.qk_head_dim if args.q_lora_rank is None else \
        args.q_lora_rank * (h + heads * args.qk_head_dim)
    attention = (q + h * (KV_LORA_RANK + ROPE_DIM) + KV_LORA_RANK * heads * (args.qk_nope_head_dim + args.v_head_dim)
                 + heads * args.v_head_dim * h)
    moe_layers = layers - args.first_k_dense_replace
    experts = args.n_routed_experts + args.n_shared_experts if moe_layers else 0  # (unchecked without MoE layers)
    return {
        "vocab_size x hidden_size (embedding and heads)":
            args.vocab_size * h * (1 + mtp + (not args.tie_word_embeddings)),
        "the attention (num_attention_heads, q_lora_rank, qk_nope_head_dim, v_head_dim)": layers * attention,
        "the dense MLPs (intermediate_size)": args.first_k_dense_replace * 3 * h * args.intermediate_size,
        "the experts (n_routed_experts, n_shared_experts, moe_intermediate_size)":
            moe_layers * experts * 3 * h * args.moe_intermediate_size,
    }


_UNSET = object()


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON's true is not 1


def is_finite(v) -> bool:
    """A finite real number: not a bool, NaN, an infinity (JSON's NaN, Infinity, 1e999) or an int
    beyond float's range."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def show(value) -> str:
    """repr(value), cut short: a hostile config's field may be megabytes long."""
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."
