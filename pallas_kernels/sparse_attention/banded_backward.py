"""The backward of sparse attention for lists with the model's prefill structure: a sliding window (a band of
pool rows that moves with the query) plus compressed entries (a second, causally growing part of the pool).

Why: the generic backward of long pools (gpu_backward.py) works per query row on its index list and adds every
(query, list entry) row gradient into dKV with an fp32 atomic: 8192 x 384 x 512 atomics per CSA layer of the 1b
training step, ~24 TFLOP/s, 21% of the step (docs/benchmarks.md, session 9), and dKV's last bits change from run
to run. When the caller knows how its lists were built it passes a `Layout`, and the same gradient becomes dense
matmuls that XLA runs on tensor cores, with no gather, no scatter of rows and no atomics (deterministic):

* window part (list entries [0, window)): query i's window entries lie in pool rows
  [i + offset - window + 1, i + offset]. Queries are taken in blocks of `block` (Qb); block b's entries all lie in
  a band of (kb + 1) x Qb consecutive rows (kb = ceil(window / Qb)), so its scores are one [Qb x H, K] x [K, band]
  matmul, masked by how many times each band row is listed (a scatter of ones, exact in any order);
* compressed part (entries [window, T)): pool rows [comp_start, N) as a dense matrix over the queries, masked by
  the multiplicities. With `ratio` > 0 the caller promises that query i lists only compressed entries
  c < (i + 1) // ratio, and each chunk of queries multiplies only the entries its last query can see (half the
  work on average, causally).
Both parts share one softmax (the max and normaliser over the whole list plus the sink). The dKV of a band is
folded back onto the pool rows by kb + 1 block-shifted adds in a fixed order. Queries run in sub-chunks of about
`CHUNK_ELEMS` scores, a `lax.scan` over the sub-chunks of a group; the groups (at most `MAX_GROUPS`, a Python
loop: static shapes) each have their own compressed width. The dispatch uses this form only where it `suits`:
the dense compressed part grows with the context (CSA at 64K: ~16x the top-k) while the lists do not.

The function and numerics are those of gpu_backward.py (p, dz rounded to the input dtype as matmul operands for
bf16 inputs, fp32 everything else; D = sum dO * O from the forward's output; the VJP of the reference's bf16
rounding of block probabilities taken as the identity); only the summation order differs. A list entry outside
the band the layout promises (or a compressed entry below comp_start) would be silently dropped: only callers
that build their lists the promised way pass a layout (v4jax.attention's prefill, tests/test_banded_backward.py).

Cost at the 1b training shapes (S = 8192, H = 16, K = 512, window 128, CSA top-k 256 of 2048): the window part
is ~5 matmuls of S x H x 192 x K, the CSA part ~5 of S x H x (C / 2) x K on average -- ~0.8 TFLOP per CSA layer
against the generic kernel's atomics (docs/benchmarks.md has the measured times).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .backward import counts

f32 = jnp.float32
BLOCK = 64
CHUNK_ELEMS = 1 << 26          # fp32 scores [B, chunk, H, band + compressed] per query sub-chunk: 256 MB
MAX_GROUPS = 8                 # compressed widths (Python-loop groups of sub-chunks) per call
DENSE_RATIO = 4                # `suits`: dense compressed part while <= this x the listed compressed entries


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the index lists of a sparse_attention call were built (a static promise about idx [B, S, T]).

    window: list entries [0, window) are window entries; query i's lie in pool rows
        [i + offset - window + 1, i + offset] (-1 allowed anywhere).
    offset: see window (0 when pool row r is the token at position r and query i is at position i).
    comp_start: list entries [window, T) name pool rows >= comp_start (the compressed entries) or -1; None when
        the list has no compressed part.
    ratio: > 0 promises that query i lists only compressed entries c < (i + 1) // ratio (c = row - comp_start);
        0 promises nothing (every query may list every entry).
    """
    window: int
    offset: int = 0
    comp_start: int | None = None
    ratio: int = 0

    def __post_init__(self):
        if self.window < 1 or self.ratio < 0 or (self.comp_start is not None and self.comp_start < 0):
            raise ValueError(f"sparse_attention Layout: invalid {self}")


def _rows(a, lo: int, n: int):
    """a[:, lo:lo + n] along axis 1 with zero rows where the range leaves [0, a.shape[1])."""
    N = a.shape[1]
    front, back = max(0, -lo), max(0, lo + n - N)
    if front or back:
        a = jnp.pad(a, ((0, 0), (front, back)) + ((0, 0),) * (a.ndim - 2))
    return a[:, lo + front:lo + front + n]


