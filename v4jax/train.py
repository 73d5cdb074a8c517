"""Continued / from-scratch training: `python -m v4jax.train --config configs/X.yaml key=value ...`.

The step (one jit-compiled function, `make_train_step`):
  loss = CE(next token) + mtp_weight * CE(MTP: position i predicts token i+2) + balance_weight * sum of the
         sequence-wise balance losses of the score-routed blocks (main layers >= num_hash_layers, and MTP)
         [+ indexer_kl_weight * the lightning indexers' KL loss, mean over CSA layers and queries]
  both CEs are means over the target tokens of the whole (accumulated) batch: a target is a token with
  loss_mask 1 whose predicting position lies in the same segment (document piece), so packed documents never
  predict each other and pads/prompts carry no loss. Gradient accumulation (`grad_accum: N`) scans over N
  micro-batches inside the one compiled step and is exactly the large-batch gradient (sums, one normalisation).
  Then: global-norm clipping (optimizer.clip) and Muon/AdamW (v4jax.optim) on the trainable leaves; then the
  auxiliary-loss-free router-bias rule on every score-routed `ffn.gate.bias` (frozen for the optimizer):
  bias_i += bias_update_speed * sign(mean_j load_j - load_i), with the step's token counts per expert.
  Router statistics (load, balance loss) count real tokens only: the batch's optional `token_mask` (v4jax.data
  marks padding in its rows; `pad_token_mask` rebuilds it for rows without one) excludes padding; tokens without
  loss (prompts, BOS) count.

Cross-entropy at real sizes (`loss_chunk`, tokens per chunk, 0 = off): the head matmul, log-sum-exp and target pick
run over sequence chunks of ~loss_chunk tokens inside jax.checkpoint (v4jax.losses.xent_sum), so the [B, S, V] fp32
logits of a micro-batch never exist at once, in the forward or the backward.

Indexer warm-up (spec 7, DeepSeek-V3.2's DSA recipe): `indexer_kl_weight` > 0 adds the KL divergence between the
main attention's distribution over the compressed entries (summed over heads, L1-normalised) and the softmax of the
index scores (v4jax.losses.indexer_kl; its gradient reaches only the indexers' weights). `indexer_kl_mode: dense`
is the warm-up stage: the CSA layers attend every visible compressed entry (index_topk raised to the number of
entries) and the KL covers all of them; `sparse` keeps the model's top-k attention and restricts the KL to the
selected entries (the sparse stage). configs/indexer_warmup.yaml trains only the indexers (trainable regex).

Precision (documented choice): the model computes with bf16 weights exactly as loaded/initialised (fp32 where the
checkpoint is fp32: mHC, attn_sink, compressor ape, router bias); the optimizer state is fp32 (optim.py); and by
default every trainable weight also has an fp32 master copy (`model.master_dtype: float32`) that the updates are
added to, the bf16 weights being its rounding. Reason: at lr ~3e-4 a Muon/AdamW update changes a weight by
~1e-4 relative, below bf16's half-ulp (2^-9 ~ 2e-3), so plain bf16 weights would silently drop most updates.
`master_dtype: bfloat16` keeps no master (2 bytes/param less) and adds the updates in bf16 -- only sensible with
large lrs or stochastic rounding. Gradients are fp32 (the cast's cotangent).

Trainable subset: `trainable: "regex"` (re.search on the checkpoint names, e.g. "layers\\.[0-9]+\\.attn\\.");
everything else is frozen (no gradient, no optimizer state). Leaves optim.py labels frozen (router bias, hash
tables, quantisation scales) are never in the optimizer; the router-bias rule applies to the biases of blocks the
regex selects (`ffn.gate.bias` is tested against it too). With mtp_weight 0 the MTP block is not run and frozen.

Checkpoints: an Orbax CheckpointManager in out_dir/checkpoints holds {state: params (fp32 masters + frozen
leaves incl. router biases), optimizer state, step, PRNG key}, {meta: data position (epoch, index), tokens seen,
config}. Restarting with the same config continues exactly (bitwise-identical losses on the same device): the
data stream is a pure function of (corpus, seed) and its position; saving is synchronous so that donated step
buffers are never read by a background writer. The final weights are exported with v4jax.save(format="hf") to
out_dir/final-hf (with the tokenizer), loadable by v4jax.load.

Metrics: every step a JSON line in out_dir/metrics.jsonl; a progress line every `log_interval` steps with
tokens/s and MFU = 6 * active_params * tokens / time / (peak_tflops * 1e12 * devices), active_params counting the
matmul weights a token passes through (routed experts times k/E, the head once per prediction head, no embedding
lookup; attention's S^2 terms are not counted). TensorBoard scalars too if tensorboardX is importable.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from . import data as D
from . import losses as L
from . import optim
from . import params as P
from .config import ConfigError, ModelConfig, PRESETS
from .attention import doc_starts
from .model import forward_train

f32 = jnp.float32


class TrainConfigError(ValueError):
    """An invalid training config; the message names the key (and the nearest valid key)."""


# ---- config schema ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class F:
    kind: str                   # int | float | bool | str | list | dict | any
    default: Any = None
    choices: tuple | None = None
    nullable: bool = False
    doc: str = ""


SCHEMA: dict[str, Any] = {
    "model": {
        "preset": F("str", None, tuple(PRESETS), True, "preset name (random init), or use model.path"),
        "path": F("str", None, None, True, "HF safetensors or v4jax Orbax directory to continue training"),
        "dtype": F("str", "bf16", ("bf16",), False, "weights the model computes with"),
        "master_dtype": F("str", "float32", ("float32", "bfloat16"), False, "trainable weights' master copy"),
        "overrides": F("dict", {}, None, False, "ModelConfig fields (vocab_size: auto = tokenizer size)"),
    },
    "data": {
        "paths": F("list", [], doc="plain-text files: globs, directories, 'stdlib:<glob>'"),
        "chat": F("list", [], doc="chat JSONL files (same syntax)"),
        "exclude": F("list", [], doc="globs removed from the matches"),
        "tokenizer": F("any", "auto", doc="auto | byte | tokenizer.json/dir | {train_bpe: {...}}"),
        "thinking": F("str", "none", doc="chat rendering mode of samples without their own 'thinking'"),
        "add_bos": F("bool", True), "add_eos": F("bool", True),
        "eval_fraction": F("float", 0.0, doc="held-out fraction of the documents"),
        "eval_paths": F("list", []), "eval_chat": F("list", []),
        "eval_batches": F("int", 4),
    },
    "optimizer": {
        "name": F("str", "muon", ("muon", "adamw")),
        "lr": F("float", 3e-4), "warmup": F("int", 0),
        "schedule": F("str", "constant", ("constant", "cosine")),
        "final_lr": F("float", None, nullable=True, doc="cosine end (default lr/10)"),
        "decay_start": F("float", None, nullable=True, doc="cosine start as a fraction of steps (default: warmup)"),
        "weight_decay": F("float", 0.1), "clip": F("float", 1.0, nullable=True),
        "muon": F("dict", {}, doc="extra optim.muon kwargs (momentum, ns_dtype (default bfloat16), ...)"),
        "adamw": F("dict", {}, doc="extra optax.adamw kwargs (b1, b2, eps)"),
        "row_splits": F("bool", False, doc="Muon per group of wo_a / per compressor half"),
    },
    "mesh": {"data": F("int", 1, doc="batch axis"), "expert": F("int", 1, doc="routed experts"),
             "seq": F("int", 1), "tensor": F("int", 1, doc="more than 1 device in all needs v4jax.sharding")},
    "batch": F("int", 8, doc="rows per optimizer step (all micro-batches)"),
    "seq_len": F("int", 256, doc="row length; every document starts at a multiple of 128"),
    "steps": F("int", 100, doc="optimizer steps in all (a resumed run continues to it)"),
    "eval_interval": F("int", 0, doc="0 = no evaluation"),
    "checkpoint_interval": F("int", 0, doc="0 = only at the end"),
    "keep_checkpoints": F("int", 3),
    "log_interval": F("int", 10, doc="a progress line every N steps"),
    "out_dir": F("str", "out/run", doc="checkpoints/, metrics.jsonl, tokenizer/, final-hf/"),
    "seed": F("int", 0),
    "mtp_weight": F("float", 0.3, doc="0 = MTP block not run and frozen"),
    "balance_weight": F("float", 1e-4, doc="sequence-wise balance loss, score-routed blocks"),
    "bias_update_speed": F("float", 1e-3, doc="aux-loss-free router-bias rule; 0 = off"),
    "remat": F("bool", True, doc="recompute each block in the backward pass"),
    "loss_chunk": F("int", 2048, doc="cross-entropy: tokens per chunk of the head matmul (0 = all logits at once)"),
    "indexer_kl_weight": F("float", 0.0, doc="lightning-indexer KL loss (CSA layers); 0 = off"),
    "indexer_kl_mode": F("str", "sparse", ("dense", "sparse"),
                         doc="dense: warm-up stage, dense attention over the compressed entries, KL over all of "
                             "them; sparse: the model's top-k attention, KL over the selected entries"),
    "indexer_kl_chunk": F("int", 256, doc="indexer KL: query tokens per chunk (0 = all at once)"),
    "grad_accum": F("int", 1, doc="micro-batches per step (batch / grad_accum rows each)"),
    "trainable": F("str", None, nullable=True, doc="regex (re.search) over parameter names; the rest frozen"),
    "peak_tflops": F("float", None, nullable=True, doc="per device, for MFU; default by device kind"),
    "resume": F("any", "auto", doc="auto (out_dir's latest), false, or a checkpoints directory"),
    "resume_step": F("int", None, nullable=True, doc="default: the latest"),
    "export_hf": F("bool", True, doc="final weights to out_dir/final-hf (v4jax.load)"),
    "tensorboard": F("bool", True, doc="scalars to out_dir/tb if tensorboardX / tensorboard is importable"),
}

_BPE_KEYS = {"vocab_size": "int", "paths": "list", "exclude": "list", "min_frequency": "int"}
_MESH_AXES = ("data", "expert", "seq", "tensor")


def _all_keys(schema=SCHEMA, prefix="") -> list[str]:
    out = []
    for k, v in schema.items():
        out += _all_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def _unknown(key: str, valid: list[str], prefix: str) -> TrainConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if near:
        hint = f"; did you mean {prefix + near[0]!r}?"
    else:  # maybe it belongs at another level (lr at top level -> optimizer.lr)
        full = [k for k in _all_keys() if difflib.get_close_matches(key, [k.rsplit(".", 1)[-1]], 1, 0.8)]
        hint = f"; did you mean {full[0]!r}?" if full else f" (valid here: {', '.join(valid)})"
    return TrainConfigError(f"unknown config key {prefix + key!r}{hint}")


def describe_schema(schema=SCHEMA, indent: int = 0) -> str:
    """The config keys as YAML-ish text: default, choices, meaning."""
    lines = []
    for k, v in schema.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(describe_schema(v, indent + 2))
        else:
            extra = [f"one of {list(v.choices)}"] if v.choices else []
            extra += [v.doc] if v.doc else []
            lines.append(" " * indent + f"{k}: {json.dumps(v.default)}" + (f"    # {'; '.join(extra)}" if extra else ""))
    return "\n".join(lines)


def defaults(schema=SCHEMA) -> dict:
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def _coerce(name: str, f: F, v: Any) -> Any:
    if v is None:
        if f.nullable or f.kind == "any":
            return None
        raise TrainConfigError(f"{name}: must not be null")
    if f.kind == "float":
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise TrainConfigError(f"{name}: expected a number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TrainConfigError(f"{name}: expected a number, got {v!r}")
        v = float(v)
    elif f.kind == "int":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TrainConfigError(f"{name}: expected an integer, got {v!r}")
    elif f.kind == "bool" and not isinstance(v, bool):
        raise TrainConfigError(f"{name}: expected true or false, got {v!r}")
    elif f.kind == "str" and not isinstance(v, str):
        raise TrainConfigError(f"{name}: expected a string, got {v!r}")
    elif f.kind == "list":
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise TrainConfigError(f"{name}: expected a list, got {v!r}")
    elif f.kind == "dict" and not isinstance(v, dict):
        raise TrainConfigError(f"{name}: expected a mapping, got {v!r}")
    if f.choices is not None and v not in f.choices:
        near = difflib.get_close_matches(str(v), [str(c) for c in f.choices], n=1, cutoff=0.5)
        raise TrainConfigError(f"{name}: {v!r} is not one of {list(f.choices)}"
                               + (f"; did you mean {near[0]!r}?" if near else ""))
    return v


def _merge(raw: dict, schema=SCHEMA, prefix="") -> dict:
    """Defaults <- raw, checking every key and value type."""
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    out = defaults(schema)
    for k, v in raw.items():
        if k not in schema:
            raise _unknown(str(k), list(schema), prefix)
        s = schema[k]
        out[k] = _merge(v if v is not None else {}, s, f"{prefix}{k}.") if isinstance(s, dict) else \
            _coerce(prefix + k, s, v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optimizer.lr=1e-3' -> (['optimizer', 'lr'], 0.001-ish value typed by yaml.safe_load)."""
    if "=" not in item:
        raise TrainConfigError(f"override {item!r}: expected key=value (e.g. optimizer.lr=1e-3)")
    key, val = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise TrainConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(val) if val.strip() else None
    except yaml.YAMLError as e:
        raise TrainConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a raw config dict (copy). Keys are checked against the schema (free-form dicts such as
    model.overrides accept any sub-key; those are checked later)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node, schema = raw, SCHEMA
        for i, k in enumerate(path):
            last = i == len(path) - 1
            if schema is not None:
                if k not in schema:
                    raise _unknown(k, list(schema), ".".join(path[:i]) + "." if i else "")
                sub = schema[k]
                schema = sub if isinstance(sub, dict) else None
                if not last and schema is None and not (isinstance(sub, F) and sub.kind in ("dict", "any")):
                    raise TrainConfigError(f"override {item!r}: {'.'.join(path[:i + 1])} is not a mapping")
            if last:
                node[k] = value
            else:
                if not isinstance(node.get(k), dict):
                    node[k] = {}
                node = node[k]
    return raw


