"""DeepSeek-V3's configuration, with Hugging Face's field names.

`ModelArgs.from_hf(dict)` reads a `config.json` as released by DeepSeek and as written by
transformers 4.x (`rope_theta` + `rope_scaling`) or 5.x (`rope_parameters`). Every field it reads
is checked (type, range, consistency, and that the sizes fit in memory at all); one ConfigError
names every field it cannot run.

Fields a config.json lacks take DeepSeek-V3's values, as transformers' DeepseekV3Config does,
except the ones that fix the tensors' shapes (SHAPE_FIELDS): without them transformers would build
the 671B model whatever the checkpoint holds, so here their absence is an error naming them.
DeepSeek's releases and transformers' save_pretrained always write them.
"""

import dataclasses
import json
import math
import os
import re

from . import config_check
# KV_LORA_RANK and ROPE_DIM are re-exported: the model's modules (attention, cache) import them from here
from .config_check import FP8_CONFIG, KV_LORA_RANK, ROPE_DIM, SHAPE_FIELDS, ConfigError, show  # noqa: F401


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
        """Raise ConfigError naming every field this package cannot run."""
        problems = config_check.problems(self)
        if problems:
            raise ConfigError(problems)

    def num_parameters(self) -> int:
        """The model's parameters, about (the norms, gates and MTP projections left out)."""
        return sum(config_check.parameter_groups(self).values())

    # ---- reading and writing config.json ----

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        """From a config.json dict (DeepSeek's release, transformers 4.x or 5.x). Raises one
        ConfigError naming every field this package cannot run, and the missing SHAPE_FIELDS."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(cfg).__name__} {show(cfg)}")
        cfg, problems = dict(cfg), []

        def bad(name, why):
            problems.append(f"config field {name} = {show(cfg[name])}: {why}")

        missing = [name for name in SHAPE_FIELDS if name not in cfg]
        if missing:
            problems.append(f"config fields missing: {', '.join(missing)} (they fix the tensors' shapes; DeepSeek's "
                            f"config.json has them all)")
        if cfg.get("model_type", "deepseek_v3") not in ("deepseek_v3", "deepseek_v2"):
            bad("model_type", "expected 'deepseek_v3'")
        if cfg.get("hidden_act", "silu") != "silu":
            bad("hidden_act", "only 'silu' is supported")
        if cfg.get("attention_bias"):
            bad("attention_bias", "DeepSeek-V3 has no attention biases")
        if cfg.get("rope_interleave", True) is False:
            bad("rope_interleave", "the MLA kernels store interleaved RoPE")
        if cfg.get("topk_method", "noaux_tc") not in ("noaux_tc", "group_limited_greedy", "greedy"):
            bad("topk_method", "is not supported (noaux_tc, group_limited_greedy or greedy)")
        if cfg.get("moe_layer_freq", 1) != 1:
            bad("moe_layer_freq", "only 1 is supported")
        rope = cfg.pop("rope_parameters", None)  # transformers 5.x
        if rope is not None and not isinstance(rope, dict):
            problems.append(f"config field rope_parameters = {show(rope)}: must be an object or null")
            rope = cfg["rope_scaling"] = None
        if rope is not None:
            rope = dict(rope)
            cfg["rope_theta"] = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            cfg["rope_scaling"] = None if kind == "default" else rope
        elif isinstance(cfg.get("rope_scaling"), dict):  # transformers 4.x / DeepSeek's release
            rs = dict(cfg["rope_scaling"])
            rs.setdefault("rope_type", rs.pop("type", "yarn"))
            cfg["rope_scaling"] = None if rs["rope_type"] == "default" else rs
        elif "rope_scaling" not in cfg:
            cfg["rope_scaling"] = None  # plain RoPE (anything but an object or null: named by validate)
        if isinstance(cfg["rope_scaling"], dict):
            cfg["rope_scaling"].setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        if cfg.get("n_group") is None:
            cfg["n_group"], cfg["topk_group"] = 1, 1
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            args = cls(**{k: v for k, v in cfg.items() if k in fields})
        except ConfigError as e:
            found = e.problems
            if rope is not None:  # name the fields as this file spells them (rope: its rope_parameters)
                found = [p.replace("config field rope_scaling", "config field rope_parameters", 1)
                         .replace("config field rope_theta", "config field rope_parameters.rope_theta", 1)
                         for p in found]
            # a missing field stands in with DeepSeek-V3's value: no problem of its own, nor any relation to it
            problems += [p for p in found if not any(re.search(rf"\b{m}\b", p) for m in missing)]
        if problems:
            raise ConfigError(problems)
        return args

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        """From a model folder's config.json (or the file's path). Raises FileNotFoundError, or
        ConfigError naming the file."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf(cfg)
        except ConfigError as e:
            raise ConfigError(e.problems, path) from None

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