def suits(layout: Layout, N: int, T: int) -> bool:
    """Whether the banded form is the cheaper backward for a pool of N rows and lists of T entries: its compressed
    part multiplies every entry a query may see (half of them on average with a causal `ratio`), so it is used
    while that is at most DENSE_RATIO x the compressed entries the lists hold (top-k; HCA lists all of them).
    Beyond (CSA at 64K context: 8192 visible entries on average against top-k 512) the list-based backward of
    the dispatch does less work."""
    Tw = min(layout.window, T)
    if layout.comp_start is None or T == Tw:
        return True
    C = max(0, N - layout.comp_start)
    return (C / 2 if layout.ratio else C) <= DENSE_RATIO * (T - Tw)


def _group_bounds(n_sub: int, groups: int) -> list[tuple[int, int]]:
    """Split n_sub sub-chunks into at most `groups` contiguous runs: [(first, end), ...]."""
    g = max(1, min(n_sub, groups))
    edges = [round(i * n_sub / g) for i in range(g + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def banded_backward(q, kv, idx, sink, out, g, scale: float, layout: Layout, *, block: int = BLOCK,
                    chunk_elems: int | None = None, max_groups: int = MAX_GROUPS):
    """(dq, dkv, dsink) of reference.sparse_attention for lists built as `layout` says.

    q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 (-1 masked), sink [H], out [B,S,H,K] = the forward's output,
    g [B,S,H,K] = its cotangent -> dq (q.dtype), dkv (kv.dtype), dsink (sink.dtype).

    Queries run in sub-chunks of Qc (a multiple of `block`; about `chunk_elems` fp32 scores each), `lax.scan`
    over the sub-chunks of one group; at most `max_groups` groups (a Python loop), each multiplying the
    compressed entries its last query can see (with a causal `ratio`; otherwise one group over all entries)."""
    B, S, H, K = q.shape
    N, T = kv.shape[1], idx.shape[-1]
    if T == 0 or S == 0:
        return jnp.zeros_like(q), jnp.zeros_like(kv), jnp.zeros_like(sink)
    cd = jnp.promote_types(q.dtype, kv.dtype)
    prec = jax.lax.Precision.HIGHEST if cd == f32 else None

    def dot(spec, a, b):
        return jnp.einsum(spec, a.astype(cd), b.astype(cd), preferred_element_type=f32, precision=prec)

    Tw = min(layout.window, T)
    cs = N if layout.comp_start is None or T == Tw else layout.comp_start
    C = max(0, N - cs)
    Qb = block
    nbk = -(-S // Qb)
    kb = -(-Tw // Qb)
    band = (kb + 1) * Qb
    lo = layout.offset + 1 - kb * Qb          # pool row of band column 0 for query block 0
    per_block = max(1, (chunk_elems or CHUNK_ELEMS) // max(B * H * (band + C) * Qb, 1))   # blocks per sub-chunk
    n_sub = -(-nbk // per_block)
    Qc = -(-nbk // n_sub) * Qb                # sub-chunks of equal size, little padding
    Sp = n_sub * Qc                           # queries padded to whole sub-chunks (padding lists are all -1)
    blocks = _rows(kv, lo, (Sp // Qb + kb) * Qb).astype(cd).reshape(B, Sp // Qb + kb, Qb, K)
    kvc = kv[:, cs:].astype(cd)
    padq = lambda a: jnp.pad(a, ((0, 0), (0, Sp - S)) + ((0, 0),) * (a.ndim - 2)) if Sp > S else a
    qp, gp, op = padq(q.astype(cd)), padq(g.astype(cd)), padq(out)
    idxp = jnp.pad(idx, ((0, 0), (0, Sp - S), (0, 0)), constant_values=-1) if Sp > S else idx
    sinkf = sink.astype(f32)
    nbc = Qc // Qb

    def sub_chunk(i0, Ci):
        """Gradients of queries [i0, i0 + Qc) (i0 traced): dq [B, Qc, H, K], band rows [B, nbc, band, K],
        compressed rows [B, Ci, K], dsink [H]."""
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, i0, Qc, axis=1)
        qc, gc, oc, ic = take(qp), take(gp), take(op), take(idxp)
        kvb = jnp.concatenate([jax.lax.dynamic_slice_in_dim(blocks, i0 // Qb + u, nbc, axis=1)
                               for u in range(kb + 1)], axis=2)                        # [B, nbc, band, K]
        first = lo + (i0 + jnp.arange(Qc)) // Qb * Qb                                 # pool row of column 0
        iw = ic[..., :Tw]
        cnt_w = counts(jnp.where(iw >= 0, iw - first[None, :, None], -1), band)
        qb, gb = qc.reshape(B, nbc, Qb, H, K), gc.reshape(B, nbc, Qb, H, K)
        z_w = dot("bnahk,bnck->bnahc", qb, kvb).reshape(B, Qc, H, band) * scale
        z_w = jnp.where(cnt_w[:, :, None] > 0, z_w, -jnp.inf)
        m = jnp.max(z_w, axis=-1)
        if Ci:
            icc = ic[..., Tw:]
            cnt_c = counts(jnp.where(icc >= 0, icc - cs, -1), Ci)
            kc = kvc[:, :Ci]
            z_c = dot("bihk,bck->bihc", qc, kc) * scale
            z_c = jnp.where(cnt_c[:, :, None] > 0, z_c, -jnp.inf)
            m = jnp.maximum(m, jnp.max(z_c, axis=-1))
        m = jnp.where(jnp.isfinite(m), m, 0.0)[..., None]                              # [B, Qc, H, 1]
        e_w = cnt_w[:, :, None] * jnp.exp(z_w - m)
        es = jnp.exp(sinkf[None, None, :, None] - m)
        den = jnp.sum(e_w, axis=-1, keepdims=True) + es
        if Ci:
            e_c = cnt_c[:, :, None] * jnp.exp(z_c - m)
            den = den + jnp.sum(e_c, axis=-1, keepdims=True)
        inv = 1.0 / den
        D = jnp.sum(gc.astype(f32) * oc.astype(f32), axis=-1, keepdims=True)          # [B, Qc, H, 1]
        dsink = -jnp.sum(D * es * inv, axis=(0, 1))[:, 0]
        p_w = e_w * inv
        dz_w = p_w * (dot("bnahk,bnck->bnahc", gb, kvb).reshape(B, Qc, H, band) - D)
        dz5, p5 = (a.reshape(B, nbc, Qb, H, band) for a in (dz_w, p_w))
        dq = dot("bnahc,bnck->bnahk", dz5, kvb).reshape(B, Qc, H, K)
        rows = scale * dot("bnahc,bnahk->bnck", dz5, qb) + dot("bnahc,bnahk->bnck", p5, gb)
        rows_c = None
        if Ci:
            p_c = e_c * inv
            dz_c = p_c * (dot("bihk,bck->bihc", gc, kc) - D)
            dq = dq + dot("bihc,bck->bihk", dz_c, kc)
            rows_c = scale * dot("bihc,bihk->bck", dz_c, qc) + dot("bihc,bihk->bck", p_c, gc)
        return scale * dq, rows, rows_c, dsink

    groups = _group_bounds(n_sub, max_groups if layout.ratio and C else 1)
    dqs, band_rows = [], []
    dkv_c = jnp.zeros((B, C, K), f32)
    dsink = jnp.zeros((H,), f32)
    for a, b in groups:
        Ci = C if not layout.ratio else min(C, b * Qc // layout.ratio)     # entries the group's last query sees

        def body(carry, i, Ci=Ci):
            acc_c, acc_s = carry
            dq, rows, rows_c, ds = sub_chunk(i * Qc, Ci)
            if Ci:
                acc_c = acc_c + rows_c
            return (acc_c, acc_s + ds), (dq, rows)

        init = (jnp.zeros((B, Ci, K), f32), jnp.zeros((H,), f32))
        (acc_c, ds), (dq, rows) = jax.lax.scan(body, init, jnp.arange(a, b))
        dqs.append(jnp.moveaxis(dq, 0, 1).reshape(B, (b - a) * Qc, H, K))
        band_rows.append(jnp.moveaxis(rows, 0, 1).reshape(B, (b - a) * nbc, band, K))
        dsink = dsink + ds
        if Ci:
            dkv_c = dkv_c.at[:, :Ci].add(acc_c)
    dq = jnp.concatenate(dqs, axis=1)[:, :S]
    # fold the bands onto the pool: band column u * Qb + a of query block n is band-slice row (n + u) * Qb + a
    rows = jnp.concatenate(band_rows, axis=1).reshape(B, Sp // Qb, kb + 1, Qb, K)
    nblk = Sp // Qb + kb
    folded = jnp.zeros((B, nblk, Qb, K), f32)
    for u in range(kb + 1):                                              # fixed order: deterministic
        folded = folded.at[:, u:u + Sp // Qb].add(rows[:, :, u])
    dkv = jnp.zeros((B, N, K), f32)
    a, b = max(lo, 0), min(lo + nblk * Qb, N)
    if b > a:
        dkv = dkv.at[:, a:b].add(folded.reshape(B, nblk * Qb, K)[:, a - lo:b - lo])
    if C:
        dkv = dkv.at[:, cs:].add(dkv_c)
    return dq.astype(q.dtype), dkv.astype(kv.dtype), dsink.astype(sink.dtype)
