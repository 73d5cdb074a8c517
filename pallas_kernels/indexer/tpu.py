"""Lightning-indexer scores for TPUs: Pallas Mosaic TPU.

Same tiling as gpu.py: one grid step = `tq` queries x `tc` keys of one sequence; the key tile sits in VMEM and
serves every query of the tile; per query, the nI heads form the M dimension of a [nI, dI] x [dI, tc] matmul,
followed by the reference's bf16 ReLU / weighting / fp32 head sum (reference.py). The head weights come in as
[.., nI, 1] columns so they broadcast over the key lanes. The step's rows are written as fp32 and rounded to the
activation dtype outside (identical values: the kernel rounds nothing else there).
On CPU run it with interpret=pltpu.InterpretParams().
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._tiles import pad_to_tiles


def _kernel(q_ref, w_ref, k_ref, o_ref, *, tq: int, dt):
    keys = k_ref[...]                                                    # [tc, dI]
    for t in range(tq):
        q = q_ref[t]                                                     # [nI, dI]
        w = w_ref[t].astype(jnp.float32)                                 # [nI, 1]
        s = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = jnp.maximum(s.astype(dt).astype(jnp.float32), 0.0)
        s = (s * w).astype(dt).astype(jnp.float32)
        o_ref[t:t + 1, :] = jnp.sum(s, axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=("block_q", "block_c", "interpret"))
def index_scores(q, w, keys, *, block_q: int = 8, block_c: int = 256, interpret=False):
    """q [B,S,nI,dI], w [B,S,nI], keys [B,C,dI] -> [B,S,C] (q.dtype); same function as reference.scores."""
    B, S, nI, dI = q.shape
    C = keys.shape[1]
    if C == 0 or S == 0:
        return jnp.zeros((B, S, C), q.dtype)
    tq = block_q
    tc = min(block_c, -(-C // 128) * 128)
    q, w, keys, Sp, Cp = pad_to_tiles(q, w, keys, tq, tc)
    out = pl.pallas_call(
        functools.partial(_kernel, tq=tq, dt=q.dtype),
        grid=(B, Sp // tq, Cp // tc),
        in_specs=[
            pl.BlockSpec((None, tq, nI, dI), lambda b, i, j: (b, i, 0, 0)),
            pl.BlockSpec((None, tq, nI, 1), lambda b, i, j: (b, i, 0, 0)),
            pl.BlockSpec((None, tc, dI), lambda b, i, j: (b, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, tq, tc), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((B, Sp, Cp), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        name="index_scores_tpu",
    )(q, w.astype(q.dtype)[..., None], keys)
    return out[:, :S, :C].astype(q.dtype)
