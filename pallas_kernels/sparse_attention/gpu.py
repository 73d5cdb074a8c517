"""Sparse attention for NVIDIA GPUs: Pallas with the Triton backend (`jax.experimental.pallas.triton`).

Why Triton and not Mosaic GPU: the kernel's core is a *gather* of KV rows by a per-query index list. Triton's
pointer loads gather rows directly (one masked load of [block, K] at arbitrary row offsets); Mosaic GPU on Hopper
moves tiles with TMA, which cannot gather rows (TMA gather is Blackwell-only), so a Mosaic GPU version would need a
hand-written per-warp cp.async gather. That is future work; this file is the only place the Triton backend is used.

One program = one query row (b, s) x one group of `hb` heads x one *split* (a contiguous chunk of the query's
index list). All heads of the group share the gathered KV rows, so QK^T is a [hb, K] x [K, 64] matmul and P.V a
[hb, 64] x [64, K] matmul (the heads give the matmul its M dimension). A program walks its chunk in blocks of 64 in
list order with the reference's online softmax (reference.py): fp32 scores, running max, probabilities rounded to
bf16 before P.V with an fp32 accumulator, the normaliser summed from the unrounded fp32 probabilities. Masked
entries (-1) are not read from memory (masked load, value 0, score -inf).

Two paths, picked from the shapes (`plan`):
* one split (batch x heads already fill the GPU, e.g. decode at batch 64, prefill): one launch; each program walks
  the whole list and writes the normalised output with the sink exp(sink - m) added once at the end.
* split-list ("flash-decoding"; small decode batches, where one program per query walking 10-18 blocks in sequence
  left the GPU idle and latency-bound): the list is cut into `num_splits` chunks of whole 64-blocks, processed by
  separate programs (grid head-group x split x row). Each writes a partial: the unnormalised fp32 accumulator, its
  running max m and its running sum l. A jnp combine (one XLA fusion) rescales the partials to the global max,
  sums them and adds the sink exactly as the reference does.
  Exact numerics (`exact=True`, default): the reference rounds each block's probabilities to bf16 relative to the
  running max *of the whole list so far* (spec section 6, bit-exactness hazard 4). A chunk does not know the maxima
  of the chunks before it, so a small pre-pass kernel first computes every 64-block's per-head score maximum
  (QK^T only; one program per block, fully parallel) and each split program starts its running max at the
  maximum over all earlier blocks. The probabilities are then rounded against exactly the reference's running
  maxima, and the result equals the single-program kernel's to fp32 rounding of the rescale factors (rare
  one-step bf16 flips of the output). The pre-pass reads the gathered KV rows a second time (from L2 at small
  batch, where this path is used). `exact=False` skips the pre-pass: each chunk rounds against its own running
  max (the same accuracy against exact arithmetic, but not the reference's bits: ~1e-3 relative).

Measured on an H100: see docs/benchmarks.md (single-split path: Flash decode at batch 64 ~56-62 us, 30% of copy
bandwidth; prefill at 31-39% of the bf16 matmul peak; small-batch decode was latency-bound at ~40-65 us before the
split path).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK = 64
MIN_HEADS = 16          # Triton's tl.dot needs M >= 16: fewer heads are zero-padded up to this
DEFAULT_SMS = 132       # H100 SXM; the real count is read from the device when there is one


# ---- kernel pieces ------------------------------------------------------------------------------------
def _gather(kv_ref, idx_ref, b, r, jb, block: int, K: int, live=None):
    """The index block jb of row r and its KV rows: (valid [block], rows [block, K]); masked rows are not read.
    live=False masks the whole block (nothing read)."""
    ids = idx_ref[r, pl.ds(jb * block, block)]                         # [block] int32
    valid = ids >= 0
    if live is not None:
        valid = valid & live
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, K), 1)
    rows = pltriton.load(kv_ref.at[b, jnp.where(valid, ids, 0)[:, None], cols],   # gather: [block, K]
                         mask=jnp.broadcast_to(valid[:, None], (block, K)), other=0)
    return valid, rows


def _scores(q, rows, valid, scale: float):
    z = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    return jnp.where(valid[None, :], z, -jnp.inf)                       # [hb, block] fp32


def _update(carry, z, rows):
    """One reference block of the online softmax: m is the raw running max (-inf while nothing was valid)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_use))
    p = jnp.exp(z - m_use[:, None])                                    # fp32, 0 where masked
    l = l * alpha + jnp.sum(p, axis=1)
    pv = jnp.dot(p.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
    acc = acc * alpha[:, None] + pv
    return m_new, l, acc


def _attn_kernel(*refs, S: int, bps: int, nb: int, block: int, scale: float, exact: bool, final: bool,
                 prefetch: bool):
    """Program (g, c, r): heads group g, split c (blocks [c*bps, (c+1)*bps)), query row r."""
    q_ref, kv_ref, idx_ref, *rest = refs
    sink_ref = rest.pop(0) if final else None
    bm_ref = rest.pop(0) if exact else None
    g, c, r = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b = r // S
    q = q_ref[...]                                                     # [hb, K]
    hb, K = q.shape
    m0 = jnp.full((hb,), -jnp.inf, jnp.float32)
    if exact:
        # running max of all blocks before this split (per head), from the pre-pass's block maxima [R, nb, H]
        nbp = 1 << max(0, nb - 1).bit_length()                       # Triton: power-of-2 shapes
        jj = jax.lax.broadcasted_iota(jnp.int32, (nbp, 1), 0)
        heads = g * hb + jax.lax.broadcasted_iota(jnp.int32, (1, hb), 1)
        before = jnp.broadcast_to(jj < c * bps, (nbp, hb))
        bm = pltriton.load(bm_ref.at[r, jnp.minimum(jj, nb - 1), heads], mask=before, other=-jnp.inf)
        m0 = jnp.max(bm, axis=0)

    init = (m0, jnp.zeros((hb,), jnp.float32), jnp.zeros((hb, K), jnp.float32))
    if prefetch:
        # software prefetch in registers: the gather of block j+1 is issued before block j's matmuls (use with
        # num_stages=1; Triton's own pipeliner does not pipeline this indirect load at num_stages=2)
        def fetch(j):
            return _gather(kv_ref, idx_ref, b, r, c * bps + jnp.minimum(j, bps - 1), block, K, live=j < bps)

        def body(j, carry):
            valid, rows, *st = carry
            nxt = fetch(j + 1)
            return (*nxt, *_update(st, _scores(q, rows, valid, scale), rows))

        _, _, m, l, acc = jax.lax.fori_loop(0, bps, body, (*fetch(0), *init))
    else:
        def body(j, carry):
            valid, rows = _gather(kv_ref, idx_ref, b, r, c * bps + j, block, K)
            return _update(carry, _scores(q, rows, valid, scale), rows)

        m, l, acc = jax.lax.fori_loop(0, bps, body, init)
    if final:
        o_ref, = rest
        m_fin = jnp.where(m == -jnp.inf, 0.0, m)
        denom = l + jnp.exp(sink_ref[...] - m_fin)
        o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    else:
        acc_ref, m_ref, l_ref = rest
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def _blockmax_kernel(q_ref, kv_ref, idx_ref, bm_ref, *, S: int, block: int, scale: float):
    """Pre-pass program (g, j, r): per-head maximum score of block j of row r (-inf if the block is all masked)."""
    j, r = pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    valid, rows = _gather(kv_ref, idx_ref, r // S, r, j, block, q.shape[1])
    bm_ref[...] = jnp.max(_scores(q, rows, valid, scale), axis=1)


def _combine(acc, m, l, sink):
    """Partials acc [R, P, H, K] (unnormalised, relative to m), m, l [R, P, H] -> [R, H, K] fp32.

    The reference's normalisation: everything rescaled to the final running max M of the row (-inf -> 0 when the
    whole list is masked), denominator sum_p l_p exp(m_p - M) + exp(sink - M)."""
    M = jnp.max(m, axis=1)
    m_fin = jnp.where(M == -jnp.inf, 0.0, M)
    w = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_fin[:, None]))                   # [R, P, H]
    den = jnp.sum(w * l, axis=1) + jnp.exp(sink[None, :] - m_fin)                   # [R, H]
    num = jnp.sum(w[..., None] * acc, axis=1)                                      # [R, H, K]
    return num / den[..., None]


