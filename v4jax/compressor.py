"""KV compressors (spec 2.6): CSA (ratio 4, overlapping) and HCA (ratio 128) pooling, prefill and decode.

A compressor turns every completed block of m tokens into one entry of width D. Per channel, it takes a softmax
over the block's positions of `score = x Wgate^T + ape[position in block]` and pools `kv = x Wkv^T` with it (fp32).
The overlapping variant (m = 4) has 2D channels: entry i pools 2m slots, block i-1 through channels [0, D) and
block i through channels [D, 2D). Each entry is then RMS-normed, rotated (RoPE at position i*m) and quantisation-
simulated: FP8 on the non-RoPE dims (main) or Hadamard + FP4 (indexer keys).

Decode keeps a streaming state of fp32 (kv, score) rows: [m, D] (HCA) or [2m, 2D] (CSA: previous block's rows,
then the current block's rows).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import quant
from .config import ModelConfig
from .layers import act_dtype, apply_rope, linear_f32, lookup, rms_norm, rope_table

f32 = jnp.float32


def _project(p: dict, x: jax.Array, positions: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """fp32 kv and score (with ape added by position within block) for tokens x [..., d]."""
    kv = linear_f32(p["wkv"], x)
    score = linear_f32(p["wgate"], x) + lookup(p["ape"].astype(f32), positions % m)     # deterministic gradient
    return kv, score


def _pool(kv: jax.Array, score: jax.Array) -> jax.Array:
    """Per-channel softmax over axis -2 (the slots), weighted sum: [..., slots, D] -> [..., D] (fp32)."""
    return jnp.sum(kv * jax.nn.softmax(score, axis=-2), axis=-2)


def _overlap_slots(kv: jax.Array, score: jax.Array, D: int, prev=None) -> tuple[jax.Array, jax.Array]:
    """[B, n, m, 2D] blocks -> [B, n, 2m, D] slots: previous block's first half, then own block's second half.
    prev: (kv, score) [B, m, 2D] rows of the block before the first one (default: none, i.e. 0 / -inf)."""
    if prev is None:
        first_kv = jnp.zeros_like(kv[:, :1, :, :D])
        first_sc = jnp.full_like(score[:, :1, :, :D], -jnp.inf)
    else:
        first_kv, first_sc = prev[0][:, None, :, :D], prev[1][:, None, :, :D]
    prev_kv = jnp.concatenate([first_kv, kv[:, :-1, :, :D]], axis=1)
    prev_sc = jnp.concatenate([first_sc, score[:, :-1, :, :D]], axis=1)
    return (jnp.concatenate([prev_kv, kv[..., D:]], axis=2),
            jnp.concatenate([prev_sc, score[..., D:]], axis=2))


def finish(cfg: ModelConfig, p: dict, pooled: jax.Array, position: jax.Array, inv_freq, indexer: bool) -> jax.Array:
    """Pooled fp32 entries [..., D] -> stored entries: norm, RoPE at the position of the block's first token,
    quantisation simulation."""
    e = rms_norm(quant.round_to(pooled, act_dtype(cfg)), p["norm"]["weight"], cfg.rms_norm_eps)
    cos, sin = rope_table(position, inv_freq)
    e = apply_rope(e, cos, sin)
    if indexer:
        e = quant.hadamard(e)
        return quant.fp4_sim(e, 32) if cfg.quant_sim else e
    return kv_quant_sim(cfg, e)


def kv_quant_sim(cfg: ModelConfig, kv: jax.Array) -> jax.Array:
    """FP8 simulation (blocks of 64) of the non-RoPE dims of a main KV vector."""
    if not cfg.quant_sim:
        return kv
    nope = cfg.nope_head_dim
    return jnp.concatenate([quant.fp8_sim(kv[..., :nope], 64), kv[..., nope:]], axis=-1)


def state_shape(m: int, D: int) -> tuple[int, int]:
    """Rows x channels of the decode state."""
    return (2 * m, 2 * D) if m == 4 else (m, D)


def prefill(cfg: ModelConfig, p: dict, x: jax.Array, m: int, D: int, inv_freq, indexer: bool = False,
            doc_start: jax.Array | None = None, start=0, prev=None):
    """x [B, S, d] -> (entries [B, S//m, D], state (kv, score) [B, rows, channels] for decode).

    doc_start [B, S] (packed rows): an entry's RoPE position is relative to its document, and the overlapping
    variant never pools the previous block across a document start.
    Context parallelism: `start` is the global position of x's first token (a multiple of m), `prev` the
    (kv, score) rows of the block before it (see `project_tail`)."""
    B, S, _ = x.shape
    overlap = m == 4
    kv, score = _project(p, x, start + jnp.arange(S), m)
    n = S // m
    rows, ch = state_shape(m, D)
    st_kv = jnp.zeros((B, rows, ch), f32)
    st_sc = jnp.full((B, rows, ch), -jnp.inf, f32)
    off = m if overlap else 0
    r = S - n * m
    if r:
        st_kv = st_kv.at[:, off:off + r].set(kv[:, n * m:])
        st_sc = st_sc.at[:, off:off + r].set(score[:, n * m:])
    if n == 0:
        return jnp.zeros((B, 0, D), act_dtype(cfg)), (st_kv, st_sc)
    kvb = kv[:, :n * m].reshape(B, n, m, -1)
    scb = score[:, :n * m].reshape(B, n, m, -1)
    block_start = start + jnp.arange(n) * m
    ds = jnp.zeros((B, n), jnp.int32) if doc_start is None else doc_start[:, jnp.arange(n) * m]   # [B, n]
    if overlap:
        st_kv = st_kv.at[:, :m].set(kvb[:, -1])
        st_sc = st_sc.at[:, :m].set(scb[:, -1])
        kvb, scb = _overlap_slots(kvb, scb, D, prev)
        if doc_start is not None:   # previous block in another document: its half does not take part
            prev_ok = (block_start - m >= ds)[:, :, None, None]
            scb = scb.at[:, :, :m].set(jnp.where(prev_ok, scb[:, :, :m], -jnp.inf))
    pooled = _pool(kvb, scb)
    entries = finish(cfg, p, pooled, block_start - ds, inv_freq, indexer)
    return entries, (st_kv, st_sc)


def project_tail(p: dict, x: jax.Array, m: int, start) -> tuple[jax.Array, jax.Array]:
    """fp32 (kv, score) rows of the last m tokens of x [B, S, d] (x's first token at global position `start`):
    what the next sequence shard's overlapping compressor needs as `prev`."""
    S = x.shape[1]
    return _project(p, x[:, S - m:], start + S - m + jnp.arange(m), m)


def decode(cfg: ModelConfig, p: dict, x: jax.Array, pos: jax.Array, state, m: int, D: int, inv_freq,
           indexer: bool = False):
    """One token per sequence. x [B, d], pos [B] -> (entry [B, D], completed [B] bool, new state).

    The entry is meaningful only where `completed` ((pos + 1) % m == 0); it belongs at compressed slot pos // m.
    """
    kv, score = _project(p, x, pos, m)
    st_kv, st_sc = state
    slot = (m if m == 4 else 0) + pos % m
    put = jax.vmap(lambda s, i, v: s.at[i].set(v))
    st_kv, st_sc = put(st_kv, slot, kv), put(st_sc, slot, score)
    if m == 4:
        slots_kv = jnp.concatenate([st_kv[:, :m, :D], st_kv[:, m:, D:]], axis=1)
        slots_sc = jnp.concatenate([st_sc[:, :m, :D], st_sc[:, m:, D:]], axis=1)
    else:
        slots_kv, slots_sc = st_kv, st_sc
    completed = (pos + 1) % m == 0
    entry = finish(cfg, p, _pool(slots_kv, slots_sc), pos // m * m, inv_freq, indexer)
    if m == 4:  # the finished block becomes the "previous" block
        shift = lambda s: jnp.where(completed[:, None, None], jnp.concatenate([s[:, m:], s[:, m:]], axis=1), s)
        st_kv, st_sc = shift(st_kv), shift(st_sc)
    return entry, completed, (st_kv, st_sc)
