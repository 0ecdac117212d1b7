"""DeepSeek-V3's configuration, with Hugging Face's field names.

`ModelArgs.from_hf(dict)` reads a `config.json` as released by DeepSeek and as written by
transformers 4.x (`rope_theta` + `rope_scaling`) or 5.x (`rope_parameters`). Settings this package
does not implement raise ConfigError naming the field.
"""

import dataclasses
import json
import math
import os

from dsv3_kernels.utils import GEMM_BLOCK


class ConfigError(ValueError):
    """A config.json field has a value this package cannot run."""


# The MLA kernels' fixed latent layout: 512 compressed kv values + 64 RoPE values per token.
KV_LORA_RANK = 512
ROPE_DIM = 64

# quantization_config of an FP8 checkpoint in DeepSeek-V3's format: e4m3 weights with one scale per
# GEMM_BLOCK x GEMM_BLOCK (128 x 128) block, activations quantized per 1 x 128 as they come.
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [GEMM_BLOCK, GEMM_BLOCK]}


@dataclasses.dataclass
class ModelArgs:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 3
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    # YaRN (None: plain RoPE): factor, beta_fast, beta_slow, mscale, mscale_all_dim,
    # original_max_position_embeddings, as in Hugging Face's rope_parameters.
    rope_scaling: dict | None = dataclasses.field(default_factory=lambda: dict(
        rope_type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
        original_max_position_embeddings=4096))
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    # FP8 checkpoints: {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}
    quantization_config: dict | None = None
    # multi-token prediction modules, stored as model.layers.{num_hidden_layers + k} (DeepSeek-V3: 1)
    num_nextn_predict_layers: int = 0

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def fp8(self) -> bool:
        return self.quantization_config is not None

    @property
    def eos_token_ids(self) -> list:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 with YaRN (DeepSeek-V3: 0.1352)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    def validate(self):
        def bad(name, why):
            raise ConfigError(f"config field {name} = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "qk_nope_head_dim",
                     "v_head_dim", "intermediate_size", "moe_intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(name, "must be a positive int")
        if self.kv_lora_rank != KV_LORA_RANK:
            bad("kv_lora_rank", f"the MLA kernels' latent cache holds {KV_LORA_RANK} values (DeepSeek-V2/V3's)")
        if self.qk_rope_head_dim != ROPE_DIM:
            bad("qk_rope_head_dim", f"the MLA kernels' latent cache holds {ROPE_DIM} RoPE values")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be an int >= 0")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            bad("q_lora_rank", "must be a positive int or null (then q_proj)")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", "must be 'sigmoid' or 'softmax'")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"must be in [0, num_hidden_layers = {self.num_hidden_layers}]")
        if self.first_k_dense_replace < self.num_hidden_layers:
            e = self.n_routed_experts
            if not isinstance(e, int) or e < 1:
                bad("n_routed_experts", "must be a positive int")
            if not isinstance(self.n_group, int) or self.n_group < 1 or e % self.n_group:
                bad("n_group", f"must divide n_routed_experts = {e}")
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must be in [1, n_group = {self.n_group}]")
            if not 1 <= self.num_experts_per_tok <= self.topk_group * (e // self.n_group):
                bad("num_experts_per_tok", "must be >= 1 and at most the experts of the topk_group groups")
            if self.moe_intermediate_size % 8 or self.hidden_size % 8:
                bad("moe_intermediate_size", "the expert kernels need moe_intermediate_size and hidden_size "
                                             "to be multiples of 8")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("yarn", "default", None):
                bad("rope_scaling", f"rope_type {kind!r} is not supported (yarn or default)")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if rs.get(key) is None:
                        bad("rope_scaling", f"yarn needs {key!r}")
        q = self.quantization_config
        if q is not None:
            if q.get("quant_method", "fp8") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
                bad("quantization_config", "only quant_method 'fp8' with fmt 'e4m3' is supported")
            blocks = FP8_CONFIG["weight_block_size"]
            if list(q.get("weight_block_size", blocks)) != blocks:
                bad("quantization_config", f"weight_block_size must be {blocks} (DeepSeek-V3's blocks)")
            if q.get("activation_scheme", "dynamic") != "dynamic":
                bad("quantization_config", "activation_scheme must be 'dynamic'")

    # ---- reading and writing config.json ----

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        """From a config.json dict (DeepSeek's release, transformers 4.x or 5.x)."""
        cfg = dict(cfg)
        if cfg.get("model_type", "deepseek_v3") not in ("deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"config field model_type = {cfg['model_type']!r}: expected 'deepseek_v3'")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field hidden_act = {cfg['hidden_act']!r}: only 'silu' is supported")
        if cfg.get("attention_bias"):
            raise ConfigError("config field attention_bias = True: DeepSeek-V3 has no attention biases")
        if cfg.get("rope_interleave", True) is False:
            raise ConfigError("config field rope_interleave = False: the MLA kernels store interleaved RoPE")
        if cfg.get("topk_method", "noaux_tc") not in ("noaux_tc", "group_limited_greedy", "greedy"):
            raise ConfigError(f"config field topk_method = {cfg['topk_method']!r} is not supported")
        if cfg.get("moe_layer_freq", 1) != 1:
            raise ConfigError(f"config field moe_layer_freq = {cfg['moe_layer_freq']!r}: only 1 is supported")
        rope = cfg.pop("rope_parameters", None)  # transformers 5.x
        if rope is not None:
            rope = dict(rope)
            cfg["rope_theta"] = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            cfg["rope_scaling"] = None if kind == "default" else rope
        elif cfg.get("rope_scaling") is not None:  # transformers 4.x / DeepSeek's release
            rs = dict(cfg["rope_scaling"])
            rs.setdefault("rope_type", rs.pop("type", "yarn"))
            cfg["rope_scaling"] = None if rs["rope_type"] == "default" else rs
        else:
            cfg["rope_scaling"] = None
        if cfg["rope_scaling"] is not None:
            cfg["rope_scaling"].setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        if cfg.get("n_group") is None:
            cfg["n_group"], cfg["topk_group"] = 1, 1
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in fields})

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(cfg)

    def to_hf(self) -> dict:
        """A transformers 5.x config.json dict (rope_parameters) for DeepseekV3Config."""
        d = dataclasses.asdict(self)
        rs = d.pop("rope_scaling")
        d["rope_parameters"] = dict(rope_type="default") if rs is None else dict(rs)
        d["rope_parameters"]["rope_theta"] = d.pop("rope_theta")
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_act="silu",
                 num_key_value_heads=self.num_attention_heads, topk_method="noaux_tc")
        return d


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def deepseek_v3_671b() -> ModelArgs:
    """DeepSeek-V3 / R1 as released (config.json of deepseek-ai/DeepSeek-V3), FP8 weights."""
    return ModelArgs(quantization_config=dict(FP8_CONFIG))


def tiny(**overrides) -> ModelArgs:
    """A tiny configuration for tests: every feature of the full model (q low rank, YaRN, groups,
    shared expert, a dense first layer), small widths. The latent is the kernels' 512 + 64."""
    args = dict(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, q_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32,
                n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                first_k_dense_replace=1, max_position_embeddings=1024,
                rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                  mscale_all_dim=0.707, original_max_position_embeddings=256))
    args.update(overrides)
    return ModelArgs(**args)
