"""mHC Sinkhorn projection: one public function, backends picked by platform.

"gpu": Pallas/Triton kernels (gpu.py) -- the whole iteration chain in one launch, forward and backward -- for fp32
inputs with 1 <= n <= gpu.MAX_N. "reference": the jnp definition (reference.py: softmax + a fori_loop of row /
column normalisations), used off NVIDIA GPUs and for inputs the kernel does not take.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._backend import platform_backend

from . import reference

BACKENDS = ("reference", "gpu")


def default_backend(platform: str | None = None) -> str:
    """The backend used on `platform` (default: JAX's default backend); see pallas_kernels._backend."""
    return platform_backend(BACKENDS, platform)


def uses_kernel(c: jax.Array, iters, eps) -> bool:
    """Whether the "gpu" backend runs the kernel for c (else the reference): fp32 [..., n, n] with at least one
    matrix, 1 <= n <= gpu.MAX_N, and iters / eps plain Python numbers (they are compiled into the kernel)."""
    from .gpu import MAX_N
    return (c.ndim >= 2 and c.shape[-1] == c.shape[-2] and 1 <= c.shape[-1] <= MAX_N and c.dtype == jnp.float32
            and c.size > 0 and isinstance(iters, (int, np.integer)) and isinstance(eps, (int, float, np.floating)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _kernel(x, n, iters, eps, interpret):
    from . import gpu
    return gpu.forward(x, n=n, iters=iters, eps=eps, interpret=interpret)


def _fwd(x, n, iters, eps, interpret):
    from . import gpu
    y, res = gpu.forward(x, n=n, iters=iters, eps=eps, save=True, interpret=interpret)
    return y, (x, res)


def _bwd(n, iters, eps, interpret, r, g):
    from . import gpu
    x, res = r
    return (gpu.backward(x, res, g, n=n, iters=iters, eps=eps, interpret=interpret),)


_kernel.defvjp(_fwd, _bwd)


def sinkhorn(c: jax.Array, iters: int, eps: float, *, backend: str | None = None) -> jax.Array:
    """c [..., n, n] (fp32 logits; n static) -> [..., n, n] fp32, nearly doubly stochastic: row-softmax + eps,
    then `iters` column and `iters - 1` row normalisations x / (sum + eps), columns first (reference.py).

    backend: None picks by platform ("gpu" on NVIDIA GPUs, "reference" elsewhere; V4JAX_KERNELS=reference forces
    it). "gpu" runs the kernel when `uses_kernel(c, iters, eps)`, else the reference; asked for on CPU, the kernel
    runs in interpret mode.

    Numerics: the kernel computes the reference's ops in XLA's form and order (see gpu.py). Measured against the
    jitted reference on CPU (interpret mode): max |diff| <= 2.4e-7 absolute (outputs <= 1; up to ~7e-6 relative
    on entries ~1e-3 and below, where the reference's own error against float64 is the same size); gradients
    within 7e-7 x max|grad| (tests/test_kernels_sinkhorn.py). Not yet measured on a GPU.

    Differentiable (jax.custom_vjp) on every backend: the kernel's backward is a second Pallas kernel (gpu.py),
    fed by residuals the training forward writes ((iters - 1) * n*n fp32 per matrix); no reference VJP involved.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"sinkhorn: unknown backend {backend!r}; available: {BACKENDS}")
    if c.ndim < 2 or c.shape[-1] != c.shape[-2]:
        raise ValueError(f"sinkhorn: c must be [..., n, n], got shape {c.shape}")
    if backend == "reference" or not uses_kernel(c, iters, eps):
        return reference.sinkhorn(c, iters, eps)
    n = c.shape[-1]
    y = _kernel(c.reshape(-1, n * n), n, int(iters), float(eps), jax.default_backend() == "cpu")
    return y.reshape(c.shape)
