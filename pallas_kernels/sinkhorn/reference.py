"""The mHC Sinkhorn projection in plain jnp: the definition every backend reproduces (moved from v4jax/hyper.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sinkhorn(c: jax.Array, iters: int, eps: float) -> jax.Array:
    """c [..., n, n] -> a nearly doubly-stochastic [..., n, n]: row-softmax + eps, then `iters` column and
    `iters - 1` row normalisations (columns first), each x / (sum + eps).

    Op order (the kernel in gpu.py follows it): softmax = exp(x - rowmax) / rowsum (jax.nn.softmax); + eps;
    c / (colsum + eps); then iters - 1 times: c / (rowsum + eps), c / (colsum + eps). The columns sum to 1 up
    to ~eps and rounding, the rows to within the last row step's change (~1e-3 after 20 iterations, see
    tests/test_components.py).

    The repeated (row, column) pair runs as a `fori_loop`: unrolled, the 20-iteration chain and its gradient
    made XLA's GPU fusion pass take minutes per block (measured: 146 s to compile one mHC gradient on H100).
    On GPU the loop costs ~4 kernels + a copy per iteration -- hence the Pallas kernel (gpu.py)."""
    c = jax.nn.softmax(c, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    def row_col(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    return jax.lax.fori_loop(0, iters - 1, row_col, c)
