"""ModelConfig: the DeepSeek-V4 hyper-parameters, named like the HF `config.json`.

`ModelConfig.from_hf(path)` reads and validates a `config.json` (or a checkpoint directory holding one);
`ModelConfig.preset(name)` gives `flash`, `pro` (the published models) and `tiny`, `tiny-pro` (small models with
the real layer patterns, for tests and demos). The config is frozen and hashable, so it can be a static argument
of `jax.jit`.

Three fields are v4jax's own runtime options, not HF's (never read from nor written to config.json): `quant_sim`
(the reference's quantisation simulations: FP8 activation quantisation before FP8 linears, FP8 rounding of the
non-RoPE KV dims, FP4 rounding on the indexer path), `compute_dtype` (the activation dtype the reference keeps in
bf16; "float32" is for tight equivalence tests) and `kv_cache_format` (how the decode cache stores its entries:
"bf16" as the reference does, or "fp8", the production layout of spec 3.2 -- FP8 e4m3 non-RoPE dims with UE8M0
scales + bf16 RoPE dims for window/compressed entries, FP4 e2m1 indexer keys with UE8M0 scales).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

_MODEL_TYPE = "deepseek_v4"
_VALID_RATIOS = (0, 4, 128)
RUNTIME_OPTIONS = ("quant_sim", "compute_dtype", "kv_cache_format")   # v4jax's own fields, not in config.json
KV_CACHE_FORMATS = ("bf16", "fp8")


class ConfigError(ValueError):
    """A config.json that is not a valid DeepSeek-V4 config; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = ()
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    # rope_scaling (yarn), flattened so the config stays hashable
    rope_factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    quantized: bool = True          # quantization_config present: FP8 linears with E8M0 128x128 scales
    expert_dtype: str = "fp4"       # routed experts: "fp4" (packed int8 + per-32 scales) or "fp8"
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    # v4jax numerics switches (not in HF config.json)
    quant_sim: bool = True
    compute_dtype: str = "bfloat16"
    kv_cache_format: str = "bf16"   # decode cache storage: "bf16" (reference) or "fp8" (production, spec 3.2)

    def __post_init__(self):
        _validate(self)

    # ---- derived facts ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.hidden_size

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_mtp(self) -> int:
        return self.num_nextn_predict_layers

    def ratio(self, layer: int) -> int:
        """Compression ratio of block `layer` (layer == num_hidden_layers is the MTP block)."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def layer_kind(self, layer: int) -> str:
        return {0: "swa", 4: "csa", 128: "hca"}[self.ratio(layer)]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
        """Read an HF `config.json` (or a directory containing one) and validate it."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such config file")
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: config must be a JSON object")
        try:
            return cls.from_dict(raw, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides) -> "ModelConfig":
        model_type = raw.get("model_type", _MODEL_TYPE)
        if model_type != _MODEL_TYPE:
            raise ConfigError(f"model_type is {model_type!r}, expected {_MODEL_TYPE!r}")
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "q_lora_rank", "o_groups", "o_lora_rank", "compress_ratios", "n_routed_experts",
                    "num_experts_per_tok", "moe_intermediate_size"]
        missing = [k for k in required if k not in raw]
        if missing:
            raise ConfigError(f"missing required field(s): {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            if k in names and k not in ("quantized",) + RUNTIME_OPTIONS:
                kw[k] = v
        scaling = raw.get("rope_scaling")
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ConfigError("rope_scaling must be an object")
            kind = scaling.get("type", scaling.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"rope_scaling.type is {kind!r}, only 'yarn' is supported")
            for src, dst in [("factor", "rope_factor"), ("original_max_position_embeddings",
                             "original_max_position_embeddings"), ("beta_fast", "beta_fast"),
                             ("beta_slow", "beta_slow")]:
                if src in scaling:
                    kw[dst] = scaling[src]
        q = raw.get("quantization_config")
        kw["quantized"] = q is not None
        if q is not None:
            if q.get("quant_method", "fp8") != "fp8" or list(q.get("weight_block_size", [128, 128])) != [128, 128]:
                raise ConfigError(f"quantization_config {q} is not FP8 with 128x128 blocks")
        if "compress_ratios" in kw:
            if not isinstance(kw["compress_ratios"], (list, tuple)):
                raise ConfigError("compress_ratios must be a list")
            kw["compress_ratios"] = tuple(kw["compress_ratios"])
        if kw.get("n_shared_experts") is None:
            kw["n_shared_experts"] = 1
        kw.update(overrides)
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(str(e)) from None

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict (the inverse of from_dict)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": _MODEL_TYPE}
        skip = {"rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "quantized",
                *RUNTIME_OPTIONS}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        out["rope_scaling"] = {"beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "factor": self.rope_factor,
                               "original_max_position_embeddings": self.original_max_position_embeddings,
                               "type": "yarn"}
        if self.quantized:
            out["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
        out.update({"attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
                    "initializer_range": 0.02, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
                    "use_cache": True})
        return out

    # ---- presets -----------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _flash_ratios(n_layers: int, first: int) -> tuple[int, ...]:
    """[first, first, 4, 128, 4, 128, ..., 4 | 0 (MTP)] -- the published schedule."""
    body = [first, first] + [4 if i % 2 == 0 else 128 for i in range(2, n_layers)]
    return tuple(body + [0])


PRESETS: dict[str, dict[str, Any]] = {
    "flash": dict(compress_ratios=_flash_ratios(43, 0)),
    "pro": dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
                index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
                compress_ratios=_flash_ratios(61, 128)),
    # Small models with the real layer patterns: window-only, CSA and HCA layers, 3 hash layers, MTP.
    # head_dim 128 keeps one 64-wide FP8 block of non-RoPE dims; index_topk 8 makes selection matter at S > 32.
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=5, num_attention_heads=4, head_dim=128,
                 q_lora_rank=64, o_groups=2, o_lora_rank=64, index_n_heads=4, index_head_dim=128, index_topk=8,
                 n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                 compress_ratios=(0, 0, 4, 128, 4, 0), max_position_embeddings=4096),
    "tiny-pro": dict(vocab_size=512, hidden_size=128, num_hidden_layers=5, num_attention_heads=4, head_dim=128,
                     q_lora_rank=64, o_groups=2, o_lora_rank=64, index_n_heads=4, index_head_dim=128, index_topk=8,
                     n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                     routed_scaling_factor=2.5, compress_ratios=(128, 128, 4, 128, 4, 0),
                     max_position_embeddings=4096),
}


