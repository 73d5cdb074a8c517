"""Sparse attention for TPUs: Pallas Mosaic TPU with scalar-prefetched index lists.

Grid (row, index block): a row is one query (b, s) with all its H heads (they share the gathered KV rows, so the
scores are one [H, K] x [K, 64] matmul per 64 entries); the index axis walks the list in steps of `block_k`
entries (a multiple of 64; default 128, two reference blocks of 64 per step).

The index lists live in SMEM (scalar prefetch). The KV pool stays in HBM (memory_space ANY); every step gathers
its `block_k` rows with one row DMA each into a double-buffered VMEM tile, and starts the next step's gathers
before computing on the current one, so the copies overlap the matmuls. Masked entries (-1) fetch row 0 (a
harmless finite row: its score is forced to -inf, its probability is exactly 0); a step whose entries are all
masked is skipped altogether (no DMA, no compute), which is exact because it would leave the online-softmax state
unchanged. A VMEM copy of the same index block gives the vector mask.

Numerics are the reference's (reference.py): fp32 scores, online softmax over blocks of 64 in list order,
probabilities rounded to the value dtype before P.V into an fp32 accumulator, the normaliser summed from the
unrounded fp32 probabilities, and exp(sink - m) added once at the end.

SMEM is small, so rows are processed in chunks of `rows_per_call` queries (a lax.map over one pallas_call);
the scalar-prefetched index chunk is rows_per_call * T int32.
On CPU run it with interpret=pltpu.InterpretParams() (tests do).

Status: not yet run on a TPU. Verified in TPU interpret mode against the reference, and lowered to Mosaic
(jax.export for platform "tpu") at the Flash/Pro shapes; Mosaic's own compiler (in libtpu) has not seen it. The
parts most likely to need work on hardware: single-row DMAs into a bf16 (sublane-packed) VMEM tile at odd row
offsets, the 64-lane slices of the [1, 128] index block, and the SMEM budget (SMEM_INDEX_BUDGET).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SUB = 64                 # the reference's softmax block
BLOCK_K = 128            # entries gathered per grid step (multiple of SUB)
SMEM_INDEX_BUDGET = 16384  # int32 index entries per pallas_call (64 KiB of SMEM)


def _kernel(idx_s, cnt_s, rowb_s,                      # scalar prefetch (SMEM)
            q_ref, ids_ref, sink_ref, kv_hbm,          # inputs
            o_ref,                                     # output
            buf, sem, m_ref, l_ref, acc_ref,           # scratch
            *, nj: int, bk: int, scale: float):
    r = pl.program_id(0)
    j = pl.program_id(1)
    Tp = nj * bk
    b = rowb_s[r]

    def copy(step, slot, i):
        row = idx_s[r * Tp + step * bk + i]
        return pltpu.make_async_copy(kv_hbm.at[b, pl.ds(row, 1)], buf.at[slot, pl.ds(i, 1)], sem.at[slot])

    def each(step, slot, fn):
        def body(i, c):
            fn(copy(step, slot, i))
            return c
        jax.lax.fori_loop(0, bk, body, 0)

    def start(step, slot):
        @pl.when(cnt_s[r * nj + step] > 0)
        def _():
            each(step, slot, lambda c: c.start())

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        start(0, 0)

    @pl.when(j + 1 < nj)
    def _():
        start(j + 1, (j + 1) % 2)

    slot = j % 2

    @pl.when(cnt_s[r * nj + j] > 0)
    def _():
        each(j, slot, lambda c: c.wait())
        q = q_ref[...]                                                    # [H, K]
        ids = ids_ref[...]                                                # [1, bk]
        for s in range(bk // SUB):
            rows = buf[slot, s * SUB:(s + 1) * SUB, :]                    # [64, K]
            valid = ids[:, s * SUB:(s + 1) * SUB] >= 0                    # [1, 64]
            z = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * scale
            z = jnp.where(valid, z, -jnp.inf)                             # [H, 64]
            m = m_ref[...]                                                # [H, 1] raw running max
            m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_use))
            p = jnp.exp(z - m_use)
            l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
            acc_ref[...] = acc_ref[...] * alpha + pv
            m_ref[...] = m_new

    @pl.when(j == nj - 1)
    def _():
        m = m_ref[...]
        m_fin = jnp.where(m == -jnp.inf, 0.0, m)
        denom = l_ref[...] + jnp.exp(sink_ref[...] - m_fin)
        o_ref[...] = (acc_ref[...] / denom).astype(o_ref.dtype)


def _call(q, kv, idx_flat, cnt, rowb, ids3, sink2, *, nj, bk, scale, interpret):
    Rc, H, K = q.shape
    kernel = functools.partial(_kernel, nj=nj, bk=bk, scale=scale)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(Rc, nj),
        in_specs=[
            pl.BlockSpec((None, H, K), lambda r, j, *_: (r, 0, 0)),
            pl.BlockSpec((None, 1, bk), lambda r, j, *_: (r, 0, j)),
            pl.BlockSpec((H, 1), lambda r, j, *_: (0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, H, K), lambda r, j, *_: (r, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, bk, K), kv.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((H, 1), jnp.float32),
            pltpu.VMEM((H, 1), jnp.float32),
            pltpu.VMEM((H, K), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((Rc, H, K), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="sparse_attention_tpu",
    )(idx_flat, cnt, rowb, q, ids3, sink2, kv)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "rows_per_call", "interpret"))
def sparse_attention(q, kv, idx, sink, scale: float, *, block_k: int = BLOCK_K, rows_per_call: int | None = None,
                     interpret=False):
    """q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 (-1 masked), sink [H] f32 -> [B,S,H,K] (q.dtype).

    Same function as reference.sparse_attention. `interpret`: False on a TPU, pltpu.InterpretParams() (or True)
    elsewhere.
    """
    if block_k % SUB:
        raise ValueError(f"sparse_attention(tpu): block_k={block_k} must be a multiple of {SUB}")
    B, S, H, K = q.shape
    T = idx.shape[-1]
    if T == 0:
        return jnp.zeros_like(q)
    bk = block_k
    idx = idx.astype(jnp.int32)
    pad = (-T) % bk
    if pad:
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    Tp = idx.shape[-1]
    nj = Tp // bk
    R = B * S
    Rc = rows_per_call or max(1, min(R, SMEM_INDEX_BUDGET // Tp))
    nc = -(-R // Rc)
    Rp = nc * Rc
    idx = idx.reshape(R, Tp)
    qr = q.reshape(R, H, K)
    rowb = jnp.repeat(jnp.arange(B, dtype=jnp.int32), S)
    if Rp != R:
        idx = jnp.pad(idx, ((0, Rp - R), (0, 0)), constant_values=-1)
        qr = jnp.pad(qr, ((0, Rp - R), (0, 0), (0, 0)))
        rowb = jnp.pad(rowb, (0, Rp - R))
    cnt = jnp.sum((idx >= 0).reshape(Rp, nj, bk), axis=-1, dtype=jnp.int32)          # valid entries per step
    safe = jnp.where(idx >= 0, idx, 0)
    sink2 = sink.astype(jnp.float32).reshape(H, 1)
    call = functools.partial(_call, kv=kv, sink2=sink2, nj=nj, bk=bk, scale=float(scale), interpret=interpret)

    def one(args):
        q_c, idx_c, safe_c, cnt_c, rowb_c = args
        return call(q_c, idx_flat=safe_c.reshape(-1), cnt=cnt_c.reshape(-1), rowb=rowb_c,
                    ids3=idx_c.reshape(Rc, 1, Tp))

    chunks = (qr.reshape(nc, Rc, H, K), idx.reshape(nc, Rc, Tp), safe.reshape(nc, Rc, Tp),
              cnt.reshape(nc, Rc, nj), rowb.reshape(nc, Rc))
    if nc == 1:
        out = one(jax.tree.map(lambda a: a[0], chunks))[None]
    else:
        out = jax.lax.map(one, chunks)
    return out.reshape(Rp, H, K)[:R].reshape(B, S, H, K)
