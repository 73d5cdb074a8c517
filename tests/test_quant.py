"""Tests for v4jax.quant against independent numpy / ml_dtypes oracles (spec 4.3, 4.4, 6)."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from v4jax import quant as Q

E4M3 = ml_dtypes.float8_e4m3fn
E2M1 = ml_dtypes.float4_e2m1fn
E8M0 = ml_dtypes.float8_e8m0fnu
BF16 = ml_dtypes.bfloat16
FP4_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

# jitted entry points (one compilation per shape keeps the suite fast; eager use is tested too)
e8m0_to_f32 = jax.jit(Q.e8m0_to_f32)
f32_to_e8m0 = jax.jit(Q.f32_to_e8m0)
pow2_scale = jax.jit(Q.pow2_scale, static_argnames=("max_value", "multiply_by_reciprocal"))
fp4_pack = jax.jit(Q.fp4_pack)
fp4_unpack = jax.jit(Q.fp4_unpack)
act_quant_fp8 = jax.jit(Q.act_quant_fp8, static_argnames="block")
fp8_sim = jax.jit(Q.fp8_sim, static_argnames="block")
fp4_sim = jax.jit(Q.fp4_sim, static_argnames="block")
quantize_fp8_weight = jax.jit(Q.quantize_fp8_weight, static_argnames="block")
dequant_fp8_weight = jax.jit(Q.dequant_fp8_weight, static_argnames=("dtype", "block"))
quantize_fp4_weight = jax.jit(Q.quantize_fp4_weight, static_argnames="block")
dequant_fp4_weight = jax.jit(Q.dequant_fp4_weight, static_argnames=("dtype", "block"))
fp4_to_fp8_weight = jax.jit(Q.fp4_to_fp8_weight)
hadamard = jax.jit(Q.hadamard)
round_e4m3 = jax.jit(Q._round_e4m3)
round_e2m1 = jax.jit(Q._round_e2m1)


# --------------------------------------------------------------------------- numpy oracles


def np_ceil_log2(v):
    """ceil(log2(v)) of float32 v, via float64 log2 (independent of any bit tricks)."""
    return np.ceil(np.log2(np.asarray(v, np.float32).astype(np.float64))).astype(np.int64)


def np_fp8_scale(amax):
    amax = np.maximum(np.asarray(amax, np.float32), np.float32(1e-4))
    return 2.0 ** np_ceil_log2(amax * np.float32(1.0 / 448.0))  # f32 product, as the reference


def np_fp4_scale(amax):
    amax = np.maximum(np.asarray(amax, np.float32), np.float32(6.0 * 2.0**-126))
    return 2.0 ** np_ceil_log2(amax / np.float32(6.0))


def np_blocks(x, block):
    n = x.shape[-1]
    pad = -n % block
    x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, block)


def np_unblock(b, n):
    return b.reshape(*b.shape[:-2], -1)[..., :n]


def np_act_quant_fp8(x, block):
    """Returns (q as float64, s float64 [..., nb], y = q*s float64)."""
    x64 = np.asarray(x).astype(np.float64)
    b = np_blocks(x64, block)
    s = np_fp8_scale(np.abs(b).max(-1))
    q = np.clip(b / s[..., None], -448, 448).astype(E4M3).astype(np.float64)
    n = x64.shape[-1]
    return np_unblock(q, n), s, np_unblock(q * s[..., None], n)


def np_fp4_sim(x, block):
    x64 = np.asarray(x).astype(np.float64)
    b = np_blocks(x64, block)
    s = np_fp4_scale(np.abs(b).max(-1))[..., None]
    q = np.clip(b / s, -6, 6).astype(E2M1).astype(np.float64)
    return np_unblock(q * s, x64.shape[-1])


def np_quant_fp8_weight(w):
    """Per 128x128 tile oracle: (q float64 [out,in], scale exponent codes [ob, ib])."""
    w = np.asarray(w, np.float64)
    out, inp = w.shape
    ob, ib = -(-out // 128), -(-inp // 128)
    q = np.zeros_like(w)
    codes = np.zeros((ob, ib), np.int64)
    for a in range(ob):
        for b in range(ib):
            t = w[a * 128 : (a + 1) * 128, b * 128 : (b + 1) * 128]
            s = np_fp8_scale(np.abs(t).max())
            codes[a, b] = int(np.log2(s)) + 127
            q[a * 128 : (a + 1) * 128, b * 128 : (b + 1) * 128] = (
                np.clip(t / s, -448, 448).astype(E4M3).astype(np.float64)
            )
    return q, codes


def np_hadamard_matrix(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def e8m0_codes(s):
    return np.asarray(s).view(np.uint8).astype(np.int64)


def rng(seed):
    return np.random.default_rng(seed)


def random_rows(seed, shape, lo=-6, hi=4):
    """Normal values with a random magnitude per row (spanning 10**lo .. 10**hi)."""
    r = rng(seed)
    mag = 10.0 ** r.uniform(lo, hi, size=shape[:-1] + (1,))
    return (r.standard_normal(shape) * mag).astype(np.float32)


# --------------------------------------------------------------------------- E8M0


def test_e8m0_decode_all_codes():
    codes = np.arange(256, dtype=np.uint8)
    got = np.asarray(e8m0_to_f32(jnp.asarray(codes.view(E8M0))))
    assert got.dtype == np.float32
    want = (2.0 ** (np.arange(255, dtype=np.float64) - 127)).astype(np.float32)
    np.testing.assert_array_equal(bits(got[:255]), bits(want))
    assert got[0] == np.float32(2.0**-127) and got[0] != 0  # subnormal bits kept
    assert np.isnan(got[255])
    # ml_dtypes' own decoding agrees
    np.testing.assert_array_equal(bits(got[:255]), bits(codes[:255].view(E8M0).astype(np.float32)))


def test_f32_to_e8m0_roundtrip():
    codes = np.arange(256, dtype=np.uint8)
    back = f32_to_e8m0(e8m0_to_f32(jnp.asarray(codes.view(E8M0))))
    assert back.dtype == jnp.float8_e8m0fnu
    np.testing.assert_array_equal(e8m0_codes(back), codes)
    # from float32 powers of two computed in numpy, with leading dims
    k = rng(0).integers(-126, 128, size=(3, 5))
    s = (2.0 ** k.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(e8m0_codes(f32_to_e8m0(jnp.asarray(s))), k + 127)


def test_pow2_scale_matches_ceil_log2():
    r = rng(1)
    amax = (10.0 ** r.uniform(-30, 30, size=4000)).astype(np.float32)
    k = r.integers(-100, 100, size=200).astype(np.float64)
    edge = np.concatenate([448.0 * 2.0**k, 6.0 * 2.0**k]).astype(np.float32)
    amax = np.concatenate([amax, edge, np.nextafter(edge, np.inf), np.nextafter(edge, 0)])
    got = np.asarray(pow2_scale(jnp.asarray(amax), 448.0))
    np.testing.assert_array_equal(got, 2.0 ** np_ceil_log2(amax * np.float32(1 / 448)))
    got = np.asarray(pow2_scale(jnp.asarray(amax), 6.0, multiply_by_reciprocal=False))
    np.testing.assert_array_equal(got, 2.0 ** np_ceil_log2(amax / np.float32(6)))
    # exhaustive over every float32 amax within 1/64 of 448 and of 6 (where the scale steps)
    for m in (448.0, 6.0):
        lo, hi = np.float32(m * (1 - 1 / 64)).view(np.uint32), np.float32(m * (1 + 1 / 64)).view(np.uint32)
        a = np.arange(lo, hi, dtype=np.uint32).view(np.float32)
        for mult, v in ((True, a * np.float32(1 / m)), (False, a / np.float32(m))):
            got = np.asarray(pow2_scale(jnp.asarray(a), max_value=m, multiply_by_reciprocal=mult))
            np.testing.assert_array_equal(got, 2.0 ** np_ceil_log2(v))
    # exact powers of two of the ratio are not rounded up
    assert float(pow2_scale(jnp.float32(6 * 2.0**-5), 6.0, multiply_by_reciprocal=False)) == 2.0**-5
    assert float(pow2_scale(jnp.float32(448.0), 448.0)) == 1.0


# --------------------------------------------------------------------------- FP4 packing


def test_fp4_decode_all_nibbles():
    nib = np.arange(16, dtype=np.uint8)
    packed = (nib | ((15 - nib) << 4)).astype(np.uint8).view(np.int8)
    got = np.asarray(fp4_unpack(jnp.asarray(packed)))
    assert got.shape == (32,) and got.dtype == np.float32
    table = np.array(FP4_TABLE + [-v for v in FP4_TABLE], np.float32)
    np.testing.assert_array_equal(bits(got[0::2]), bits(table))
    np.testing.assert_array_equal(bits(got[1::2]), bits(table[::-1]))
    assert np.signbit(got[0::2][8])  # nibble 8 is -0.0
    # ml_dtypes stores one E2M1 per byte in the low nibble: same decoding
    np.testing.assert_array_equal(bits(got[0::2]), bits(nib.view(E2M1).astype(np.float32)))


def test_fp4_packing_order():
    # byte 0x2B: low nibble 0xB = -1.5 (element 0), high nibble 0x2 = 1.0 (element 1)
    # byte 0xF1 (int8 -15): low 0x1 = 0.5, high 0xF = -6.0
    packed = np.array([[0x2B, 0xF1]], np.uint8).view(np.int8)
    got = np.asarray(fp4_unpack(jnp.asarray(packed)))
    np.testing.assert_array_equal(got, [[-1.5, 1.0, 0.5, -6.0]])
    repacked = np.asarray(fp4_pack(jnp.asarray(got)))
    assert repacked.dtype == np.int8
    np.testing.assert_array_equal(repacked.view(np.uint8), [[0x2B, 0xF1]])


def test_fp4_pack_unpack_roundtrip():
    r = rng(2)
    vals = np.array(FP4_TABLE + [-v for v in FP4_TABLE], np.float32)
    v = vals[r.integers(0, 16, size=(3, 4, 64))]
    packed = fp4_pack(jnp.asarray(v))
    assert packed.shape == (3, 4, 32) and packed.dtype == jnp.int8
    back = np.asarray(fp4_unpack(packed))
    np.testing.assert_array_equal(bits(back), bits(v))  # includes -0.0
    # bytes agree with ml_dtypes' nibble encoding
    nib = v.astype(E2M1).view(np.uint8) & 0xF
    np.testing.assert_array_equal(np.asarray(packed).view(np.uint8), nib[..., 0::2] | (nib[..., 1::2] << 4))
    # and every byte survives unpack -> pack
    allb = np.arange(256, dtype=np.uint8).view(np.int8)
    np.testing.assert_array_equal(np.asarray(fp4_pack(fp4_unpack(jnp.asarray(allb)))), allb)


# --------------------------------------------------------------------------- element casts


def test_e4m3_and_e2m1_casts_match_ml_dtypes():
    # all finite E4M3 values, their midpoints (ties) and midpoints +- 1 float32 ulp
    e4 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
    e4 = np.unique(e4[np.isfinite(e4)])
    mid = ((e4[1:] + e4[:-1]) / 2).astype(np.float32)
    r = rng(3)
    rand = (r.uniform(-1, 1, 20000) * 10.0 ** r.uniform(-4, np.log10(448), 20000)).astype(np.float32)
    x = np.concatenate([e4.astype(np.float32), mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf), rand])
    got = np.asarray(round_e4m3(jnp.asarray(x)))
    assert got.dtype == E4M3
    np.testing.assert_array_equal(got.view(np.uint8), x.astype(E4M3).view(np.uint8))

    e2 = np.array(sorted(set(FP4_TABLE + [-v for v in FP4_TABLE])))
    mid = ((e2[1:] + e2[:-1]) / 2).astype(np.float32)
    rand = r.uniform(-6, 6, 20000).astype(np.float32)
    x = np.concatenate([e2.astype(np.float32), mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf), rand])
    got = np.asarray(round_e2m1(jnp.asarray(x)))
    np.testing.assert_array_equal(got, x.astype(E2M1).astype(np.float32))
    # ties to even, spelled out
    ties = jnp.asarray([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(round_e2m1(ties)), [0, 1, 1, 2, 2, 4, 4, -1, -4])


# --------------------------------------------------------------------------- FP8 activations


@pytest.mark.parametrize("block", [128, 64])
@pytest.mark.parametrize("shape", [(4, 256), (2, 3, 300), (5, 100)])
def test_act_quant_fp8_matches_oracle(shape, block):
    x = random_rows(10 + len(shape) + block, shape)
    x[..., : min(block, shape[-1]) // 2] *= 0  # half of the first block zero
    x.reshape(-1, shape[-1])[0] = 0.0  # an all-zero row: 1e-4 floor
    q, s = act_quant_fp8(jnp.asarray(x), block)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == jnp.float32 and s.shape == shape[:-1] + (-(-shape[-1] // block),)
    q_ref, s_ref, _ = np_act_quant_fp8(x, block)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float64), q_ref)
    zero_row_scale = np.asarray(s).reshape(-1, s.shape[-1])[0]
    np.testing.assert_array_equal(zero_row_scale, 2.0 ** np.ceil(np.log2(np.float32(1e-4) * np.float32(1 / 448))))


def test_act_quant_fp8_ties_and_amax_edges():
    # block amax exactly 448 -> s = 1; other entries on E4M3 midpoints (ties to even)
    e4 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
    e4 = np.unique(e4[np.isfinite(e4) & (e4 >= 0)])
    mid = (e4[1:] + e4[:-1]) / 2
    row = np.zeros(256)
    row[: mid.size] = mid
    row[mid.size : 2 * mid.size] = -mid
    row[255] = 448.0
    x = np.stack([row, row * 2.0**-20, row * 2.0**40]).astype(np.float32)
    q, s = act_quant_fp8(jnp.asarray(x), 256)
    np.testing.assert_array_equal(np.asarray(s)[:, 0], [1.0, 2.0**-20, 2.0**40])
    np.testing.assert_array_equal(np.asarray(q)[0].astype(np.float64), row.astype(np.float32).astype(E4M3).astype(np.float64))
    assert float(np.asarray(q)[0, 0]) == 0.0 and float(np.asarray(q)[0, 1]) == 2.0**-9 * 2  # ties to even
    # the element equal to amax maps to exactly +-448 when amax = 448 * 2^k; slightly above -> next scale
    y = np.array([[448.0, -448.0 * (1 + 2.0**-23)]], np.float32)
    q, s = act_quant_fp8(jnp.asarray(y), 128)
    q_ref, s_ref, _ = np_act_quant_fp8(y, 128)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float64), q_ref)
    assert float(s[0, 0]) == 2.0 and float(q[0, 0]) == 224.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("block", [128, 64])
def test_fp8_sim_bit_exact(dtype, block):
    x = jnp.asarray(random_rows(20 + block, (2, 3, 300)), dtype)
    x = x.at[0, 0, :block].set(0)
    y = fp8_sim(x, block)
    assert y.dtype == x.dtype and y.shape == x.shape
    _, _, y_ref = np_act_quant_fp8(np.asarray(x.astype(jnp.float32)), block)
    y_ref = y_ref.astype(BF16 if dtype == jnp.bfloat16 else np.float32)
    np.testing.assert_array_equal(bits(np.asarray(y)), bits(y_ref))
    assert not np.array_equal(np.asarray(y), np.asarray(x))  # it does quantise
    if dtype == jnp.bfloat16 and block == 64:  # eager (un-jitted) call gives the same bits
        np.testing.assert_array_equal(bits(np.asarray(Q.fp8_sim(x[0], block))), bits(y_ref[0]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fp4_sim_bit_exact(dtype):
    x = random_rows(30, (3, 2, 200), lo=-30, hi=30)
    x[0, 0, :32] = 0.0  # floor
    x[0, 1, :32] = np.tile([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], 4) * (1 - 2 * (np.arange(32) % 2))  # ties
    x = jnp.asarray(x, dtype)
    y = fp4_sim(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    y_ref = np_fp4_sim(np.asarray(x.astype(jnp.float32)), 32).astype(BF16 if dtype == jnp.bfloat16 else np.float32)
    np.testing.assert_array_equal(bits(np.asarray(y)), bits(y_ref))
    np.testing.assert_array_equal(
        np.asarray(y[0, 1, :8].astype(jnp.float32)), [0, -1, 1, -2, 2, -4, 4, -6]
    )  # s = 1, ties to even
    if dtype == jnp.bfloat16:  # eager (un-jitted) call gives the same bits
        np.testing.assert_array_equal(bits(np.asarray(Q.fp4_sim(x[0]))), bits(y_ref[0]))


@pytest.mark.parametrize("fn", [Q.fp8_sim, Q.fp4_sim])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sim_gradient_is_identity(fn, dtype):
    x = jnp.asarray(random_rows(40, (3, 160), lo=-2, hi=2), dtype)
    w = jnp.asarray(rng(41).standard_normal((3, 160)), dtype)

    def loss(x):
        return jnp.sum(fn(x).astype(jnp.float32) * w.astype(jnp.float32))

    g = jax.jit(jax.grad(loss))(x)
    assert g.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    if dtype == jnp.bfloat16:  # eager differentiation too
        np.testing.assert_array_equal(np.asarray(jax.grad(loss)(x)), np.asarray(w))


# --------------------------------------------------------------------------- FP8 weights


def test_quantize_fp8_weight_matches_oracle_partial_tiles():
    r = rng(50)
    w = (r.standard_normal((300, 200)) * 10.0 ** r.uniform(-3, 3, size=(300, 1))).astype(np.float32)
    w[256:, 128:] = 0.0  # an all-zero (partial) tile
    w8, s = quantize_fp8_weight(jnp.asarray(w))
    assert w8.dtype == jnp.float8_e4m3fn and w8.shape == (300, 200)
    assert s.dtype == jnp.float8_e8m0fnu and s.shape == (3, 2)
    q_ref, codes_ref = np_quant_fp8_weight(w)
    np.testing.assert_array_equal(np.asarray(w8).astype(np.float64), q_ref)
    np.testing.assert_array_equal(e8m0_codes(s), codes_ref)
    # per-tile max |q| lies in [224, 448]; the zero tile has the 1e-4 floor scale
    assert 224 <= np.abs(q_ref[:128, :128]).max() <= 448
    assert e8m0_codes(s)[2, 1] == 127 + np.ceil(np.log2(np.float32(1e-4) * np.float32(1 / 448)))


def test_fp8_weight_roundtrip_and_idempotence():
    r = rng(51)
    w = (r.standard_normal((2, 260, 130)) * np.float32(0.02)).astype(np.float32)
    w8, s = quantize_fp8_weight(jnp.asarray(w))
    assert s.shape == (2, 3, 2)
    for e in range(2):  # batch dims = per-slice
        w8e, se = quantize_fp8_weight(jnp.asarray(w[e]))
        np.testing.assert_array_equal(np.asarray(w8[e]).view(np.uint8), np.asarray(w8e).view(np.uint8))
        np.testing.assert_array_equal(e8m0_codes(s[e]), e8m0_codes(se))
    deq = np.asarray(dequant_fp8_weight(w8, s, jnp.float32))
    # exact: fp8 * 2^(E-127) in float64
    sf = 2.0 ** (e8m0_codes(s) - 127.0)
    sfull = np.repeat(np.repeat(sf, 128, -2), 128, -1)[..., :260, :130]
    np.testing.assert_array_equal(deq.astype(np.float64), np.asarray(w8).astype(np.float64) * sfull)
    # error bound: half an E4M3 ulp (3 mantissa bits) or half the smallest subnormal step
    err = np.abs(deq.astype(np.float64) - w)
    assert np.all(err <= np.maximum(np.abs(w) * 2.0**-4, sfull * 2.0**-10))
    # bf16 output is the bf16 rounding of the exact value
    deq_bf = np.asarray(dequant_fp8_weight(w8, s))
    assert deq_bf.dtype == BF16
    np.testing.assert_array_equal(bits(deq_bf), bits(deq.astype(BF16)))
    # re-quantising the dequantised weight reproduces it exactly
    w8b, sb = quantize_fp8_weight(jnp.asarray(deq))
    np.testing.assert_array_equal(np.asarray(dequant_fp8_weight(w8b, sb, jnp.float32)), deq)


# --------------------------------------------------------------------------- FP4 weights


def fp4_weight_oracle(w):
    """(q float64 [..., out, in], codes [..., out, ceil(in/32)])."""
    w64 = w.astype(np.float64)
    b = np_blocks(w64, 32)
    s = np_fp4_scale(np.abs(b).max(-1))
    q = np.clip(b / s[..., None], -6, 6).astype(E2M1).astype(np.float64)
    return np_unblock(q, w.shape[-1]), np.log2(s).astype(np.int64) + 127


@pytest.mark.parametrize("shape", [(64, 256), (2, 5, 80)])
def test_quantize_fp4_weight_matches_oracle(shape):
    r = rng(60)
    w = (r.standard_normal(shape) * 2.0 ** r.integers(-12, 4, size=shape[:-1] + (1,))).astype(np.float32)
    w[..., 0, :32] = 0.0
    packed, s = quantize_fp4_weight(jnp.asarray(w))
    assert packed.dtype == jnp.int8 and packed.shape == shape[:-1] + (shape[-1] // 2,)
    assert s.dtype == jnp.float8_e8m0fnu and s.shape == shape[:-1] + (-(-shape[-1] // 32),)
    q_ref, codes_ref = fp4_weight_oracle(w)
    np.testing.assert_array_equal(e8m0_codes(s), codes_ref)
    np.testing.assert_array_equal(np.asarray(fp4_unpack(packed)).astype(np.float64), q_ref)
    nib = q_ref.astype(E2M1).view(np.uint8) & 0xF
    np.testing.assert_array_equal(np.asarray(packed).view(np.uint8), nib[..., 0::2] | (nib[..., 1::2] << 4))
    # dequant = q * 2^(E-127), exact, then cast
    sfull = np.repeat(2.0 ** (codes_ref - 127.0), 32, -1)[..., : shape[-1]]
    deq = np.asarray(dequant_fp4_weight(packed, s, jnp.float32))
    np.testing.assert_array_equal(deq.astype(np.float64), q_ref * sfull)
    np.testing.assert_array_equal(bits(np.asarray(dequant_fp4_weight(packed, s))), bits(deq.astype(BF16)))
    # error bound: half the largest E2M1 spacing (2, between 4 and 6) times s
    assert np.all(np.abs(deq - w) <= sfull)


def np_fp8_tile_codes(codes4, out, inp):
    """Oracle tile scale codes: max of the 1x32 sub-scale codes of each 128x128 tile, minus 6."""
    c = np.pad(codes4, [(0, 0)] * (codes4.ndim - 2) + [(0, -out % 128), (0, -(inp // 32) % 4)])
    return c.reshape(*c.shape[:-2], c.shape[-2] // 128, 128, c.shape[-1] // 4, 4).max(axis=(-3, -1)) - 6


def check_fp4_to_fp8_exact(packed, s4):
    out, inp = packed.shape[-2], packed.shape[-1] * 2
    w8, s8 = fp4_to_fp8_weight(packed, s4)
    assert w8.dtype == jnp.float8_e4m3fn and w8.shape == packed.shape[:-1] + (inp,)
    assert s8.dtype == jnp.float8_e8m0fnu and s8.shape == packed.shape[:-2] + (-(-out // 128), -(-inp // 128))
    d4 = np.asarray(dequant_fp4_weight(packed, s4, jnp.float32))
    d8 = np.asarray(dequant_fp8_weight(w8, s8, jnp.float32))
    np.testing.assert_array_equal(bits(d8), bits(d4))
    np.testing.assert_array_equal(bits(np.asarray(dequant_fp8_weight(w8, s8))), bits(np.asarray(dequant_fp4_weight(packed, s4))))
    np.testing.assert_array_equal(e8m0_codes(s8), np_fp8_tile_codes(e8m0_codes(s4), out, inp))
    assert np.abs(np.asarray(w8).astype(np.float32)).max() <= 384  # 6 * 2^6


@pytest.mark.parametrize("shape", [(300, 192), (2, 130, 160), (128, 128)])
def test_fp4_to_fp8_weight_exact_from_quantised(shape):
    r = rng(70 + len(shape))
    inp = shape[-1]
    sub = 2.0 ** r.integers(-18, -7, size=shape[:-1] + (inp // 32, 1))  # sub-scale spread ~2^10..2^12
    w = (r.standard_normal(shape[:-1] + (inp // 32, 32)) * sub).reshape(shape).astype(np.float32)
    check_fp4_to_fp8_exact(*quantize_fp4_weight(jnp.asarray(w)))


def test_fp4_to_fp8_weight_exact_at_scale_ratio_bound():
    # random nibbles (all 16 codes) and sub-scale codes spanning exactly 2^14 within every tile
    r = rng(80)
    shape = (2, 200, 288)
    packed = jnp.asarray(r.integers(-128, 128, size=shape[:-1] + (shape[-1] // 2,)).astype(np.int8))
    codes = r.integers(100, 115, size=shape[:-1] + (shape[-1] // 32,))
    codes[..., ::128, ::4] = 114  # every tile holds the max ...
    codes[..., 1::128, 1::4] = 100  # ... and the min
    s4 = jnp.asarray(codes.astype(np.uint8).view(E8M0))
    check_fp4_to_fp8_exact(packed, s4)
    # one step beyond the bound, 0.5 * 2^-9 = 2^-10 underflows E4M3: the repack is no longer exact
    codes[..., 1::128, 1::4] = 99
    w8, s8 = fp4_to_fp8_weight(packed, jnp.asarray(codes.astype(np.uint8).view(E8M0)))
    lossless = np.array_equal(
        np.asarray(dequant_fp8_weight(w8, s8, jnp.float32)),
        np.asarray(dequant_fp4_weight(packed, jnp.asarray(codes.astype(np.uint8).view(E8M0)), jnp.float32)),
    )
    assert not lossless


# --------------------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64, 128, 256])
def test_hadamard_matches_sylvester_matrix(n):
    h = np_hadamard_matrix(n)
    x = rng(n).standard_normal((2, 3, n)).astype(np.float32)
    y = np.asarray(hadamard(jnp.asarray(x)))
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x.astype(np.float64) @ h / math.sqrt(n), rtol=0, atol=2e-6 * math.sqrt(n))
    # small integers: butterfly sums are exact, so only the final f32 scaling rounds -> bit exact
    xi = rng(n + 1).integers(-8, 9, size=(5, n)).astype(np.float32)
    yi = np.asarray(hadamard(jnp.asarray(xi)))
    want = (xi.astype(np.float64) @ h).astype(np.float32) * np.float32(1 / math.sqrt(n))
    np.testing.assert_array_equal(yi, want)
    # orthogonal: applying twice gives back x
    np.testing.assert_allclose(np.asarray(hadamard(hadamard(jnp.asarray(x)))), x, rtol=0, atol=1e-5)
    # bf16 in -> bf16 out = bf16(f32 result)
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = hadamard(xb)
    assert yb.dtype == jnp.bfloat16
    ref = np.asarray(hadamard(xb.astype(jnp.float32))).astype(BF16)
    np.testing.assert_array_equal(bits(np.asarray(yb)), bits(ref))


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError):
        hadamard(jnp.ones((2, 12)))


def test_fp8_fp4_rounding_matches_the_casts_bit_for_bit():
    """The reduce_precision form of E4M3FN / E2M1 rounding (XLA's GPU compiler removes cast round trips under jit,
    it keeps reduce_precision) equals the dtype conversions, incl. ties, subnormals and the range ends."""
    from v4jax.quant import _rne_e4m3_f32, _round_e2m1
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1 << 18) * np.exp2(rng.integers(-14, 9, 1 << 18))).astype(np.float32)
    ties8 = np.concatenate([np.arange(-4096, 4097) / 4096.0, np.arange(-448, 448.01, 0.25)]).astype(np.float32)
    x8 = np.clip(np.concatenate([x, ties8]), -448, 448)
    want8 = np.asarray(jnp.asarray(x8).astype(jnp.float8_e4m3fn).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(jax.jit(_rne_e4m3_f32)(x8)), want8)
    x4 = np.clip(np.concatenate([x / 64, np.arange(-6, 6.0001, 0.125)]).astype(np.float32), -6, 6)
    want4 = np.asarray(jnp.asarray(x4).astype(jnp.float4_e2m1fn).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(jax.jit(_round_e2m1)(x4)), want4)


def test_hadamard_gemm_form_for_many_bf16_rows():
    """From HADAMARD_GEMM_ROWS bf16 rows on, the transform is one bf16 GEMM with the Sylvester matrix: the butterfly's
    values up to fp32 summation order (equal bits here: small integers sum exactly), and a GEMM in the program."""
    n, rows = 128, Q.HADAMARD_GEMM_ROWS
    xi = jnp.asarray(rng(7).integers(-8, 9, size=(rows, n)), jnp.bfloat16)
    want = np.asarray(hadamard(xi.astype(jnp.float32)).astype(jnp.bfloat16))
    np.testing.assert_array_equal(bits(np.asarray(hadamard(xi))), bits(want))
    hlo = jax.jit(Q.hadamard).lower(xi).as_text()
    assert "dot_general" in hlo and "dot_general" not in jax.jit(Q.hadamard).lower(xi[:rows - 1]).as_text()
    np.testing.assert_array_equal(np.abs(Q.sylvester(8) @ Q.sylvester(8).T), 8 * np.eye(8))
