"""Linear layer, the definition: y = x @ W^T with W the exactly dequantised weight, fp32 accumulation.

    W = w                                     (bf16 / fp32 weight)
    W[o, k] = w8[o, k] * 2^(E[o//128, k//128] - 127)   (FP8 e4m3 + E8M0 128x128 block scales)
    W = the FP4 decode                        (packed int8 + 1x32 E8M0, as `v4jax.layers.weight`)

The matmul runs in `compute_dtype`: bf16 when x is bf16 and the weight is exact in bf16 (bf16, FP8, FP4), else
fp32 (`precision=HIGHEST`: true fp32, no TF32). Either way every product is exact in fp32, so the result is the
fp32 accumulation of x * W -- the same graph as `v4jax.layers.linear_fp8 / linear_f32` (dequantise + einsum).
x_fp8=True first replaces x by `v4jax.quant.fp8_sim(x, 128)` (the activation FP8 simulation of `linear_fp8` under
quant_sim; identity gradient), the definition the kernel's in-register quantisation must match bit for bit.
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


def linear(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, *, x_fp8: bool = False) -> jax.Array:
    """x [..., K], w [O, K] (+ optional scale) -> [..., O] fp32 = x @ dequantize(w, scale)^T; x_fp8: of
    fp8_sim(x, 128) instead of x."""
    if x_fp8:
        from v4jax import quant                  # lazy: v4jax imports pallas_kernels (no import cycle)
        x = quant.fp8_sim(x, 128)
    dt = compute_dtype(x, w, scale)
    return jnp.einsum("...k,ok->...o", x.astype(dt), dequantize(w, scale, dt), preferred_element_type=f32,
                      precision=jax.lax.Precision.HIGHEST)


def bf16_parts(a: jax.Array) -> list[jax.Array]:
    """Exact bf16 parts of a: [a] for bf16; for fp32 [hi, mid, lo] with hi = bf16(a), mid = bf16(a - hi),
    lo = bf16(a - hi - mid) (round to nearest even), hi + mid + lo == a exactly. Why exact: a float32 has 24
    significant bits, a bf16 8; each subtraction is exact in fp32 (Sterbenz: the rounding is close to the value) and
    each remainder has at most 16, then 8 significant bits, so lo holds the rest without rounding. |mid| <= 2^-8 |a|,
    |lo| <= 2^-16 |a|. Exceptions: |a| < 2^-103 (~1e-31), where a remainder can fall below 2^-126 and XLA (CPU
    and GPU) flushes such fp32/bf16 subnormals to zero -- the parts then miss < 2^-126 in absolute value --;
    |a| above bf16's max ~3.39e38 (hi overflows); non-finite a (NaN parts). The roundings go through
    reduce_precision: a plain f32 -> bf16 -> f32 cast pair may be dropped by XLA as excess precision, which would
    make mid and lo zero. Used by the skinny kernel (gpu.split3) and by v4jax.layers.split_matmul."""
    if a.dtype == jnp.bfloat16:
        return [a]
    if a.dtype != f32:
        raise TypeError(f"bf16_parts: bf16 or fp32 input expected, got {a.dtype}")
    rnd = lambda v: jax.lax.reduce_precision(v, exponent_bits=8, mantissa_bits=7)      # RNE to bf16, kept by XLA
    hi = rnd(a)
    mid = rnd(a - hi)
    lo = rnd(a - hi - mid)
    return [v.astype(jnp.bfloat16) for v in (hi, mid, lo)]
