"""Lightning-indexer scoring and top-k, the definition (spec 2.7): the jnp functions of v4jax.indexer.

One definition: this module re-exports `v4jax.indexer.scores` and `v4jax.indexer.topk` (bf16 semantics: the score
einsum output rounded to bf16, ReLU, bf16 head weighting, head sum in fp32 rounded to bf16; top-k over the
visible entries, -1 padded).
"""
from __future__ import annotations

from v4jax.indexer import scores, topk

__all__ = ["scores", "topk"]
