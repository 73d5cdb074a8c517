"""Quantisers of the DeepSeek-V4 reference, simulated in pure jax.numpy.

Spec: v4-architecture.md (the project spec) sections 4.3 (FP8 weights, 128x128 E8M0
tiles), 4.4 (packed FP4 / MXFP4 expert weights and their lossless FP8 repack) and 6
("Quantisers": FP8/FP4 activation quantisation and the Hadamard transform).

All scales are powers of two.  ``ceil(log2(v))`` is taken from the exponent bits of the
float32 ``v`` (+1 when the mantissa is non-zero), as the reference kernels do, so every
quantiser shares one code path (:func:`pow2_scale`).  Every function is jit-able and
accepts arbitrary leading dimensions.

Note: XLA on CPU flushes float32 subnormals to zero in arithmetic, so E8M0 code 0
(2**-127, a float32 subnormal) decodes to the right bits but becomes 0 once multiplied.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FP8_MAX = 448.0
FP4_MAX = 6.0

FP8_AMAX_FLOOR = 1e-4  # act_quant / FP8 weight amax floor
FP4_AMAX_FLOOR = 6.0 * 2.0**-126  # fp4_act_quant amax floor

_MANTISSA_MASK = 0x007FFFFF
_F32_NAN_BITS = 0x7FC00000
_F32_2POW_M127_BITS = 0x00400000  # 2**-127 (subnormal)


# --------------------------------------------------------------------------- helpers



def round_to(x: jax.Array, dtype) -> jax.Array:
    """Cast to `dtype` with a rounding XLA keeps. Under jit XLA may use excess precision (it drops an
    f32 -> bf16 -> f32 round trip inside a fusion); the reference rounds to bf16 at every bf16 op, so narrowing
    casts to bf16 go through `reduce_precision` first."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and x.dtype != jnp.bfloat16:
        x = lax.reduce_precision(x.astype(jnp.float32), exponent_bits=8, mantissa_bits=7)
    return x.astype(dtype)

def _f32_bits(x):
    """Raw int32 bits of a float32 array."""
    return lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)


def _exp2i(e):
    """2.0**e as float32 for integer e, built from exponent bits (e clipped to [-126, 127])."""
    e = jnp.clip(jnp.asarray(e, jnp.int32), -126, 127)
    return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _ceil_log2(v):
    """ceil(log2(v)) for positive normal float32 v, from the exponent and mantissa bits."""
    bits = _f32_bits(v)
    exponent = ((bits >> 23) & 0xFF) - 127
    return exponent + ((bits & _MANTISSA_MASK) != 0).astype(jnp.int32)


def _e8m0_codes(scale):
    """E8M0 array -> int32 exponent codes 0..255."""
    return lax.bitcast_convert_type(scale, jnp.uint8).astype(jnp.int32)


# Rounding to FP8/FP4 values is written with reduce_precision (normals) and a fixed-point round (subnormals), not
# as a cast round trip: XLA's GPU compiler removes f32 -> fp8 -> f32 and f32 -> fp4 -> f32 cast pairs under jit
# (measured on H100: the KV FP8 and indexer FP4 simulations changed nothing), but keeps reduce_precision.
def _rne_e4m3_f32(x):
    """float32 -> the nearest E4M3FN value (ties to even) as float32, for |x| <= 448 (the caller clips)."""
    x = jnp.asarray(x, jnp.float32)
    normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=3)      # 3 mantissa bits, no overflow
    sub = jnp.round(x * 512.0) * (1.0 / 512.0)                                  # subnormals: steps of 2^-9
    return jnp.where(jnp.abs(x) < 2.0 ** -6, sub, normal)


def _round_e4m3(x):
    """float32 -> E4M3FN with round-to-nearest-even (caller clips to +-448)."""
    return _rne_e4m3_f32(x).astype(jnp.float8_e4m3fn)


