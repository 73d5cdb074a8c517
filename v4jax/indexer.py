"""Lightning indexer (spec 2.7): scores every completed CSA entry for each query and keeps the top-k.

    I[t, s] = sum_h w[t, h] * ReLU(q_I[t, h] . K_I[s]),   w = weights_proj(x) / sqrt(index_head_dim * n_heads)
computed with bf16 tensors as the reference does (score einsum output, ReLU, weighting, head sum rounded to bf16).
Queries are RoPE'd on their last dims, Hadamard-rotated and FP4-simulated; keys come from the indexer's own
compressor (compressor.py with indexer=True).

Decode cache storage of the keys (`kv_cache_format`): "bf16" keeps them as activations; "fp8" (the production
layout, spec 3.2) keeps each key as FP4 e2m1, two per byte, + one UE8M0 scale per 32 values: dI/2 + dI/32 bytes
(68 B for dI = 128), one uint8 row per key. The stored values are already FP4-simulated (compressor.finish), so
with `quant_sim` on the FP4 row holds exactly the bf16 key (re-quantising an FP4-simulated block is lossless).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import quant
from .config import ModelConfig
from .layers import act_dtype, apply_rope, linear_bf16, linear_fp8

f32 = jnp.float32


def queries(cfg: ModelConfig, p: dict, x: jax.Array, qr: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
    """x [B, S, d], qr [B, S, q_lora] -> (q_I [B, S, nI, dI], head weights w [B, S, nI])."""
    nI, dI = cfg.index_n_heads, cfg.index_head_dim
    q = linear_fp8(cfg, p["wq_b"], qr).reshape(qr.shape[:-1] + (nI, dI))
    q = apply_rope(q, cos[..., None, :], sin[..., None, :])
    q = quant.hadamard(q)
    if cfg.quant_sim:
        q = quant.fp4_sim(q, 32)
    w = quant.round_to(linear_bf16(cfg, p["weights_proj"], x).astype(f32) * (dI ** -0.5 * nI ** -0.5), q.dtype)
    return q, w


def key_bytes(cfg: ModelConfig, fmt: str | None = None) -> int:
    """Bytes of one cached indexer key in cache format `fmt` (default cfg.kv_cache_format)."""
    dI = cfg.index_head_dim
    if (fmt or cfg.kv_cache_format) == "bf16":
        return dI * jnp.dtype(act_dtype(cfg)).itemsize
    return dI // 2 + dI // 32


def store_keys(cfg: ModelConfig, keys: jax.Array) -> jax.Array:
    """Keys [..., dI] (activation dtype) -> cache rows [..., key_bytes] (fp8 format: packed FP4 | UE8M0 scales)."""
    if cfg.kv_cache_format == "bf16":
        return keys.astype(act_dtype(cfg))
    packed, scale = quant.quantize_fp4_weight(keys, 32)            # int8 [..., dI/2], E8M0 [..., dI/32]
    u8 = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint8)
    return jnp.concatenate([u8(packed), u8(scale)], axis=-1)


def fp4_rows_to_keys(rows: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """FP4 cache rows uint8 [..., dI/2 + dI/32] (packed e2m1 pairs, element 2i in the low nibble | UE8M0 scales per
    32 values) -> keys [..., dI] in dtype (exact)."""
    dI = rows.shape[-1] * 32 // 17
    if dI // 2 + dI // 32 != rows.shape[-1]:
        raise ValueError(f"FP4 key rows of {rows.shape[-1]} bytes: not dI/2 + dI/32 for any dI")
    packed = jax.lax.bitcast_convert_type(rows[..., :dI // 2], jnp.int8)
    scale = jax.lax.bitcast_convert_type(rows[..., dI // 2:], jnp.float8_e8m0fnu)
    return quant.dequant_fp4_weight(packed, scale, dtype, 32)


def load_keys(cfg: ModelConfig, rows: jax.Array) -> jax.Array:
    """Inverse of `store_keys`: cache rows [..., key_bytes] -> keys [..., dI] in the activation dtype (exact)."""
    if cfg.kv_cache_format == "bf16":
        return rows
    return fp4_rows_to_keys(rows, act_dtype(cfg))


def scores(q: jax.Array, w: jax.Array, keys: jax.Array) -> jax.Array:
    """q [B, S, nI, dI], w [B, S, nI], keys [B, C, dI] -> index scores [B, S, C] (activation dtype)."""
    dt = q.dtype
    r = lambda v: quant.round_to(v, dt).astype(f32)           # each bf16 op of the reference rounds
    s = r(jnp.einsum("bshd,bcd->bshc", q, keys, preferred_element_type=f32, precision="highest"))
    s = r(jax.nn.relu(s) * w.astype(f32)[..., None])
    return quant.round_to(jnp.sum(s, axis=2), dt)


def topk(index_scores: jax.Array, n_visible: jax.Array, k: int, first: jax.Array | int = 0) -> jax.Array:
    """Top-k entries among the visible ones (entry j visible iff first <= j < n_visible); -1 pads.

    index_scores [..., C]; n_visible, first broadcastable to index_scores.shape[:-1] -> int32 [..., k], sorted
    by descending score. `first` > 0 hides the entries of earlier documents in a packed row.
    """
    C = index_scores.shape[-1]
    j = jnp.arange(C)
    visible = (j < jnp.asarray(n_visible)[..., None]) & (j >= jnp.asarray(first)[..., None])
    visible = jnp.broadcast_to(visible, index_scores.shape)
    s = jnp.where(visible, index_scores.astype(f32), -jnp.inf)
    _, idx = jax.lax.top_k(s, k)
    return jnp.where(jnp.take_along_axis(visible, idx, axis=-1), idx, -1).astype(jnp.int32)