def load_config(path: str | None, overrides: list[str] = ()) -> dict:
    """YAML file (optional) + dotted overrides -> raw config dict (not yet validated)."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise TrainConfigError(f"--config: no such file {path}")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{path}: the top level must be a mapping")
    return apply_overrides(raw, list(overrides))


# ---- validation (no compute) ---------------------------------------------------------------------------
def _sharding_available() -> bool:
    try:
        from . import sharding  # noqa: F401
        return True
    except ImportError:
        return False


def _model_overrides(c: dict) -> dict:
    ov = dict(c["model"]["overrides"])
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for k in ov:
        if k not in names:
            near = difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.6)
            raise TrainConfigError(f"unknown config key 'model.overrides.{k}' (not a ModelConfig field)"
                                   + (f"; did you mean 'model.overrides.{near[0]}'?" if near else ""))
        if isinstance(ov[k], list):
            ov[k] = tuple(ov[k])
    return ov


def _tokenizer_spec(c: dict) -> Any:
    t = c["data"]["tokenizer"]
    if isinstance(t, dict):
        if set(t) != {"train_bpe"} or not isinstance(t["train_bpe"], dict):
            raise TrainConfigError("data.tokenizer: a mapping must be {train_bpe: {vocab_size: N, paths: [...]}}")
        for k, v in t["train_bpe"].items():
            if k not in _BPE_KEYS:
                raise _unknown(k, list(_BPE_KEYS), "data.tokenizer.train_bpe.")
            _coerce(f"data.tokenizer.train_bpe.{k}", F(_BPE_KEYS[k]), v)
        if "vocab_size" not in t["train_bpe"]:
            raise TrainConfigError("data.tokenizer.train_bpe.vocab_size is required")
    elif t is not None and not isinstance(t, str):
        raise TrainConfigError(f"data.tokenizer: expected auto, byte, a path or {{train_bpe: ...}}, got {t!r}")
    return t


def validate(raw: dict) -> dict:
    """Check the whole config before any compute; returns it with defaults filled in. One clear
    TrainConfigError per problem (unknown key + nearest valid key, missing file, bad batch / mesh, ...)."""
    c = _merge(raw)
    m, d, o = c["model"], c["data"], c["optimizer"]
    # model
    if (m["preset"] is None) == (m["path"] is None):
        raise TrainConfigError("model: give exactly one of model.preset (random init) or model.path (checkpoint)")
    if m["path"] is not None and not os.path.isdir(os.path.expanduser(m["path"])):
        raise TrainConfigError(f"model.path: no such checkpoint directory {m['path']}")
    _model_overrides(c)
    # data
    if not d["paths"] and not d["chat"]:
        raise TrainConfigError("data: give data.paths (text) and/or data.chat (chat JSONL)")
    for key in ("paths", "chat", "eval_paths", "eval_chat"):
        if d[key]:
            try:
                D.resolve_paths(d[key], d["exclude"], where=f"data.{key}")
            except D.DataError as e:
                raise TrainConfigError(str(e)) from None
    tok = _tokenizer_spec(c)
    if isinstance(tok, str) and tok not in ("auto", "byte") and not os.path.exists(os.path.expanduser(tok)):
        raise TrainConfigError(f"data.tokenizer: no such file or directory {tok}")
    if isinstance(tok, dict) and tok["train_bpe"].get("paths"):
        try:
            D.resolve_paths(tok["train_bpe"]["paths"], tok["train_bpe"].get("exclude", ()),
                            where="data.tokenizer.train_bpe.paths")
        except D.DataError as e:
            raise TrainConfigError(str(e)) from None
    if not 0.0 <= d["eval_fraction"] < 1.0:
        raise TrainConfigError(f"data.eval_fraction: must be in [0, 1), got {d['eval_fraction']}")
    # sizes
    for k in ("batch", "seq_len", "steps", "grad_accum", "log_interval", "keep_checkpoints"):
        if c[k] < 1:
            raise TrainConfigError(f"{k}: must be >= 1, got {c[k]}")
    for k in ("eval_interval", "checkpoint_interval"):
        if c[k] < 0:
            raise TrainConfigError(f"{k}: must be >= 0, got {c[k]}")
    if c["seq_len"] < 2:
        raise TrainConfigError("seq_len: must be at least 2")
    if c["batch"] % c["grad_accum"]:
        raise TrainConfigError(f"batch {c['batch']} is not divisible by grad_accum {c['grad_accum']}")
    micro = c["batch"] // c["grad_accum"]
    mesh = c["mesh"]
    for ax in _MESH_AXES:
        if mesh[ax] < 1:
            raise TrainConfigError(f"mesh.{ax}: must be >= 1, got {mesh[ax]}")
    if micro % mesh["data"]:
        raise TrainConfigError(f"batch: the micro-batch of {micro} rows (batch {c['batch']} / grad_accum "
                               f"{c['grad_accum']}) does not divide over mesh.data = {mesh['data']}")
    n_dev = math.prod(mesh[a] for a in _MESH_AXES)
    if n_dev > 1:
        if not _sharding_available():
            raise TrainConfigError(f"mesh {dict(mesh)} asks for {n_dev} devices, but v4jax.sharding is not "
                                   "available in this install; use a 1-device mesh (all axes 1)")
        if n_dev > jax.device_count():
            raise TrainConfigError(f"mesh {dict(mesh)} needs {n_dev} devices, only {jax.device_count()} present")
    # optimizer
    if o["lr"] <= 0:
        raise TrainConfigError(f"optimizer.lr: must be > 0, got {o['lr']}")
    if not 0 <= o["warmup"] <= c["steps"]:
        raise TrainConfigError(f"optimizer.warmup {o['warmup']} must be between 0 and steps ({c['steps']})")
    if o["decay_start"] is not None and not 0 <= o["decay_start"] <= 1:
        raise TrainConfigError(f"optimizer.decay_start: a fraction of steps in [0, 1], got {o['decay_start']}")
    try:
        if o["schedule"] == "cosine":
            optim.lr_schedule(o["lr"], o["warmup"], c["steps"], decay_start_frac=o["decay_start"])
    except ValueError as e:
        raise TrainConfigError(f"optimizer: the cosine schedule does not fit: {e}") from None
    if o["clip"] is not None and o["clip"] <= 0:
        raise TrainConfigError(f"optimizer.clip: must be > 0 or null, got {o['clip']}")
    import inspect
    for key, fn in (("muon", optim.muon), ("adamw", optax.adamw)):
        valid = [p for p in inspect.signature(fn).parameters if p not in ("learning_rate", "weight_decay")]
        for k in o[key]:
            if k not in valid:
                raise _unknown(k, valid, f"optimizer.{key}.")
    for k in ("mtp_weight", "balance_weight", "bias_update_speed", "indexer_kl_weight", "loss_chunk",
              "indexer_kl_chunk"):
        if c[k] < 0:
            raise TrainConfigError(f"{k}: must be >= 0, got {c[k]}")
    if c["indexer_kl_weight"] > 0 and mesh["seq"] > 1:
        raise TrainConfigError("indexer_kl_weight: the indexer KL loss does not support context parallelism "
                               f"(mesh.seq = {mesh['seq']}) yet")
    if c["trainable"] is not None:
        try:
            re.compile(c["trainable"])
        except re.error as e:
            raise TrainConfigError(f"trainable: {c['trainable']!r} is not a valid regex ({e})") from None
    if c["resume"] not in ("auto", False, True) and not isinstance(c["resume"], str):
        raise TrainConfigError(f"resume: expected auto, false or a checkpoints directory, got {c['resume']!r}")
    if isinstance(c["resume"], str) and c["resume"] != "auto" and not os.path.isdir(c["resume"]):
        raise TrainConfigError(f"resume: no such checkpoints directory {c['resume']}")
    if c["peak_tflops"] is not None and c["peak_tflops"] <= 0:
        raise TrainConfigError(f"peak_tflops: must be > 0, got {c['peak_tflops']}")
    # a cheap shape-level model check where no tokenizer is needed
    if m["preset"] is not None and _model_overrides(c).get("vocab_size") != "auto":
        cfg = model_config(c, None)
        trainable_names(c, cfg, P.abstract_flat(cfg, "bf16"))
        check_model(c, cfg)
    return c


def check_model(c: dict, cfg: ModelConfig) -> None:
    """Config checks that need the model config."""
    if c["indexer_kl_weight"] > 0 and not csa_layers(cfg):
        raise TrainConfigError(f"indexer_kl_weight {c['indexer_kl_weight']}: the model has no CSA layer (compress "
                               f"ratio 4, the layers with a lightning indexer); compress_ratios = "
                               f"{list(cfg.compress_ratios)}")


# ---- model / parameters --------------------------------------------------------------------------------
def model_config(c: dict, tokenizer_size: int | None) -> ModelConfig:
    """The ModelConfig of a preset (with overrides; vocab_size "auto" = tokenizer size rounded up to 128)."""
    ov = _model_overrides(c)
    if ov.get("vocab_size") == "auto":
        if tokenizer_size is None:
            raise TrainConfigError("model.overrides.vocab_size: auto needs the tokenizer")
        ov["vocab_size"] = -(-tokenizer_size // 128) * 128
    try:
        if c["model"]["preset"] is not None:
            return ModelConfig.preset(c["model"]["preset"], **ov)
        base = checkpoint_config(c["model"]["path"])
        new = base.replace(**ov)
    except (ConfigError, TypeError) as e:
        raise TrainConfigError(f"model: {e}") from None
    a, b = P.abstract_flat(base, "bf16"), P.abstract_flat(new, "bf16")
    if {k: v.shape for k, v in a.items()} != {k: v.shape for k, v in b.items()}:
        raise TrainConfigError(f"model.overrides {sorted(ov)} change parameter shapes of the checkpoint at "
                               f"{c['model']['path']}; only numerics switches (quant_sim, compute_dtype, ...) apply")
    return new


def checkpoint_config(path: str) -> ModelConfig:
    from . import checkpoint as ck
    path = os.path.expanduser(path)
    if ck.is_orbax_dir(path):
        return ck.read_marker(path)[0]
    return ModelConfig.from_hf(path)


def trainable_names(c: dict, cfg: ModelConfig, flat: dict) -> list[str]:
    """Names of the leaves the optimizer updates (see the module docstring)."""
    rx = re.compile(c["trainable"]) if c["trainable"] else None
    with_mtp = cfg.n_mtp > 0 and c["mtp_weight"] > 0
    out = []
    for n, v in flat.items():
        if optim.label_for(n, v) == optim.FROZEN:
            continue
        if n.startswith("mtp.") and not with_mtp:
            continue
        if rx is None or rx.search(n):
            out.append(n)
    if not out:
        raise TrainConfigError(f"trainable: {c['trainable']!r} matches no trainable parameter "
                               f"(names look like {next(iter(flat))!r}, 'layers.3.attn.wq_a.weight')")
    return out


def csa_layers(cfg: ModelConfig) -> list[int]:
    """The main layers with a lightning indexer (compress ratio 4), in the order of forward_train's indexer_kl."""
    return [i for i in range(cfg.n_layers) if cfg.ratio(i) == 4]


