"""mHC (manifold-constrained hyper-connections): hc_pre, hc_post, hc_head and the Sinkhorn projection.

The residual stream is X [B, S, n_hc, D] in the activation dtype. Each sub-layer reads a weighted sum of the
n_hc streams (`pre`) and writes its output back into every stream (`post`) while the streams are mixed by a
doubly-stochastic matrix (`comb`, row j = source stream, column k = destination). All maths is fp32 (spec 2.2).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.sinkhorn import sinkhorn as _sinkhorn

from . import layers
from .quant import round_to

f32 = jnp.float32


def uses_split_mixes(X: jax.Array) -> bool:
    """Whether `_mixes` runs its product as `layers.split_dot_nt` (bf16 tensor-core GEMMs on exact parts): where
    `layers.uses_split` would split an fp32 linear -- the split backend is "gpu" (NVIDIA GPUs, unless
    V4JAX_KERNELS=reference) and more than `pallas_kernels.linear.MAX_ROWS` tokens (decode keeps the plain
    einsum): `layers.split_rows`."""
    return layers.split_rows(math.prod(X.shape[:-2]))


def _mixes(X: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """RMS-scaled projection of the flattened streams: [B, S, n_hc*D] -> [B, S, fn.shape[0]] (fp32).

    The product x @ fn^T is fp32 x fp32 (spec 2.2). On GPU (`uses_split_mixes`) it runs `layers.split_dot_nt`:
    the same value and gradients up to fp32 summation order on tensor cores (a bf16 X is one exact part, fp32 fn
    three), instead of fp32 SIMT GEMMs for the product and both its gradients."""
    x = X.reshape(X.shape[:-2] + (-1,)).astype(f32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    if uses_split_mixes(X):
        return layers.split_dot_nt(x, fn.astype(f32), x_bf16=X.dtype == jnp.bfloat16) * r
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


def _exact_sum(terms) -> jax.Array:
    """Left-to-right fp32 sum of (a, b) products, each a bf16 value times a bf16 value (exact in fp32)."""
    acc = None
    for a, b in terms:
        t = a.astype(f32) * b.astype(f32)
        acc = t if acc is None else acc + t
    return acc


def _post_value(X, f_out, post, comb):
    """sum_p post_p[k] f + sum_j sum_p comb_p[j, k] X_j over the exact bf16 parts (layers.split_parts) of post
    and comb: 3 + 3n products, each exact in fp32, summed in this fixed order."""
    n = X.shape[-2]
    pp, cp = layers.split_parts(post), layers.split_parts(comb)
    terms = [(q[..., None], f_out[..., None, :]) for q in pp]
    terms += [(c[..., j, :, None], X[..., j:j + 1, :]) for j in range(n) for c in cp]
    return round_to(_exact_sum(terms), X.dtype)


@jax.custom_vjp
def _hc_post_bf16(X, f_out, post, comb):
    return _post_value(X, f_out, post, comb)


def _hc_post_bf16_fwd(X, f_out, post, comb):
    return _post_value(X, f_out, post, comb), (X, f_out, post, comb)


def _hc_post_bf16_bwd(res, g):
    """g [.., n, D] bf16 (the cotangent of the bf16 output, hence of the fp32 sum before its rounding):
      dX_j = sum_k comb[j, k] g_k, df = sum_k post_k g_k  (exact products of the bf16 parts, fixed order),
      dpost_k = sum_d g_k f, dcomb[j, k] = sum_d g_k X_j  (exact products, reduced over D in fp32)."""
    X, f_out, post, comb = res
    n = X.shape[-2]
    pp, cp = layers.split_parts(post), layers.split_parts(comb)
    dX = jnp.stack([_exact_sum([(c[..., j, k, None], g[..., k, :]) for k in range(n) for c in cp])
                    for j in range(n)], axis=-2)
    df = _exact_sum([(q[..., k, None], g[..., k, :]) for k in range(n) for q in pp])
    gf = g.astype(f32)
    dpost = jnp.sum(gf * f_out.astype(f32)[..., None, :], axis=-1)
    dcomb = jnp.sum(X.astype(f32)[..., :, None, :] * gf[..., None, :, :], axis=-1)            # [.., j, k]
    return round_to(dX, X.dtype), round_to(df, f_out.dtype), dpost, dcomb


_hc_post_bf16.defvjp(_hc_post_bf16_fwd, _hc_post_bf16_bwd)


def hc_post(X: jax.Array, f_out: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """X'_k = post_k * f_out + sum_j comb[j, k] * X_j (fp32), back to X.dtype.

    bf16 X and f_out (the model's activations): elementwise, with a custom VJP (`_hc_post_bf16`): post and comb
    are split into their exact bf16 parts, so every product (post_p f, comb_p X_j, and in the backward comb_p g,
    post_p g, g f, g X_j) is exact in fp32 and the sums run in a fixed order -- the fp32 result up to summation
    order, and the same bits whether or not XLA contracts a multiply-add into an FMA (which depends on the
    fusion it picks, so an elementwise fp32 mix would not be bit-reproducible from one program to the next).
    One fusion forward, elementwise + reductions over D backward, instead of a batched [n, n] x [n, D] fp32
    GEMM per token (precision HIGHEST) and its two gradients, which XLA runs as SIMT GEMMs on a GPU.
    Other dtypes (compute_dtype="float32"): the fp32 einsum."""
    if X.dtype == jnp.bfloat16 and f_out.dtype == jnp.bfloat16 and post.dtype == f32 and comb.dtype == f32:
        return _hc_post_bf16(X, f_out, post, comb)
    mixed = jnp.einsum("...jk,...jd->...kd", comb, X.astype(f32), precision="highest")
    return round_to(post[..., None] * f_out.astype(f32)[..., None, :] + mixed, X.dtype)


def hc_head(X: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, *, norm_eps: float,
            hc_eps: float) -> jax.Array:
    """Collapse the streams for the output head: y = sum_j (sigmoid(m_j*scale + base_j) + eps) X_j."""
    m = _mixes(X, fn, norm_eps)
    pre = jax.nn.sigmoid(m * scale[0] + base) + hc_eps
    return round_to(jnp.sum(pre[..., None] * X.astype(f32), axis=-2), X.dtype)
