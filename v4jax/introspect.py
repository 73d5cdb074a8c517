"""Looking inside a DeepSeek-V4 model: what the notebooks draw.

  kv_bytes_per_token(cfg, fmt)            growing decode-cache bytes per token of context (spec 3.2's table)
  kv_cache_bytes(cfg, n_tokens, fmt)      a whole sequence's decode cache at a given context length, by part
  dense_kv_cache_bytes(n_tokens, ...)     the same for a dense-attention GQA/MHA baseline
  indexer_selection(cfg, params, tokens, layer)
                                          the lightning indexer's scores and top-k choice on a CSA layer
  mhc_mixing(cfg, params, tokens, layer)  the Sinkhorn-normalised stream-mixing matrices of one block

The model functions are the model's own (attention._qkv, compressor.prefill, indexer.queries / scores / topk,
hyper.hc_pre): nothing here re-implements a computation, it only keeps intermediate results the forward pass
throws away. They are jit-compiled (cfg and layer static); run them on small inputs.

Cache accounting (spec 3.1 / 3.2), per sequence, main layers only (the MTP block keeps no decode cache):
  fmt "fp8" (the production layout): a main entry (window row or compressed entry) is the non-RoPE dims as FP8
    e4m3 + the RoPE dims as bf16 + one UE8M0 scale per 64 FP8 values, padded to 8 bytes (584 B at Flash size); an
    indexer key is FP4 + one UE8M0 scale per 32 values (68 B), or with indexer_keys="fp8" FP8 + one fp32 scale
    (132 B, SGLang's default).
  fmt "bf16" (what the reference keeps): head_dim and index_head_dim bf16 values.
  Growing part: one entry per m tokens on each compressed layer, one indexer key per 4 tokens on each CSA layer.
  Fixed part: the 128-row sliding-window ring of every layer, and the compressors' streaming state of the open
    block (fp32 kv and score rows, spec 3.1).
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from . import attention, compressor, indexer, model
from .config import ModelConfig
from .hyper import hc_post
from .layers import rms_norm, rope_inv_freq, rope_table

__all__ = ["FORMATS", "kv_entry_bytes", "index_key_bytes", "kv_bytes_per_token", "kv_cache_bytes",
           "dense_kv_cache_bytes", "block_input", "indexer_selection", "mhc_mixing"]

FORMATS = ("fp8", "bf16")


# ---- decode-cache accounting ----------------------------------------------------------------------------
def _check_fmt(fmt: str, indexer_keys: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if indexer_keys not in ("fp4", "fp8"):
        raise ValueError(f"indexer_keys must be 'fp4' or 'fp8', got {indexer_keys!r}")


def kv_entry_bytes(cfg: ModelConfig, fmt: str = "fp8") -> int:
    """Bytes of one cached main KV row (window row or compressed entry): `attention.kv_bytes`."""
    _check_fmt(fmt, "fp4")
    return attention.kv_bytes(cfg, fmt)


def index_key_bytes(cfg: ModelConfig, fmt: str = "fp8", indexer_keys: str = "fp4") -> int:
    """Bytes of one cached indexer key (fmt "fp8": FP4 + per-32 UE8M0 scales as `indexer.key_bytes`, or, with
    indexer_keys="fp8", SGLang's FP8 + one fp32 scale)."""
    _check_fmt(fmt, indexer_keys)
    if fmt == "fp8" and indexer_keys == "fp8":
        return cfg.index_head_dim + 4
    return indexer.key_bytes(cfg, fmt)


def kv_bytes_per_token(cfg: ModelConfig, fmt: str = "fp8", indexer_keys: str = "fp4") -> float:
    """Decode-cache bytes added per token of context (window rings and streaming state excluded).

    Flash: 3514 ("fp8"), 3850 ("fp8", indexer_keys="fp8"), 6880 ("bf16"); Pro: 5031, 5511, 9848."""
    _check_fmt(fmt, indexer_keys)
    if indexer_keys == "fp4" or fmt == "bf16":
        return attention.cache_bytes_per_token(cfg, fmt)
    entry, key = kv_entry_bytes(cfg, fmt), index_key_bytes(cfg, fmt, indexer_keys)
    return sum(entry / cfg.ratio(i) + (key / 4 if cfg.ratio(i) == 4 else 0)
               for i in range(cfg.n_layers) if cfg.ratio(i))


def kv_cache_bytes(cfg: ModelConfig, n_tokens: int, fmt: str = "fp8", indexer_keys: str = "fp4") -> dict[str, int]:
    """Bytes of one sequence's decode cache holding `n_tokens` tokens, by part: {"window", "compressed",
    "indexer", "state", "total"}. The window ring holds min(n_tokens, sliding_window) rows per layer; compressed
    entries and indexer keys exist for completed blocks only (n_tokens // m); "state" is the compressors' fp32
    (kv, score) rows of the open block (CSA [2m, 2D] for the main and the indexer compressor, HCA [m, D])."""
    _check_fmt(fmt, indexer_keys)
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    entry, key = kv_entry_bytes(cfg, fmt), index_key_bytes(cfg, fmt, indexer_keys)
    out = {"window": 0, "compressed": 0, "indexer": 0, "state": 0}
    for layer in range(cfg.n_layers):
        m = cfg.ratio(layer)
        out["window"] += min(n_tokens, cfg.sliding_window) * entry
        if m:
            out["compressed"] += (n_tokens // m) * entry
            out["state"] += 2 * 4 * math.prod(compressor.state_shape(m, cfg.head_dim))
        if m == 4:
            out["indexer"] += (n_tokens // m) * key
            out["state"] += 2 * 4 * math.prod(compressor.state_shape(m, cfg.index_head_dim))
    out["total"] = sum(out.values())
    return out


def dense_kv_cache_bytes(n_tokens: int, *, n_layers: int, kv_heads: int = 8, head_dim: int = 128,
                         bytes_per_value: int = 2) -> int:
    """A dense-attention baseline: K and V of every token in every layer (default: bf16 GQA with 8 KV heads of
    128 dims, the baseline of the V4 report; kv_heads = query heads gives MHA)."""
    return 2 * n_layers * kv_heads * head_dim * bytes_per_value * n_tokens


# ---- activations the forward pass does not return -------------------------------------------------------
@partial(jax.jit, static_argnums=(0, 3))
def block_input(cfg: ModelConfig, params: dict, tokens: jax.Array, layer: int) -> jax.Array:
    """The residual streams [B, S, n_hc, D] entering main block `layer` (the blocks before it run with
    `model.block_forward`, prefill semantics: positions 0..S-1)."""
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must be in 0..{cfg.n_layers - 1}, got {layer}")
    tokens = jnp.asarray(tokens, jnp.int32)
    X = model._embed(cfg, params, tokens)
    for i in range(layer):
        X = model.block_forward(cfg, params, i, X, tokens)
    return X


@partial(jax.jit, static_argnums=(0, 3))
def indexer_selection(cfg: ModelConfig, params: dict, tokens: jax.Array, layer: int) -> dict[str, jax.Array]:
    """The lightning indexer of CSA layer `layer` on `tokens` [B, S] (prefill, as in attention.prefill):

    {"scores": float32 [B, S, C] index score of compressed entry c for the query at t (-inf where the entry is not
     complete yet, c >= (t + 1) // 4), "topk": int32 [B, S, k] the entries the query attends to, best first
     (-1 = none), "selected": bool [B, S, C] the same as a mask}. C = S // 4; entry c pools tokens 4c .. 4c+3."""
    if not 0 <= layer < cfg.n_layers or cfg.ratio(layer) != 4:
        csa = [i for i in range(cfg.n_layers) if cfg.ratio(i) == 4]
        raise ValueError(f"layer {layer} is not a CSA layer (ratio 4); the CSA layers are {csa}")
    tokens = jnp.asarray(tokens, jnp.int32)
    B, S = tokens.shape
    m = 4
    C = S // m
    if C == 0:
        raise ValueError(f"need at least {m} tokens for one compressed entry, got {S}")
    p = model.block_params(params, cfg, layer)
    X = block_input(cfg, params, tokens, layer)
    y, _, _ = model._hc(cfg, p, "attn", X)
    x = rms_norm(y, p["attn_norm"]["weight"], cfg.rms_norm_eps)
    inv_freq = rope_inv_freq(cfg, layer)
    cos, sin = rope_table(jnp.arange(S)[None, :], inv_freq)
    qr, _, _ = attention._qkv(cfg, p["attn"], x, cos, sin)
    keys, _ = compressor.prefill(cfg, p["attn"]["indexer"]["compressor"], x, m, cfg.index_head_dim, inv_freq,
                                 indexer=True)
    qI, w = indexer.queries(cfg, p["attn"]["indexer"], x, qr, cos, sin)
    scores = indexer.scores(qI, w, keys).astype(jnp.float32)                   # [B, S, C]
    n_visible = jnp.broadcast_to((jnp.arange(S) + 1) // m, (B, S))
    top = indexer.topk(scores, n_visible, min(cfg.index_topk, C))
    visible = jnp.arange(C) < n_visible[..., None]
    selected = jnp.any(top[..., :, None] == jnp.arange(C), axis=-2)
    return {"scores": jnp.where(visible, scores, -jnp.inf), "topk": top, "selected": selected}


@partial(jax.jit, static_argnums=(0, 3))
def mhc_mixing(cfg: ModelConfig, params: dict, tokens: jax.Array, layer: int) -> dict[str, dict[str, jax.Array]]:
    """The mHC stream mixing of block `layer` on `tokens` [B, S], for its attention ("attn") and MoE ("ffn")
    sub-layers: {"comb" float32 [B, S, n, n] the doubly-stochastic (Sinkhorn-normalised) matrix that mixes the n
    residual streams (row j = source stream, column k = destination; columns sum to 1, rows to within the Sinkhorn iterations' convergence), "post"
    [B, S, n] the weights with which the sub-layer's output is added to each stream}."""
    tokens = jnp.asarray(tokens, jnp.int32)
    p = model.block_params(params, cfg, layer)
    X = block_input(cfg, params, tokens, layer)
    y, post, comb = model._hc(cfg, p, "attn", X)
    out = {"attn": {"comb": comb, "post": post}}
    a, _ = attention.prefill(cfg, p["attn"], layer, rms_norm(y, p["attn_norm"]["weight"], cfg.rms_norm_eps),
                             rope_inv_freq(cfg, layer))
    X = hc_post(X, a, post, comb)                          # the streams entering the MoE sub-layer
    _, post, comb = model._hc(cfg, p, "ffn", X)
    out["ffn"] = {"comb": comb, "post": post}
    return out