def pad_token_mask(rows: dict, pad_id: int) -> np.ndarray:
    """[..., S] bool, False on padding, for packed rows {tokens, segment_ids, loss_mask} (v4jax.data's format).

    data.py gives padding runs their own segment ids and loss_mask 0, and pads with `pad_id` (the EOS id); a run
    is padding when none of its positions is a target and all of its tokens are pad_id. (The one real run that
    also fits: a document piece made only of EOS tokens, none of them a target -- at most the last token of a text
    document split across rows; treating it as padding only drops it from the router statistics.)"""
    tok, seg, loss = (np.asarray(rows[k]) for k in ("tokens", "segment_ids", "loss_mask"))
    shape = tok.shape
    tok, seg, loss = (a.reshape(-1, shape[-1]) for a in (tok, seg, loss))
    n_seg = int(seg.max(initial=0)) + 1
    flat = (np.arange(len(seg))[:, None] * n_seg + seg).reshape(-1)
    targets = np.bincount(flat, weights=(loss != 0).reshape(-1), minlength=len(seg) * n_seg)
    non_pad = np.bincount(flat, weights=(tok != pad_id).reshape(-1), minlength=len(seg) * n_seg)
    real_seg = (targets > 0) | (non_pad > 0)
    return real_seg[flat].reshape(shape)


