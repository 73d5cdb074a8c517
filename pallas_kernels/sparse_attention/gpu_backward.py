"""The backward of sparse attention for NVIDIA GPUs when the KV pool is long: Pallas with the Triton backend.

What: dq, dkv, dsink of `reference.sparse_attention` (q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 with -1 =
masked, sink [H] fp32), given the output cotangent dO and the forward's output O, without materialising the
[B, S, T, K] gathered rows that the jnp reference's VJP builds (and scatter-adds back: ~34% of a 1b training step
at 8K tokens on an H100, docs/STATUS.md).

Why a kernel: `backward.pool_backward` (dense matmuls over the pool with list multiplicities) is the right form
while the pool is at most ~8x the list; training at 8K+ tokens has a pool of S window rows + S/4 or S/128
compressed entries against lists of 128 + top-k entries, so the pool form would compute (and store) [S, H, N]
scores for mostly empty multiplicities. This kernel works on the lists, like the forward (gpu.py).

The function (per query row, head h; p and o are those of the forward's softmax with the sink):
    z_j = scale * q . kv_j,  m = max_j z_j (0 if the whole list is masked),
    denom = sum_j exp(z_j - m) + exp(sink - m),  p_j = exp(z_j - m) / denom,  o = sum_j p_j kv_j
    D = sum_k dO * O,  dz_j = p_j (dO . kv_j - D)
    dq = scale * sum_j dz_j kv_j
    dkv[idx_j] += scale * sum_h dz_j q + sum_h p_j dO        (every list entry is its own term: an index listed
                                                              twice gets both contributions, like the reference)
    dsink = -sum_{rows} D * exp(sink - m) / denom
Masked entries (-1) have p = dz = 0 and write nothing; an all-masked row has p = 0 everywhere, dq = 0, and
contributes -D to dsink (D = 0 there since its output is 0).

Launch: one program = one query row (b, s) x one group of `hb` heads (grid G x B*S; no query blocks, so any S
works). All heads of the group share
the gathered KV rows, so the scores are a [hb, K] x [K, bt] matmul per block of `bt` list entries. A program walks
its list twice:
  1. statistics: QK^T per block, online max m and sum l -> m, 1 / denom (the forward kernel's outputs are the
     normalised O only, so these are recomputed: one extra QK^T pass, ~1/6 of the kernel's matmul work);
  2. gradients: per block, recompute z, dP = dO . KV^T, p, dz; accumulate dq in fp32 registers; form the block's
     row gradients dkv_rows [bt, K] = scale * dz^T q + p^T dO (fp32) and add them into an fp32 [B, N, K] buffer
     with `pltriton.atomic_add` (masked rows: the atomic's mask). dsink's per-row terms D exp(sink - m) / denom
     are written per program and summed by XLA.
  D = sum(dO * O) is computed in the program from the forward's output O (saved as a residual, as FlashAttention
  does), not recomputed from P.V.

Tiles and resource limits (K = 512, H = 64 in Flash): the live tiles of a program are q and dO [hb, K] (bf16),
the dq accumulator [hb, K] fp32 and, per block, the gathered rows [bt, K] (bf16) and dkv_rows [bt, K] fp32. At
hb = 64, bt = 64, K = 512 that is > 400 KB per program, far beyond the register file (64K 32-bit registers per
SM, <= 255 per thread) -- Triton would spill everything or fail on shared memory. So:
  * heads are split over programs: `heads_per_program` (default min(H, 64); Triton's tl.dot needs M >= 16, fewer
    heads are zero-padded to 16; padded heads have q = dO = O = 0, so dz = p^T dO = 0 and they add nothing);
  * K is split inside the program: `k_chunk` (default 64) -- the scores are accumulated over K chunks, and the
    dq / dkv products are formed per chunk (dq is a tuple of [hb, k_chunk] accumulators, each dkv chunk
    [bt, k_chunk] is added atomically on its own); the chunk's rows are re-gathered for the second half of the
    block (an L1/L2 hit) rather than kept live, so a block holds [bt, k_chunk] tiles, not [bt, K];
  * `block` (bt, default 16 with 64 heads per program, else 32) list entries per step.
Defaults (8 warps): the best of `scripts/probe_attention_backward.py --sweep` on an H100 at S = 8192, T = 640,
K = 512 (docs/benchmarks.md, session 5): H = 16: k_chunk 64 + 8 warps 17.4 ms (the session 4 launch -- 16 heads,
bt 32, k_chunk 128, 4 warps -- 20.8 ms); H = 64: 64 heads per program, bt 16, k_chunk 64, 8 warps 61.1 ms (80.1 ms).
The live set at 64 heads is dominated by the dq accumulator ([64, 512] fp32, 128 registers per thread at 256
threads); one head group per query row then reads the gathered rows once instead of four times.
The lowering test (tests/test_sparse_attention_backward.py) builds the Triton IR at Flash training shapes; it
cannot check PTX resource limits, which only a GPU run (scripts/probe_attention_backward.py) checks.
Cost model at H = 64: G = H / hb programs per row each gather the row's listed rows (mostly from L2: the pool is
~10 MB) three times with K chunks (statistics, scores, products; twice with one chunk) and add their partial dkv
rows: G x B x S x T x K fp32 atomics (one program per row at the 1b model's H = 16). Larger hb means fewer
atomics but larger tiles; the probe sweeps (hb, bt, k_chunk, warps, stages).

Numerics:
  * the gradient of the reference's function, with the VJP of its bf16 rounding of block probabilities taken as
    the identity (as backward.py does; JAX's own VJP of reduce_precision rounds the cotangent dP to bf16 -- the
    kernel does not);
  * scores, softmax statistics, dP, dz and all accumulators in fp32; for bf16 inputs the tensor-core operands p
    and dz are rounded to bf16 for the dq / dkv products (FlashAttention's practice), and D uses the forward's
    bf16 output O -- both are ~2^-9 relative effects; fp32 inputs use fp32 (IEEE) dots throughout;
  * p = exp(z - m) / denom with the exact final max m (the forward's blocking of the list is irrelevant here);
  * dkv: the atomic adds land in an order set by the hardware scheduler, so dkv's fp32 summation order -- and its
    last bits -- are NONDETERMINISTIC from run to run on a GPU (dq and dsink are deterministic); it is rounded to
    kv.dtype once at the end, so a bf16 dkv can differ by one ulp between runs.
Interpret mode (CPU tests): Pallas's interpreter discharges an atomic add at gathered indices as
`ref.at[ids].set(ref[ids] + val)`, which drops all but one of duplicate indices, and it rejects `mask`; the
interpret path therefore adds the block's rows one at a time (a scalar-index atomic add per row, masked rows add
0 to row 0). The GPU path is the vector atomic with a mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .gpu import MIN_HEADS

f32 = jnp.float32

BLOCK = 32            # list entries per step (16 when a program holds 64 or more heads)
HEADS = 64            # heads per program (at most)
K_CHUNK = 64          # K columns per product chunk
NUM_WARPS = 8
NUM_STAGES = 1


# ---- kernel -----------------------------------------------------------------------------------------------
def _gather(kv_ref, b, ids, valid, c0: int, kc: int):
    """Rows ids[valid] of batch b, columns [c0, c0 + kc): [bt, kc]; masked rows are not read (value 0)."""
    cols = c0 + jax.lax.broadcasted_iota(jnp.int32, (1, kc), 1)
    bt = ids.shape[0]
    return pltriton.load(kv_ref.at[b, jnp.where(valid, ids, 0)[:, None], cols],
                         mask=jnp.broadcast_to(valid[:, None], (bt, kc)), other=0)


def _dot_t(a, b):
    """a [m, k] . b [n, k]^T -> [m, n] fp32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32)


