"""Token-chunked evaluation of per-token work (prefill memory).

A prefill of 8 x 8K or 64K tokens runs every per-token computation of a block (mHC mixing, projections, the
indexer's scores, the MoE dispatch) on all tokens at once, and XLA then holds several fp32 [tokens, width]
transients per layer: at 64K tokens the q projection's fp32 output alone is 8 GiB (measured: 137 GiB of
temporaries for the full Flash model, docs/benchmarks.md). `token_chunks` runs such a computation on consecutive
chunks of the token axis in a `fori_loop`, writing each chunk's results into preallocated outputs, so only one
chunk's transients are alive at a time. Each token's result is the same computation as without chunking.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .sharding import constrain

# tokens (batch x sequence) per chunk of a chunked prefill: the size at which a full Flash layer's transients fit
# next to the weights on an H200 (1 x 8K prefills ran unchunked, 8 x 8K did not)
PREFILL_TOKENS = 8192


def rows_per_chunk(batch: int, seq: int, tokens: int = PREFILL_TOKENS) -> int:
    """Sequence positions per chunk for `tokens` tokens per chunk at this batch size (0: no chunking needed)."""
    if not tokens or batch * seq <= tokens:
        return 0
    return max(1, tokens // batch)


def token_chunks(fn: Callable, chunk: int, *arrays: jax.Array):
    """fn(start, *chunks) on consecutive chunks of `chunk` positions along axis 1 of every array, one after the
    other; returns fn's outputs (a pytree of arrays with the token axis at 1) for all positions.

    `start` is the first position of the chunk (a traced int32 inside the loop, a Python int for the tail chunk
    when the length is not a multiple of `chunk`). chunk <= 0 or >= the length: one call, fn(0, *arrays)."""
    S = arrays[0].shape[1]
    if chunk <= 0 or chunk >= S:
        return fn(0, *arrays)
    n, tail = divmod(S, chunk)
    # Inputs and outputs whole along the chunked axis 1 on every device (batch on its rule, the rest replicated).
    # Otherwise sharding propagation splits the buffers along axis 1 (the expert-parallel MoE returns its tokens
    # split over `expert`), and every chunk's dynamic slice / update all-gathers the WHOLE buffer: on 2 H200s
    # 672 all-gathers of up to [8, 8192, 4, 4096] fp32 per 6-layer 8 x 8K prefill, 44% of its time (session 8).
    whole = lambda t: jax.tree.map(lambda a: constrain(a, ("batch",) + (None,) * (a.ndim - 1)), t)
    arrays = whole(arrays)
    take = lambda a, s0, c: jax.lax.dynamic_slice_in_dim(a, s0, c, axis=1)
    # the output buffers start as the first chunk's result padded with zeros: they then depend on this call's
    # inputs, so XLA cannot materialise every layer's zero buffers up front
    first = whole(fn(0, *[a[:, :chunk] for a in arrays]))
    bufs = jax.tree.map(lambda o: jnp.concatenate([o, jnp.zeros((o.shape[0], S - chunk) + o.shape[2:], o.dtype)],
                                                  axis=1), first)

    def body(i, bufs):
        s0 = i * chunk
        out = whole(fn(s0, *[take(a, s0, chunk) for a in arrays]))
        return jax.tree.map(lambda b, o: jax.lax.dynamic_update_slice_in_dim(b, o.astype(b.dtype), s0, axis=1),
                            bufs, out)

    bufs = jax.lax.fori_loop(1, n, body, whole(bufs))
    if tail:
        s0 = n * chunk
        out = whole(fn(s0, *[a[:, s0:] for a in arrays]))
        bufs = jax.tree.map(lambda b, o: b.at[:, s0:].set(o.astype(b.dtype)), bufs, out)
    return bufs
