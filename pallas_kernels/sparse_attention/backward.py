"""The backward of sparse attention, computed over the whole KV pool with list multiplicities as weights.

The jnp reference's own VJP gathers one KV row per (query, list entry) and scatters the row gradients back:
at training shapes that materialises [B, S, T, K] fp32 tensors (GBs per layer) and an atomic scatter of the same
size. When the pool is small compared with the lists (training at a few thousand tokens: pool = S window rows +
S/m compressed entries), the same gradient is a few dense matmuls over the pool:

    c[b,s,n] = how many times n is in idx[b,s] (0 for masked)        p = c * exp(z - m) / (sum c exp(z - m) + exp(sink - m))
    z = scale * q . kv_n                                               o = sum_n p_n kv_n   (K = V shared)
    D = sum_k dO * o,  dz = p * (dO . kv_n - D)
    dq = scale * dz . kv,   dkv = scale * dz^T . q + p^T . dO,   dsink = -sum D * exp(sink - m) / denom

Queries are processed in chunks (lax.map) so memory stays bounded by `chunk x H x N`. The gradient is the exact
gradient of the attention function; it differs from the reference VJP only by floating-point summation order
and by the reference's bf16 rounding of block probabilities (whose VJP is the identity).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32

# Use the pool form while the pool is at most this many times the (padded) list length; beyond, the gather form
# moves fewer bytes than the pool form computes.
POOL_RATIO = 8
CHUNK_ELEMS = 1 << 26          # [chunk, H, N] fp32 scores per query chunk: 256 MB


def use_pool_backward(n_pool: int, list_len: int) -> bool:
    return n_pool <= POOL_RATIO * max(list_len, 64)


def counts(entries, width: int):
    """entries [B, Q, J] int32 column numbers -> [B, Q, width] fp32 multiplicities (how many times each column is
    listed per row); entries outside [0, width) (e.g. -1, masked) are ignored. A scatter of ones: exact in any
    order. Used by pool_backward and banded_backward."""
    B, Q, _ = entries.shape
    ok = (entries >= 0) & (entries < width)
    col = jnp.where(ok, entries, width)
    b = jnp.arange(B)[:, None, None]
    i = jnp.arange(Q)[None, :, None]
    return jnp.zeros((B, Q, width), f32).at[b, i, col].add(ok.astype(f32), mode="drop")


def _chunk_grads(q, kv, idx, g, sink, scale):
    """One batch row's query chunk: q [c,H,K], kv [N,K], idx [c,T], g [c,H,K] -> (dq [c,H,K], dkv [N,K] f32,
    dsink [H] f32)."""
    N = kv.shape[0]
    cnt = counts(idx[None], N)[0]                                                     # [c, N]
    kvf = kv.astype(f32)
    z = jnp.einsum("chk,nk->chn", q.astype(f32), kvf, precision="highest") * scale
    z = jnp.where(cnt[:, None, :] > 0, z, -jnp.inf)
    m = jnp.max(z, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = cnt[:, None, :] * jnp.exp(z - m)                                               # [c, H, N]
    es = jnp.exp(sink[None, :, None] - m)                                             # [c, H, 1]
    denom = jnp.sum(e, axis=-1, keepdims=True) + es
    p = e / denom
    gf = g.astype(f32)
    o = jnp.einsum("chn,nk->chk", p, kvf, precision="highest")
    D = jnp.sum(gf * o, axis=-1, keepdims=True)                                       # [c, H, 1]
    dp = jnp.einsum("chk,nk->chn", gf, kvf, precision="highest")
    dz = p * (dp - D)
    dq = scale * jnp.einsum("chn,nk->chk", dz, kvf, precision="highest")
    dkv = (scale * jnp.einsum("chn,chk->nk", dz, q.astype(f32), precision="highest")
           + jnp.einsum("chn,chk->nk", p, gf, precision="highest"))
    dsink = -jnp.sum(D[..., 0] * (es / denom)[..., 0], axis=0)
    return dq, dkv, dsink


def pool_backward(q, kv, idx, sink, scale, g):
    """q [B,S,H,K], kv [B,N,K], idx [B,S,T], sink [H], g [B,S,H,K] -> (dq, dkv, dsink) in the inputs' dtypes."""
    B, S, H, K = q.shape
    N = kv.shape[1]
    chunk = max(1, min(S, CHUNK_ELEMS // max(1, H * N)))
    n_chunks = -(-S // chunk)
    pad = n_chunks * chunk - S
    if pad:
        q_, g_ = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, g))
        idx_ = jnp.pad(idx, ((0, 0), (0, pad), (0, 0)), constant_values=-1)
    else:
        q_, g_, idx_ = q, g, idx

    def per_batch(args):
        qb, kvb, ib, gb = args
        qc = qb.reshape(n_chunks, chunk, H, K)
        ic = ib.reshape(n_chunks, chunk, -1)
        gc = gb.reshape(n_chunks, chunk, H, K)

        def body(carry, xs):
            dkv_acc, ds_acc = carry
            dq, dkv, ds = _chunk_grads(xs[0], kvb, xs[1], xs[2], sink.astype(f32), scale)
            return (dkv_acc + dkv, ds_acc + ds), dq
        (dkv, ds), dq = jax.lax.scan(body, (jnp.zeros((N, K), f32), jnp.zeros((H,), f32)), (qc, ic, gc))
        return dq.reshape(n_chunks * chunk, H, K)[:S], dkv, ds

    dq, dkv, dsink = jax.lax.map(per_batch, (q_, kv, idx_, g_))
    return dq.astype(q.dtype), dkv.astype(kv.dtype), jnp.sum(dsink, axis=0).astype(sink.dtype)
