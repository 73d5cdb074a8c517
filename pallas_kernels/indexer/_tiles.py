"""Tile padding shared by the indexer scoring kernels (GPU and TPU)."""
from __future__ import annotations

import jax.numpy as jnp


def pad_to_tiles(q, w, keys, tq: int, tc: int):
    """Pad the query axis of q [B,S,nI,dI] / w [B,S,nI] to a multiple of tq and the key axis of keys [B,C,dI] to
    a multiple of tc (padded rows are sliced off the output)."""
    S, C = q.shape[1], keys.shape[1]
    Sp, Cp = -(-S // tq) * tq, -(-C // tc) * tc
    if Sp != S:
        q = jnp.pad(q, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        w = jnp.pad(w, ((0, 0), (0, Sp - S), (0, 0)))
    if Cp != C:
        keys = jnp.pad(keys, ((0, 0), (0, Cp - C), (0, 0)))
    return q, w, keys, Sp, Cp
