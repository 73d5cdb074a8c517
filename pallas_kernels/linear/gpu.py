"""Skinny linear (decode: M <= 64 rows) for NVIDIA GPUs: Pallas with the Triton backend.

y[m, o] = sum_k x[m, k] * W[o, k], W [O, K] stored bf16, or FP8 e4m3 with E8M0 128x128 block scales
([ceil(O/128), ceil(K/128)], passed to the kernel as their raw bytes and decoded in the kernel, `e8m0_decode`).

Why: at decode the linears are memory bound -- the weight read is the cost. Dequantising W to bf16 in XLA and
calling cuBLAS reads 1 + writes 2 + reads 2 bytes per FP8 parameter; this kernel reads each weight byte once and
decodes it in registers. At batch-1 decode the step is also dominated by tiny kernels (1-4 us each), so what used
to be separate XLA kernels around the linear runs inside it: the E8M0 scale decode (was `quant.e8m0_to_f32` in the
wrapper) and, with x_fp8=True, the activation FP8 simulation `quant.fp8_sim(x, 128)` of `layers.linear_fp8` (was 2
XLA kernels).

Two paths, one grid. The grid is (O / block_n, splits), O tiles fastest (the programs in flight share one K range
of x, from L2). Program (j, s) owns weight rows [j*block_n, (j+1)*block_n) and the s-th of `splits` equal K ranges;
it loops over its range in block_k steps (block_k <= 128, a power of two: one E8M0 scale per (O block, K block)
covers the whole [block_n, block_k] tile since block_n and block_k divide 128), and stores its partial sums in
partial[s] ([splits, R, O] fp32). The wrapper sums the splits in a fixed order (s = 0, 1, ...) -- deterministic, no
atomics. Every weight byte is loaded exactly once.
  * Tensor cores ("mma", more than GEMV_ROWS kernel rows): all R rows live in one program: the x tile is padded
    (by clamped loads, never in memory) to Mp = the next power of two >= max(R, 16) rows (Triton tensors must have
    power-of-two sizes; tl.dot needs >= 16). Per step:
        w tile [block_n, block_k] (fp8 or bf16) -> fp32 -> * scale (exact: a power of two) -> bf16 (exact)
        acc [block_n, Mp] fp32 += w_tile . x_tile^T       (w_lhs: the decoded tile is the dot's register operand)
    and acc^T is stored masked to the R real rows. `launch` gives its defaults.
  * CUDA cores ("gemv", R <= GEMV_ROWS): no dot, no padding. Per step the tile is decoded to fp32 and, for each of
    the R rows (a static loop), multiplied elementwise by that row's x block (times the tile's scale, applied to x:
    block_k multiplies instead of block_n * block_k) and accumulated in fp32: gemv_acc="step" reduces the product
    over k every step into acc [block_n] per row (registers independent of block_k; a few warp shuffles per step),
    "tile" keeps acc [block_n, block_k] per row (plain FMAs, one reduction at the end; R * block_n * block_k / threads
    accumulator registers). `unroll` steps (default GEMV_UNROLL) are loaded before any is used (more weight bytes in
    flight per warp: Triton's software pipeliner does not stage loads that feed no dot). `gemv_launch` gives its
    defaults.

Numerics. bf16 x: fp32 accumulation of exact bf16 x bf16 products (the reference's graph up to summation order).
In the GEMV path a product is (x * scale) * w8 with x bf16 (8 significant bits), w8 e4m3 (4), scale a power of two:
exact in fp32 as well (barring fp32 subnormals), so both paths equal the reference up to summation order.
fp32 x (the output head, fp32 router/compressor inputs): x = hi + mid + lo exactly, hi = bf16(x),
mid = bf16(x - hi), lo = bf16(x - hi - mid) (each subtraction exact in fp32; a float32 has 24 significant bits,
three bf16s carry 3 x 8). The three parts are stacked as R = 3M rows through the same kernel and the results summed
(hi + mid) + lo in fp32: the fp32-x times bf16-W product to within fp32 summation rounding (fp32 values below
~2^-110, where lo would be a bf16 subnormal, are the only exception). Roundings go through reduce_precision
(`quant.round_to`) so XLA cannot drop them. Output: fp32, or bf16 by RNE of the fp32 result.

x_fp8=True: each row's 128-input block is replaced in the kernel by exactly `quant.fp8_sim(x, 128)` (`fp8_sim_block`,
bit for bit): amax, the power-of-two scale and the E4M3 round-to-nearest-even are computed with integer operations
on the fp32 bits (Pallas' Triton lowering has no reduce_precision/round, and XLA removes fp8 cast round trips). The
quantised value q * s has 4 significant bits, exact in bf16, so fp32 x needs no 3-way split here (R = M) and the
products stay exact. Needs K % 128 == 0 and block_k == 128 (one x tile is one quantisation block).

Launch parameters: `launch` / `gemv_launch` (unmeasured defaults, see there); every one can be overridden.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import bf16_parts

f32 = jnp.float32
bf16 = jnp.bfloat16
i32 = jnp.int32
SMEM_BUDGET = 160 * 1024          # bytes of shared memory the pipelined loads may use (H100: 227 KB per block)
# kernel rows (3M for fp32 x without x_fp8) served by the CUDA-core path; V4JAX_DECODE_LINEAR=legacy (the session 6
# decode linears, for A/B runs: see v4jax.layers) turns it off
GEMV_ROWS = 0 if os.environ.get("V4JAX_DECODE_LINEAR") == "legacy" else 4
GEMV_ACCS = ("step", "tile")      # the CUDA-core path's accumulators (module docstring)
GEMV_ACC = "step"                 # its default: registers independent of block_k and of the row count's growth
FP8_BLOCK = 128                   # x_fp8: the activation quantisation block (quant.fp8_sim(x, 128))

GEMV_UNROLL = 1                   # GEMV steps loaded per loop iteration by default (the sweep: 2 was 5-17% slower)

# fp32 bit patterns used by the in-kernel decodes (int32)
_F32_ABS = 0x7FFFFFFF
_F32_SIGN = -(1 << 31)            # 0x80000000
_F32_2POW_M6 = 121 << 23          # 2^-6: the smallest normal E4M3 magnitude
_E4M3_DROP = -(1 << 20)           # 0xFFF00000: keep sign, exponent and 3 mantissa bits


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pow2_dividing(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    b = cap
    while b > 1 and n % b:
        b //= 2
    return b


def padded_rows(rows: int) -> int:
    """Rows of the in-kernel x tile and accumulator (tensor-core path): a power of two >= 16."""
    return max(16, _pow2_at_least(rows))


def launch(rows: int, O: int, K: int, w_bytes: int = 1, sms: int = 132, *, x_bytes: int = 2,
           min_block_k: int = 32):
    """Default (block_n, block_k, splits, num_warps, num_stages) of the tensor-core path for `rows` kernel rows (3M
    for fp32 x), an [O, K] weight of `w_bytes` bytes per element, `sms` SMs (H100: 132), x loaded with `x_bytes` per
    element (2: bf16; 4: fp32 x with x_fp8) and block_k >= min_block_k (x_fp8: 128). Design rules, not yet tuned:
      * block_n 64 for Mp <= 32; 128 above (x is re-read from L2 once per O tile: per step the x tile is Mp*256
        bytes against block_n*128*w_bytes of weight), unless 64 gives more programs where 128 gives < 2 per SM.
        Lowered to divide O and to keep the accumulator block_n * Mp <= 16384 fp32.
      * block_k 128 (one scale per step), halved (not below min_block_k) until 3 pipeline stages fit SMEM_BUDGET;
        num_stages 4 if 4 fit, else 3, else 2 (only with min_block_k forcing a large tile).
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
        stage = lambda bk: (bn * w_bytes + mp * x_bytes) * bk
        while bk > max(32, min_block_k) and 3 * stage(bk) > SMEM_BUDGET:
            bk //= 2
        num_stages = 4 if 4 * stage(bk) <= SMEM_BUDGET else 3 if 3 * stage(bk) <= SMEM_BUDGET else 2
        num_warps = 4 if bn * mp <= 4096 else 8
        steps, tiles = K // bk, O // bn
        splits = _splits(steps, tiles, rows, K, w_bytes, sms)
        if best is None or tiles * splits > best[0]:
            best = (tiles * splits, (bn, bk, splits, num_warps, num_stages))
        if best[0] >= 2 * sms:
            break
    return best[1]


