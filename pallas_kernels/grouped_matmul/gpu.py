"""Grouped matmul for NVIDIA GPUs: Pallas with the Triton backend (`jax.experimental.pallas.triton`).

out[r] = x[r] @ w[g(r)]^T for the rows r of group g (x sorted by group), 0 for rows past sum(group_sizes).

Tiling. The grid is (out tiles, row tiles); one program computes a [block_m, block_n] output tile with a K loop
of [block_m, block_k] x [block_k, block_n] dots (fp32 accumulator, Triton software-pipelines the loads).
Each row tile belongs to exactly ONE group: the groups are "virtually padded" to a multiple of block_m, i.e. group g
gets ceil(size_g / block_m) tiles starting at its own first row, and a tile's rows past its group's end are loaded
(clamped to N - 1, harmless) but never stored. Nothing is copied or padded in memory: the tile -> (group, first
row, end row) map is a small int32 [3, T] array computed from group_sizes with jnp ops before the pallas_call
(`tile_map`), T = a static upper bound on the tile count; tiles past the real count store nothing. The rows past
sum(group_sizes) form one more pseudo-group whose tiles store zeros. The out-tile axis is the fastest grid axis:
the programs running together share one x row tile per 16 (Flash) out tiles and the weights of the 2-3 experts
in flight, which L2 holds, so x is read from memory once and each expert's weight about once.

Split-K (launch option split_k = s > 1; the decode default, see below). At decode the batch's few rows fall into
many groups of 1-2 rows: one row tile per non-empty expert, so batch 1 (6 rows) on Flash w1 [2048, 4096] has
6 x 16 = 96 programs for 132 SMs, each running a 32-step K loop whose weight tile is decoded in registers between
the loads. Such a loop is latency-bound (one 4-warp program per SM cannot hide the load -> decode -> dot chain):
~100 us per call where the weight bytes need ~10-15 us. With s > 1 the grid is (out tiles, row tiles, s); program
(j, t, ks) runs the K steps [ks * K/(s*block_k), (ks+1) * K/(s*block_k)) -- ranges of whole block_k steps, so they
stay aligned to the FP8 128-blocks and FP4 32-blocks of the scales (block_k divides 128 / is a multiple of 32) and
to the per-block_k column permutation of fp4_parity="permuted" -- and stores its fp32 [block_m, block_n] partial,
masked to its group's rows, into partial[ks] of an fp32 [s, N, O] buffer (the tail pseudo-group stores zeros, so
rows past sum(group_sizes) sum to exactly 0; every element of the buffer is written once). The wrapper sums the s
partials in a fixed order (ks = 0, 1, ...: deterministic, no atomics) in fp32 and rounds to out_dtype (bf16 by
reduce_precision, a rounding XLA keeps). Every weight byte is still loaded exactly once; x is re-read once per
out tile as before. Grid order: the split axis is the slowest, so within one K range the order is the unsplit
kernel's -- the programs in flight are the out tiles of consecutive row tiles at the same K range, so a group's
row tiles (a group with more than block_m rows) read the same weight tile within ~O/block_n programs of each
other (in L2), and the x row tile is shared by the out tiles in flight. (Split fastest would put the K ranges of
one weight tile side by side, but no program shares a K range with its neighbour then, and a group's row tiles
would be s times further apart.) The cost: 8 * s * N * O bytes of fp32 partials written and re-read, small next
to the weights at decode (batch 1: 6 rows). `decode_split_k` picks s at decode (about 4 programs per SM, at least
2 K steps per program); elsewhere s = 1, the unsplit kernel, bit-identical to the kernel before split-K.

Weights, [E, out, in] (checkpoint layout), decoded in registers tile by tile:
  * bf16: used as is.
  * FP8 e4m3 + E8M0 per-128x128 block scales ([E, ceil(out/128), ceil(in/128)], passed as fp32): the weight tile
    is upcast to fp32, multiplied by its block scale (exact: powers of two) and rounded to bf16 (exact), then a
    bf16 x bf16 dot -- the same product as dequantise-then-matmul. block_k must divide 128.
  * FP4 e2m1 packed two per int8 ([E, out, in/2], element 2k in the low nibble) + E8M0 per-32 scales
    ([E, out, in/32], passed as uint8 codes): each nibble is rewritten as the e4m3 byte of value/64
    (sign<<7 | (e1 e0 m)<<2 -- exact, e2m1 subnormal 0.5 becomes an e4m3 subnormal), upcast, times 64 * scale,
    rounded to bf16 (exact), the low/high halves interleaved (tt.join) into the [block_n, block_k] tile.
    E8M0 code 0 (2^-127) decodes to 0 and 255 (NaN) to inf here. block_k must be a multiple of 32.
    Opt-in decode variants (launch options, for benchmarking the ALU-bound decode; the defaults are the path above):
      - fp4_decode="bits": the fp32 bit pattern of value/64 is built with integer ops (v = e1 e0 m, s = sign:
        v >= 2 -> (v << 22) + bits(2^-7), i.e. exponent e + 120 and mantissa top bit m; v == 1 -> bits(2^-7);
        v == 0 -> 0; OR s << 31), no fp8 conversion; then the same fp32 multiply by 64 * scale and bf16 rounding
        as "e4m3", so the tile is bit-identical for every nibble and every E8M0 code (incl. 0, 249-254 where
        64 * scale overflows to inf, and 255). It is the bf16 pattern ((v << 6) + 0x3F00 for the value itself)
        shifted into fp32, which skips the bf16 -> fp32 widening before the multiply.
      - fp4_decode="bits_exp": no float op at all: the scale is applied by adding (code - 127) to the bf16
        exponent field ((v << 6) + 0x3F00 + ((code - 127) << 7); v == 1: 0x3F00 + ...; v == 0: 0). Bit-identical
        for E8M0 codes 2..248 (exact, where "e4m3" overflows, for 249..252); code 1 flushes 0.5 * 2^-126 to 0,
        codes 0 and 253-255 (never in a quantised checkpoint) are not handled (no 0 / inf: garbage bits).
      - fp4_parity=True ("split"): no interleave; the low nibbles form a [block_n, block_k/2] tile of the even-k
        weights, the high nibbles one of the odd-k weights, and two dots take the even and odd columns of x: the
        [block_m, block_k] x tile split by reshape [block_m, block_k/2, 2] + unstack (tt.split). "strided": x's
        even/odd columns loaded with stride-2 column indices instead. "permuted": x's columns permuted once
        outside the kernel (per block_k chunk: the even columns, then the odd ones) so both halves are contiguous
        loads. Same products, fp32 accumulation in another order (two dots of block_k/2 per K step).
  * FP4 in the "halves" layout (uint8, `v4jax.quant.fp4_to_halves`, made by `v4jax.params.to_kernel_layout`):
    per 64 inputs byte i holds inputs (i, 32 + i), so each nibble half is one whole scale block: FP8 dots take
    each half as its own dot (no interleave, no split); bf16 dots join the two scaled halves against x's columns
    permuted to (0, 32, 1, 33, ...) by the wrapper. The nibble rewrite runs as inline PTX on four bytes at a time.
    Measured 14-23% faster than the int8 layout at 32 decode tokens, 3-10% in prefill (docs/benchmarks.md).
    Where out % 128 == 0 the layout is also stored in 4 KB tiles (128 rows x 64 inputs, contiguous, ordered by
    (row tile, 64-group); `quant.fp4_to_halves`), so a K step reads whole contiguous blocks; untiled, it read 32
    bytes from each of 128 rows 2 KB apart, one DRAM page per row. H100, Flash experts: at 32 decode tokens
    w13 1096 -> 683 us (42% -> 67% of copy bandwidth), w2 518 -> 329 us; at 1 token w13 100 -> 68 us; prefill
    (bf16 dots) 16K tokens 19.7 -> 15.0 ms (docs/benchmarks.md, session 12). Tiling the E8M0 scales the same way
    was measured too and reverted: faster at 32 tokens (w13 647 -> 574 us), slower at 1 (59 -> 70 us).
  * transpose_w=True (bf16 only): w is used as [E, in, out] (out[r] = x[r] @ w[g]), the VJP's dx.

FP8 x FP8 dots (launch option mma="fp8", FP8/FP4 weights). The wrapper quantises x per row and 128-column block
(`fp8_blocks`: e4m3 values and a power-of-two scale; exact when x is `quant.fp8_sim` output, as the MoE's inputs
are under quant_sim). Per K step the weight tile stays e4m3 -- FP4 nibbles rewritten as the e4m3 bytes of value / 64
as above, interleaved to [block_n, block_k] and split (tt.split) into 32-column blocks; FP8 tiles as stored -- and
each scale block is one e4m3 x e4m3 dot into a fresh fp32 partial, multiplied by its weight scale (64 * 2^(code-127)
per row for FP4, the 128 x 128 block scale for FP8) and x's block scale, and added to the accumulator. Exact
products, fp32 sums in another order. block_k divides 128. Measured (H100, docs/benchmarks.md): at decode (16-row
tiles) 22-25% faster than the bf16 dots at 8-32 tokens and 6-11% at 1 token -- it is taken there automatically for
FP4 weights when the caller passes x_fp8=True (DECODE_MMA_DEFAULTS); with many rows per group the dependent
partial -> scale -> add chain after every small dot makes it 1.4-4x slower than bf16 dots, so never automatic.

A CUDA-core GEMV for 1-2 rows per group (no padded rows, FP4 decoded to fp32 per element) was written in session 7
and measured in session 8 (docs/benchmarks.md): 1.4-3.7x SLOWER than the FP8-dot launch at 1-32 tokens on an H100,
so it was removed (git history: commit ebf93b2).

Weight gradient (`grouped_matmul_dw`, the VJP's dw): dw[e] = sum over the rows r of group e of dy[r]^T x[r]. The
grid is (out tiles, in tiles, experts), the out-tile axis fastest, so the programs in flight work on one expert and
share its x and dy rows through L2. One program computes a [block_o, block_i] tile of dw[e] with a loop over its
group's rows, block_r at a time (dynamic trip count: ceil(size_e / block_r), an scf.for), loading the dy rows
[block_r, block_o] and x rows [block_r, block_i] with rows outside the group masked to 0 (rows past sum(group_sizes)
never contribute), and accumulating dot(dy_tile^T, x_tile) in fp32. An empty group stores zeros. The group
starts/ends ([2, E] int32, from group_sizes with jnp ops) are read per program like the forward's tile map.

Numerics: fp32 accumulation of bf16 x bf16 products, result cast to out_dtype (fp32 default; bf16 with RNE, the
same rounding as `quant.round_to`). Pointer offsets: 32-bit unless an operand exceeds 4 GiB (then 64-bit).

Measured on an H100 (docs/benchmarks.md, one MoE layer's w1/w3/w2 at the Flash shapes): bf16 weights 470 TFLOP/s at
16K tokens (78% of the measured bf16 matmul peak), 588 at 64K; at 1K-4K tokens the time (5.1-5.4 ms) is the weight
read (12.9 GB, floor 4.7 ms). On-device results equal XLA's own GEMMs bit for bit. FP8 weights: 311 TFLOP/s at 16K
(52%), slower than bf16 at every size: decoding the weight tile (fp8 -> fp32 x scale -> bf16) costs issue slots
per row tile, so FP8 pays off in memory, not time; FP4 241 TFLOP/s at 16K (40%). An FP8 x FP8 wgmma with
per-128 block promotion (the activations are FP8-simulated anyway under quant_sim) would be the next step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32

# weight-gradient launch defaults (block_o, block_i, block_r, num_warps, num_stages): a sensible first guess,
# NOT yet tuned on a GPU
DW_DEFAULTS = (128, 128, 64, 8, 3)

# launch defaults per weight format: the fastest of the sweeps in docs/benchmarks.md (H100, Flash expert shapes,
# 16K tokens): (block_m, block_n, block_k, num_warps, num_stages, w_lhs)
DEFAULTS = {"bf16": (128, 256, 64, 8, 4, False), "fp8": (256, 128, 64, 8, 3, True),
            "fp4": (128, 128, 64, 4, 4, False)}


# decode: few rows per expert (the batch's tokens spread over many experts, most groups of 1-2 rows). Row tiles of
# 16 (the dot's minimum) so the wasted rows do not multiply the math; the weight tile is the dot's left operand.
DECODE_DEFAULTS = {"bf16": (16, 128, 64, 4, 4, True), "fp8": (16, 128, 128, 4, 3, True),
                   "fp4": (16, 128, 128, 4, 3, True)}
# decode with FP8 x FP8 dots (mma="fp8", taken automatically for FP4 weights when the caller says x is FP8-
# representable, x_fp8=True): the sweep's best at 1-32 tokens (scripts/sweep_decode_kernels.py --mma-only, H100):
# 64-column tiles, the weight as the dot's RIGHT operand. At 8 and 32 tokens 22-25% faster than DECODE_DEFAULTS'
# bf16 dots (w1 346 -> 261 us, 873 -> 665 us), 6-11% at 1 token. With many rows per group (prefill) the per-32-column
# scaling of the partial sums is 1.4-4x SLOWER than bf16 dots (bench moe), so mma="fp8" is never automatic there.
DECODE_MMA_DEFAULTS = {"fp4": (16, 64, 128, 4, 3, False), "fp8": (16, 64, 128, 4, 3, False),
                       "fp4h": (16, 128, 128, 4, 3, True)}
# FP4 in the kernel layout (uint8, "fp4h": halves in 128-row tiles): block_k 128 (two 4 KB tiles per K step) is the
# sweep's best at 32 tokens (H100, session 12: w13 641 us, w2 308 us = 69-71% of copy bandwidth, against 677 / 327
# with block_k 64) and within 3-5 us of the best at 1 token (w13 57.8 us, w2 49.2 us at split 4). Before the tiles:
# FP4 in the halves layout (uint8, "fp4h"): the FP8-dot decode launch is the sweep's best at 32 tokens (w1 607 us,
# w2 525 us against 708 / 685 for the int8 layout's default; 55.6 / 65.0 us at 1 token); prefill as "fp4"
DEFAULTS["fp4h"] = DEFAULTS["fp4"]
DECODE_DEFAULTS["fp4h"] = DECODE_DEFAULTS["fp4"]
MMA_AUTO_FORMATS = ("fp4",)      # formats for which x_fp8=True picks mma="fp8" at decode
DECODE_ROWS_PER_GROUP = 16       # N / E below this takes DECODE_DEFAULTS
SMS = 132                        # streaming multiprocessors (H100 SXM and H200)
DECODE_WAVES = 4                 # decode_split_k's target: programs per SM
W_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4 / 128 ** 2, "fp4": 0.5 + 1 / 32}   # bytes read per weight (with scales)

def decode_split_k(N: int, E: int, O: int, K: int, *, block_n: int, block_k: int, w_bytes: float = W_BYTES["fp4"],
                   sms: int = SMS, waves: int = DECODE_WAVES, min_steps: int = 2) -> int:
    """The K split of the decode launch (a pure function of static shapes): N rows over E groups, weight [out=O,
    in=K] of `w_bytes` bytes per weight, block_n x block_k tiles.

    Without a split there are about busy = min(N, E) working row tiles (at decode nearly every non-empty group is
    one 16-row tile and there are at most N non-empty groups) times ceil(O / block_n) out tiles. The rule: the
    smallest divisor s of the K steps (K / block_k) that gives busy * out tiles * s >= waves * sms programs
    (default 4 per SM: 4-warp programs, 16 warps per SM to hide the latency of the in-register weight decode),
    keeping at least `min_steps` K steps per program and the fp32 partials (written then re-read,
    8 * s * N * O bytes) at most half the weight bytes read (busy * O * K * w_bytes); if the target cannot be
    reached, the largest s those limits allow. Flash (FP4, 16 x 128 x 128 decode tiles, E = 256 or 128): batch 1
    (N = 6) w1/w3 [2048, 4096] -> 8 (768 programs of 4 K steps), w2 [4096, 2048] -> 4 (768 of 4); batch 4
    (N = 24) -> 2 and 1; batch >= 8 (N >= 48) -> 1 (enough row tiles already)."""
    steps = K // block_k
    if N <= 0 or E <= 0 or steps <= 0:
        return 1
    busy = min(N, E)
    programs = busy * -(-O // block_n)
    best = 1
    for s in range(2, steps // max(min_steps, 1) + 1):
        if programs * best >= waves * sms or 16 * s * N > busy * K * w_bytes:
            break
        if steps % s == 0:
            best = s
    return best


def num_tiles(N: int, E: int, block_m: int) -> int:
    """Static upper bound on sum_g ceil(size_g / block_m) over the E groups and the tail pseudo-group."""
    if N == 0:
        return 0
    groups = min(E + 1, N)                                      # at most N groups are non-empty
    return (N + groups * (block_m - 1)) // block_m


def tile_map(group_sizes: jax.Array, N: int, block_m: int) -> jax.Array:
    """group_sizes [E] -> int32 [3, T]: per row tile (group, first row, end row); group E = the rows past the
    groups (stored as zeros); unused tiles have first row = end row = 0 (nothing stored)."""
    E = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), N)
    zero = jnp.zeros((1,), jnp.int32)
    starts = jnp.concatenate([zero, ends[:-1]]) if E else zero[:0]
    total = ends[-1:] if E else zero
    starts = jnp.concatenate([starts, total])
    ends = jnp.concatenate([ends, jnp.full((1,), N, jnp.int32)])
    ntile = (ends - starts + block_m - 1) // block_m
    tend = jnp.cumsum(ntile)
    tstart = tend - ntile
    T = num_tiles(N, E, block_m)
    t = jnp.arange(T, dtype=jnp.int32)
    g = jnp.searchsorted(tend, t, side="right", method="compare_all").astype(jnp.int32)
    valid = g <= E
    gc = jnp.minimum(g, E)
    row0 = starts[gc] + (t - tstart[gc]) * block_m
    rend = jnp.minimum(row0 + block_m, ends[gc])
    return jnp.stack([gc, jnp.where(valid, row0, 0), jnp.where(valid, rend, 0)]).astype(jnp.int32)


def _f8_of_nibble(nib):
    """e2m1 nibble (int32) -> float8_e4m3fn of value / 64 (exact)."""
    b = ((nib & 7) << 2) | ((nib & 8) << 4)
    return jax.lax.bitcast_convert_type(b.astype(jnp.int8), jnp.float8_e4m3fn)


# PTX for 4 packed FP4 bytes at once (pack=4: the four int8 of one 32-bit register $1): $0 <- the e4m3 bytes of
# the low (high) nibbles' value / 64. Per byte b: low ((b << 2) & 0x1C) | ((b << 4) & 0x80), high
# ((b >> 2) & 0x1C) | (b & 0x80) -- the masks keep every shifted bit inside its own byte. Two single-result asm
# ops: Pallas' Triton lowering of elementwise_inline_asm returns one result only (JAX 0.10-0.11).
_LOW_NIBBLES_E4M3_PTX = """{
.reg .b32 a, b;
shl.b32 a, $1, 2;
shl.b32 b, $1, 4;
and.b32 a, a, 0x1C1C1C1C;
and.b32 b, b, 0x80808080;
or.b32 $0, a, b;
}"""
_HIGH_NIBBLES_E4M3_PTX = """{
.reg .b32 a, b;
shr.b32 a, $1, 2;
and.b32 a, a, 0x1C1C1C1C;
and.b32 b, $1, 0x80808080;
or.b32 $0, a, b;
}"""


def _e4m3_of_nibbles(b, asm: bool):
    """Packed FP4 bytes b (int8 [..]) -> (low, high) nibbles as float8_e4m3fn of value / 64 (exact), each b's
    shape. asm: four bytes per instruction sequence (the PTX above, GPU only); else per element on int32."""
    if asm:
        f8 = lambda ptx: jax.lax.bitcast_convert_type(pltriton.elementwise_inline_asm(
            ptx, args=[b], constraints="=r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(b.shape, jnp.int8)])[0], jnp.float8_e4m3fn)
        return f8(_LOW_NIBBLES_E4M3_PTX), f8(_HIGH_NIBBLES_E4M3_PTX)
    b = b.astype(jnp.int32)
    return _f8_of_nibble(b & 15), _f8_of_nibble((b >> 4) & 15)


def _e8m0_pow2(codes):
    """E8M0 codes (int32) -> 2^(code - 127) in fp32 from the bits code << 23 (code 0 -> 0, 255 -> inf)."""
    return jax.lax.bitcast_convert_type(codes << 23, f32)


def _fp4_scale(codes):
    """E8M0 codes (int32) -> 64 * 2^(code - 127) in fp32: the scale of the e4m3 bytes of value / 64."""
    return _e8m0_pow2(codes) * 64.0


TILE_DECODES = ("e4m3", "bits", "bits_exp")   # fp4_decode_tile's (the int8 layout's bf16 dots)
FP4_DECODES = TILE_DECODES + ("asm",)         # "asm": the FP8-dot path and the halves layout
FP4_PARITIES = (False, True, "split", "strided", "permuted")
_F32_BITS_2M7 = 0x3C000000       # fp32 bits of 2^-7 = e2m1 0.5 / 64
_F32_SIGN = -(1 << 31)           # int32 0x80000000


def _e2m1_f32(v, sign, half_bits):
    """fp32 of an e2m1 value from its 3 magnitude bits v (int32 0..7) and sign (int32, bit 31), times the power of
    two whose fp32 bits `half_bits` are those of 0.5 times it: v >= 2 is 2^(e-1) (1 + m/2), exponent field one above
    0.5's times 2^(e-1) and mantissa top bit m, i.e. the bits (v << 22) + half_bits; v == 1 is 0.5 (half_bits) and
    v == 0 zero (v * half_bits; the product, which wraps for v > 1, is not selected there). Exact, keeps -0."""
    mag = jnp.where(v > 1, (v << 22) + half_bits, v * half_bits)
    return jax.lax.bitcast_convert_type(mag | sign, f32)


def _f32_of_nibble_bits(b, high):
    """Packed FP4 bytes b (int32, the int8 sign-extended) -> fp32 value / 64 of the low (high=False) or high
    nibble's e2m1 value, its bit pattern built with integer ops (exact, equal to `_f8_of_nibble`'s upcast bit for
    bit, signed zero included)."""
    if high:
        return _e2m1_f32((b >> 4) & 7, b & _F32_SIGN, _F32_BITS_2M7)   # sign-extended: bit 31 = the high sign
    return _e2m1_f32(b & 7, (b << 28) & _F32_SIGN, _F32_BITS_2M7)


def fp4_decode_tile(b, codes, decode="e4m3"):
    """The FP4 weight tile decode, on its own: packed bytes b (int32 [n, k/2], the int8 sign-extended) and E8M0
    codes (int32 [n, k/32], one per 32 weights = 16 bytes) -> (lo, hi), bf16 [n, k/2] each: the weights at even k
    (low nibbles) and odd k (high nibbles), value * 2^(code - 127). "e4m3" and "bits" (bit-identical): code 0 -> 0,
    255 -> inf; 249-254 overflow 64 * scale to inf: NaN for a zero nibble, +-inf otherwise. "bits_exp": the same
    bits for codes 2..248 (every nibble; a zero nibble is +-0 at any code), the exact value for 249..252; code 1
    flushes the subnormal 0.5 * 2^-126 to 0, and codes 0 and 253-255 give meaningless bits (not 0/inf) -- codes
    a checkpoint's weight scales never have (quantize_fp4_weight's smallest is 1, for |w| <= 6 * 2^-126)."""
    n, kh = b.shape
    per_weight = lambda t: jnp.broadcast_to(t[:, :, None], (n, kh // 16, 16)).reshape(n, kh)
    if decode == "bits_exp":
        # bf16 bits of value * 2^(code-127), integer ops only: k = bits of 0.5 * 2^(code-127) (exponent field
        # code - 1), v >= 2: (v << 6) + k, v == 1: k, v == 0: 0; OR the sign bit 15; no float op at all
        k = per_weight(0x3F00 + ((codes - 127) << 7))

        def half(v, sign):
            mag = jnp.where(v > 1, (v << 6) + k, v * k)
            return jax.lax.bitcast_convert_type((mag | sign).astype(jnp.int16), jnp.bfloat16)

        return half(b & 7, (b << 12) & 0x8000), half((b >> 4) & 7, (b << 8) & 0x8000)
    sc = per_weight(_fp4_scale(codes))
    if decode == "e4m3":
        half = lambda high: _f8_of_nibble(((b >> 4) & 15) if high else (b & 15)).astype(f32)
    elif decode == "bits":
        half = lambda high: _f32_of_nibble_bits(b, high)
    else:
        raise ValueError(f"grouped_matmul(gpu): fp4_decode={decode!r}, not one of {TILE_DECODES}")
    return tuple((half(high) * sc).astype(jnp.bfloat16) for high in (False, True))


def _kernel(meta_ref, x_ref, w_ref, *rest, E, N, K, O, bm, bn, bk, fmt, transpose_w, w_lhs, fp4_decode="e4m3",
            fp4_parity=False, split_k=1, mma="bf16", fp4_asm=False, fp4_layout="pairs", fp4_tiles=False):
    xs_ref = None
    if fmt == "bf16":
        s_ref, (o_ref,) = None, rest
    elif mma == "fp8":                                                # x_ref: e4m3 x, xs_ref: its 128-block scales
        s_ref, xs_ref, o_ref = rest
    else:
        s_ref, o_ref = rest
    j = pl.program_id(0)                                              # out tile
    t = pl.program_id(1)                                              # row tile
    g = meta_ref[0, t]
    row0 = meta_ref[1, t]
    rend = meta_ref[2, t]
    iota = lambda n: jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    # All indices are index arrays (Triton: make_range + offsets, contiguous where an iota is added to a scalar;
    # interpret mode: gathers). Loads clamp rows/columns into the array (rows past the group are computed and
    # dropped); stores use the unclamped, distinct indices under a mask.
    rows = row0 + iota(bm)
    cols = j * bn + iota(bn)
    xrow = jnp.minimum(rows, N - 1)
    xr = xrow[:, None]                                                 # [bm, 1]
    wcol = cols if O % bn == 0 else jnp.minimum(cols, O - 1)
    wc = wcol[:, None]                                                 # [bn, 1]
    mask = (rows < rend)[:, None] & (cols < O)[None, :]
    steps = K // bk // split_k                                         # K steps of this program
    if split_k > 1:                                                    # K split: steps [s * steps, (s+1) * steps)
        ks = pl.program_id(2)
        o_at = o_ref.at[ks, rows[:, None], cols[None, :]]              # fp32 partial [split_k, N, O]
    else:
        o_at = o_ref.at[rows[:, None], cols[None, :]]

    def kcols(k0, n):
        return (k0 + iota(n))[None, :]                                 # [1, n]

    def fp4_halves(k0):
        """(even-k, odd-k) weights, bf16 [bn, bk/2] each: w[g, cols, k0:k0+bk:2], w[g, cols, k0+1:k0+bk:2]."""
        b = w_ref[g, wc, kcols(k0 // 2, bk // 2)].astype(jnp.int32)    # [bn, bk/2] packed pairs
        codes = s_ref[g, wc, kcols(k0 // 32, bk // 32)].astype(jnp.int32)   # [bn, bk/32] E8M0 codes
        return fp4_decode_tile(b, codes, fp4_decode)

    def halves_group(k0, h, transposed):
        """The h-th 64-column group of the K step in the halves layout: (low, high) e4m3 [bn, 32] (inputs
        k0 + 64h + 0..31 and + 32..63) and their scales, [bn, 1] each, or [1, bn] if transposed."""
        if fp4_tiles:                                                  # w_ref: [E, O * K/64, 32], 4 KB tiles
            tb = ((j * bn) // 128 * (K // 64) + k0 // 64 + h) * 128    # the tile of this group and out tile
            trows = tb + (j * bn) % 128 + iota(bn) if 128 % bn == 0 and O % bn == 0 else \
                ((wcol // 128) * (K // 64) + k0 // 64 + h) * 128 + wcol % 128
            b = w_ref[g, trows[:, None], iota(32)[None, :]]            # [bn, 32]: contiguous rows of 32 bytes
        else:
            b = w_ref[g, wc, kcols(k0 // 2 + 32 * h, 32)]
        lo, hi = _e4m3_of_nibbles(b, fp4_asm)
        cb = k0 // 32 + 2 * h + iota(2)
        codes = s_ref[g, wcol[None, :], cb[:, None]] if transposed else s_ref[g, wc, cb[None, :]]   # [2,bn]/[bn,2]
        return lo, hi, jnp.split(_fp4_scale(codes.astype(jnp.int32)), 2, axis=0 if transposed else 1)

    def weight_tile(k0):
        """[bn, bk] bf16: w[g, cols, k0:k0+bk], dequantised."""
        if fmt == "bf16":
            return w_ref[g, wc, kcols(k0, bk)]
        if fmt == "fp8":
            w8 = w_ref[g, wc, kcols(k0, bk)]
            s = s_ref[g, wc // 128, k0 // 128]                        # [bn, 1] fp32 block scales
            return (w8.astype(f32) * s).astype(jnp.bfloat16)
        lo, hi = fp4_halves(k0)
        return jnp.stack([lo, hi], axis=-1).reshape(bn, bk)

    def x_halves(k0):
        """x's (even, odd) columns of the K step, bf16 [bm, bk/2] each (see fp4_parity)."""
        if fp4_parity == "strided":
            ev = k0 + 2 * iota(bk // 2)
            return x_ref[xr, ev[None, :]], x_ref[xr, (ev + 1)[None, :]]
        if fp4_parity == "permuted":                                   # x's columns permuted by the wrapper
            return x_ref[xr, kcols(k0, bk // 2)], x_ref[xr, kcols(k0 + bk // 2, bk // 2)]
        xt = x_ref[xr, kcols(k0, bk)]                                  # "split": [bm, bk] -> tt.split
        return tuple(jnp.unstack(xt.reshape(bm, bk // 2, 2), axis=-1))

    def fp8_step(acc, k0):
        """One K step as FP8 x FP8 dots: acc += sum over the step's scale blocks of dot(w8, x8) * w_scale * x_scale.
        FP4: the nibbles become e4m3 bytes of value / 64 (exact), interleaved into [bn, bk] and split into bk/32
        blocks of 32 columns, one E8M0 code per row each (scale 64 * 2^(code - 127)). FP8: the e4m3 tile as is,
        one 128 x 128 block scale. x: e4m3 [bm, bk] with one power-of-two scale per row (bk divides 128)."""
        # x's tile first (session 5's order): loading it after the weight tile made the int8 layout's 6-layer
        # Flash decode at 32 tokens ~6% slower (14.89 vs 14.09 ms/token, H100)
        xt = x_ref[xr, kcols(k0, bk)] if fp4_layout != "halves" or fmt == "fp8" else None    # [bm, bk] e4m3
        xsc = xs_ref[k0 // 128, xrow[None, :] if w_lhs else xr]        # [1, bm] (w_lhs) or [bm, 1]; xs^T
        if fmt == "fp8":
            wts = [w_ref[g, wc, kcols(k0, bk)]]                        # [bn, bk] e4m3
            wsc = [s_ref[g, wc // 128 if w_lhs else wcol[None, :] // 128, k0 // 128]]   # [bn, 1] / [1, bn]
            xts = [xt]
        elif fp4_layout == "halves":                                    # per 64 columns: two whole scale blocks
            xts = [x_ref[xr, kcols(k0 + 32 * i, 32)] for i in range(bk // 32)]   # x first, as above
            wts, wsc = [], []
            for h in range(bk // 64):
                lo, hi, (sa, sb) = halves_group(k0, h, transposed=not w_lhs)
                wts += [lo, hi]
                wsc += [sa, sb]
        else:
            nb = bk // 32
            lo, hi = _e4m3_of_nibbles(w_ref[g, wc, kcols(k0 // 2, bk // 2)], fp4_asm)    # [bn, bk/2] each
            w8 = jnp.stack([lo, hi], axis=-1).reshape(bn, bk)
            if w_lhs:
                codes = s_ref[g, wc, kcols(k0 // 32, nb)].astype(jnp.int32)          # [bn, nb]
            else:
                codes = s_ref[g, wcol[None, :], (k0 // 32 + iota(nb))[:, None]].astype(jnp.int32)   # [nb, bn]
            sc = _fp4_scale(codes)
            split = lambda a, axis: jnp.split(a, nb, axis=axis) if nb > 1 else [a]
            wts, xts = split(w8, 1), split(xt, 1)
            wsc = split(sc, 1 if w_lhs else 0)
        for wt, xb, ws in zip(wts, xts, wsc):
            if w_lhs:                                                   # [bn, bm]
                part = jax.lax.dot_general(wt, xb, (((1,), (1,)), ((), ())), preferred_element_type=f32)
            else:                                                       # [bm, bn]
                part = jax.lax.dot_general(xb, wt, (((1,), (1,)), ((), ())), preferred_element_type=f32)
            acc = acc + part * (ws * xsc)
        return acc

    def mm(acc, wt, xt):
        if w_lhs:                                                      # acc^T [bn, bm] = w_tile . x_tile^T
            return acc + jax.lax.dot_general(wt, xt, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        return acc + jax.lax.dot_general(xt, wt, (((1,), (1,)), ((), ())), preferred_element_type=f32)

    @pl.when((rend > row0) & (g < E))
    def _compute():
        def body(kk, acc):
            k0 = pl.multiple_of((ks * steps + kk if split_k > 1 else kk) * bk, bk)
            if mma == "fp8":
                return fp8_step(acc, k0)
            if fmt == "fp4" and fp4_layout == "halves":                # per 64 columns one dot; x permuted
                for h in range(bk // 64):                              # by the wrapper to (0, 32, 1, 33, ..)
                    lo, hi, (sa, sb) = halves_group(k0, h, transposed=False)
                    wt = jnp.stack([(lo.astype(f32) * sa).astype(jnp.bfloat16),
                                    (hi.astype(f32) * sb).astype(jnp.bfloat16)], axis=-1).reshape(bn, 64)
                    acc = mm(acc, wt, x_ref[xr, kcols(k0 + 64 * h, 64)])
                return acc
            if fmt == "fp4" and fp4_parity:                            # two dots: even k, odd k
                (w_ev, w_od), (x_ev, x_od) = fp4_halves(k0), x_halves(k0)
                return mm(mm(acc, w_ev, x_ev), w_od, x_od)
            xt = x_ref[xr, kcols(k0, bk)]                              # [bm, bk]
            if transpose_w:
                wt = w_ref[g, (k0 + iota(bk))[:, None], wcol[None, :]]          # [bk, bn]
                return acc + jnp.dot(xt, wt, preferred_element_type=f32)
            return mm(acc, weight_tile(k0), xt)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, bm) if w_lhs else (bm, bn), f32))
        if w_lhs:
            acc = acc.T
        pltriton.store(o_at, acc.astype(o_ref.dtype), mask=mask)

    @pl.when((rend > row0) & (g == E))
    def _zeros():
        pltriton.store(o_at, jnp.zeros((bm, bn), o_ref.dtype), mask=mask)


MMAS = ("bf16", "fp8")


def fp8_blocks(x: jax.Array, block: int = 128):
    """x [N, K] (K a multiple of block) -> (e4m3 [N, K], fp32 [N, K / block]): per row and block of columns the
    smallest power of two s with max |x| <= 448 s (found from frexp, no rounding; s = 2^-9 for an all-zero block),
    and x / s rounded to e4m3. Exact whenever x is e4m3 x (any power of two) per block, which is what
    `quant.fp8_sim` leaves (that scale is >= s, so x / s is an e4m3 value times a power of two <= 448)."""
    N, K = x.shape
    xb = x.astype(f32).reshape(N, K // block, block)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    m, e = jnp.frexp(amax)                                  # amax = m 2^e, m in [0.5, 1): 448 = 1.75 * 2^8
    s = jnp.ldexp(jnp.ones_like(amax), e - 9 + (2 * m > 1.75).astype(e.dtype))
    q = (xb / s[..., None]).astype(jnp.float8_e4m3fn)
    return q.reshape(N, K), s


def weight_format(w: jax.Array, scale: jax.Array | None) -> str:
    if scale is None:
        return "bf16"
    from v4jax.quant import is_fp4               # lazy: v4jax imports pallas_kernels
    if is_fp4(w):                                # int8, or uint8 in quant.fp4_to_halves' layout
        return "fp4"
    if w.dtype == jnp.float8_e4m3fn:
        return "fp8"
    raise ValueError(f"grouped_matmul(gpu): unsupported quantised weight dtype {w.dtype}")


@functools.partial(jax.jit, static_argnames=("transpose_w", "out_dtype", "block_m", "block_n", "block_k",
                                             "num_warps", "num_stages", "w_lhs", "fp4_decode", "fp4_parity",
                                             "split_k", "mma", "x_fp8", "fp4_tiles", "interpret"))
def grouped_matmul(x, w, group_sizes, scale=None, *, transpose_w: bool = False, out_dtype=f32,
                   block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                   num_warps: int | None = None, num_stages: int | None = None, w_lhs: bool | None = None,
                   fp4_decode: str | None = None, fp4_parity: bool | str = False, split_k: int | None = None,
                   mma: str | None = None, x_fp8: bool = False, fp4_tiles: bool | None = None,
                   interpret: bool = False):
    """x [N, in] bf16 sorted by group, w [E, out, in] (bf16; FP8 e4m3 with E8M0 scale [E, out/128, in/128];
    FP4 packed int8 [E, out, in/2] with E8M0 scale [E, out, in/32]), group_sizes [E] int32 -> [N, out] out_dtype.

    transpose_w (bf16 only): w is [E, in, out] and out[r] = x[r] @ w[g]. block_k is lowered to a divisor of `in`.
    w_lhs: compute each tile as (w_tile . x_tile^T)^T, the decoded weight as the dot's left operand (wgmma can
    take its A operand from registers, B only from shared memory); ignored with transpose_w.
    Launch parameters left None take the format's DEFAULTS, or DECODE_DEFAULTS when there are fewer than
    DECODE_ROWS_PER_GROUP rows per group on average (decode).
    split_k: K split over programs (see the module docstring), a divisor of the K steps in / block_k; None = 1,
    or `decode_split_k` with the decode launch. split_k = 1 is the unsplit kernel (output written in-kernel).
    FP4 decode variants (opt-in launch options, ignored for other formats; see the module docstring): fp4_decode
    "e4m3" (default), "bits" (bit-identical tiles) or "bits_exp" (integer ops only; E8M0 codes 2..252);
    fp4_parity False (default: the interleaved [block_n, block_k] tile), True (= "split"), "strided" or "permuted"
    (even-k and odd-k half tiles, two dots per K step; the variants differ in how x's even/odd columns are read).
    mma: "bf16" (default: the weight tile dequantised to bf16, bf16 x bf16 dots) or "fp8" (FP8 / FP4 weights only:
    x is quantised per 128 columns by `fp8_blocks` and every dot is e4m3 x e4m3 with fp32 accumulation, the
    weight and x block scales applied to each block's partial sum -- per 32 columns for FP4, per 128 for FP8; see
    the module docstring). "fp8" equals "bf16" up to summation order when x is FP8-representable per 128-column
    block (`quant.fp8_sim` output); otherwise it adds x's FP8 rounding. None: "fp8" at decode for FP4 weights
    (MMA_AUTO_FORMATS) when x_fp8 says x is FP8-representable per 128 columns and in % 128 == 0, else "bf16".
    The decode launch with mma="fp8" takes DECODE_MMA_DEFAULTS.
    FP4 in the "halves" layout (w uint8, `v4jax.quant.fp4_to_halves`; the scales as for int8): per 64 columns the
    low nibbles are one whole 32-column scale block and the high nibbles the next. FP8 dots: each half is its own
    dot (no nibble interleave, no split of the tile); bf16 dots: the two scaled halves joined into one [block_n,
    64] tile against x's columns permuted to (0, 32, 1, 33, ...) by the wrapper (XLA fuses the permutation into
    x's producer, the MoE's row gather). block_k % 64 == 0; fp4_parity and the "bits" decodes do not apply.
    fp4_decode="asm" rewrites four packed bytes per PTX sequence (`_LOW_NIBBLES_E4M3_PTX`; interpret mode runs
    the same rewrite per element); None: "asm" for the halves layout, else "e4m3" (the int8 layout as measured
    before: with the PTX its 6-layer Flash decode at 32 tokens measured 14.9 ms against 13.8 ms, not isolated).
    fp4_tiles (halves layout only): whether w is stored in 128-row x 64-input tiles of 4 KB (`quant.fp4_tiled`);
    None: the layout's rule (out % 128 == 0); False reads an untiled halves array (`quant.fp4_to_halves(...,
    tiles=False)`, for A/B measurements).
    """
    halves = w.dtype == jnp.uint8
    if not (fp4_decode is None or fp4_decode in FP4_DECODES):
        raise ValueError(f"grouped_matmul(gpu): fp4_decode={fp4_decode!r}, not one of {FP4_DECODES}")
    if not (isinstance(fp4_parity, bool) or fp4_parity in FP4_PARITIES[2:]):
        raise ValueError(f"grouped_matmul(gpu): fp4_parity={fp4_parity!r}, not one of {FP4_PARITIES}")
    fp4_parity = "split" if fp4_parity is True else fp4_parity
    fmt = weight_format(w, scale)
    decode = x.shape[0] < DECODE_ROWS_PER_GROUP * w.shape[0] and not transpose_w
    if mma is None:
        mma = "fp8" if (x_fp8 and decode and fmt in MMA_AUTO_FORMATS and x.shape[1] % 128 == 0) else "bf16"
    if mma not in MMAS:
        raise ValueError(f"grouped_matmul(gpu): mma={mma!r}, not one of {MMAS}")
    if fp4_decode is None:
        fp4_decode = "asm" if halves else "e4m3"
    if fmt == "fp4" and fp4_decode == "asm" and mma != "fp8" and not halves:
        raise ValueError(f"grouped_matmul(gpu): fp4_decode='asm' needs mma='fp8' or the halves layout (got {mma!r})")
    if halves and (fp4_parity or fp4_decode in ("bits", "bits_exp")):
        raise ValueError(f"grouped_matmul(gpu): the halves FP4 layout (uint8) takes no fp4_parity / "
                         f"fp4_decode={fp4_decode!r}")
    if mma == "fp8" and (fmt == "bf16" or transpose_w):
        raise ValueError(f"grouped_matmul(gpu): mma='fp8' needs FP8 or FP4 weights (got {fmt}"
                         f"{', transpose_w' if transpose_w else ''})")
    table = (DECODE_MMA_DEFAULTS if mma == "fp8" else DECODE_DEFAULTS) if decode else DEFAULTS
    d = dict(zip(("block_m", "block_n", "block_k", "num_warps", "num_stages", "w_lhs"),
                 table[fmt + "h" if halves else fmt]))
    block_m, block_n, block_k = block_m or d["block_m"], block_n or d["block_n"], block_k or d["block_k"]
    num_warps, num_stages = num_warps or d["num_warps"], num_stages or d["num_stages"]
    w_lhs = d["w_lhs"] if w_lhs is None else w_lhs
    N, K = x.shape
    E = w.shape[0]
    if transpose_w:
        if fmt != "bf16":
            raise NotImplementedError("grouped_matmul(gpu): transpose_w needs bf16 weights")
        Kw, O = w.shape[1], w.shape[2]
    else:
        O, Kw = w.shape[1], w.shape[2] * (2 if fmt == "fp4" else 1)
    if Kw != K:
        raise ValueError(f"grouped_matmul(gpu): x has {K} inputs, w {Kw} (w {w.shape}, {fmt})")
    if group_sizes.shape != (E,):
        raise ValueError(f"grouped_matmul(gpu): group_sizes {group_sizes.shape} != ({E},)")
    want = {"fp8": (E, -(-O // 128), -(-K // 128)), "fp4": (E, O, K // 32)}.get(fmt)
    if want is not None and tuple(scale.shape) != want:
        raise ValueError(f"grouped_matmul(gpu): {fmt} scale {tuple(scale.shape)} does not match w {tuple(w.shape)} "
                         f"(expected {want})")
    if N == 0 or O == 0:
        return jnp.zeros((N, O), out_dtype)
    x = x.astype(jnp.bfloat16)
    if fmt == "bf16":
        w = w.astype(jnp.bfloat16)
    bk = block_k
    if fmt == "fp8" or mma == "fp8":
        bk = min(bk, 128)
    while bk > 16 and K % bk:
        bk //= 2
    if K % bk or ((fmt == "fp8" or mma == "fp8") and 128 % bk) or (fmt == "fp4" and bk % 32) or (
            halves and bk % 64):
        raise ValueError(f"grouped_matmul(gpu): in={K} has no usable block_k for {fmt} (block_k={block_k})")
    bm, bn = block_m, block_n
    if split_k is None:
        split_k = decode_split_k(N, E, O, K, block_n=bn, block_k=bk, w_bytes=W_BYTES[fmt]) if decode else 1
    if not isinstance(split_k, int) or split_k < 1 or (K // bk) % split_k:
        raise ValueError(f"grouped_matmul(gpu): split_k={split_k!r} does not divide the {K // bk} K steps "
                         f"(in={K}, block_k={bk})")
    if fp4_tiles is None:
        from v4jax.quant import fp4_tiled
        fp4_tiles = halves and fp4_tiled(w.shape)
    if fp4_tiles and not (halves and O % 128 == 0):
        raise ValueError(f"grouped_matmul(gpu): fp4_tiles needs the halves FP4 layout (uint8) with out % 128 == 0 "
                         f"(got {w.dtype} {tuple(w.shape)})")
    meta = tile_map(group_sizes, N, bm)
    args = [meta, x, w.reshape(E, O * (K // 64), 32) if fp4_tiles else w]
    if fmt == "fp8":
        from v4jax.quant import e8m0_to_f32
        args.append(e8m0_to_f32(scale))
    elif fmt == "fp4":
        args.append(jax.lax.bitcast_convert_type(scale, jnp.uint8))
        if fp4_parity == "permuted" and mma == "bf16":   # per K step of bk columns: bk/2 even ones, then odd ones
            args[1] = x.reshape(N, K // bk, bk // 2, 2).swapaxes(2, 3).reshape(N, K)
        if halves and mma == "bf16":   # per 64 columns (0, 32, 1, 33, ..): the order of the joined nibble halves
            args[1] = x.reshape(N, K // 64, 2, 32).swapaxes(2, 3).reshape(N, K)   # (fuses into x's producer)
    if mma == "fp8":
        if K % 128:
            raise ValueError(f"grouped_matmul(gpu): mma='fp8' needs in={K} to be a multiple of 128")
        args[1], xs = fp8_blocks(x, 128)
        args.append(xs.T)       # [in/128, N]: a K step's row scales in one contiguous run, not one 4-byte read
                                # per row at a stride of in/128 (H100, halves layout: 5-15% faster at 1-32 tokens)
    kernel = functools.partial(_kernel, E=E, N=N, K=K, O=O, bm=bm, bn=bn, bk=bk, fmt=fmt,
                               transpose_w=transpose_w, w_lhs=bool(w_lhs) and not transpose_w,
                               fp4_decode=fp4_decode, fp4_parity=fp4_parity if fmt == "fp4" else False,
                               split_k=split_k, mma=mma, fp4_asm=fp4_decode == "asm" and not interpret,
                               fp4_layout="halves" if halves else "pairs", fp4_tiles=bool(fp4_tiles))
    split = split_k > 1
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(O, bn), meta.shape[1]) + ((split_k,) if split else ()),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((split_k, N, O) if split else (N, O), f32 if split else out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"grouped_matmul_{fmt}" + (f"_split{split_k}" if split else ""),
    )(*args)
    if not split:
        return out
    y = out[0]
    for i in range(1, split_k):                  # fixed order (deterministic), one fused XLA elementwise kernel
        y = y + out[i]
    if jnp.dtype(out_dtype) == jnp.bfloat16:     # RNE to bf16 that XLA keeps (as quant.round_to)
        y = jax.lax.reduce_precision(y, exponent_bits=8, mantissa_bits=7)
    return y.astype(out_dtype)


def _dw_kernel(se_ref, x_ref, dy_ref, o_ref, *, N, I, O, bo, bi, br):
    jo, ji, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)     # out tile, in tile, expert
    start, end = se_ref[0, e], se_ref[1, e]
    iota = lambda n: jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    ocols, icols = jo * bo + iota(bo), ji * bi + iota(bi)
    oc = (ocols if O % bo == 0 else jnp.minimum(ocols, O - 1))[None, :]      # [1, bo], clamped into dy
    ic = (icols if I % bi == 0 else jnp.minimum(icols, I - 1))[None, :]      # [1, bi], clamped into x

    def body(k, acc):
        rows = start + k * br + iota(br)
        r = jnp.minimum(rows, N - 1)[:, None]                                # [br, 1]
        inside = (rows < end)[:, None]                                       # other groups / past the groups: 0
        dyt = pltriton.load(dy_ref.at[r, oc], mask=jnp.broadcast_to(inside, (br, bo)), other=0.0)
        xt = pltriton.load(x_ref.at[r, ic], mask=jnp.broadcast_to(inside, (br, bi)), other=0.0)
        return acc + jax.lax.dot_general(dyt, xt, (((0,), (0,)), ((), ())), preferred_element_type=f32)

    acc = jax.lax.fori_loop(0, (end - start + br - 1) // br, body, jnp.zeros((bo, bi), f32))
    mask = (ocols < O)[:, None] & (icols < I)[None, :]
    pltriton.store(o_ref.at[e, ocols[:, None], icols[None, :]], acc.astype(o_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_o", "block_i", "block_r", "num_warps",
                                             "num_stages", "interpret"))
def grouped_matmul_dw(x, dy, group_sizes, *, out_dtype=f32, block_o: int | None = None, block_i: int | None = None,
                      block_r: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                      interpret: bool = False):
    """The weight gradient of `grouped_matmul`: x [N, in], dy [N, out] (bf16, rows sorted by group; rows past
    sum(group_sizes) ignored), group_sizes [E] int32 -> dw [E, out, in] in out_dtype, dw[e] = dy_e^T x_e (fp32
    accumulation of bf16 products; bf16 output RNE-rounded). Empty groups give zeros. Launch parameters left None
    take DW_DEFAULTS (untuned)."""
    d = DW_DEFAULTS
    bo, bi, br = block_o or d[0], block_i or d[1], block_r or d[2]
    num_warps, num_stages = num_warps or d[3], num_stages or d[4]
    (N, I), (Ny, O), E = x.shape, dy.shape, group_sizes.shape[0]
    if Ny != N or group_sizes.ndim != 1:
        raise ValueError(f"grouped_matmul_dw(gpu): x {x.shape}, dy {dy.shape}, group_sizes {group_sizes.shape}")
    if N == 0 or E == 0 or O == 0 or I == 0:
        return jnp.zeros((E, O, I), out_dtype)
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), N)
    se = jnp.stack([jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]]), ends]).astype(jnp.int32)  # [2, E]
    kernel = functools.partial(_dw_kernel, N=N, I=I, O=O, bo=bo, bi=bi, br=br)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(O, bo), pl.cdiv(I, bi), E),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((E, O, I), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="grouped_matmul_dw",
    )(se, x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16))
