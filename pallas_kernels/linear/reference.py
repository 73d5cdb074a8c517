"""Linear layer, the definition: y = x @ W^T with W the exactly dequantised weight, fp32 accumulation.

    W = w                                     (bf16 / fp32 weight)
    W[o, k] = w8[o, k] * 2^(E[o//128, k//128] - 127)   (FP8 e4m3 + E8M0 128x128 block scales)
    W = the FP4 decode                        (packed int8 + 1x32 E8M0, as `v4jax.layers.weight`)

The matmul runs in `compute_dtype`: bf16 when x is bf16 and the weight is exact in bf16 (bf16, FP8, FP4), else
fp32 (`precision=HIGHEST`: true fp32, no TF32). Either way every product is exact in fp32, so the result is the
fp32 accumulation of x * W -- the same graph as `v4jax.layers.linear_fp8 / linear_f32` (dequantise + einsum).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._weights import dequantize

f32 = jnp.float32


def compute_dtype(x: jax.Array, w: jax.Array, scale: jax.Array | None):
    """bf16 if x is bf16 and the dequantised weight is exact in bf16, else fp32."""
    exact_bf16 = scale is not None or w.dtype in (jnp.bfloat16, jnp.float8_e4m3fn)
    return jnp.dtype(jnp.bfloat16) if x.dtype == jnp.bfloat16 and exact_bf16 else jnp.dtype(f32)


def linear(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x [..., K], w [O, K] (+ optional scale) -> [..., O] fp32 = x @ dequantize(w, scale)^T."""
    dt = compute_dtype(x, w, scale)
    return jnp.einsum("...k,ok->...o", x.astype(dt), dequantize(w, scale, dt), preferred_element_type=f32,
                      precision=jax.lax.Precision.HIGHEST)
