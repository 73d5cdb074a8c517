"""Skinny linear (decode: M <= 64 rows) for NVIDIA GPUs: Pallas with the Triton backend.

y[m, o] = sum_k x[m, k] * W[o, k], W [O, K] stored bf16, or FP8 e4m3 with E8M0 128x128 block scales
([ceil(O/128), ceil(K/128)], passed to the kernel as fp32 powers of two).

Why: at decode the linears are memory bound -- the weight read is the cost. Dequantising W to bf16 in XLA and
calling cuBLAS reads 1 + writes 2 + reads 2 bytes per FP8 parameter; this kernel reads each weight byte once and
decodes it in registers.

Tiling. All M rows live in one program: x is [M, K] bf16, padded (by clamped loads, never in memory) to
Mp = the next power of two >= max(M, 16) rows (Triton tensors must have power-of-two sizes; tl.dot needs >= 16).
The grid is (O / block_n, splits), O tiles fastest (the programs in flight share one K range of x, from L2).
Program (j, s) owns weight rows [j*block_n, (j+1)*block_n) and the s-th of `splits` equal K ranges; it loops over
its range in block_k steps (block_k <= 128, a power of two: one E8M0 scale per (O block, K block) covers the whole
[block_n, block_k] tile since block_n and block_k divide 128):
    w tile [block_n, block_k] (fp8 or bf16)  -> fp32 -> * scale (exact: a power of two) -> bf16 (exact)
    acc [block_n, Mp] fp32 += w_tile . x_tile^T         (w_lhs: the decoded tile is the dot's register operand)
and stores acc^T masked to the M real rows into partial[s] ([splits, M, O] fp32). The wrapper sums the splits in
a fixed order (s = 0, 1, ...) -- deterministic, no atomics. Every weight byte is loaded exactly once.

Numerics. bf16 x: fp32 accumulation of exact bf16 x bf16 products (the reference's graph up to summation order).
fp32 x (the output head, fp32 router/compressor inputs): x = hi + mid + lo exactly, hi = bf16(x),
mid = bf16(x - hi), lo = bf16(x - hi - mid) (each subtraction exact in fp32; a float32 has 24 significant bits,
three bf16s carry 3 x 8). The three parts are stacked as 3M rows through the same kernel and the results summed
(hi + mid) + lo in fp32: the fp32-x times bf16-W product to within fp32 summation rounding (fp32 values below
~2^-110, where lo would be a bf16 subnormal, are the only exception). Roundings go through reduce_precision
(`quant.round_to`) so XLA cannot drop them. Output: fp32, or bf16 by RNE of the fp32 result.

Launch parameters: `launch` (unmeasured defaults, see there); every one can be overridden.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import bf16_parts

f32 = jnp.float32
bf16 = jnp.bfloat16
SMEM_BUDGET = 160 * 1024          # bytes of shared memory the pipelined loads may use (H100: 227 KB per block)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pow2_dividing(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    b = cap
    while b > 1 and n % b:
        b //= 2
    return b


def padded_rows(rows: int) -> int:
    """Rows of the in-kernel x tile and accumulator: a power of two >= 16."""
    return max(16, _pow2_at_least(rows))


def launch(rows: int, O: int, K: int, w_bytes: int = 1, sms: int = 132):
    """Default (block_n, block_k, splits, num_warps, num_stages) for `rows` kernel rows (3M for fp32 x), an [O, K]
    weight of `w_bytes` bytes per element, `sms` SMs (H100: 132). Design rules, not yet tuned by measurement:
      * block_n 64 for Mp <= 32; 128 above (x is re-read from L2 once per O tile: per step the x tile is Mp*256
        bytes against block_n*128*w_bytes of weight), unless 64 gives more programs where 128 gives < 2 per SM.
        Lowered to divide O and to keep the accumulator block_n * Mp <= 16384 fp32.
      * block_k 128 (one scale per step), halved until 3 pipeline stages fit SMEM_BUDGET; num_stages 4 if 4 fit.
      * num_warps 4, or 8 when the accumulator block_n * Mp exceeds 4096 fp32 (<= 64 registers per thread).
      * splits: the smallest divisor of the K steps giving >= 2 programs per SM, but at most K*w_bytes/(16*rows)
        (the fp32 partials written and re-read, 8*splits*rows*O bytes, stay <= half the weight bytes).
    """
    mp = padded_rows(rows)
    best = None
    for cap in ((128, 64) if mp > 32 else (64,)):
        bn = _pow2_dividing(O, cap)
        while bn > 16 and bn * mp > 16384:             # accumulator <= 64 fp32 registers per thread at 8 warps
            bn //= 2
        bk = _pow2_dividing(K, 128)
        stage = lambda bk: (bn * w_bytes + mp * 2) * bk
        while bk > 32 and 3 * stage(bk) > SMEM_BUDGET:
            bk //= 2
        num_stages = 4 if 4 * stage(bk) <= SMEM_BUDGET else 3
        num_warps = 4 if bn * mp <= 4096 else 8
        steps, tiles = K // bk, O // bn
        splits = 1
        for d in range(1, steps + 1):
            if steps % d == 0 and 16 * d * rows <= K * w_bytes:
                splits = d
                if tiles * d >= 2 * sms:
                    break
        if best is None or tiles * splits > best[0]:
            best = (tiles * splits, (bn, bk, splits, num_warps, num_stages))
        if best[0] >= 2 * sms:
            break
    return best[1]


def _kernel(x_ref, w_ref, *rest, M, bn, bk, steps, mp, w_lhs):
    s_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    j = pl.program_id(0)                                       # O tile
    s = pl.program_id(1)                                       # K split
    iota = lambda n: jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    rows = iota(mp)
    xr = jnp.minimum(rows, M - 1)[:, None]                     # rows past M: loads clamped, results never stored
    o0 = pl.multiple_of(j * bn, bn)
    cols = o0 + iota(bn)
    ob = o0 // 128                                             # the tile's 128-row scale block
    nt = (((1,), (1,)), ((), ()))                              # a . b^T

    def body(i, acc):
        k0 = pl.multiple_of((s * steps + i) * bk, bk)
        kc = (k0 + iota(bk))[None, :]
        xt = x_ref[xr, kc]                                     # [mp, bk] bf16
        wt = w_ref[cols[:, None], kc]                          # [bn, bk] fp8 / bf16
        if s_ref is not None:
            wt = (wt.astype(f32) * s_ref[ob, k0 // 128]).astype(bf16)
        else:
            wt = wt.astype(bf16)
        if w_lhs:
            return acc + jax.lax.dot_general(wt, xt, nt, preferred_element_type=f32)
        return acc + jax.lax.dot_general(xt, wt, nt, preferred_element_type=f32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, mp) if w_lhs else (mp, bn), f32))
    if w_lhs:
        acc = acc.T
    mask = jnp.broadcast_to((rows < M)[:, None], (mp, bn))
    pltriton.store(o_ref.at[s, rows[:, None], cols[None, :]], acc, mask=mask)


def split3(x: jax.Array) -> jax.Array:
    """fp32 [M, K] -> bf16 [3M, K] = (hi, mid, lo) with hi + mid + lo == x exactly (see the module docstring)."""
    return jnp.concatenate(bf16_parts(x.astype(f32)))


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_n", "block_k", "splits", "num_warps",
                                             "num_stages", "w_lhs", "interpret"))
def linear(x, w, scale=None, *, out_dtype=f32, block_n: int | None = None, block_k: int | None = None,
           splits: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
           w_lhs: bool = True, interpret: bool = False):
    """x [M, K] (bf16, or fp32 through the exact 3-way bf16 split), w [O, K] bf16 or float8_e4m3fn (scale: E8M0
    [ceil(O/128), ceil(K/128)] or None) -> [M, O] out_dtype, fp32 accumulation. O and K must be multiples of 16.

    Launch parameters left None take `launch`'s defaults; block_n and block_k must be powers of two dividing 128
    and O, K respectively; splits must divide K / block_k. w_lhs: compute acc^T = w_tile . x_tile^T.
    """
    M, K = x.shape
    O, Kw = w.shape
    if Kw != K:
        raise ValueError(f"linear(gpu): x has K={K} inputs, the weight {w.shape} has {Kw}")
    if w.dtype not in (bf16, jnp.float8_e4m3fn):
        raise ValueError(f"linear(gpu): weight dtype {w.dtype} unsupported (bf16 or float8_e4m3fn)")
    if scale is not None and scale.shape != (-(-O // 128), -(-K // 128)):
        raise ValueError(f"linear(gpu): scale shape {scale.shape} != {(-(-O // 128), -(-K // 128))} "
                         f"for a weight of shape {w.shape}")
    if O % 16 or K % 16 or O * K >= 2 ** 31:
        raise ValueError(f"linear(gpu): weight shape {w.shape} unsupported (O and K multiples of 16, O*K < 2^31)")
    if M == 0:
        return jnp.zeros((0, O), out_dtype)
    xs = x if x.dtype == bf16 else split3(x)
    R = xs.shape[0]
    d = launch(R, O, K, w.dtype.itemsize)
    bn, bk, ns, nw, st = (v or dv for v, dv in zip((block_n, block_k, splits, num_warps, num_stages), d))
    if 128 % bn or O % bn or 128 % bk or K % bk or (K // bk) % ns:
        raise ValueError(f"linear(gpu): block_n={bn}, block_k={bk}, splits={ns} do not tile weight {w.shape}")
    args = [xs, w]
    if scale is not None:
        from v4jax.quant import e8m0_to_f32
        args.append(e8m0_to_f32(scale))
    kernel = functools.partial(_kernel, M=R, bn=bn, bk=bk, steps=K // bk // ns, mp=padded_rows(R), w_lhs=w_lhs)
    part = pl.pallas_call(
        kernel,
        grid=(O // bn, ns),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((ns, R, O), f32),
        compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=st),
        interpret=interpret,
        name="linear_fp8" if scale is not None else "linear_bf16",
    )(*args)
    y = part[0]
    for i in range(1, ns):                                    # fixed order, one fused XLA elementwise kernel
        y = y + part[i]
    if R != M:
        y = (y[:M] + y[M:2 * M]) + y[2 * M:]
    if jnp.dtype(out_dtype) == bf16:
        y = jax.lax.reduce_precision(y, exponent_bits=8, mantissa_bits=7)
    return y.astype(out_dtype)