def _round_e2m1(x):
    """float32 -> nearest E2M1 value (ties to even), returned as float32 (caller clips to +-6)."""
    x = jnp.asarray(x, jnp.float32)
    normal = jax.lax.reduce_precision(x, exponent_bits=3, mantissa_bits=1)      # 1, 1.5, 2, 3, 4, 6
    sub = jnp.round(x * 2.0) * 0.5                                              # 0, 0.5 (and 1 by rounding up)
    return jnp.where(jnp.abs(x) < 1.0, sub, normal)


def _pad_axis(x, axis, multiple, value=0):
    """Pad ``axis`` of x at the end up to a multiple of ``multiple``."""
    size = x.shape[axis]
    extra = -size % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks_last(x, block):
    """[..., n] -> [..., ceil(n/block), block] (zero padded)."""
    x = _pad_axis(x, -1, block)
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _tiles(x, bo, bi, value=0):
    """[..., out, in] -> [..., ceil(out/bo), bo, ceil(in/bi), bi] (padded with ``value``)."""
    x = _pad_axis(_pad_axis(x, -2, bo, value), -1, bi, value)
    *lead, o, i = x.shape
    return x.reshape(*lead, o // bo, bo, i // bi, bi)


def _untile(t, out, inp):
    """Inverse of :func:`_tiles`, cropping the padding."""
    *lead, ob, bo, ib, bi = t.shape
    return t.reshape(*lead, ob * bo, ib * bi)[..., :out, :inp]


# --------------------------------------------------------------------------- scales


def e8m0_to_f32(scale):
    """Decode an E8M0 array (code e -> 2**(e-127), 255 -> NaN) to float32 via its bits."""
    return e8m0_codes_to_f32(_e8m0_codes(scale))


def e8m0_codes_to_f32(e):
    """E8M0 codes (int32 0..255) -> float32 2**(e-127) from its bits: e << 23, code 0 -> 2**-127 (subnormal), 255 ->
    NaN. Integer ops only, so Pallas kernels decode raw scale bytes with it too (pallas_kernels.linear)."""
    bits = jnp.where(e == 255, _F32_NAN_BITS, jnp.where(e == 0, _F32_2POW_M127_BITS, e << 23))
    return lax.bitcast_convert_type(bits.astype(jnp.int32), jnp.float32)


def f32_to_e8m0(s):
    """Encode exact float32 powers of two as E8M0 (inverse of :func:`e8m0_to_f32`).

    The code is the float32 exponent field; 2**-127 (subnormal) maps to 0; NaN/inf -> 255.
    Inputs that are not powers of two are truncated to their power-of-two floor.
    """
    field = (_f32_bits(s) >> 23) & 0xFF
    return lax.bitcast_convert_type(field.astype(jnp.uint8), jnp.float8_e8m0fnu)


def pow2_scale(amax, max_value, *, multiply_by_reciprocal=True):
    """Reference scale rule s = 2**ceil(log2(amax / max_value)) as float32.

    The ratio is formed in float32 as ``amax * f32(1/max_value)`` (FP8 ``act_quant``,
    the default) or ``amax / max_value`` (``fp4_act_quant``:
    ``multiply_by_reciprocal=False``); ceil(log2) is then read from its bits.
    The caller applies the amax floor.  (For 448 and 6 both forms give the same scale for
    every float32 amax above the floors; both are kept to mirror the reference literally.)
    """
    amax = jnp.asarray(amax, jnp.float32)
    if multiply_by_reciprocal:
        v = amax * jnp.float32(1.0 / max_value)
    else:
        v = amax / jnp.float32(max_value)
    return _exp2i(_ceil_log2(v))


def _fp8_scale(amax):
    """FP8 scale from a float32 amax (floor 1e-4, ratio by multiplication with f32(1/448))."""
    return pow2_scale(jnp.maximum(amax, jnp.float32(FP8_AMAX_FLOOR)), FP8_MAX)


def _fp4_scale(amax):
    """FP4 scale from a float32 amax (floor 6*2**-126, ratio by division by 6)."""
    amax = jnp.maximum(amax, jnp.float32(FP4_AMAX_FLOOR))
    return pow2_scale(amax, FP4_MAX, multiply_by_reciprocal=False)


# --------------------------------------------------------------------------- FP4 packing


def _nibble_to_f32(nib):
    """E2M1 nibble (int32 0..15) -> float32, assembled from float32 bits (keeps -0.0)."""
    sign = (nib >> 3) & 1
    e = (nib >> 1) & 3
    m = nib & 1
    normal = ((e + 126) << 23) | (m << 22)  # 2**(e-1) * (1 + m/2)
    subnormal = jnp.where(m == 1, 126 << 23, 0)  # 0.5 or 0
    bits = jnp.where(e > 0, normal, subnormal) | (sign << 31)
    return lax.bitcast_convert_type(bits.astype(jnp.int32), jnp.float32)


def _f32_to_nibble(x):
    """Exactly E2M1-representable float32 -> nibble (int32 0..15), from float32 bits."""
    bits = _f32_bits(x)
    sign = (bits >> 31) & 1
    field = (bits >> 23) & 0xFF
    m = (bits >> 22) & 1
    # 0 -> 0; 0.5 (field 126) -> 1; 2**k*(1+m/2), k = field-127 in 0..2 -> (k+1)<<1 | m
    idx = jnp.where(field == 0, 0, jnp.where(field == 126, 1, ((field - 126) << 1) | m))
    return idx | (sign << 3)


FP4_TILE_ROWS = 128    # rows of one tile of the kernel layout (see fp4_to_halves)


def fp4_tiled(shape) -> bool:
    """Whether a uint8 kernel-layout FP4 weight of this shape [..., out, in/2] is stored in 128-row tiles: exactly
    when out is a multiple of FP4_TILE_ROWS (the rule every producer and reader of the layout applies)."""
    return len(shape) >= 2 and shape[-2] % FP4_TILE_ROWS == 0


def _tile_rows(b, tiles: bool):
    """[..., O, n] bytes in row order -> 128-row tiles (tiles=True) or back: in the tiled order the 4 KB block of
    rows 128t .. 128t + 127 and bytes 32c .. 32c + 31 (one 64-input group) is contiguous, blocks ordered (t, c)."""
    *lead, O, n = b.shape
    R = FP4_TILE_ROWS
    if O % R:
        raise ValueError(f"FP4 kernel-layout tiles need out % {R} == 0, got a weight {tuple(b.shape)}")
    if tiles:
        return b.reshape(*lead, O // R, R, n // 32, 32).swapaxes(-3, -2).reshape(*lead, O, n)
    return b.reshape(*lead, O // R, n // 32, R, 32).swapaxes(-3, -2).reshape(*lead, O, n)


def fp4_to_halves(packed, tiles: bool | None = None):
    """Packed FP4 in the checkpoint's layout (int8 [..., n], byte k = elements (2k, 2k + 1)) -> the GPU decode
    kernel's layout, marked by its dtype uint8. Same bytes and size; n % 32 == 0.

    Halves: per 64 elements, byte i (0..31) = elements (i, 32 + i) in its (low, high) nibble. The low nibbles of
    a 64-group's 32 bytes are then one whole 32-element scale block and the high nibbles the next, which the kernel
    multiplies without interleaving nibbles (pallas_kernels.grouped_matmul.gpu, FP8 x FP8 dots).
    Tiles: a weight [..., O, n] with O % 128 == 0 (`fp4_tiled`) is also stored in tiles of 128 rows x 32 bytes
    (4 KB, one 64-input group of 128 outputs), contiguous in memory, ordered by (row tile, group): a kernel
    program's K step reads whole 4 KB blocks instead of 32 bytes from each of 128 rows 2 KB apart.
    `tiles=False` skips the tiling (only for A/B measurements of the untiled layout: every reader applies the
    `fp4_tiled` rule, so such an array is read correctly only where a caller says so, e.g. the kernel's
    `fp4_tiles=False`)."""
    *lead, n = packed.shape
    if packed.dtype != jnp.int8 or n % 32:
        raise ValueError(f"fp4_to_halves: int8 [..., n] with n % 32 == 0 expected, got {packed.dtype} {packed.shape}")
    b = lax.bitcast_convert_type(packed, jnp.uint8)
    nib = jnp.stack([b & 15, b >> 4], axis=-1).reshape(*lead, n // 32, 2, 32)        # [.., group, half, i]
    h = (nib[..., 0, :] | (nib[..., 1, :] << 4)).reshape(*lead, n)
    if fp4_tiled(h.shape) if tiles is None else tiles:
        h = _tile_rows(h, True)
    return h


def fp4_from_halves(h, tiles: bool | None = None):
    """Inverse of `fp4_to_halves`: uint8 kernel layout (untiled first where `fp4_tiled`, or as `tiles` says) ->
    int8 in the checkpoint's layout."""
    *lead, n = h.shape
    if h.dtype != jnp.uint8 or n % 32:
        raise ValueError(f"fp4_from_halves: uint8 [..., n] with n % 32 == 0 expected, got {h.dtype} {h.shape}")
    if fp4_tiled(h.shape) if tiles is None else tiles:
        h = _tile_rows(h, False)
    b = h.reshape(*lead, n // 32, 32)
    nib = jnp.stack([b & 15, b >> 4], axis=-2).reshape(*lead, n, 2)                   # natural element order
    return lax.bitcast_convert_type(nib[..., 0] | (nib[..., 1] << 4), jnp.int8)


def is_fp4(w) -> bool:
    """Whether a stored weight (with a scale) is packed FP4: int8 (checkpoint layout) or uint8 ("halves")."""
    return w.dtype in (jnp.int8, jnp.uint8)


def fp4_unpack(packed):
    """Packed FP4 [..., n] -> float32 [..., 2n]: int8 (element 2k is the low nibble of byte k) or uint8 in the
    `fp4_to_halves` layout."""
    if packed.dtype == jnp.uint8:
        packed = fp4_from_halves(packed)
    b = lax.bitcast_convert_type(packed, jnp.uint8).astype(jnp.int32)
    lo = _nibble_to_f32(b & 0xF)
    hi = _nibble_to_f32(b >> 4)
    out = jnp.stack([lo, hi], axis=-1)
    return out.reshape(*out.shape[:-2], out.shape[-2] * 2)


def fp4_pack(values):
    """Float [..., 2n] of exact E2M1 values -> packed int8 [..., n] (inverse of fp4_unpack).

    Values must already be representable (use the quantisers to round); -0.0 keeps its sign.
    """
    values = jnp.asarray(values, jnp.float32)
    if values.shape[-1] % 2:
        raise ValueError(f"fp4_pack needs an even last axis, got {values.shape}")
    nib = _f32_to_nibble(values).reshape(*values.shape[:-1], values.shape[-1] // 2, 2)
    byte = nib[..., 0] | (nib[..., 1] << 4)
    return lax.bitcast_convert_type(byte.astype(jnp.uint8), jnp.int8)


# --------------------------------------------------------------------------- weights


def quantize_fp8_weight(w, block=(128, 128)):
    """Weight [..., out, in] -> (E4M3 [..., out, in], E8M0 [..., ceil(out/bo), ceil(in/bi)]).

    Per tile: amax floored at 1e-4, s = 2**ceil(log2(amax * f32(1/448))),
    q = E4M3(clip(w / s, +-448)) with round-to-nearest-even. Partial tiles allowed.
    """
    bo, bi = block
    w = jnp.asarray(w, jnp.float32)
    out, inp = w.shape[-2:]
    t = _tiles(w, bo, bi)
    s = _fp8_scale(jnp.max(jnp.abs(t), axis=(-3, -1)))  # [..., ob, ib]
    q = _round_e4m3(jnp.clip(t / s[..., :, None, :, None], -FP8_MAX, FP8_MAX))
    return _untile(q, out, inp), f32_to_e8m0(s)


def dequant_fp8_weight(w8, scale, dtype=jnp.bfloat16, block=(128, 128)):
    """W[..., i, j] = fp8[i, j] * 2**(E[i // bo, j // bi] - 127), exact in float32, then cast."""
    bo, bi = block
    out, inp = w8.shape[-2:]
    t = _tiles(w8.astype(jnp.float32), bo, bi)
    s = e8m0_to_f32(scale)
    return _untile(t * s[..., :, None, :, None], out, inp).astype(dtype)


def quantize_fp4_weight(w, block=32):
    """Weight [..., out, in] -> (packed int8 [..., out, in/2], E8M0 [..., out, ceil(in/block)]).

    Per row per ``block`` inputs: amax floored at 6*2**-126, s = 2**ceil(log2(amax / 6)),
    q = E2M1(clip(w / s, +-6)) with round-to-nearest-even. ``in`` must be even.
    """
    w = jnp.asarray(w, jnp.float32)
    inp = w.shape[-1]
    b = _blocks_last(w, block)
    s = _fp4_scale(jnp.max(jnp.abs(b), axis=-1))
    q = _round_e2m1(jnp.clip(b / s[..., None], -FP4_MAX, FP4_MAX))
    q = q.reshape(*q.shape[:-2], -1)[..., :inp]
    return fp4_pack(q), f32_to_e8m0(s)


def dequant_fp4_weight(packed, scale, dtype=jnp.bfloat16, block=32):
    """W[..., i, j] = e2m1(nibble[i, j]) * 2**(E[i, j // block] - 127), exact in float32, then cast."""
    v = fp4_unpack(packed)
    inp = v.shape[-1]
    b = _blocks_last(v, block) * e8m0_to_f32(scale)[..., None]
    return b.reshape(*b.shape[:-2], -1)[..., :inp].astype(dtype)


def fp4_to_fp8_weight(packed, scale):
    """Lossless repack of FP4 (1x32 scales) to FP8 with 128x128 E8M0 tiles (spec 4.4).

    Tile scale = max(sub-scales in the tile) / 2**6; each value becomes
    e2m1 * (sub_scale / tile_scale) <= 6 * 2**6 = 384, exact in E4M3 provided the sub-scales
    of a tile span at most 2**14 (below that, values underflow and are rounded RNE).
    Returns (E4M3 [..., out, in], E8M0 [..., ceil(out/128), ceil(in/128)]).
    """
    v = fp4_unpack(packed)  # [..., out, in]
    out, inp = v.shape[-2:]
    if inp % 32:
        raise ValueError(f"fp4_to_fp8_weight needs in % 32 == 0, got in={inp}")
    e = _e8m0_codes(scale)  # [..., out, in/32]
    et = _tiles(e, 128, 4)  # [..., ob, 128, ib, 4]; padding code 0 never wins the max
    tile_code = jnp.maximum(jnp.max(et, axis=(-3, -1)) - 6, 0)  # [..., ob, ib]
    tile_full = jnp.repeat(jnp.repeat(tile_code, 128, axis=-2), 4, axis=-1)[..., :out, : inp // 32]
    ratio = _exp2i(e - tile_full)  # sub_scale / tile_scale, <= 2**6
    w = _blocks_last(v, 32) * ratio[..., None]
    w8 = _round_e4m3(w.reshape(*w.shape[:-2], -1))
    tile_scale = lax.bitcast_convert_type(tile_code.astype(jnp.uint8), jnp.float8_e8m0fnu)
    return w8, tile_scale


# --------------------------------------------------------------------------- activations


def act_quant_fp8(x, block=128):
    """Per-row, per-``block`` FP8 activation quantisation (reference ``act_quant``).

    amax = max(max|x| in float32, 1e-4); s = 2**ceil(log2(amax * f32(1/448)));
    q = E4M3(clip(x / s, +-448)) RNE. Returns (q E4M3 of x's shape, s float32
    [..., ceil(n/block)]); a partial last block is allowed.
    """
    x = jnp.asarray(x)
    n = x.shape[-1]
    b = _blocks_last(x.astype(jnp.float32), block)
    s = _fp8_scale(jnp.max(jnp.abs(b), axis=-1))
    q = _round_e4m3(jnp.clip(b / s[..., None], -FP8_MAX, FP8_MAX))
    return q.reshape(*q.shape[:-2], -1)[..., :n], s


def _fp8_sim_value(x, block):
    q, s = act_quant_fp8(x, block)
    y = _blocks_last(q.astype(jnp.float32), block) * s[..., None]
    return y.reshape(*y.shape[:-2], -1)[..., : x.shape[-1]].astype(x.dtype)


def _fp4_sim_value(x, block):
    b = _blocks_last(x.astype(jnp.float32), block)
    s = _fp4_scale(jnp.max(jnp.abs(b), axis=-1))[..., None]
    y = _round_e2m1(jnp.clip(b / s, -FP4_MAX, FP4_MAX)) * s
    return y.reshape(*y.shape[:-2], -1)[..., : x.shape[-1]].astype(x.dtype)


def _straight_through(fn):
    """Wrap ``fn(x, block)`` with an identity (straight-through) gradient w.r.t. x."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def f(x, block):
        return fn(x, block)

    def fwd(x, block):
        return fn(x, block), None

    def bwd(block, _, g):
        return (g,)

    f.defvjp(fwd, bwd)
    return f


_fp8_sim = _straight_through(_fp8_sim_value)
_fp4_sim = _straight_through(_fp4_sim_value)


def fp8_sim(x, block=128):
    """In-place FP8 simulation x.dtype(E4M3(clip(x/s, +-448)) * s) of act_quant; identity gradient."""
    return _fp8_sim(jnp.asarray(x), block)


def fp4_sim(x, block=32):
    """In-place FP4 simulation x.dtype(E2M1(clip(x/s, +-6)) * s) of fp4_act_quant; identity gradient."""
    return _fp4_sim(jnp.asarray(x), block)


def sylvester(n: int) -> np.ndarray:
    """The n x n Sylvester-ordered Hadamard matrix (+-1, float32); n a power of 2."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


HADAMARD_GEMM_ROWS = 8192     # bf16 inputs with at least this many rows take the GEMM form (decode: <= 64 x 64)


def hadamard_gemm(x):
    """`hadamard` of bf16 x as one bf16 GEMM with the +-1 Sylvester matrix (exact products, fp32 accumulation),
    times 1/sqrt(n), rounded to bf16: the form `hadamard` takes from HADAMARD_GEMM_ROWS rows on."""
    n = x.shape[-1]
    y = jnp.einsum("...k,kn->...n", x, jnp.asarray(sylvester(n), jnp.bfloat16), preferred_element_type=jnp.float32)
    return round_to(y * jnp.float32(1.0 / math.sqrt(n)), x.dtype)


def hadamard(x):
    """Sylvester-ordered Walsh-Hadamard transform of the last axis times 1/sqrt(n), fp32 inside, x.dtype out.

    bf16 x with at least HADAMARD_GEMM_ROWS rows (the model's indexer queries and keys at prefill): one bf16 GEMM
    with the +-1 matrix -- every product is exact and the dot accumulates in fp32 -- then the fp32 scale and the
    rounding to bf16. Otherwise (decode sizes, fp32): the fast butterfly (log2 n stages) in fp32. The two differ
    only in fp32 summation order: on 537M random bf16 outputs 2.7e-7 of them by one or two bf16 steps
    (scripts/probe_hadamard.py); the reference's CUDA kernel has an order of its own.
    Why: XLA fuses the butterfly's stacked stages into one loop fusion, 4.4x slower than the GEMM at prefill (H100,
    16K tokens x 64 heads x 128: 2.67 ms against 0.60 ms), but at decode that one fusion beats a GEMM call plus its
    scaling kernel (6-layer Flash on an H100: 2.42 ms/token with the butterfly, 2.51 with the GEMM at one token).
    n must be a power of 2."""
    x = jnp.asarray(x)
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two last axis, got {n}")
    if x.dtype == jnp.bfloat16 and math.prod(x.shape[:-1]) >= HADAMARD_GEMM_ROWS:
        return hadamard_gemm(x)
    scale = jnp.float32(1.0 / math.sqrt(n))
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    y = y.reshape(*lead, n) * scale
    return round_to(y, x.dtype)