def _dot_tn(a, b):
    """a [k, m]^T . b [k, n] -> [m, n] fp32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32)


def _scatter_add(dkv_ref, b, ids, valid, c0: int, vals, interpret: bool):
    """dkv_ref[b, ids[i], c0:c0+kc] += vals[i] for the valid rows i."""
    bt, kc = vals.shape
    if not interpret:
        cols = c0 + jax.lax.broadcasted_iota(jnp.int32, (1, kc), 1)
        pltriton.atomic_add(dkv_ref, (b, jnp.where(valid, ids, 0)[:, None], cols), vals,
                            mask=jnp.broadcast_to(valid[:, None], (bt, kc)))
        return
    safe = jnp.where(valid, ids, 0)
    vals = jnp.where(valid[:, None], vals, 0.0)

    def one(i, carry):        # interpret: scalar-index atomics (duplicates add up; see the module docstring)
        pltriton.atomic_add(dkv_ref, (b, safe[i], pl.ds(c0, kc)), vals[i])
        return carry
    jax.lax.fori_loop(0, bt, one, 0)


def _bwd_kernel(q_ref, do_ref, o_ref, kv_ref, idx_ref, sink_ref, _dkv_in, dq_ref, ds_ref, dkv_ref, *,
                S: int, nb: int, bt: int, kc: int, scale: float, interpret: bool):
    """Program (g, r): heads group g, query row r = b * S + s."""
    r = pl.program_id(1)
    b = r // S
    hb, K = q_ref.shape
    chunks = [(c0, min(kc, K - c0)) for c0 in range(0, K, kc)]
    single = len(chunks) == 1

    def block_ids(j):
        ids = idx_ref[r, pl.ds(j * bt, bt)]
        return ids, ids >= 0

    def scores(ids, valid, with_dp: bool):
        """z [hb, bt] (-inf where masked), dP [hb, bt] (or None), and the rows if K is one chunk."""
        z = dp = rows = None
        for c0, w in chunks:
            rows = _gather(kv_ref, b, ids, valid, c0, w)
            zc = _dot_t(q_ref[:, pl.ds(c0, w)], rows)
            z = zc if z is None else z + zc
            if with_dp:
                dc = _dot_t(do_ref[:, pl.ds(c0, w)], rows)
                dp = dc if dp is None else dp + dc
        z = jnp.where(valid[None, :], z * scale, -jnp.inf)
        return z, dp, (rows if single else None)

    # 1. softmax statistics over the whole list (online max / sum, as the forward)
    def stats_body(j, carry):
        m, l = carry
        ids, valid = block_ids(j)
        z, _, _ = scores(ids, valid, False)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_use))
        return m_new, l * alpha + jnp.sum(jnp.exp(z - m_use[:, None]), axis=1)

    m, l = jax.lax.fori_loop(0, nb, stats_body, (jnp.full((hb,), -jnp.inf, f32), jnp.zeros((hb,), f32)))
    m = jnp.where(m == -jnp.inf, 0.0, m)
    es = jnp.exp(sink_ref[...] - m)
    inv = 1.0 / (l + es)
    D = jnp.sum(do_ref[...].astype(f32) * o_ref[...].astype(f32), axis=1)          # [hb]
    ds_ref[...] = D * es * inv

    # 2. gradients
    cd = q_ref.dtype

    def grad_body(j, dq):
        ids, valid = block_ids(j)
        z, dp, rows = scores(ids, valid, True)
        p = jnp.exp(z - m[:, None]) * inv[:, None]                                   # 0 where masked
        dz = p * (dp - D[:, None])
        pc, dzc = p.astype(cd), dz.astype(cd)
        out = []
        for (c0, w), acc in zip(chunks, dq):
            rc = rows if single else _gather(kv_ref, b, ids, valid, c0, w)
            out.append(acc + jnp.dot(dzc, rc, preferred_element_type=f32))
            rows_grad = scale * _dot_tn(dzc, q_ref[:, pl.ds(c0, w)]) + _dot_tn(pc, do_ref[:, pl.ds(c0, w)])
            _scatter_add(dkv_ref, b, ids, valid, c0, rows_grad, interpret)
        return tuple(out)

    dq = jax.lax.fori_loop(0, nb, grad_body, tuple(jnp.zeros((hb, w), f32) for _, w in chunks))
    for (c0, w), acc in zip(chunks, dq):
        dq_ref[:, pl.ds(c0, w)] = (scale * acc).astype(dq_ref.dtype)


# ---- entry point ------------------------------------------------------------------------------------------
def plan(H: int, K: int, T: int, *, heads_per_program: int | None = None, block: int | None = None,
         k_chunk: int | None = None, interpret: bool = False) -> dict:
    """The launch for these shapes: padded heads Hp, heads per program hb, head groups G, list block bt, padded
    list length Tp, blocks nb, K chunk kc."""
    Hp = H if interpret else -(-H // MIN_HEADS) * MIN_HEADS       # tl.dot: M >= 16
    hb = heads_per_program or min(Hp, HEADS)
    if interpret and heads_per_program is None:
        hb = next(d for d in range(min(Hp, HEADS), 0, -1) if Hp % d == 0)
    if Hp % hb:
        raise ValueError(f"sparse_attention backward (gpu): heads_per_program={hb} does not divide H={Hp}")
    block = block or (16 if hb >= 64 else BLOCK)
    kc = min(K, k_chunk or K_CHUNK)
    if K % kc:
        raise ValueError(f"sparse_attention backward (gpu): k_chunk={kc} does not divide K={K}")
    if not interpret:          # Triton: power-of-2 tensor shapes; tl.dot: every dimension >= 16
        for name, v in (("heads_per_program", hb), ("block", block), ("k_chunk", kc)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"sparse_attention backward (gpu): {name}={v} must be a power of 2 >= 16")
    nb = max(1, -(-T // block))
    return dict(Hp=Hp, hb=hb, G=Hp // hb, bt=block, Tp=nb * block, nb=nb, kc=kc)


@functools.partial(jax.jit, static_argnames=("scale", "block", "heads_per_program", "k_chunk", "num_warps",
                                             "num_stages", "interpret"))
def sparse_attention_bwd(q, kv, idx, sink, out, g, scale: float, *, block: int | None = None,
                         heads_per_program: int | None = None, k_chunk: int | None = None,
                         num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES, interpret: bool = False):
    """(dq, dkv, dsink) of reference.sparse_attention at (q, kv, idx, sink, scale) for the output cotangent g.

    q [B,S,H,K], kv [B,N,K], idx [B,S,T] int32 (-1 masked), sink [H] fp32, out [B,S,H,K] = the forward's output,
    g [B,S,H,K] -> dq [B,S,H,K] (q.dtype), dkv [B,N,K] (kv.dtype), dsink [H] (sink.dtype). Launch parameters:
    see the module docstring. dkv is summed with fp32 atomics: its last bits are nondeterministic on a GPU.
    """
    B, S, H, K = q.shape
    N, T = kv.shape[1], idx.shape[-1]
    if T == 0 or S == 0:
        return jnp.zeros_like(q), jnp.zeros_like(kv), jnp.zeros_like(sink)
    p = plan(H, K, T, heads_per_program=heads_per_program, block=block, k_chunk=k_chunk, interpret=interpret)
    Hp, hb, G, bt, Tp, nb, kc = (p[k] for k in ("Hp", "hb", "G", "bt", "Tp", "nb", "kc"))
    cd = jnp.promote_types(q.dtype, kv.dtype)                  # tl.dot: one operand type
    R = B * S
    pad_h = ((0, 0), (0, Hp - H), (0, 0))
    qr, gr, orr = (jnp.pad(a.astype(cd).reshape(R, H, K), pad_h) for a in (q, g, out))
    sinkp = jnp.pad(sink.astype(f32), (0, Hp - H))
    idxr = jnp.pad(idx.astype(jnp.int32).reshape(R, T), ((0, 0), (0, Tp - T)), constant_values=-1)
    head_spec = pl.BlockSpec((None, hb, K), lambda gi, r: (r, gi, 0))
    kernel = functools.partial(_bwd_kernel, S=S, nb=nb, bt=bt, kc=kc, scale=float(scale), interpret=interpret)
    dq, ds, dkv = pl.pallas_call(
        kernel,
        grid=(G, R),
        in_specs=[head_spec, head_spec, head_spec, pl.no_block_spec, pl.no_block_spec,
                  pl.BlockSpec((hb,), lambda gi, r: (gi,)), pl.no_block_spec],
        out_specs=[head_spec, pl.BlockSpec((None, hb), lambda gi, r: (r, gi)), pl.no_block_spec],
        out_shape=[jax.ShapeDtypeStruct((R, Hp, K), q.dtype), jax.ShapeDtypeStruct((R, Hp), f32),
                   jax.ShapeDtypeStruct((B, N, K), f32)],
        input_output_aliases={6: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_attention_bwd_gpu",
    )(qr, gr, orr, kv.astype(cd), idxr, sinkp, jnp.zeros((B, N, K), f32))
    dq = dq[:, :H].reshape(B, S, H, K)
    dsink = -jnp.sum(ds[:, :H], axis=0)
    return dq, dkv.astype(kv.dtype), dsink.astype(sink.dtype)
