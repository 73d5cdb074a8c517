"""Lightning-indexer scoring and top-k: one dispatch per function, backends picked by platform.

index_scores: "gpu" (Pallas/Triton) on NVIDIA GPUs, "tpu" (Pallas Mosaic TPU) on TPUs, "reference" elsewhere;
differentiable through a jax.custom_vjp whose backward is the reference's VJP.
cached_index_scores: the decode's scoring against cached keys (bf16, or FP4 rows decoded inside the GPU kernel).
index_topk: "gpu" (Pallas/Triton threshold select + a sort of the k survivors, gpu.index_topk) on NVIDIA GPUs
for bf16 scores (the model's); the reference (jax.lax.top_k) for other score dtypes and on other platforms (no
Mosaic TPU top-k yet: the GPU kernel's cumsum-and-scatter compaction has no Mosaic TPU counterpart here).
"""
from __future__ import annotations

import functools

import jax

from .._backend import platform_backend

from . import reference

BACKENDS = ("reference", "gpu", "tpu")


def default_backend(platform: str | None = None) -> str:
    """The backend used on `platform` (default: JAX's default backend); see pallas_kernels._backend."""
    return platform_backend(BACKENDS, platform)


def _forward(q, w, keys, backend):
    on_cpu = jax.default_backend() == "cpu"
    if backend == "gpu":
        from . import gpu
        return gpu.index_scores(q, w, keys, interpret=on_cpu)
    from jax.experimental.pallas import tpu as pltpu
    from . import tpu
    return tpu.index_scores(q, w, keys, interpret=pltpu.InterpretParams() if on_cpu else False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _index_scores(q, w, keys, backend):
    return _forward(q, w, keys, backend)


def _fwd(q, w, keys, backend):
    return _forward(q, w, keys, backend), (q, w, keys)


def _bwd(backend, res, g):
    _, vjp = jax.vjp(reference.scores, *res)
    return vjp(g)


_index_scores.defvjp(_fwd, _bwd)


def index_scores(q, w, keys, *, backend: str | None = None):
    """q [B,S,nI,dI], w [B,S,nI], keys [B,C,dI] -> index scores [B,S,C] (q.dtype), bf16 semantics (spec 2.7).

    backend: None picks by platform; "reference" | "gpu" | "tpu" overrides (a Pallas backend on CPU runs in
    interpret mode). Gradients (w.r.t. q, w, keys) are the reference's VJP.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"index_scores: unknown backend {backend!r}; available: {BACKENDS}")
    if backend == "reference":
        return reference.scores(q, w, keys)
    return _index_scores(q, w, keys, backend)


def cached_index_scores(q, w, keys, *, backend: str | None = None):
    """Decode scoring against the cache: q [B,S,nI,dI], w [B,S,nI], keys [B,C,dI] bf16 or the production cache's
    FP4 rows (uint8 [B, C, dI/2 + dI/32]) -> [B,S,C] (q.dtype), the same function as reference.cached_scores.
    "gpu": the scoring kernel, FP4 rows decoded in registers; "tpu": its kernel for bf16 keys, the reference for
    FP4 rows; no gradient (inference only: the cache is not differentiated)."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"cached_index_scores: unknown backend {backend!r}; available: {BACKENDS}")
    if backend == "reference" or (backend == "tpu" and keys.dtype == jax.numpy.uint8):
        return reference.cached_scores(q, w, keys)
    return _forward(q, w, keys, backend)


def index_topk(index_scores, n_visible, k: int, first=0, *, backend: str | None = None):
    """Top-k visible entries (entry j visible iff first <= j < n_visible), sorted by score (equal scores by
    ascending index), -1 padded -> int32 [..., k]. `first` > 0 hides earlier documents of a packed row (see
    v4jax.indexer.topk). Integer output: nothing to differentiate.

    backend: None picks by platform; "gpu" runs the Pallas kernel for bf16 scores (interpret mode on CPU) -- the
    same indices as the reference, ties included; "tpu" and "reference", and scores of other dtypes, run the
    reference (jax.lax.top_k).
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"index_topk: unknown backend {backend!r}; available: {BACKENDS}")
    if backend == "gpu" and index_scores.dtype == jax.numpy.bfloat16 and 0 < k <= index_scores.shape[-1]:
        from . import gpu
        return gpu.index_topk(index_scores, n_visible, k, first, interpret=jax.default_backend() == "cpu")
    if isinstance(first, int) and first == 0:
        return reference.topk(index_scores, n_visible, k)
    return reference.topk(index_scores, n_visible, k, first)
