"""Sparse attention, the definition (spec 2.5 step 5 and section 6), as a gather-by-index computation.

Every query attends to the KV rows its index list names (-1 = masked); all H heads share one KV vector per
entry (MQA with K = V). One softmax over the listed entries plus a per-head sink logit:
    p_j = exp(z_j) / (sum_k exp(z_k) + exp(sink_h)),  z_j = (q . kv_j) * scale,  o = sum_j p_j kv_j.
Numerics follow the reference kernel: scores accumulate in fp32; the list is processed in blocks of 64 with an
online softmax, the probabilities of a block are rounded to the value dtype (bf16) relative to the running max
before P.V, the normaliser sums the unrounded fp32 probabilities, and the sink joins once at the end.
Memory is O(S x T) for T listed entries, never S x N.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 64


def sparse_attention(q: jax.Array, kv: jax.Array, idx: jax.Array, sink: jax.Array, scale: float,
                     block: int = BLOCK) -> jax.Array:
    """q [B, S, H, K], kv [B, N, K], idx [B, S, T] int32 (-1 masked), sink [H] fp32 -> [B, S, H, K] (q.dtype)."""
    B, S, H, K = q.shape
    T = idx.shape[-1]
    if T == 0:
        return jnp.zeros_like(q)
    pad = (-T) % block
    if pad:
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    nb = idx.shape[-1] // block
    valid = idx >= 0
    rows = jax.vmap(lambda kv_b, i_b: kv_b[i_b])(kv, jnp.where(valid, idx, 0))        # [B, S, T', K]
    z = jnp.einsum("bshk,bstk->bsht", q, rows, preferred_element_type=jnp.float32, precision="highest") * scale
    z = jnp.where(valid[:, :, None, :], z, -jnp.inf)
    zb = z.reshape(B, S, H, nb, block)
    m_run = jax.lax.cummax(jnp.max(zb, axis=-1), axis=3)                                 # running max per block
    m_run = jnp.where(jnp.isfinite(m_run), m_run, 0.0)
    p = jnp.exp(zb - m_run[..., None])                                                  # fp32, 0 where masked
    m_fin = m_run[..., -1:]
    rescale = jnp.exp(m_run - m_fin)                                                    # [B, S, H, nb]
    denom = jnp.sum(jnp.sum(p, axis=-1) * rescale, axis=-1) + jnp.exp(sink - m_fin[..., 0])
    p_rounded = p if kv.dtype == jnp.float32 else jax.lax.reduce_precision(p, exponent_bits=8, mantissa_bits=7)
    w = (p_rounded * rescale[..., None]).reshape(B, S, H, -1)
    o = jnp.einsum("bsht,bstk->bshk", w, rows.astype(jnp.float32), precision="highest")
    out = o / denom[..., None]
    if q.dtype == jnp.bfloat16:   # a rounding XLA keeps (see v4jax.quant.round_to)
        out = jax.lax.reduce_precision(out, exponent_bits=8, mantissa_bits=7)
    return out.astype(q.dtype)