def _splits(steps: int, tiles: int, rows: int, K: int, w_bytes: int, sms: int) -> int:
    """The smallest divisor d of `steps` with tiles * d >= 2 * sms, among those keeping the fp32 partials at most
    half the weight bytes (16 * d * rows <= K * w_bytes); else the largest such divisor."""
    splits = 1
    for d in range(1, steps + 1):
        if steps % d == 0 and 16 * d * rows <= K * w_bytes:
            splits = d
            if tiles * d >= 2 * sms:
                break
    return splits


GEMV_MIN_STEPS = 4                # K steps a GEMV program keeps at least (measured: fewer, longer programs win)


def gemv_launch(rows: int, O: int, K: int, w_bytes: int = 1, sms: int = 132):
    """Default (block_n, block_k, splits, num_warps, num_stages) of the CUDA-core path (rows <= GEMV_ROWS). Tuned by
    `scripts/sweep_decode_kernels.py --only linear` on an H100 (docs/benchmarks.md, session 7): at Flash's decode
    shapes these launches were the sweep's best or within 3% of it (one row: wq_b [32768, 1024] 17.5 us = 70% of
    copy bandwidth, wo_b [4096, 8192] 19.3 us, wq_a [1024, 4096] 8.8 us).
      * block_k 128: one E8M0 scale and one x_fp8 block per step; a tile row is 128 bytes of FP8 (8 threads x 16).
      * block_n: an 8 KB weight tile (64 FP8 / 32 bf16 rows), lowered to divide O.
      * splits: as `launch` -- the smallest divisor of the K steps giving >= 2 programs per SM -- but keeping at
        least GEMV_MIN_STEPS steps per program (wq_a: 16 O tiles x 8 splits measured 8.8 us, x 32 splits 10.7).
      * num_warps 4; num_stages 1: no dot in the loop, so nothing for the pipeliner to stage.
    """
    bk = _pow2_dividing(K, 128)
    bn = _pow2_dividing(O, max(16, 8192 // (bk * w_bytes)))
    bn = min(bn, 128)
    steps, tiles = K // bk, O // bn
    splits = _splits(steps, tiles, rows, K, w_bytes, sms)
    while splits > 1 and steps // splits < GEMV_MIN_STEPS:
        splits = max(d for d in range(1, splits) if steps % d == 0)
    return bn, bk, splits, 4, 1


# ---- in-kernel decodes (jnp on int32 bits: each lowers to Triton integer ops; also used on CPU by the tests) ----
def e8m0_decode(code: jax.Array) -> jax.Array:
    """E8M0 codes (int32 0..255, e.g. a uint8 scale byte widened) -> fp32 2^(code - 127), `quant.e8m0_to_f32` bit for
    bit (code 0 -> 2^-127, 255 -> NaN): `quant.e8m0_codes_to_f32`, integer ops that lower to Triton."""
    from v4jax.quant import e8m0_codes_to_f32          # lazy: v4jax imports pallas_kernels
    return e8m0_codes_to_f32(code)


def rne_e4m3(v: jax.Array) -> jax.Array:
    """fp32 v (|v| <= 448, the caller clips) -> the nearest E4M3FN value as fp32, ties to even: `quant._rne_e4m3_f32`
    bit for bit (signed zeros included), with integer operations only.
      |v| >= 2^-6 (E4M3 normals): round the fp32 bits to 3 mantissa bits: + 0x7FFFF + (bit 20), clear the low 20
        bits (a carry into the exponent is the correct round-up; the sign bit is untouched for |v| <= 448).
      |v| < 2^-6 (subnormals, multiples of 2^-9): n = RNE(|v| * 2^9) from the 24-bit significand m (implicit 1) of
        |v| = m * 2^(e - 150), e the biased exponent field: n = RNE(m >> sh), sh = 141 - e >= 21, clamped to 25
        (every |v| < 2^-10 gives 0 from sh = 25 on; the clamp also keeps the shift amount defined); RNE as above:
        (m + 2^(sh-1) - 1 + bit sh of m) >> sh. Value n * 2^-9 (exact) with v's sign bit. An fp32 subnormal or zero v
        gives +-0."""
    bits = jax.lax.bitcast_convert_type(v.astype(f32), i32)
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & _E4M3_DROP
    mag = bits & _F32_ABS
    sh = jnp.clip(141 - (mag >> 23), 21, 25)
    m = (mag & 0x7FFFFF) | 0x800000
    n = (m + ((1 << (sh - 1)) - 1) + ((m >> sh) & 1)) >> sh                   # RNE(m / 2^sh), 0..8
    sub = jax.lax.bitcast_convert_type(n.astype(f32) * (2.0 ** -9), i32) | (bits & _F32_SIGN)
    return jax.lax.bitcast_convert_type(jnp.where(mag < _F32_2POW_M6, sub, normal), f32)


def fp8_sim_block(x: jax.Array) -> jax.Array:
    """x [..., n] (bf16/fp32; one quantisation block along the last axis) -> fp32 `quant.fp8_sim` of it, bit for bit:
    amax = max(max|x|, 1e-4) (on the fp32 bits: for non-negative floats the integer order is the float order, and a
    NaN stays the maximum as in XLA); s = 2^ceil(log2(amax * f32(1/448))), ceil(log2) read from the fp32 bits as
    `quant._ceil_log2`, the exponent clipped to [-126, 127] as `quant._exp2i`; q = rne_e4m3(clip(x / s, +-448)),
    x / s computed as x * 2^-e (exact where the quotient is an fp32 normal; where not, both round to +-0); value q*s,
    exact (4 significant bits) in bf16. Finite x only: a block holding inf/NaN gives non-finite or meaningless
    values (under Triton the clip is NaN-ignoring), as fp8_sim's are non-finite, but not bit for bit."""
    from v4jax.quant import (FP8_AMAX_FLOOR, FP8_MAX, _F32_2POW_M127_BITS, _ceil_log2,   # lazy: v4jax
                             _exp2i)                                               # imports pallas_kernels
    x = x.astype(f32)
    bits = jax.lax.bitcast_convert_type(x, i32)
    floor = int(np.float32(FP8_AMAX_FLOOR).view(np.int32))
    amax = jnp.maximum(jnp.max(bits & _F32_ABS, axis=-1, keepdims=True), floor)
    e = jnp.clip(_ceil_log2(jax.lax.bitcast_convert_type(amax, f32) * f32(1.0 / FP8_MAX)), -126, 127)
    s = _exp2i(e)
    inv = jax.lax.bitcast_convert_type(jnp.where(e == 127, _F32_2POW_M127_BITS, (127 - e) << 23), f32)
    return rne_e4m3(jnp.clip(x * inv, -448.0, 448.0)) * s


def _tile_scale(s_ref, ob, kb):
    """The fp32 scale of weight block (ob, kb): raw E8M0 bytes (uint8) decoded here, or fp32 decoded by XLA."""
    if s_ref.dtype == jnp.uint8:
        return e8m0_decode(s_ref[ob, kb].astype(i32))
    return s_ref[ob, kb]


def _kernel(x_ref, w_ref, *rest, M, bn, bk, steps, mp, w_lhs, x_fp8):
    """Tensor-core path (module docstring)."""
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
        xt = x_ref[xr, kc]                                     # [mp, bk] bf16 (x_fp8: bf16 or fp32)
        if x_fp8:
            xt = fp8_sim_block(xt).astype(bf16)                # exact in bf16
        wt = w_ref[cols[:, None], kc]                          # [bn, bk] fp8 / bf16
        if s_ref is not None:
            wt = (wt.astype(f32) * _tile_scale(s_ref, ob, k0 // 128)).astype(bf16)
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


def _gemv_kernel(x_ref, w_ref, *rest, M, bn, bk, steps, unroll, acc_mode, x_fp8):
    """CUDA-core path (module docstring): per row an fp32 accumulator, no dot, no padded rows."""
    s_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    j = pl.program_id(0)
    s = pl.program_id(1)
    iota = lambda n: jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    o0 = pl.multiple_of(j * bn, bn)
    cols = o0 + iota(bn)
    ob = jax.lax.div(o0, 128)                                   # (lax.div: no floor-division fix-ups)
    kk = iota(bk)

    def body(i, accs):
        k0s = [pl.multiple_of((s * steps + i * unroll + u) * bk, bk) for u in range(unroll)]
        tiles = [w_ref[cols[:, None], (k0 + kk)[None, :]] for k0 in k0s]          # all loads first
        for k0, wt in zip(k0s, tiles):
            wt = wt.astype(f32)                                                  # [bn, bk], exact
            sc = None if s_ref is None else _tile_scale(s_ref, ob, jax.lax.div(k0, 128))
            new = []
            for m in range(M):
                xm = x_ref[m, k0 + kk].astype(f32)                               # [bk]
                if x_fp8:
                    xm = fp8_sim_block(xm)
                if sc is not None:
                    xm = xm * sc                                                 # exact: a power of two
                p = wt * xm[None, :]                                             # exact products
                new.append(accs[m] + (p if acc_mode == "tile" else jnp.sum(p, axis=1)))
            accs = tuple(new)
        return accs

    shape = (bn, bk) if acc_mode == "tile" else (bn,)
    accs = jax.lax.fori_loop(0, steps // unroll, body, tuple(jnp.zeros(shape, f32) for _ in range(M)))
    for m in range(M):
        y = jnp.sum(accs[m], axis=1) if acc_mode == "tile" else accs[m]
        o_ref[s, m, cols] = y


def split3(x: jax.Array) -> jax.Array:
    """fp32 [M, K] -> bf16 [3M, K] = (hi, mid, lo) with hi + mid + lo == x exactly (see the module docstring)."""
    return jnp.concatenate(bf16_parts(x.astype(f32)))


@functools.partial(jax.jit, static_argnames=("out_dtype", "x_fp8", "gemv", "block_n", "block_k", "splits",
                                             "num_warps", "num_stages", "w_lhs", "gemv_acc", "unroll",
                                             "scale_in_kernel", "interpret"))
def linear(x, w, scale=None, *, out_dtype=f32, x_fp8: bool = False, gemv: bool | None = None,
           block_n: int | None = None, block_k: int | None = None, splits: int | None = None,
           num_warps: int | None = None, num_stages: int | None = None, w_lhs: bool = True,
           gemv_acc: str = GEMV_ACC, unroll: int | None = None, scale_in_kernel: bool = True,
           interpret: bool = False):
    """x [M, K] (bf16, or fp32 through the exact 3-way bf16 split), w [O, K] bf16 or float8_e4m3fn (scale: E8M0
    [ceil(O/128), ceil(K/128)] or None) -> [M, O] out_dtype, fp32 accumulation. O and K must be multiples of 16.

    x_fp8: x is replaced by `quant.fp8_sim(x, 128)` in the kernel (bit for bit; bf16 or fp32 x, no split: R = M);
    needs K % 128 == 0 and block_k == 128. The rows R the kernel runs (3M for fp32 x without x_fp8, else M) pick
    the path: R <= GEMV_ROWS the CUDA-core GEMV, else the tensor cores; gemv=True/False forces one.
    Launch parameters left None take `gemv_launch` / `launch` defaults; block_n and block_k must be powers of two
    dividing 128 and O, K respectively; splits must divide K / block_k. w_lhs (tensor cores): compute
    acc^T = w_tile . x_tile^T. gemv_acc (GEMV): "step" or "tile" (module docstring); unroll (GEMV): steps loaded
    per loop iteration, dividing the program's K / block_k / splits steps (default GEMV_UNROLL).
    scale_in_kernel: the E8M0 bytes go to the kernel and are decoded there (default); False decodes them with an
    XLA kernel first (`quant.e8m0_to_f32`, the former behaviour, kept for comparisons).
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
    if x_fp8 and (K % FP8_BLOCK or x.dtype not in (bf16, f32)):
        raise ValueError(f"linear(gpu): x_fp8 needs K % {FP8_BLOCK} == 0 and a bf16/fp32 x, got x {x.shape} "
                         f"{x.dtype}")
    if gemv_acc not in GEMV_ACCS:
        raise ValueError(f"linear(gpu): gemv_acc={gemv_acc!r}, not one of {GEMV_ACCS}")
    if M == 0:
        return jnp.zeros((0, O), out_dtype)
    xs = x if (x.dtype == bf16 or x_fp8) else split3(x)
    R = xs.shape[0]
    use_gemv = R <= GEMV_ROWS if gemv is None else gemv
    wb = w.dtype.itemsize
    if use_gemv:
        d = gemv_launch(R, O, K, wb)
    else:
        d = launch(R, O, K, wb, x_bytes=xs.dtype.itemsize, min_block_k=FP8_BLOCK if x_fp8 else 32)
    bn, bk, ns, nw, st = (v or dv for v, dv in zip((block_n, block_k, splits, num_warps, num_stages), d))
    if 128 % bn or O % bn or 128 % bk or K % bk or (K // bk) % ns:
        raise ValueError(f"linear(gpu): block_n={bn}, block_k={bk}, splits={ns} do not tile weight {w.shape}")
    if x_fp8 and bk != FP8_BLOCK:
        raise ValueError(f"linear(gpu): x_fp8 needs block_k == {FP8_BLOCK} (one quantisation block per x tile), "
                         f"got block_k={bk}")
    steps = K // bk // ns
    args = [xs, w]
    if scale is not None:
        if scale_in_kernel:
            args.append(jax.lax.bitcast_convert_type(scale, jnp.uint8))        # the raw E8M0 bytes: free
        else:
            from v4jax.quant import e8m0_to_f32
            args.append(e8m0_to_f32(scale))
    if use_gemv:
        un = unroll or GEMV_UNROLL
        if steps % un:
            raise ValueError(f"linear(gpu): unroll={un} does not divide the {steps} steps per program")
        kernel = functools.partial(_gemv_kernel, M=R, bn=bn, bk=bk, steps=steps, unroll=un, acc_mode=gemv_acc,
                                   x_fp8=x_fp8)
    else:
        kernel = functools.partial(_kernel, M=R, bn=bn, bk=bk, steps=steps, mp=padded_rows(R), w_lhs=w_lhs,
                                   x_fp8=x_fp8)
    name = ("linear_fp8" if scale is not None else "linear_bf16") + ("_gemv" if use_gemv else "")
    part = pl.pallas_call(
        kernel,
        grid=(O // bn, ns),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((ns, R, O), f32),
        compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=st),
        interpret=interpret,
        name=name,
    )(*args)
    y = part[0]
    for i in range(1, ns):                                    # fixed order, one fused XLA elementwise kernel
        y = y + part[i]
    if R != M:
        y = (y[:M] + y[M:2 * M]) + y[2 * M:]
    if jnp.dtype(out_dtype) == bf16:
        y = jax.lax.reduce_precision(y, exponent_bits=8, mantissa_bits=7)
    return y.astype(out_dtype)
