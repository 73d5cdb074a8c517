"""mHC (manifold-constrained hyper-connections): hc_pre, hc_post, hc_head and the Sinkhorn projection.

The residual stream is X [B, S, n_hc, D] in the activation dtype. Each sub-layer reads a weighted sum of the
n_hc streams (`pre`) and writes its output back into every stream (`post`) while the streams are mixed by a
doubly-stochastic matrix (`comb`, row j = source stream, column k = destination). All maths is fp32 (spec 2.2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sinkhorn import sinkhorn as _sinkhorn

from .quant import round_to

f32 = jnp.float32


def _mixes(X: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """RMS-scaled projection of the flattened streams: [B, S, n_hc*D] -> [B, S, fn.shape[0]] (fp32)."""
    x = X.reshape(X.shape[:-2] + (-1,)).astype(f32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return jnp.einsum("...i,mi->...m", x, fn.astype(f32), precision="highest") * r


def sinkhorn(c: jax.Array, iters: int, eps: float) -> jax.Array:
    """Row-softmax + eps, then `iters` column and `iters - 1` row normalisations (columns first).

    Dispatches to `pallas_kernels.sinkhorn` (the definition is its reference.py): on NVIDIA GPUs one Pallas
    kernel launch for the whole chain (and one for its gradient) instead of the reference's fori_loop, which XLA
    runs as ~4 kernels + a copy per iteration; elsewhere the reference."""
    return _sinkhorn(c, iters, eps)


def hc_pre(X: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, *, norm_eps: float, hc_eps: float,
           iters: int):
    """-> (y [B,S,D] in X.dtype, post [B,S,n], comb [B,S,n,n]) (post/comb fp32)."""
    n = X.shape[-2]
    m = _mixes(X, fn, norm_eps)
    pre = jax.nn.sigmoid(m[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * jax.nn.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
    raw = (m[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(m.shape[:-1] + (n, n))
    comb = sinkhorn(raw, iters, hc_eps)
    y = jnp.sum(pre[..., None] * X.astype(f32), axis=-2)
    return round_to(y, X.dtype), post, comb


def hc_post(X: jax.Array, f_out: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """X'_k = post_k * f_out + sum_j comb[j, k] * X_j (fp32), back to X.dtype."""
    mixed = jnp.einsum("...jk,...jd->...kd", comb, X.astype(f32), precision="highest")
    return round_to(post[..., None] * f_out.astype(f32)[..., None, :] + mixed, X.dtype)


def hc_head(X: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, *, norm_eps: float,
            hc_eps: float) -> jax.Array:
    """Collapse the streams for the output head: y = sum_j (sigmoid(m_j*scale + base_j) + eps) X_j."""
    m = _mixes(X, fn, norm_eps)
    pre = jax.nn.sigmoid(m * scale[0] + base) + hc_eps
    return round_to(jnp.sum(pre[..., None] * X.astype(f32), axis=-2), X.dtype)