def _validate(c: ModelConfig) -> None:
    def bad(field: str, msg: str):
        raise ConfigError(f"{field}: {msg} (got {getattr(c, field)!r})")

    for f in ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
              "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
              "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "hc_mult", "hc_sinkhorn_iters"]:
        v = getattr(c, f)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(f, "must be a positive integer")
    for f in ["num_hash_layers", "num_nextn_predict_layers", "n_shared_experts"]:
        v = getattr(c, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            bad(f, "must be a non-negative integer")
    if c.num_key_value_heads != 1:
        bad("num_key_value_heads", "DeepSeek-V4 has one shared KV head")
    if c.n_shared_experts > 1:
        bad("n_shared_experts", "at most one shared expert is supported")
    if c.qk_rope_head_dim % 2 or c.qk_rope_head_dim >= c.head_dim:
        bad("qk_rope_head_dim", "must be even and smaller than head_dim")
    if c.nope_head_dim % 64:
        bad("head_dim", "head_dim - qk_rope_head_dim must be a multiple of 64 (FP8 KV blocks)")
    if c.index_head_dim & (c.index_head_dim - 1) or c.index_head_dim < c.qk_rope_head_dim:
        bad("index_head_dim", "must be a power of two (Hadamard) and >= qk_rope_head_dim")
    if c.index_head_dim % 32:
        bad("index_head_dim", "must be a multiple of 32 (FP4 blocks)")
    if c.num_attention_heads % c.o_groups:
        bad("o_groups", "must divide num_attention_heads")
    if c.num_experts_per_tok > c.n_routed_experts:
        bad("num_experts_per_tok", "must not exceed n_routed_experts")
    if c.num_hash_layers > c.num_hidden_layers:
        bad("num_hash_layers", "must not exceed num_hidden_layers")
    n_ratios = c.num_hidden_layers + c.num_nextn_predict_layers
    if not isinstance(c.compress_ratios, tuple) or len(c.compress_ratios) != n_ratios:
        bad("compress_ratios", f"must have num_hidden_layers + num_nextn_predict_layers = {n_ratios} entries")
    for i, r in enumerate(c.compress_ratios):
        if r not in _VALID_RATIOS:
            raise ConfigError(f"compress_ratios[{i}]: ratio {r!r} is not one of {_VALID_RATIOS}")
    if c.scoring_func != "sqrtsoftplus":
        bad("scoring_func", "only 'sqrtsoftplus' is supported")
    if c.expert_dtype not in ("fp4", "fp8"):
        bad("expert_dtype", "must be 'fp4' or 'fp8'")
    if c.expert_dtype == "fp4" and c.moe_intermediate_size % 32 or c.hidden_size % 32:
        bad("moe_intermediate_size", "hidden_size and moe_intermediate_size must be multiples of 32 (FP4 blocks)")
    if c.compute_dtype not in ("bfloat16", "float32"):
        bad("compute_dtype", "must be 'bfloat16' or 'float32'")
    if c.kv_cache_format not in KV_CACHE_FORMATS:
        bad("kv_cache_format", f"must be one of {KV_CACHE_FORMATS}")
    if not c.norm_topk_prob:
        bad("norm_topk_prob", "DeepSeek-V4 renormalises the top-k weights")
    if c.tie_word_embeddings:
        bad("tie_word_embeddings", "DeepSeek-V4 has separate embed and head")
