"""Sparse attention for NVIDIA GPUs: Pallas with the Triton backend (`jax.experimental.pallas.triton`).

Why Triton and not Mosaic GPU: the kernel's core is a *gather* of KV rows by a per-query index list. Triton's
pointer loads gather rows directly (one masked load of [block, K] at arbitrary row offsets); Mosaic GPU on Hopper
moves tiles with TMA, which cannot gather rows (TMA gather is Blackwell-only), so a Mosaic GPU version would need a
hand-written per-warp cp.async gather. That is future work; this file is the only place the Triton backend is used.

One program = one query row (b, s) x one group of `hb` heads. All heads of the group share the gathered KV rows, so
QK^T is a [hb, K] x [K, 64] matmul and P.V a [hb, 64] x [64, K] matmul (the heads give the matmul its M dimension).
The index list is walked in blocks of 64 in list order with the reference's online softmax (reference.py):
fp32 scores, running max, probabilities rounded to bf16 before P.V with an fp32 accumulator, the normaliser summed
from the unrounded fp32 probabilities, and the sink exp(sink - m) added once at the end. Masked entries (-1) are
not read from memory (masked load, value 0, score -inf).

Measured on an H100 (docs/benchmarks.md): on-device results match a float64 emulation of the spec's numerics to
bf16 rounding; Flash decode at batch 64 ~56-62 us (30% of copy bandwidth), prefill at 31-39% of the bf16 matmul
peak; small-batch decode is latency-bound (~40-65 us: one program walks its list's blocks in sequence).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK = 64
MIN_HEADS = 16          # Triton's tl.dot needs M >= 16: fewer heads are zero-padded up to this


def _kernel(q_ref, kv_ref, idx_ref, sink_ref, o_ref, *, S: int, nb: int, block: int, scale: float):
    r = pl.program_id(0)
    b = r // S
    q = q_ref[...]                                                     # [hb, K] bf16
    hb = q.shape[0]
    K = q.shape[1]
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, K), 1)

    def gather(jb):
        ids = idx_ref[r, pl.ds(jb * block, block)]                     # [block] int32
        valid = ids >= 0
        rows = pltriton.load(kv_ref.at[b, jnp.where(valid, ids, 0)[:, None], cols],   # gather: [block, K]
                             mask=jnp.broadcast_to(valid[:, None], (block, K)), other=0)
        return valid, rows

    def update(carry, valid, rows):
        m, l, acc = carry                                              # [hb] raw running max (-inf start), [hb], [hb, K]
        z = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        z = jnp.where(valid[None, :], z, -jnp.inf)                     # [hb, block]
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_use))
        p = jnp.exp(z - m_use[:, None])                                # fp32, 0 where masked
        l = l * alpha + jnp.sum(p, axis=1)
        pv = jnp.dot(p.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
        acc = acc * alpha[:, None] + pv
        return m_new, l, acc

    def body(j, carry):
        valid, rows = gather(j)
        return update(carry, valid, rows)

    init = (jnp.full((hb,), -jnp.inf, jnp.float32), jnp.zeros((hb,), jnp.float32),
            jnp.zeros((hb, K), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, nb, body, init)
    m_fin = jnp.where(m == -jnp.inf, 0.0, m)
    denom = l + jnp.exp(sink_ref[...] - m_fin)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)


def _pick_hb(H: int) -> int:
    for hb in (32, 16, 8, 4, 2, 1):
        if H % hb == 0:
            return hb
    return H


@functools.partial(jax.jit, static_argnames=("scale", "block", "heads_per_program", "num_warps", "num_stages",
                                             "interpret"))
def sparse_attention(q, kv, idx, sink, scale: float, *, block: int = BLOCK, heads_per_program: int | None = None,
                     num_warps: int = 4, num_stages: int = 3, interpret: bool = False):
    """q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 (-1 masked), sink [H] f32 -> [B,S,H,K] (q.dtype).

    Same function as reference.sparse_attention (block=64 gives the reference numerics). `heads_per_program` heads
    share one program (default: 32 if H divides, else 16, else H); H below 16 is zero-padded to 16.
    Launch defaults (32 heads, 4 warps, 3 stages) were the fastest of a small sweep on an H100 for both the
    Flash and Pro shapes, decode and prefill (docs/benchmarks.md).
    """
    B, S, H, K = q.shape
    T = idx.shape[-1]
    if T == 0:
        return jnp.zeros_like(q)
    Hp = H if interpret else -(-H // MIN_HEADS) * MIN_HEADS      # tl.dot: M >= 16 and power-of-2 blocks
    if Hp != H:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, Hp - H), (0, 0)))
        sink = jnp.pad(sink, (0, Hp - H))
    hb = heads_per_program or _pick_hb(Hp)
    if Hp % hb:
        raise ValueError(f"sparse_attention(gpu): heads_per_program={hb} does not divide H={Hp}")
    pad = (-T) % block
    idx = idx.astype(jnp.int32)
    if pad:
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    nb = idx.shape[-1] // block
    R = B * S
    qr = q.reshape(R, Hp, K)
    idx = idx.reshape(R, nb * block)
    kernel = functools.partial(_kernel, S=S, nb=nb, block=block, scale=float(scale))
    out = pl.pallas_call(
        kernel,
        grid=(R, Hp // hb),
        in_specs=[
            pl.BlockSpec((None, hb, K), lambda r, g: (r, g, 0)),
            pl.no_block_spec,                                                  # kv: whole array, gathered inside
            pl.no_block_spec,                                                  # idx: whole array
            pl.BlockSpec((hb,), lambda r, g: (g,)),
        ],
        out_specs=pl.BlockSpec((None, hb, K), lambda r, g: (r, g, 0)),
        out_shape=jax.ShapeDtypeStruct((R, Hp, K), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_attention_gpu",
    )(qr, kv, idx, sink.astype(jnp.float32))
    return out.reshape(B, S, Hp, K)[:, :, :H]