# ---- launch planning -----------------------------------------------------------------------------------
def _pick_hb(H: int) -> int:
    for hb in (32, 16, 8, 4, 2, 1):
        if H % hb == 0:
            return hb
    return H


def _decode_launch(B: int, H: int, T: int, num_warps: int | None) -> tuple[int | None, int]:
    """(heads per program, warps) of a decode launch (S = 1) that runs in one pass: the fastest entries of the H100
    launch sweep at batch 64, 64K context (docs/benchmarks.md): Flash (H = 64) 16 heads per program, 4 warps
    (47.5 us vs 53.7 us with 32 heads); Pro (H = 128) 64 heads, 8 warps (101.6 us vs 149.2 us). Split launches
    (small batches) keep the defaults."""
    Hp = max(H, MIN_HEADS)
    if auto_splits(B * (Hp // _pick_hb(Hp)), max(1, -(-T // BLOCK)), _num_sms()) > 1:
        return None, num_warps or 4
    if H >= 128 and H % 64 == 0:
        return 64, num_warps or 8
    if H % 16 == 0:
        return 16, num_warps or 4
    return None, num_warps or 4


def launch_defaults(B: int, S: int, H: int, T: int, heads_per_program: int | None, num_splits: int | None,
                    num_warps: int | None) -> tuple[int | None, int]:
    """(heads per program, warps) that `sparse_attention` launches with for these arguments: at decode (S = 1)
    with neither heads_per_program nor num_splits given, `_decode_launch`'s; otherwise the given values (warps
    default 4; heads None = `plan`'s default). The benchmark resolves its "auto" rows through this too."""
    if S == 1 and heads_per_program is None and num_splits is None:     # decode: the launch sweep's best
        heads_per_program, num_warps = _decode_launch(B, H, T, num_warps)
    return heads_per_program, num_warps or 4


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        if dev.platform in ("gpu", "cuda"):
            return int(getattr(dev, "core_count", None) or DEFAULT_SMS)
    except Exception:  # noqa: BLE001 - no device information: use the default
        pass
    return DEFAULT_SMS


def auto_splits(programs: int, nb: int, sms: int) -> int:
    """Number of list splits for `programs` (rows x head groups) programs over `nb` 64-blocks on `sms` SMs.

    No split once the programs half-fill the GPU (a split costs partial writes, a combine and, exact, a pre-pass).
    Otherwise the smallest divisor of nb that gives every SM a program (splits of equal length: a static trip
    count, no padding); all nb splits (one block each) when no divisor reaches that.
    """
    if nb <= 1 or 2 * programs >= sms:
        return 1
    want = -(-sms // programs)
    for d in range(2, nb + 1):
        if nb % d == 0 and d >= want:
            return d
    return nb


def plan(B: int, S: int, H: int, T: int, *, block: int = BLOCK, heads_per_program: int | None = None,
         num_splits: int | None = None, interpret: bool = False, sms: int | None = None) -> dict:
    """The launch the kernel will use for these shapes: padded heads Hp, heads per program hb, head groups G,
    64-blocks nb (after padding T), splits P, blocks per split bps, programs."""
    Hp = H if interpret else -(-H // MIN_HEADS) * MIN_HEADS      # tl.dot: M >= 16 and power-of-2 blocks
    hb = heads_per_program or _pick_hb(Hp)
    if Hp % hb:
        raise ValueError(f"sparse_attention(gpu): heads_per_program={hb} does not divide H={Hp}")
    G = Hp // hb
    nb = max(1, -(-T // block))
    R = B * S
    P = num_splits if num_splits is not None else auto_splits(R * G, nb, sms or _num_sms())
    P = max(1, min(int(P), nb))
    bps = -(-nb // P)
    P = -(-nb // bps)                                            # no empty split
    return dict(Hp=Hp, hb=hb, G=G, nb=nb, P=P, bps=bps, programs=R * G * P)


# ---- the entry point -----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("scale", "block", "heads_per_program", "num_splits", "exact",
                                             "prefetch", "prepass_heads", "num_warps", "num_stages", "interpret"))
def sparse_attention(q, kv, idx, sink, scale: float, *, block: int = BLOCK, heads_per_program: int | None = None,
                     num_splits: int | None = None, exact: bool = True, prefetch: bool = False,
                     prepass_heads: int | None = None, num_warps: int | None = None, num_stages: int = 3,
                     interpret: bool = False):
    """q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 (-1 masked), sink [H] f32 -> [B,S,H,K] (q.dtype).

    Same function as reference.sparse_attention (block=64 gives the reference numerics). `heads_per_program` heads
    share one program (default: 32 if H divides, else 16, else H); H below 16 is zero-padded to 16.
    `num_splits`: None picks from the shapes (`plan` / `auto_splits`), 1 = the single-pass kernel, n > 1 cuts
    each list into n chunks of whole 64-blocks (rounded so that none is empty). `exact` (only with splits): run the
    block-max pre-pass so the bf16 rounding of probabilities matches the reference (see the module docstring).
    `prefetch`: gather the next 64-block into registers while computing the current one (a launch variant for
    the benchmark sweep; same results). `prepass_heads`: heads per program of the block-max pre-pass (default:
    the main kernel's; all heads in one program read each KV row once).
    Launch defaults (32 heads, 4 warps, 3 stages) were the fastest of a small sweep on an H100 for the single-pass
    kernel, Flash and Pro shapes, decode and prefill (docs/benchmarks.md).
    """
    B, S, H, K = q.shape
    T = idx.shape[-1]
    if T == 0:
        return jnp.zeros_like(q)
    heads_per_program, num_warps = launch_defaults(B, S, H, T, heads_per_program, num_splits, num_warps)
    p = plan(B, S, H, T, block=block, heads_per_program=heads_per_program, num_splits=num_splits,
             interpret=interpret)
    Hp, hb, G, nb, P, bps = p["Hp"], p["hb"], p["G"], p["nb"], p["P"], p["bps"]
    if Hp != H:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, Hp - H), (0, 0)))
        sink = jnp.pad(sink, (0, Hp - H))
    sink = sink.astype(jnp.float32)
    idx = idx.astype(jnp.int32)
    pad = P * bps * block - T                                    # whole blocks, whole splits; -1 is neutral
    if pad:
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    R = B * S
    qr = q.reshape(R, Hp, K)
    idx = idx.reshape(R, P * bps * block)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    q_spec = pl.BlockSpec((None, hb, K), lambda g, c, r: (r, g, 0))
    exact = exact and P > 1
    nbt = P * bps                                                # blocks after padding
    extra_in, extra_specs = [], []
    if exact:
        hb2 = prepass_heads or hb
        if Hp % hb2:
            raise ValueError(f"sparse_attention(gpu): prepass_heads={hb2} does not divide H={Hp}")
        bm = pl.pallas_call(
            functools.partial(_blockmax_kernel, S=S, block=block, scale=float(scale)),
            grid=(Hp // hb2, nbt, R),
            in_specs=[pl.BlockSpec((None, hb2, K), lambda g, j, r: (r, g, 0)), pl.no_block_spec, pl.no_block_spec],
            out_specs=pl.BlockSpec((None, None, hb2), lambda g, j, r: (r, j, g)),
            out_shape=jax.ShapeDtypeStruct((R, nbt, Hp), jnp.float32),
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret,
            name="sparse_attention_blockmax_gpu",
        )(qr, kv, idx)
        extra_in, extra_specs = [bm], [pl.no_block_spec]
    kernel = functools.partial(_attn_kernel, S=S, bps=bps, nb=nbt, block=block, scale=float(scale),
                               exact=exact, final=P == 1, prefetch=prefetch)
    if P == 1:
        out = pl.pallas_call(
            kernel,
            grid=(G, 1, R),
            in_specs=[q_spec, pl.no_block_spec, pl.no_block_spec, pl.BlockSpec((hb,), lambda g, c, r: (g,))],
            out_specs=pl.BlockSpec((None, hb, K), lambda g, c, r: (r, g, 0)),
            out_shape=jax.ShapeDtypeStruct((R, Hp, K), q.dtype),
            compiler_params=params,
            interpret=interpret,
            name="sparse_attention_gpu",
        )(qr, kv, idx, sink)
    else:
        acc, m, l = pl.pallas_call(
            kernel,
            grid=(G, P, R),
            in_specs=[q_spec, pl.no_block_spec, pl.no_block_spec, *extra_specs],
            out_specs=[pl.BlockSpec((None, None, hb, K), lambda g, c, r: (r, c, g, 0)),
                       pl.BlockSpec((None, None, hb), lambda g, c, r: (r, c, g)),
                       pl.BlockSpec((None, None, hb), lambda g, c, r: (r, c, g))],
            out_shape=[jax.ShapeDtypeStruct((R, P, Hp, K), jnp.float32),
                       jax.ShapeDtypeStruct((R, P, Hp), jnp.float32),
                       jax.ShapeDtypeStruct((R, P, Hp), jnp.float32)],
            compiler_params=params,
            interpret=interpret,
            name="sparse_attention_split_gpu",
        )(qr, kv, idx, *extra_in)
        out = _combine(acc, m, l, sink).astype(q.dtype)
    return out.reshape(B, S, Hp, K)[:, :, :H]