def score_blocks(cfg: ModelConfig, with_mtp: bool) -> list[tuple[int, str]]:
    """(row of forward_train's load/balance, bias name) of every score-routed block."""
    out = [(i, f"layers.{i}.ffn.gate.bias") for i in range(cfg.n_layers) if not cfg.is_hash_layer(i)]
    if with_mtp:
        out += [(cfg.n_layers + j, f"mtp.{j}.ffn.gate.bias") for j in range(cfg.n_mtp)]
    return out


def flops_params(cfg: ModelConfig, with_mtp: bool = True) -> int:
    """Weights a token's matmuls touch (for 6*N*tokens): routed experts x k/E, head once per prediction head,
    no embedding lookup, no router bias / hash table."""
    k_over_e = cfg.num_experts_per_tok / cfg.n_routed_experts
    n = 0.0
    for name, p in P.declare(cfg).items():
        if name == "embed.weight" or p.storage == "i32" or name.endswith("gate.bias"):
            continue
        if name.startswith("mtp.") and not with_mtp:
            continue
        size = float(np.prod(p.shape))
        if ".experts." in name and ".shared_experts." not in name:
            size *= k_over_e
        if name == "head.weight":
            size *= 1 + (cfg.n_mtp if with_mtp else 0)
        n += size
    return int(n)


