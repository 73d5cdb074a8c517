"""Sparse attention over per-query index lists: one public function, backends picked by platform."""
from __future__ import annotations

import jax

from .reference import sparse_attention as _reference

BACKENDS = ("reference",)


def sparse_attention(q, kv, idx, sink, scale, *, backend: str | None = None):
    """q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 (-1 = masked), sink [H] f32 -> [B,S,H,K].

    backend: None picks the best for the platform; "reference" is the plain-jnp definition.
    """
    backend = backend or "reference"
    if backend not in BACKENDS:
        raise ValueError(f"sparse_attention: unknown backend {backend!r}; available: {BACKENDS}")
    return _reference(q, kv, idx, sink, scale)
