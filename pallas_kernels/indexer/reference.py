"""Lightning-indexer scoring and top-k, the definition (spec 2.7): the jnp functions of v4jax.indexer.

One definition: this module re-exports `v4jax.indexer.scores` and `v4jax.indexer.topk` (bf16 semantics: the score
einsum output rounded to bf16, ReLU, bf16 head weighting, head sum in fp32 rounded to bf16; top-k over the
visible entries, -1 padded).
"""
from __future__ import annotations

import jax.numpy as jnp

from v4jax.indexer import fp4_rows_to_keys, scores, topk

__all__ = ["scores", "topk", "fp4_rows_to_keys", "cached_scores"]


def cached_scores(q, w, keys):
    """`scores` against cached keys: bf16 keys [B, C, dI], or the production cache's FP4 rows (uint8
    [B, C, dI/2 + dI/32], `v4jax.indexer.store_keys`), decoded exactly to q's dtype first."""
    if keys.dtype == jnp.uint8:
        keys = fp4_rows_to_keys(keys, q.dtype)
    return scores(q, w, keys)
