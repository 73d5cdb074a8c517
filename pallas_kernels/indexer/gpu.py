"""Lightning-indexer scores and top-k for NVIDIA GPUs: Pallas with the Triton backend.

    I[b, t, c] = bf16( sum_h f32( bf16( w[b,t,h] * relu(bf16(q[b,t,h] . K[b,c])) ) ) )

One program = one tile of `tq` queries x `tc` keys of one sequence: the key tile is loaded once and reused by every
query of the tile; per query the nI heads give the matmul its M dimension ([nI, dI] x [dI, tc]), then the bf16
ReLU / weighting / head sum of the reference (reference.py) follow in registers. Heads below 16 are zero-padded
(zero q and zero weight add exactly 0). The head sum runs in fp32 in a different order than XLA's reduction, so
a score can differ from the reference by one bf16 rounding step on rare ties.

The top-k (`index_topk`, below) selects over the bf16 scores as 16-bit keys, without sorting the row.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ._tiles import pad_to_tiles

MIN_HEADS = 16


def _fp4_keys(k_ref, C: int, tc: int, dI: int):
    """The key tile [tc, dI] (bf16, exact) of program axis 2 from FP4 cache rows (uint8 [B, C, dI/2 + dI/32]:
    packed e2m1 pairs, element 2i in the low nibble, then one UE8M0 code per 32 values), decoded in registers
    with the grouped matmul's tile decode (codes 1..254; a stored key's are >= 1, quant.quantize_fp4_weight)."""
    from pallas_kernels.grouped_matmul.gpu import fp4_decode_tile
    b, j = pl.program_id(0), pl.program_id(2)
    iota = lambda n: jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    r = jnp.minimum(j * tc + iota(tc), C - 1)[:, None]                 # rows past C: computed, sliced off
    packed = k_ref[b, r, iota(dI // 2)[None, :]].astype(jnp.int32)     # [tc, dI/2]
    codes = k_ref[b, r, (dI // 2 + iota(dI // 32))[None, :]].astype(jnp.int32)
    lo, hi = fp4_decode_tile(packed, codes)                            # even / odd dims, bf16 [tc, dI/2] each
    return jnp.stack([lo, hi], axis=-1).reshape(tc, dI)


def _kernel(q_ref, w_ref, k_ref, o_ref, *, tq: int, fp4: tuple | None = None):
    keys = _fp4_keys(k_ref, *fp4) if fp4 else k_ref[...]               # [tc, dI] bf16

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
    """q [B,S,nI,dI], w [B,S,nI], keys [B,C,dI] -> [B,S,C] (q.dtype); same function as reference.scores.

    keys may also be the production cache's FP4 rows, uint8 [B, C, dI/2 + dI/32] (`v4jax.indexer.store_keys`):
    each key tile is then decoded in registers (reference.cached_scores), so the decode reads 68 bytes per key
    instead of writing and re-reading a bf16 copy of every key."""
    B, S, nI, dI = q.shape
    C = keys.shape[1]
    fp4 = keys.dtype == jnp.uint8
    if fp4 and keys.shape[2] != dI // 2 + dI // 32:
        raise ValueError(f"index_scores(gpu): FP4 key rows of {keys.shape[2]} bytes, expected {dI // 2 + dI // 32} "
                         f"for dI={dI}")
    if C == 0 or S == 0:
        return jnp.zeros((B, S, C), q.dtype)
    nIp = nI if interpret else max(nI, MIN_HEADS)
    nIp = pl.next_power_of_2(nIp) if not interpret else nIp
    if nIp != nI:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, nIp - nI), (0, 0)))
        w = jnp.pad(w, ((0, 0), (0, 0), (0, nIp - nI)))
    tq = min(block_q, S)
    tc = min(block_c, max(16, pl.next_power_of_2(C)))
    q, w, padded, Sp, Cp = pad_to_tiles(q, w, keys, tq, tc)
    if not fp4:
        keys = padded                 # FP4 rows stay as stored (row index clamped in the kernel, not padded)
    out = pl.pallas_call(
        functools.partial(_kernel, tq=tq, fp4=(C, tc, dI) if fp4 else None),
        grid=(B, Sp // tq, Cp // tc),
        in_specs=[
            pl.BlockSpec((None, tq, nIp, dI), lambda b, i, j: (b, i, 0, 0)),
            pl.BlockSpec((None, tq, nIp), lambda b, i, j: (b, i, 0)),
            pl.no_block_spec if fp4 else pl.BlockSpec((None, tc, dI), lambda b, i, j: (b, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, tq, tc), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((B, Sp, Cp), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="index_scores_gpu",
    )(q, w.astype(q.dtype), keys)
    return out[:, :S, :C]


# ---- top-k: a threshold select per row, then a sort of the k survivors ----------------------------------------
# Index scores are bf16, so every score is a 16-bit key. `desc_keys` maps them to int32 keys 0..65535 whose
# ascending order is the scores' descending fp32 total order (NaN first, +0 before -0, -inf last); invisible
# entries get the key of -inf, padding PAD_KEY (after everything). jax.lax.top_k's result, the definition, is the
# first k entries in (key, index) order.
#
# One program selects the k smallest (key, index) pairs of one group of a row, its keys held in registers:
#   1. the threshold T: the smallest key with count(key <= T) >= k, by a search over the 17-bit key range that
#      tests `radix` thresholds per step (radix 2, the default: bisection, 17 sums of compares; 4 and 16 measured
#      no faster on an H100);
#   2. compaction: every key < T, and the first k - count(key < T) keys == T in index order (a cumsum over the
#      ties), written at their rank in index order (a cumsum over the selection) -- exactly k survivors, in
#      ascending index order, as (key, position) pairs.
# A group holds at most `max_group` entries. Longer rows -- and, at the first level, short batches of long rows,
# to fill the GPU -- are cut into groups whose survivors (k per group, group-major, so still in ascending index
# order) are selected again, until one group is left. The k survivors are then put in (key, rank) order by one
# sort of [rows, k] int32 composite keys (key << bits(k) | rank); rank order is index order, so this is
# (key, index) order: lax.top_k's, ties included.
KEY_RANGE = 1 << 16          # bf16 keys are 0 .. 65535
PAD_KEY = KEY_RANGE          # padding: after every real key
TOPK_MAX_GROUP = 4096        # entries per program (more: another level of groups). H100, against 16384: 12% faster
                             # at 4096 x 16384, 18% at one 262,144-entry decode row, 7% slower at 64 x 32768
TOPK_SMS = 132


def desc_keys(scores):
    """bf16 scores (any shape) -> int32 keys in [0, 65535]: ascending key = descending score (fp32 total order)."""
    b = jax.lax.bitcast_convert_type(scores.astype(jnp.bfloat16), jnp.int16).astype(jnp.int32)
    return 32767 - (b ^ ((b >> 15) & 0x7FFF))


NEG_INF_KEY = 32767 - ((-128) ^ 0x7FFF)      # desc_keys(-inf): bf16 bits 0xFF80 = int16 -128


def _select_kernel(nv_ref, first_ref, x_ref, key_ref, pos_ref, *, C: int, gsize: int, block: int, k: int,
                   from_scores: bool, radix: int, clamp: bool):
    """Program (r, g): the k smallest (key, index) entries of group g (columns g*gsize ..) of row r, in index
    order, into key_ref / pos_ref[r, g*k : (g+1)*k]. Column G*k of the outputs is a scratch slot for lanes that
    store nothing (interpret mode runs a masked store as a read-modify-write of every lane's address). clamp
    (interpret mode): clamp the masked-off lanes' load addresses into the row (on a GPU they are not read, and
    unclamped addresses keep the load contiguous)."""
    r, g = pl.program_id(0), pl.program_id(1)
    local = jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
    j = g * gsize + local
    inside = (local < gsize) & (j < C)
    x = pltriton.load(x_ref.at[r, jnp.minimum(j, C - 1) if clamp else j], mask=inside, other=0)
    if from_scores:
        u = jnp.where((j >= first_ref[r]) & (j < nv_ref[r]), desc_keys(x), NEG_INF_KEY)
    else:
        u = x
    u = jnp.where(inside, u, PAD_KEY)
    count = lambda pred: jnp.sum(pred.astype(jnp.int32))

    def narrow(_, lohi):          # T in [lo, hi]: test `radix` thresholds splitting the range, keep one part
        lo, hi = lohi
        step = (hi - lo) // radix + 1
        thr = jnp.minimum(lo + (jax.lax.broadcasted_iota(jnp.int32, (radix,), 0) + 1) * step - 1, hi)
        ge = jnp.sum((u[None, :] <= thr[:, None]).astype(jnp.int32), axis=1) >= k       # monotone in thr
        return jnp.max(jnp.where(ge, lo, thr + 1)), jnp.min(jnp.where(ge, thr, hi))

    steps = -(-(PAD_KEY + 1).bit_length() // (radix.bit_length() - 1))
    t, _ = jax.lax.fori_loop(0, steps, narrow, (jnp.int32(0), jnp.int32(PAD_KEY)))
    tie = (u == t).astype(jnp.int32)
    take = (u < t) | ((tie == 1) & (jnp.cumsum(tie) - tie < k - count(u < t)))
    ti = take.astype(jnp.int32)
    at = jnp.where(take, g * k + jnp.cumsum(ti) - ti, pl.num_programs(1) * k)
    pltriton.store(key_ref.at[r, at], u, mask=take)
    pltriton.store(pos_ref.at[r, at], j, mask=take)


def topk_groups(R: int, C: int, k: int, *, first_level: bool = True, max_group: int = TOPK_MAX_GROUP,
                sms: int = TOPK_SMS) -> int:
    """Entries per program for R rows of C entries: the whole row if it is at most max_group long (and, at the
    first level, the rows alone give the GPU two programs per SM); else halved (a power of two) while it stays
    >= 4k, so each level keeps at most half its entries."""
    g = C
    while g > 4 * k and (g > max_group or (first_level and R * -(-C // g) < 2 * sms)):
        g = pl.next_power_of_2(g) // 2
    return g


def _select(x, nv, first, k: int, *, from_scores: bool, max_group: int, interpret: bool,
            num_warps: int | None = None, radix: int = 2):
    """x [R, C] (bf16 scores, or int32 keys) -> (keys, positions) [R, k] int32: the k smallest (key, index) entries
    in index order (positions are column indices of x)."""
    R, C = x.shape
    gsize = topk_groups(R, C, k, first_level=from_scores, max_group=max_group)
    G = -(-C // gsize)
    block = pl.next_power_of_2(gsize)
    keys, pos = pl.pallas_call(
        functools.partial(_select_kernel, C=C, gsize=gsize, block=block, k=k, from_scores=from_scores,
                          radix=radix, clamp=bool(interpret)),
        grid=(R, G),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=[pl.no_block_spec] * 2,
        out_shape=[jax.ShapeDtypeStruct((R, G * k + 1), jnp.int32)] * 2,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps or min(16, max(4, block // 1024)),
                                                num_stages=1),
        interpret=interpret,
        name="index_topk_select_gpu",
    )(nv, first, x)
    keys, pos = keys[:, :G * k], pos[:, :G * k]
    if G == 1:
        return keys, pos
    keys, sub = _select(keys, nv, first, k, from_scores=False, max_group=max_group, interpret=interpret,
                        num_warps=num_warps, radix=radix)
    return keys, jnp.take_along_axis(pos, sub, axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "max_group", "num_warps", "radix", "interpret"))
def index_topk(index_scores, n_visible, k: int, first=0, *, max_group: int = TOPK_MAX_GROUP,
               num_warps: int | None = None, radix: int = 2, interpret: bool = False):
    """The same function as reference.topk for bf16 scores: index_scores [..., C] bf16, n_visible and first
    broadcastable to its leading shape -> int32 [..., k], the k highest visible scores' indices, highest first,
    equal scores by ascending index, -1 where fewer than k entries are visible. k <= C."""
    if index_scores.dtype != jnp.bfloat16:
        raise TypeError(f"index_topk(gpu): bf16 index scores expected, got {index_scores.dtype}")
    *lead, C = index_scores.shape
    if not 0 < k <= min(C, 1 << 14):
        raise ValueError(f"index_topk(gpu): k={k} must be in 1..min(C={C}, 16384)")
    if radix < 2 or radix & (radix - 1):
        raise ValueError(f"index_topk(gpu): radix={radix} must be a power of two >= 2")
    R = math.prod(lead)
    if R == 0:
        return jnp.zeros((*lead, k), jnp.int32)
    x = index_scores.reshape(R, C)
    nv = jnp.broadcast_to(jnp.asarray(n_visible, jnp.int32), tuple(lead)).reshape(R)
    fs = jnp.broadcast_to(jnp.asarray(first, jnp.int32), tuple(lead)).reshape(R)
    keys, pos = _select(x, nv, fs, k, from_scores=True, max_group=max_group, interpret=interpret,
                        num_warps=num_warps, radix=radix)
    bits = max(1, (k - 1).bit_length())
    order = jax.lax.sort((keys << bits) | jnp.arange(k, dtype=jnp.int32), dimension=-1) & ((1 << bits) - 1)
    idx = jnp.take_along_axis(pos, order, axis=-1)
    visible = (idx >= fs[:, None]) & (idx < nv[:, None])
    return jnp.where(visible, idx, -1).reshape(*lead, k)