def default_peak_tflops() -> float:
    """bf16 dense peak of one device (TFLOP/s) by device kind; CPUs get a nominal 1.0."""
    kind = jax.devices()[0].device_kind.lower()
    table = [("h200", 989.0), ("h100", 989.0), ("b200", 2250.0), ("a100", 312.0), ("l4", 121.0),
             ("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0)]
    for key, val in table:
        if key in kind:
            return val
    return 1.0


# ---- the step -------------------------------------------------------------------------------------------
def router_bias_update(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
    """Auxiliary-loss-free balancing: bias_i += speed * sign(mean_j load_j - load_i) (fp32)."""
    load = load.astype(f32)
    return (bias.astype(f32) + speed * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype)


@dataclass(frozen=True)
class StepSpec:
    """Everything the compiled step depends on besides array shapes (hashable: it keys the compile cache)."""
    cfg: ModelConfig
    trainable: tuple[str, ...]
    model_dtypes: tuple[tuple[str, str], ...]     # trainable name -> dtype the model computes with
    master_dtype: str
    remat: bool
    with_mtp: bool
    mtp_weight: float
    balance_weight: float
    bias_speed: float
    bias_rows: tuple[tuple[int, str], ...]        # router biases updated by the rule
    balance_rows: tuple[int, ...]
    grad_accum: int
    opt: tuple                                     # (name, lr, warmup, schedule, final, decay_start, wd, clip,
                                                   #  muon kwargs, adamw kwargs, row_splits, steps)
    loss_chunk: int = SCHEMA["loss_chunk"].default
    indexer_kl_weight: float = 0.0
    indexer_kl_dense: bool = False                 # warm-up stage: dense attention over the compressed entries
    indexer_kl_chunk: int = SCHEMA["indexer_kl_chunk"].default


def _freeze(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, list):
        return tuple(_freeze(v) for v in x)
    return x


# Newton-Schulz matmul dtype of the trainer's Muon unless optimizer.muon.ns_dtype says otherwise: bf16, as DeepSeek
# trained V4 (spec section 7: "NS in BF16 matmuls was found stable"); measured on an H100 at the 1b bench size:
# fp32 NS was half of the Muon step (docs/benchmarks.md)
NS_DTYPE = "bfloat16"


def build_optimizer(spec: StepSpec, master: dict) -> tuple[optax.GradientTransformation, Callable]:
    name, lr, warmup, schedule, final, decay_start, wd, clip, mk, ak, row_splits, steps = spec.opt
    if schedule == "constant":
        sched = optim.lr_schedule(lr, warmup, steps, decay_steps=0)
    else:
        sched = optim.lr_schedule(lr, warmup, steps, final=lr / 10 if final is None else final,
                                  decay_start_frac=decay_start if decay_start is not None else None)
    muon_kwargs = {**dict(mk), "weight_decay": wd}
    muon_kwargs.setdefault("ns_dtype", NS_DTYPE)
    if isinstance(muon_kwargs["ns_dtype"], str):
        muon_kwargs["ns_dtype"] = jnp.dtype(muon_kwargs["ns_dtype"])
    if row_splits:
        muon_kwargs["row_splits"] = optim.logical_row_splits(spec.cfg, list(master))
    tx = optim.make_optimizer(master, lr_schedule=sched, muon_kwargs=muon_kwargs,
                              adamw_kwargs={**dict(ak), "weight_decay": wd}, clip_norm=clip, optimizer=name)
    return tx, sched


def _targets(seg, mask, shift: int):
    """Weights [B, S]: position t's weight for predicting token t+shift (same segment, loss_mask 1); the last
    `shift` positions have no target (weight 0)."""
    w = (mask[:, shift:] * (seg[:, shift:] == seg[:, :-shift])).astype(f32)
    return jnp.pad(w, ((0, 0), (0, shift)))


def _shifted(tokens, shift: int):
    """[B, S] targets: token t+shift at position t (0 where there is none; its weight is 0)."""
    return jnp.pad(tokens[:, shift:], ((0, 0), (0, shift)))


def _assemble(spec: StepSpec, master: dict, frozen: dict) -> dict:
    dts = dict(spec.model_dtypes)
    flat = {n: v.astype(dts[n]) for n, v in master.items()}
    flat.update(frozen)
    return P.unflatten(flat)


def forward_config(spec: StepSpec, seq_len: int) -> ModelConfig:
    """The model config the step runs: the indexer warm-up (dense mode) raises index_topk to the number of
    compressed entries, i.e. every visible entry is attended (dense attention over the compressed entries)."""
    cfg = spec.cfg
    if spec.indexer_kl_dense and seq_len // 4 > cfg.index_topk:
        cfg = cfg.replace(index_topk=seq_len // 4)
    return cfg


def model_losses(spec: StepSpec, params: dict, tokens, seg, mask, token_mask=None) -> dict:
    """Sums over one (micro-)batch: {ce, n, mtp, n_mtp, balance, load, kl (sum over CSA layers and queries),
    n_kl (queries)}."""
    kl_on = spec.indexer_kl_weight > 0
    out = forward_train(forward_config(spec, tokens.shape[1]), params, tokens, seg, token_mask=token_mask,
                        remat=spec.remat, with_mtp=spec.with_mtp, logits=False, indexer_kl=kl_on,
                        kl_chunk=spec.indexer_kl_chunk)
    w1 = _targets(seg, mask, 1)
    r = {"ce": L.xent_sum(params["head"], out["hidden"], _shifted(tokens, 1), w1, spec.loss_chunk),
         "n": jnp.sum(w1), "mtp": jnp.zeros((), f32), "n_mtp": jnp.zeros((), f32), "load": out["load"],
         "kl": jnp.zeros((), f32), "n_kl": jnp.zeros((), f32)}
    if spec.with_mtp:
        w2 = _targets(seg, mask, 2)
        r["mtp"] = L.xent_sum(params["head"], out["mtp_hidden"], _shifted(tokens, 2), w2, spec.loss_chunk)
        r["n_mtp"] = jnp.sum(w2)
    rows = jnp.asarray(spec.balance_rows, jnp.int32)
    r["balance"] = jnp.sum(out["balance"][rows]) if spec.balance_rows else jnp.zeros((), f32)
    if kl_on:
        r["kl"], r["n_kl"] = jnp.sum(out["indexer_kl"]), out["indexer_kl_queries"]
    return r


def _token_mask(batch: dict):
    tm = batch.get("token_mask")
    return jnp.ones(batch["tokens"].shape, bool) if tm is None else tm.astype(bool)


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, sched: Callable):
    """state, batch {tokens, segment_ids, loss_mask[, token_mask]: [grad_accum, micro, S]} -> (state, metrics).
    token_mask (default all True): False on padding (router statistics and the indexer KL skip those tokens)."""
    kl_on = spec.indexer_kl_weight > 0
    n_csa = max(len(csa_layers(spec.cfg)), 1)

    def step(state, batch):
        master, frozen = state["master"], state["frozen"]
        toks, seg, mask, tmask = batch["tokens"], batch["segment_ids"], batch["loss_mask"], _token_mask(batch)
        count = lambda f: jnp.sum(jax.vmap(f)(seg, mask, tmask))
        n_tok = jnp.maximum(count(lambda s, m, _: jnp.sum(_targets(s, m, 1))), 1.0)
        n_mtp = jnp.maximum(count(lambda s, m, _: jnp.sum(_targets(s, m, 2))), 1.0)
        n_kl = jnp.maximum(count(lambda s, _, t: jnp.sum(L.kl_query_mask(doc_starts(s), t).astype(f32))), 1.0)
        kl_norm = n_kl * n_csa

        def micro_loss(mst, t, s, m, tm):
            r = model_losses(spec, _assemble(spec, mst, frozen), t, s, m, tm)
            loss = (r["ce"] / n_tok + spec.mtp_weight * r["mtp"] / n_mtp
                    + spec.balance_weight * r["balance"] / spec.grad_accum)
            if kl_on:
                loss = loss + spec.indexer_kl_weight * r["kl"] / kl_norm
            return loss, (jnp.stack([r["ce"], r["mtp"], r["balance"], r["kl"]]), r["load"])

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(carry, xs):
            g_acc, sums, load_acc = carry
            (_, (parts, load)), g = grad_fn(master, *xs)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(f32), g_acc, g)
            return (g_acc, sums + parts, load_acc + load), None

        n_rows = spec.cfg.n_layers + (spec.cfg.n_mtp if spec.with_mtp else 0)
        init = (jax.tree.map(lambda p: jnp.zeros(p.shape, f32), master), jnp.zeros(4, f32),
                jnp.zeros((n_rows, spec.cfg.n_routed_experts), f32))
        (grads, sums, load), _ = jax.lax.scan(body, init, (toks, seg, mask, tmask))
        gnorm = optax.tree.norm(grads)
        updates, opt = tx.update(grads, state["opt"], master)
        master = optax.apply_updates(master, updates)
        frozen = dict(frozen)
        for row, name in spec.bias_rows:
            frozen[name] = router_bias_update(frozen[name], load[row], spec.bias_speed)
        if spec.balance_rows:       # max/mean expert load, averaged over the score-routed blocks
            l = load[jnp.asarray(spec.balance_rows, jnp.int32)]
            imb = jnp.mean(jnp.max(l, -1) / jnp.maximum(jnp.mean(l, -1), 1e-9))
        else:
            imb = jnp.zeros((), f32)
        metrics = {"loss": sums[0] / n_tok, "mtp_loss": sums[1] / n_mtp, "balance": sums[2] / spec.grad_accum,
                   "gnorm": gnorm, "lr": sched(state["step"]), "targets": n_tok, "imbalance": imb, "load": load}
        if kl_on:
            metrics["indexer_kl"] = sums[3] / kl_norm
        new = {"master": master, "frozen": frozen, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
        return new, metrics
    return step


def make_eval_step(spec: StepSpec):
    def ev(state, batch):
        params = _assemble(spec, state["master"], state["frozen"])
        r = model_losses(dataclasses.replace(spec, remat=False, indexer_kl_weight=0.0), params, batch["tokens"],
                         batch["segment_ids"], batch["loss_mask"], _token_mask(batch))
        return jnp.stack([r["ce"], r["n"], r["mtp"], r["n_mtp"]])
    return ev


_COMPILED: dict[StepSpec, tuple] = {}


def compiled(spec: StepSpec, master: dict):
    """(train_step, eval_step, optimizer, schedule) for a spec, built once per process (so a restarted Trainer
    with the same config reuses the compiled executables)."""
    if spec not in _COMPILED:
        tx, sched = build_optimizer(spec, master)
        _COMPILED[spec] = (jax.jit(make_train_step(spec, tx, sched), donate_argnums=0),
                           jax.jit(make_eval_step(spec)), tx, sched)
    return _COMPILED[spec]


# ---- metrics sinks -------------------------------------------------------------------------------------
class _TensorBoard:
    def __init__(self, logdir: str):
        self.w = None
        try:
            from tensorboardX import SummaryWriter
            self.w = SummaryWriter(logdir)
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter  # the `tensorboard` package's writer front end
                import tensorboard  # noqa: F401
                self.w = SummaryWriter(logdir)
            except Exception:  # noqa: BLE001 - optional
                self.w = None

    def log(self, step: int, metrics: dict) -> None:
        if self.w is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.w.add_scalar(k, v, step)

    def close(self):
        if self.w is not None:
            self.w.close()


# ---- the trainer ----------------------------------------------------------------------------------------
class Trainer:
    """One training run. `Trainer(raw_config_dict).run()`; the config is validated first (TrainConfigError)."""

    def __init__(self, config: dict, *, log: Callable[[str], None] | None = None):
        self.log = log or (lambda s: print(s, flush=True))
        self.c = c = validate(config)
        self.out_dir = os.path.abspath(os.path.expanduser(c["out_dir"]))
        os.makedirs(self.out_dir, exist_ok=True)
        self.mesh = self._mesh()
        t0 = time.time()
        self.tokenizer = self._tokenizer()
        self.cfg = model_config(c, self.tokenizer.vocab_size) if c["model"]["preset"] else model_config(c, None)
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise TrainConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size "
                                   f"is {self.cfg.vocab_size} (set model.overrides.vocab_size: auto)")
        if c["seq_len"] > self.cfg.max_position_embeddings:
            raise TrainConfigError(f"seq_len {c['seq_len']} exceeds max_position_embeddings "
                                   f"{self.cfg.max_position_embeddings}")
        self._data()
        self.log(f"data: {len(self.train_corpus)} documents, {self.train_corpus.n_tokens:,} tokens "
                 f"({self.dataset.rows_in_epoch(0):,} rows of {c['seq_len']} per epoch), tokenizer "
                 f"{self.tokenizer.vocab_size} tokens; eval: "
                 f"{'none' if self.eval_corpus is None else f'{len(self.eval_corpus)} documents'} "
                 f"[{time.time() - t0:.1f}s]")
        self.with_mtp = self.cfg.n_mtp > 0 and c["mtp_weight"] > 0
        check_model(c, self.cfg)
        abstract = P.abstract_flat(self.cfg, "bf16")
        self.names = trainable_names(c, self.cfg, abstract)
        rx = re.compile(c["trainable"]) if c["trainable"] else None
        bias_rows = tuple((r, n) for r, n in score_blocks(self.cfg, self.with_mtp)
                          if c["bias_update_speed"] > 0 and (rx is None or rx.search(n)))
        o = c["optimizer"]
        self.spec = StepSpec(
            cfg=self.cfg, trainable=tuple(self.names),
            model_dtypes=tuple((n, str(abstract[n].dtype)) for n in self.names),
            master_dtype=c["model"]["master_dtype"], remat=c["remat"], with_mtp=self.with_mtp,
            mtp_weight=c["mtp_weight"], balance_weight=c["balance_weight"], bias_speed=c["bias_update_speed"],
            bias_rows=bias_rows, balance_rows=tuple(r for r, _ in score_blocks(self.cfg, self.with_mtp)),
            grad_accum=c["grad_accum"],
            opt=(o["name"], o["lr"], o["warmup"], o["schedule"], o["final_lr"], o["decay_start"], o["weight_decay"],
                 o["clip"], _freeze(o["muon"]), _freeze(o["adamw"]), o["row_splits"], c["steps"]),
            loss_chunk=c["loss_chunk"], indexer_kl_weight=c["indexer_kl_weight"],
            indexer_kl_dense=c["indexer_kl_mode"] == "dense", indexer_kl_chunk=c["indexer_kl_chunk"])
        self.n_active = flops_params(self.cfg, self.with_mtp)
        n_dev = math.prod(c["mesh"][a] for a in _MESH_AXES)
        self.peak = (c["peak_tflops"] or default_peak_tflops()) * 1e12 * n_dev
        self.manager = None
        self.tokens_seen = 0
        self.state = self._restore_or_init()
        self.step = int(self.state["step"])
        self._write_config()
        self.tb = _TensorBoard(os.path.join(self.out_dir, "tb")) if c["tensorboard"] else None

    # -- setup pieces
    def _mesh(self):
        """None for a 1-device mesh; else v4jax.sharding's mesh over the first n devices."""
        n_dev = math.prod(self.c["mesh"][a] for a in _MESH_AXES)
        if n_dev == 1:
            return None
        from . import sharding
        try:
            return sharding.make_mesh({a: self.c["mesh"][a] for a in _MESH_AXES}, devices=jax.devices()[:n_dev])
        except ValueError as e:
            raise TrainConfigError(f"mesh: {e}") from None

    def _mesh_ctx(self):
        import contextlib
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _state_shardings(self, abstract_state: dict):
        """Where every state leaf lives: one device, or (with a mesh) the parameter's sharding from v4jax.sharding
        for params and for optimizer-state leaves keyed by a parameter name of the same shape; replicated else."""
        if self.mesh is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda _: dev, abstract_state)
        from . import sharding
        table = P.flatten(sharding.param_shardings(self.cfg, self.mesh, "bf16"))
        shapes = P.abstract_flat(self.cfg, "bf16")
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def pick(path, leaf):
            for k in reversed(path):
                name = getattr(k, "key", None)
                if isinstance(name, str) and name in table and tuple(shapes[name].shape) == tuple(leaf.shape):
                    return table[name]
            return rep
        return jax.tree_util.tree_map_with_path(pick, abstract_state)

    def _put_batch(self, batch: dict) -> dict:
        if self.mesh is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return {k: jax.device_put(v, dev) for k, v in batch.items()}
        # [grad_accum, rows, S] (train) or [rows, S] (eval): rows over data, the sequence over seq (context
        # parallelism) when it divides
        n_data, n_seq = self.c["mesh"]["data"], self.c["mesh"].get("seq", 1)

        def spec(v):
            seq = "seq" if n_seq > 1 and v.shape[-1] % n_seq == 0 else None
            return jax.sharding.PartitionSpec(*[None] * (v.ndim - 2), "data" if n_data > 1 else None, seq)

        return {k: jax.device_put(v, jax.sharding.NamedSharding(self.mesh, spec(v))) for k, v in batch.items()}

    def _tokenizer(self):
        spec = self.c["data"]["tokenizer"]
        cached = os.path.join(self.out_dir, "tokenizer", "tokenizer.json")
        if isinstance(spec, dict):
            if os.path.isfile(cached):
                return D.load_tokenizer(cached)
            from .tokenizer import train_bpe_tokenizer
            b = spec["train_bpe"]
            files = D.resolve_paths(b.get("paths") or self.c["data"]["paths"], b.get("exclude", self.c["data"]["exclude"]),
                                    where="data.tokenizer.train_bpe.paths")
            t0 = time.time()
            tok = train_bpe_tokenizer(files, int(b["vocab_size"]), min_frequency=int(b.get("min_frequency", 2)))
            self.log(f"tokenizer: trained a {tok.vocab_size}-token BPE on {len(files)} files [{time.time() - t0:.1f}s]")
        else:
            model_dir = os.path.expanduser(self.c["model"]["path"]) if self.c["model"]["path"] else None
            tok = D.load_tokenizer(spec, model_dir)
        tok.save(os.path.dirname(cached))
        return tok

    def _data(self):
        d, c = self.c["data"], self.c
        files = lambda key: D.resolve_paths(d[key], d["exclude"], where=f"data.{key}") if d[key] else []
        corpus = D.Corpus.from_files(files("paths"), files("chat"), self.tokenizer, thinking=d["thinking"],
                                     add_bos=d["add_bos"], add_eos=d["add_eos"])
        self.train_corpus, self.eval_corpus = corpus.split(d["eval_fraction"], c["seed"])
        if d["eval_paths"] or d["eval_chat"]:
            self.eval_corpus = D.Corpus.from_files(files("eval_paths"), files("eval_chat"), self.tokenizer,
                                                   thinking=d["thinking"], add_bos=d["add_bos"], add_eos=d["add_eos"])
        pad = self.tokenizer.eos_id
        self.dataset = D.PackedDataset(self.train_corpus, c["seq_len"], c["seed"], pad_id=pad)
        self.eval_rows = None
        if self.eval_corpus is not None:
            ev = D.PackedDataset(self.eval_corpus, c["seq_len"], c["seed"], pad_id=pad, shuffle=False)
            micro = c["batch"] // c["grad_accum"]
            rows = ev.epoch_rows(0, limit=d["eval_batches"] * micro)       # token_mask: data marks padding
            n = (len(rows["tokens"]) // micro) * micro
            self.eval_rows = {k: v[:n].reshape(-1, micro, c["seq_len"]) for k, v in rows.items()} if n else None

    def _init_params(self) -> dict:
        m = self.c["model"]
        if m["preset"] is not None:
            t0 = time.time()
            params = P.init_params(self.cfg, jax.random.key(self.c["seed"]), dtype="bf16")
            self.log(f"model: random {m['preset']} init, {P.count_params(self.cfg):,} parameters "
                     f"[{time.time() - t0:.1f}s]")
            return params
        from .checkpoint import load
        cfg, params = load(os.path.expanduser(m["path"]), dtype="bf16")
        return params

    def _fresh_state(self, flat: dict) -> dict:
        mdt = jnp.float32 if self.spec.master_dtype == "float32" else None
        master = {n: (flat[n].astype(mdt) if mdt is not None and jnp.issubdtype(flat[n].dtype, jnp.floating)
                      else flat[n]) for n in self.names}
        frozen = {n: v for n, v in flat.items() if n not in master}
        _, _, tx, _ = compiled(self.spec, master)
        return {"master": master, "frozen": frozen, "opt": tx.init(master), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(self.c["seed"]))}

    def _abstract_state(self) -> dict:
        flat = P.abstract_flat(self.cfg, "bf16")
        return jax.eval_shape(self._fresh_state, flat)

    def _open_manager(self, directory: str, read_only: bool = False):
        import orbax.checkpoint as ocp
        if read_only:
            opts = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0,
                                                enable_async_checkpointing=False)
        else:
            opts = ocp.CheckpointManagerOptions(max_to_keep=self.c["keep_checkpoints"], create=True,
                                                enable_async_checkpointing=False)
        return ocp.CheckpointManager(directory, options=opts, item_names=("state", "meta"))

    def _restore_or_init(self) -> dict:
        import orbax.checkpoint as ocp
        c = self.c
        own = os.path.join(self.out_dir, "checkpoints")
        self.manager = self._open_manager(own)
        src, step = None, c["resume_step"]
        if isinstance(c["resume"], str) and c["resume"] != "auto":
            src = self._open_manager(os.path.abspath(c["resume"]), read_only=True)
        elif c["resume"] in ("auto", True) and self.manager.latest_step() is not None:
            src = self.manager
        if src is None:
            if step is not None:
                raise TrainConfigError(f"resume_step {step}: there is no checkpoint to resume from")
            flat = P.flatten(self._init_params())
            state = self._fresh_state(flat)
            # committed placement (also what a restore gives), so a restarted run reuses the compiled step
            return jax.device_put(state, self._state_shardings(state))
        steps = src.all_steps()
        if not steps:
            raise TrainConfigError(f"resume: {src.directory} holds no checkpoint")
        step = max(steps) if step is None else step
        if step not in steps:
            raise TrainConfigError(f"resume_step {step}: not among the checkpoints {sorted(steps)} in {src.directory}")
        abstract = self._abstract_state()
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract,
                              self._state_shardings(abstract))
        t0 = time.time()
        try:
            got = src.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                            meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - name the checkpoint, not Orbax's internals
            raise TrainConfigError(f"resume: cannot restore step {step} from {src.directory}: {type(e).__name__}: "
                                   f"{str(e)[:1000]} (was it written with another model/trainable/optimizer "
                                   "config?)") from None
        meta = got["meta"]
        self.dataset.set_state(meta["data"])
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.log(f"resumed from {src.directory} step {step} (data epoch {meta['data']['epoch']}, row "
                 f"{meta['data']['index']}) [{time.time() - t0:.1f}s]")
        return got["state"]

    def _write_config(self):
        with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(self.c, f, sort_keys=False)

    # -- running
    def next_batch(self) -> dict:
        c = self.c
        rows = self.dataset.next_rows(c["batch"])                          # token_mask: data marks padding
        micro = c["batch"] // c["grad_accum"]
        return {k: v.reshape(c["grad_accum"], micro, c["seq_len"]) for k, v in rows.items()}

    def save(self) -> None:
        import orbax.checkpoint as ocp
        if self.step in self.manager.all_steps():
            return
        meta = {"data": self.dataset.state(), "step": self.step, "tokens_seen": self.tokens_seen,
                "model": self.cfg.to_hf()}
        self.manager.save(self.step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def evaluate(self) -> dict:
        if self.eval_rows is None:
            return {}
        _, ev, _, _ = compiled(self.spec, self.state["master"])
        tot = np.zeros(4)
        with self._mesh_ctx():
            for i in range(self.eval_rows["tokens"].shape[0]):
                tot += np.asarray(ev(self.state, self._put_batch({k: v[i] for k, v in self.eval_rows.items()})))
        out = {"eval_loss": tot[0] / max(tot[1], 1)}
        if self.with_mtp:
            out["eval_mtp_loss"] = tot[2] / max(tot[3], 1)
        return out

    def params(self) -> dict:
        """The current model parameters (bf16 as the model computes with), nested."""
        return _assemble(self.spec, self.state["master"], self.state["frozen"])

    def run(self, steps: int | None = None) -> list[dict]:
        """Train until step `steps` (default: the config's); returns the metrics of the steps run."""
        c = self.c
        end = c["steps"] if steps is None else steps
        train_step, _, _, _ = compiled(self.spec, self.state["master"])
        history: list[dict] = []
        mf = open(os.path.join(self.out_dir, "metrics.jsonl"), "a")
        tok_per_step = c["batch"] * c["seq_len"]
        t_log, n_log, pos = time.time(), 0, None
        try:
            while self.step < end:
                pos = self.dataset.state()
                batch = self._put_batch(self.next_batch())
                t0 = time.time()
                with self._mesh_ctx():
                    new_state, m = train_step(self.state, batch)
                self.state = new_state
                pos = None
                m = jax.device_get(m)
                dt = time.time() - t0
                self.step += 1
                self.tokens_seen += tok_per_step
                rec = {"step": self.step, **{k: float(v) for k, v in m.items() if k != "load"},
                       "epoch": self.dataset.epoch, "tokens": self.tokens_seen, "step_time": dt,
                       "tok_per_s": tok_per_step / dt, "mfu": 6 * self.n_active * tok_per_step / dt / self.peak}
                if c["eval_interval"] and self.step % c["eval_interval"] == 0:
                    rec.update(self.evaluate())
                history.append({**rec, "load": np.asarray(m["load"])})
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                if self.tb is not None:
                    self.tb.log(self.step, rec)
                n_log += 1
                if self.step % c["log_interval"] == 0 or self.step == end or self.step == 1:
                    el = time.time() - t_log
                    tps = n_log * tok_per_step / el
                    mfu = 6 * self.n_active * n_log * tok_per_step / el / self.peak
                    ev = f" | eval {rec['eval_loss']:.4f}" if "eval_loss" in rec else ""
                    ev = (f" | indexer KL {rec['indexer_kl']:.4f}" if "indexer_kl" in rec else "") + ev
                    note = " (incl. compile)" if self.step == 1 or len(history) == 1 else ""
                    self.log(f"step {self.step}/{end} | loss {rec['loss']:.4f} | mtp {rec['mtp_loss']:.4f} | "
                             f"bal {rec['balance']:.3f} | lr {rec['lr']:.2e} | gnorm {rec['gnorm']:.3f}{ev} | "
                             f"{tps:,.0f} tok/s | MFU {mfu:.2%}{note}")
                    t_log, n_log = time.time(), 0
                if c["checkpoint_interval"] and self.step % c["checkpoint_interval"] == 0:
                    self.save()
        except KeyboardInterrupt:
            if pos is not None:                      # the step in flight did not finish: its batch is unused
                self.dataset.set_state(pos)
            if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
                self.log(f"interrupted inside step {self.step + 1}: its input buffers were donated; "
                         f"resume from the last checkpoint")
            else:
                self.log(f"interrupted: saving a checkpoint at step {self.step}")
                self.save()
            raise
        finally:
            mf.close()
        if self.step >= c["steps"]:
            self.save()
        return history

    def export(self, path: str | None = None) -> str:
        """Write the current weights with v4jax.save(format="hf") (+ the tokenizer); replaces an older export
        only once the new one is complete."""
        from .checkpoint import save
        path = path or os.path.join(self.out_dir, "final-hf")
        tmp = path + ".new"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        save(self.cfg, self.params(), tmp, format="hf", tokenizer_dir=os.path.join(self.out_dir, "tokenizer"))
        if os.path.exists(path):
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        return path

    def close(self):
        if self.manager is not None:
            self.manager.close()
        if self.tb is not None:
            self.tb.close()


def train(config: dict, log: Callable[[str], None] | None = None) -> Trainer:
    """Validate, train to `steps`, export (if export_hf); returns the (closed) Trainer."""
    t = Trainer(config, log=log)
    try:
        t.run()
        if t.c["export_hf"] and t.step >= t.c["steps"]:
            path = t.export()
            t.log(f"exported step {t.step} to {path} (load with v4jax.load)")
    finally:
        t.close()
    return t


def main(argv: list[str] | None = None) -> int:
    from .xla_flags import apply_defaults
    apply_defaults()
    ap = argparse.ArgumentParser(prog="python -m v4jax.train", description=__doc__.split("\n")[0],
                                 epilog="overrides: dotted keys, values typed as YAML (optimizer.lr=1e-3 "
                                        "model.overrides.quant_sim=false data.paths=[a.txt,b.txt])")
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--peak-tflops", type=float, help="per-device peak TFLOP/s for the MFU estimate")
    ap.add_argument("--validate-only", action="store_true", help="check the config and exit")
    ap.add_argument("--show-defaults", action="store_true", help="print every config key with its default and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    a = ap.parse_args(argv)
    if a.show_defaults:
        print(describe_schema())
        return 0
    try:
        raw = load_config(a.config, a.overrides)
        if a.peak_tflops is not None:
            raw["peak_tflops"] = a.peak_tflops
        if a.validate_only:
            validate(raw)
            print("config OK")
            return 0
        train(raw)
    except (TrainConfigError, D.DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
