"""Lightning-indexer scores for NVIDIA GPUs: Pallas with the Triton backend.

    I[b, t, c] = bf16( sum_h f32( bf16( w[b,t,h] * relu(bf16(q[b,t,h] . K[b,c])) ) ) )

One program = one tile of `tq` queries x `tc` keys of one sequence: the key tile is loaded once and reused by every
query of the tile; per query the nI heads give the matmul its M dimension ([nI, dI] x [dI, tc]), then the bf16
ReLU / weighting / head sum of the reference (reference.py) follow in registers. Heads below 16 are zero-padded
(zero q and zero weight add exactly 0). The head sum runs in fp32 in a different order than XLA's reduction, so
a score can differ from the reference by one bf16 rounding step on rare ties.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ._tiles import pad_to_tiles

MIN_HEADS = 16


def _kernel(q_ref, w_ref, k_ref, o_ref, *, tq: int):
    keys = k_ref[...]                                                    # [tc, dI]

    def body(t, c):
        q = q_ref[t]                                                     # [nI, dI]
        w = w_ref[t].astype(jnp.float32)                                 # [nI]
        s = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = jnp.maximum(s.astype(q.dtype).astype(jnp.float32), 0.0)     # bf16 scores, ReLU
        s = (s * w[:, None]).astype(q.dtype).astype(jnp.float32)         # bf16 weighting
        o_ref[t] = jnp.sum(s, axis=0).astype(o_ref.dtype)
        return c

    jax.lax.fori_loop(0, tq, body, 0)


@functools.partial(jax.jit, static_argnames=("block_q", "block_c", "num_warps", "num_stages", "interpret"))
def index_scores(q, w, keys, *, block_q: int = 16, block_c: int = 128, num_warps: int = 4, num_stages: int = 2,
                 interpret: bool = False):
    """q [B,S,nI,dI], w [B,S,nI], keys [B,C,dI] -> [B,S,C] (q.dtype); same function as reference.scores."""
    B, S, nI, dI = q.shape
    C = keys.shape[1]
    if C == 0 or S == 0:
        return jnp.zeros((B, S, C), q.dtype)
    nIp = nI if interpret else max(nI, MIN_HEADS)
    nIp = pl.next_power_of_2(nIp) if not interpret else nIp
    if nIp != nI:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, nIp - nI), (0, 0)))
        w = jnp.pad(w, ((0, 0), (0, 0), (0, nIp - nI)))
    tq = min(block_q, S)
    tc = min(block_c, max(16, pl.next_power_of_2(C)))
    q, w, keys, Sp, Cp = pad_to_tiles(q, w, keys, tq, tc)
    out = pl.pallas_call(
        functools.partial(_kernel, tq=tq),
        grid=(B, Sp // tq, Cp // tc),
        in_specs=[
            pl.BlockSpec((None, tq, nIp, dI), lambda b, i, j: (b, i, 0, 0)),
            pl.BlockSpec((None, tq, nIp), lambda b, i, j: (b, i, 0)),
            pl.BlockSpec((None, tc, dI), lambda b, i, j: (b, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, tq, tc), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((B, Sp, Cp), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="index_scores_gpu",
    )(q, w.astype(q.dtype), keys)
    return out[:, :S, :C]
