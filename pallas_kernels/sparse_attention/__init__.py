"""Sparse attention over per-query index lists: one public function, backends picked by platform."""
from __future__ import annotations

import functools

import jax

from .._backend import platform_backend

from . import banded_backward as _banded
from .backward import pool_backward, use_pool_backward
from .banded_backward import Layout
from .reference import sparse_attention as _reference

BACKENDS = ("reference", "gpu", "tpu")


def default_backend(platform: str | None = None) -> str:
    """The backend used on `platform` (default: JAX's default backend); see pallas_kernels._backend."""
    return platform_backend(BACKENDS, platform)


def _forward(q, kv, idx, sink, scale, backend):
    if backend == "reference":
        return _reference(q, kv, idx, sink, scale)
    on_cpu = jax.default_backend() == "cpu"
    if backend == "gpu":
        from . import gpu
        return gpu.sparse_attention(q, kv, idx, sink, scale, interpret=on_cpu)
    from jax.experimental.pallas import tpu as pltpu
    from . import tpu
    return tpu.sparse_attention(q, kv, idx, sink, scale, interpret=pltpu.InterpretParams() if on_cpu else False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sparse_attention(q, kv, idx, sink, scale, backend, layout):
    return _forward(q, kv, idx, sink, scale, backend)


def _kernel_backward(kv, idx, backend) -> bool:
    """The Pallas backward (gpu_backward.py) serves the "gpu" backend when the pool is long for the lists."""
    return backend == "gpu" and not use_pool_backward(kv.shape[1], idx.shape[-1])


def _banded_backward(kv, idx, layout) -> bool:
    """The banded backward (banded_backward.py) serves every non-reference backend when the caller passed a layout
    and the dense form suits the shapes."""
    return layout is not None and _banded.suits(layout, kv.shape[1], idx.shape[-1])


def _fwd(q, kv, idx, sink, scale, backend, layout):
    out = _forward(q, kv, idx, sink, scale, backend)
    # the banded and kernel backwards need the output (D = sum dO * O); the others recompute what they need
    keep = _banded_backward(kv, idx, layout) or _kernel_backward(kv, idx, backend)
    return out, (q, kv, idx, sink, out if keep else None)


def _bwd(scale, backend, layout, res, g):
    q, kv, idx, sink, out = res
    if _banded_backward(kv, idx, layout):
        dq, dkv, dsink = _banded.banded_backward(q, kv, idx, sink, out, g, scale, layout)
        return dq, dkv, None, dsink
    if use_pool_backward(kv.shape[1], idx.shape[-1]):
        dq, dkv, dsink = pool_backward(q, kv, idx, sink, scale, g)
        return dq, dkv, None, dsink
    if _kernel_backward(kv, idx, backend):
        from .gpu_backward import sparse_attention_bwd
        dq, dkv, dsink = sparse_attention_bwd(q, kv, idx, sink, out, g, scale,
                                              interpret=jax.default_backend() == "cpu")
        return dq, dkv, None, dsink
    _, vjp = jax.vjp(lambda q_, kv_, s_: _reference(q_, kv_, idx, s_, scale), q, kv, sink)
    dq, dkv, dsink = vjp(g)
    return dq, dkv, None, dsink


_sparse_attention.defvjp(_fwd, _bwd)


def sparse_attention(q, kv, idx, sink, scale, *, backend: str | None = None, layout: Layout | None = None):
    """q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 (-1 = masked), sink [H] f32 -> [B,S,H,K].

    backend: None picks by platform ("gpu": Pallas/Triton kernel on NVIDIA GPUs, "tpu": Pallas Mosaic TPU kernel
    on TPUs, "reference" elsewhere); pass one to override. A Pallas backend asked for on CPU runs in interpret mode.
    All backends compute the reference's function (reference.py) with its numerics. On GPU the launch is picked
    from the shapes (gpu.plan): one pass when rows x head groups fill the SMs (prefill, large decode batches),
    else the split-list path (each list cut into chunks run by separate programs, an exact block-max pre-pass,
    partials combined with the sink; gpu.py).

    Differentiable w.r.t. q, kv and sink through a jax.custom_vjp: the forward runs the chosen backend; the
    backward, for every backend but "reference", is
      * banded_backward.banded_backward (dense matmuls over the window band and the compressed entries, no
        atomics, deterministic) when the caller passes `layout`, its promise of how idx was built (`Layout`:
        the model's prefill lists), and the dense compressed part is not much wider than the lists
        (`banded_backward.suits`; e.g. CSA at 64K context falls through to the forms below);
      * backward.pool_backward (dense matmuls over the pool with list multiplicities) when the pool is at most
        8x the list (`backward.use_pool_backward`);
      * on the "gpu" backend with a longer pool: the Pallas/Triton kernel of gpu_backward.py (per query row:
        recomputed softmax, dq in registers, dkv rows added with fp32 atomics -- dkv's summation order, hence
        its last bits, is nondeterministic; the forward's output is saved as a residual for D = sum dO * O);
      * otherwise the VJP of the jnp reference (recomputed from the saved inputs; it gathers [B, S, T, K] rows).
    All treat the VJP of the reference's bf16 rounding of block probabilities as the identity, except the
    reference VJP itself (JAX's VJP of reduce_precision rounds the cotangent to bf16).
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"sparse_attention: unknown backend {backend!r}; available: {BACKENDS}")
    if backend == "reference":
        return _reference(q, kv, idx, sink, scale)
    return _sparse_attention(q, kv, idx, sink, float(scale), backend, layout)
