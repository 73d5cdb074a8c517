"""Grouped matmul, the definition: rows of x sorted by group, each group multiplied by its own weight.

    out[r] = x[r] @ w[g(r)]^T  for start_g <= r < start_g + group_sizes[g]   (start_g = sum of the sizes before g)
    out[r] = 0                 for rows past sum(group_sizes)

w is stored [E, out, in] (the checkpoint layout). Accumulation in fp32 (`precision=HIGHEST`: true fp32 for fp32
inputs, no TF32), result fp32. This is `v4jax.moe`'s former `_grouped`, written with `jax.lax.ragged_dot`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [N, in], w [E, out, in], group_sizes [E] int32 -> [N, out] fp32 (rows past the groups: 0)."""
    return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), group_sizes.astype(jnp.int32),
                              precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
