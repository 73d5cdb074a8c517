"""The logical value of a stored weight, shared by the kernels' reference paths."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dequantize(w: jax.Array, scale: jax.Array | None, dtype=jnp.bfloat16) -> jax.Array:
    """The logical [..., out, in] weight of (w, scale), exact (as `v4jax.layers.weight`), cast to dtype:
    bf16/fp32 as is; FP8 e4m3 + E8M0 per 128x128 block; FP4 packed int8 [..., out, in/2] (or uint8 in
    `v4jax.quant.fp4_to_halves`' layout) + E8M0 per 1x32."""
    if scale is None:
        return w.astype(dtype)
    from v4jax import quant                      # lazy: v4jax imports pallas_kernels (no import cycle)
    if quant.is_fp4(w):
        return quant.dequant_fp4_weight(w, scale, dtype)
    return quant.dequant_fp8_weight(w, scale, dtype)
