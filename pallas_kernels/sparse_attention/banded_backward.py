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
folded back onto the pool rows by kb + 1 block-shifted adds in a fixed order. Queries run in chunks (a Python
loop: static shapes, so each chunk's compressed width is its own) of about `CHUNK_ELEMS` scores.

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

f32 = jnp.float32
BLOCK = 64
CHUNK_ELEMS = 1 << 26          # fp32 scores [B, chunk, H, band + compressed] per query chunk: 256 MB


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


def _counts(entries, width: int):
    """entries [B, Q, J] int32 column numbers (anything outside [0, width) is ignored) -> [B, Q, width] fp32 counts."""
    B, Q, _ = entries.shape
    ok = (entries >= 0) & (entries < width)
    col = jnp.where(ok, entries, width)
    b = jnp.arange(B)[:, None, None]
    i = jnp.arange(Q)[None, :, None]
    return jnp.zeros((B, Q, width), f32).at[b, i, col].add(ok.astype(f32), mode="drop")


def banded_backward(q, kv, idx, sink, out, g, scale: float, layout: Layout, *, block: int = BLOCK,
                    chunk_elems: int | None = None):
    """(dq, dkv, dsink) of reference.sparse_attention for lists built as `layout` says.

    q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 (-1 masked), sink [H], out [B,S,H,K] = the forward's output,
    g [B,S,H,K] = its cotangent -> dq (q.dtype), dkv (kv.dtype), dsink (sink.dtype)."""
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
    Sp = nbk * Qb
    kb = -(-Tw // Qb)
    band = (kb + 1) * Qb
    lo = layout.offset + 1 - kb * Qb          # pool row of band column 0 for query block 0
    L = (nbk + kb) * Qb
    blocks = _rows(kv, lo, L).astype(cd).reshape(B, nbk + kb, Qb, K)
    kvc = kv[:, cs:].astype(cd)
    padq = lambda a: jnp.pad(a, ((0, 0), (0, Sp - S)) + ((0, 0),) * (a.ndim - 2)) if Sp > S else a
    qp, gp, op = padq(q.astype(cd)), padq(g.astype(cd)), padq(out)
    idxp = jnp.pad(idx, ((0, 0), (0, Sp - S), (0, 0)), constant_values=-1) if Sp > S else idx
    sinkf = sink.astype(f32)

    per_query = B * H * (band + C)
    Qc = max(Qb, (chunk_elems or CHUNK_ELEMS) // max(per_query, 1) // Qb * Qb)
    dkv_band = jnp.zeros((B, nbk + kb, Qb, K), f32)
    dkv_c = jnp.zeros((B, C, K), f32)
    dsink = jnp.zeros((H,), f32)
    dqs = []
    for i0 in range(0, Sp, Qc):
        i1 = min(Sp, i0 + Qc)
        nq, b0, nbc = i1 - i0, i0 // Qb, (i1 - i0) // Qb
        qc, gc = qp[:, i0:i1], gp[:, i0:i1]
        ic = idxp[:, i0:i1]
        Ci = C if not layout.ratio else min(C, i1 // layout.ratio)
        # window band: [B, nbc, band, K] rows; counts [B, nq, band]
        kvb = jnp.concatenate([blocks[:, b0 + u:b0 + u + nbc] for u in range(kb + 1)], axis=2)
        first = lo + (i0 + jnp.arange(nq)) // Qb * Qb                                # pool row of column 0
        iw = ic[..., :Tw]
        cnt_w = _counts(jnp.where(iw >= 0, iw - first[None, :, None], -1), band)
        qb = qc.reshape(B, nbc, Qb, H, K)
        z_w = dot("bnahk,bnck->bnahc", qb, kvb).reshape(B, nq, H, band) * scale
        z_w = jnp.where(cnt_w[:, :, None] > 0, z_w, -jnp.inf)
        m = jnp.max(z_w, axis=-1)
        if Ci:
            icc = ic[..., Tw:]
            cnt_c = _counts(jnp.where(icc >= 0, icc - cs, -1), Ci)
            kc = kvc[:, :Ci]
            z_c = dot("bihk,bck->bihc", qc, kc) * scale
            z_c = jnp.where(cnt_c[:, :, None] > 0, z_c, -jnp.inf)
            m = jnp.maximum(m, jnp.max(z_c, axis=-1))
        m = jnp.where(jnp.isfinite(m), m, 0.0)[..., None]                              # [B, nq, H, 1]
        e_w = cnt_w[:, :, None] * jnp.exp(z_w - m)
        es = jnp.exp(sinkf[None, None, :, None] - m)
        den = jnp.sum(e_w, axis=-1, keepdims=True) + es
        if Ci:
            e_c = cnt_c[:, :, None] * jnp.exp(z_c - m)
            den = den + jnp.sum(e_c, axis=-1, keepdims=True)
        inv = 1.0 / den
        D = jnp.sum(gc.astype(f32) * op[:, i0:i1].astype(f32), axis=-1, keepdims=True)   # [B, nq, H, 1]
        dsink = dsink - jnp.sum(D * es * inv, axis=(0, 1))[:, 0]
        gb = gc.reshape(B, nbc, Qb, H, K)
        p_w = e_w * inv
        dp_w = dot("bnahk,bnck->bnahc", gb, kvb).reshape(B, nq, H, band)
        dz_w = p_w * (dp_w - D)
        dz5, p5 = (a.reshape(B, nbc, Qb, H, band) for a in (dz_w, p_w))
        dq = dot("bnahc,bnck->bnahk", dz5, kvb).reshape(B, nq, H, K)
        rows = scale * dot("bnahc,bnahk->bnck", dz5, qb) + dot("bnahc,bnahk->bnck", p5, gb)   # [B, nbc, band, K]
        rows = rows.reshape(B, nbc, kb + 1, Qb, K)
        for u in range(kb + 1):                                 # fold the band onto its blocks, fixed order
            dkv_band = dkv_band.at[:, b0 + u:b0 + u + nbc].add(rows[:, :, u])
        if Ci:
            p_c = e_c * inv
            dp_c = dot("bihk,bck->bihc", gc, kc)
            dz_c = p_c * (dp_c - D)
            dq = dq + dot("bihc,bck->bihk", dz_c, kc)
            dkv_c = dkv_c.at[:, :Ci].add(scale * dot("bihc,bihk->bck", dz_c, qc) + dot("bihc,bihk->bck", p_c, gc))
        dqs.append(scale * dq)
    dq = jnp.concatenate(dqs, axis=1)[:, :S]
    # pool rows of the folded band: [lo, lo + L) (clipped to the pool); the compressed part: [cs, N)
    dkv = jnp.zeros((B, N, K), f32)
    a, b = max(lo, 0), min(lo + L, N)
    if b > a:
        dkv = dkv.at[:, a:b].add(dkv_band.reshape(B, L, K)[:, a - lo:b - lo])
    if C:
        dkv = dkv.at[:, cs:].add(dkv_c)
    return dq.astype(q.dtype), dkv.astype(kv.dtype), dsink.astype(sink.dtype)
