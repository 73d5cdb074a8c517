"""Skinny linear (pallas_kernels.linear): the Pallas GPU kernel in interpret mode == the dequantise + einsum reference.

CPU only: the Triton kernel runs with interpret=True on small shapes, and is lowered for cuda at the decode shapes
to catch Pallas->Triton lowering errors (e.g. non power-of-two tensors) without the hardware. Both paths are covered
(CUDA-core GEMV for <= gpu.GEMV_ROWS kernel rows, tensor cores above), with and without the in-kernel activation
FP8 simulation (x_fp8), whose quantised x must equal quant.fp8_sim bit for bit.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl

from pallas_kernels import linear as lin
from pallas_kernels.linear import gpu, reference
from v4jax import quant


def _weight(O, K, fmt, seed=0):
    """Random weight node: fp8 e4m3 values with varied block scales (quantised from a bf16 matrix whose 128x128
    blocks differ in magnitude by up to 2^+-6), or bf16."""
    rng = np.random.default_rng(seed)
    mag = 2.0 ** rng.integers(-6, 7, (-(-O // 128), -(-K // 128)))
    mag = np.repeat(np.repeat(mag, 128, 0), 128, 1)[:O, :K]
    w = jnp.asarray(rng.standard_normal((O, K)) * mag, jnp.float32).astype(jnp.bfloat16)
    if fmt == "fp8":
        return dict(zip(("weight", "scale"), quant.quantize_fp8_weight(w)))
    return {"weight": w}


def _x(shape, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(dtype)


def _close(out, ref, rtol=1e-5):
    """fp32 results: equal up to summation order (relative to the largest |ref|)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape and np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def _bf16_ulps(a, b):
    """Elementwise distance in bf16 ulps (the ordered bit patterns of bf16), where |b| >= 1% of max |b|: below,
    cancellation lets fp32 summation order move the result by more than a bf16 ulp."""
    ia, ib = (np.asarray(jax.lax.bitcast_convert_type(v, jnp.int16), np.int32) for v in (a, b))
    ia, ib = (np.where(i < 0, -(i & 0x7FFF), i) for i in (ia, ib))
    bf = np.abs(np.asarray(b, np.float32))
    return np.where(bf >= 0.01 * bf.max(), np.abs(ia - ib), 0)


# kernel launches: the defaults, and small tiles with several O tiles and K splits (scale blocks shared/crossed)
LAUNCHES = [{}, dict(block_n=32, block_k=64, splits=3), dict(block_n=16, block_k=32, splits=2, w_lhs=False)]


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("xdt", [jnp.bfloat16, jnp.float32])
def test_kernel_matches_reference(fmt, xdt):
    for i, (O, K) in enumerate([(256, 384), (128, 1024)]):
        node = _weight(O, K, fmt, seed=i)
        w, s = node["weight"], node.get("scale")
        for j, M in enumerate([1, 5, 16, 33]):
            x = _x((M, K), xdt, seed=10 * i + j)
            ref = reference.linear(x, w, s)
            kw = LAUNCHES[(i + j) % len(LAUNCHES)] if O == 256 else {}
            out = gpu.linear(x, w, s, interpret=True, **kw)
            assert out.dtype == jnp.float32
            _close(out, ref)
            if M in (5, 33):                     # bf16 output: RNE of the fp32 result; vs the reference: <= 1 ulp
                ob = gpu.linear(x, w, s, out_dtype=jnp.bfloat16, interpret=True, **kw)
                assert ob.dtype == jnp.bfloat16
                np.testing.assert_array_equal(np.asarray(ob), np.asarray(quant.round_to(out, jnp.bfloat16)))
                assert _bf16_ulps(ob, quant.round_to(ref, jnp.bfloat16)).max() <= 1


def test_kernel_partial_scale_blocks():
    """O, K multiples of 16 but not of 128: partial E8M0 blocks, block_n/block_k lowered to divide them."""
    O, K = 80, 208
    node = _weight(O, K, "fp8", seed=3)
    assert node["scale"].shape == (1, 2)
    for M, xdt in [(3, jnp.bfloat16), (7, jnp.float32)]:
        x = _x((M, K), xdt, seed=M)
        _close(gpu.linear(x, node["weight"], node["scale"], interpret=True),
               reference.linear(x, node["weight"], node["scale"]))


_fp8_sim = jax.jit(lambda x: quant.fp8_sim(x, 128))        # (jitted: eager ops compile one by one per shape)


def _bits(a):
    a = jnp.asarray(a)
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16 if a.dtype == jnp.bfloat16 else jnp.uint32))


def _fp8_sim_cases(n_rows, K, seed=20, huge=True):
    """fp32 [n_rows, K] (exact in bf16) covering quant.fp8_sim's corner cases, per 128-input block: random blocks with
    block scales 2^-30..2^30, all-zero and 1e-30 blocks (the amax floor), blocks near bf16's largest values, and
    crafted blocks with amax 400 * 2^k (scale s = 2^k exactly) holding, relative to s, E4M3 ties (between normals,
    between subnormals 2^-9 apart, 2^-10 between 0 and 2^-9), values just around 2^-6 (the normal/subnormal border),
    2^-10, 2^-11, 448 and 447, in random signs. huge=False: no blocks near bf16's largest (for finite products)."""
    rng = np.random.default_rng(seed)
    nb = K // 128
    out = rng.standard_normal((n_rows, nb, 128)) * 2.0 ** rng.integers(-30, 31, (n_rows, nb, 1))
    rel = [(1 + (2 * j + 1) / 16) * 2.0 ** e for e in range(-6, 8) for j in (0, 3, 7)]      # normal ties
    rel += [(2 * n + 1) * 2.0 ** -10 for n in range(8)]                                     # subnormal ties
    rel += [2.0 ** -6 * (1 + d) for d in (-2 ** -7, 0, 2 ** -7)] + [2.0 ** -10 * (1 + d) for d in (-2 ** -7, 2 ** -7)]
    rel += [2.0 ** -11, 448, 447, (1 + 1 / 16 + 2 ** -7) * 2.0 ** -3, 2.0 ** -7 * 1.5]
    rel = np.asarray(rel)
    for r in range(n_rows):
        for b in range(nb):
            kind = (r * nb + b) % 6
            if kind == 0:
                out[r, b] = 0
            elif kind == 1:
                out[r, b] = rng.standard_normal(128) * 1e-30
            elif kind == 2:
                out[r, b] = rng.uniform(-3e38, 3e38, 128) if huge else rng.standard_normal(128)
            elif kind >= 3:
                k = int(rng.integers(-20, 21))
                vals = rng.permutation(np.concatenate([rel, rng.uniform(-400, 400, 128 - len(rel) - 1)]))
                out[r, b] = np.concatenate([[400.0], vals])[rng.permutation(128)] * 2.0 ** k
                out[r, b] *= rng.choice([-1.0, 1.0], 128)
    return np.asarray(jnp.asarray(out.reshape(n_rows, K), jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


def test_fp8_sim_block_is_bit_exact():
    """gpu.fp8_sim_block (integer ops on the fp32 bits, as the kernel runs them) == quant.fp8_sim bit for bit, signed
    zeros included, on corner cases and on random fp32 data; also inside a Pallas kernel (interpret mode)."""
    xc = _fp8_sim_cases(36, 128)
    xr = np.random.default_rng(21).standard_normal((64, 128)) * 2.0 ** np.random.default_rng(22).integers(
        -40, 40, (64, 1))
    block = jax.jit(lambda x: gpu.fp8_sim_block(x).astype(x.dtype))
    for x in (jnp.asarray(xc, jnp.bfloat16), jnp.asarray(xc), jnp.asarray(xr, jnp.float32)):
        ref = _fp8_sim(x)
        got = block(x)
        np.testing.assert_array_equal(_bits(got), _bits(ref))
        r = np.asarray(ref, np.float32)
        assert (np.signbit(r) & (r == 0)).any() and (r == 0).any() and (np.abs(r) > 0).mean() > 0.5
    x = jnp.asarray(xc, jnp.bfloat16)
    sim = jnp.asarray(_fp8_sim(x), np.float32)
    assert not np.array_equal(np.asarray(sim), np.asarray(x, np.float32))          # it does quantise
    # the cases hold exact ties (halfway between two E4M3 values) among normals and among subnormals
    _, sc = jax.jit(quant.act_quant_fp8)(x)
    v = np.abs(np.asarray(x, np.float64).reshape(-1, 128) / np.asarray(sc, np.float64).reshape(-1, 1))
    sub = v < 2.0 ** -6
    t = np.where(sub, v * 512, v * 2.0 ** (3 - np.floor(np.log2(np.where(v > 0, v, 1)))))
    assert np.any((t % 1 == 0.5) & sub) and np.any((t % 1 == 0.5) & ~sub)

    def k(x_ref, o_ref):
        o_ref[...] = gpu.fp8_sim_block(x_ref[...]).astype(o_ref.dtype)
    got = pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    np.testing.assert_array_equal(_bits(got), _bits(_fp8_sim(x)))


def test_e8m0_decode_bit_exact():
    codes = jnp.arange(256, dtype=jnp.uint8)
    ref = quant.e8m0_to_f32(jax.lax.bitcast_convert_type(codes, jnp.float8_e8m0fnu))
    np.testing.assert_array_equal(_bits(gpu.e8m0_decode(codes.astype(jnp.int32))), _bits(ref))


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_x_fp8_kernel_matches_reference(fmt):
    """x_fp8: the kernel == fp8_sim then the reference, both paths (GEMV for <= GEMV_ROWS rows, tensor cores above)
    and several launches (K splits, small tiles, both GEMV accumulators, unroll); x_fp8=False on the GEMV path with
    small tiles too."""
    O, K = 256, 384
    node = _weight(O, K, fmt, seed=30)
    w, s = node["weight"], node.get("scale")
    cases = [(1, jnp.bfloat16, True, {}), (2, jnp.bfloat16, True, dict(block_n=32, splits=3, gemv_acc="tile")),
             (3, jnp.float32, True, dict(block_n=16, splits=1, unroll=3)), (4, jnp.bfloat16, True, dict(gemv_acc="tile")),
             (5, jnp.bfloat16, True, dict(block_n=16, splits=3, w_lhs=False)), (33, jnp.float32, True, {}),
             (1, jnp.bfloat16, True, dict(gemv=False, block_n=32)), (5, jnp.bfloat16, True, dict(gemv=True)),
             (2, jnp.bfloat16, False, dict(block_n=32, block_k=64, splits=2)),
             (3, jnp.bfloat16, False, dict(block_n=16, splits=3, gemv_acc="tile"))]
    ref_fn = jax.jit(reference.linear, static_argnames="x_fp8")
    for i, (M, xdt, xq, kw) in enumerate(cases):
        x = jnp.asarray(_fp8_sim_cases(M, K, 40 + i, huge=False), xdt) if i % 2 else _x((M, K), xdt, seed=40 + i)
        ref = ref_fn(x, w, s, x_fp8=xq)
        out = gpu.linear(x, w, s, x_fp8=xq, interpret=True, **kw)
        assert out.dtype == jnp.float32 and out.shape == (M, O)
        _close(out, ref)
        if xq:                                       # quantising x matters at this tolerance
            y0 = np.asarray(ref_fn(x, w, s), np.float64)
            assert np.abs(y0 - np.asarray(ref, np.float64)).max() > 1e-3 * np.abs(y0).max()


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_x_fp8_kernel_quantises_bit_exactly(fmt):
    """Through the kernel: W = diag(2^d) with d per 128-block (FP8: E8M0 codes 112, 119 and 129 -- one >= 128, so a
    sign-extended byte would show) gives y = fp8_sim(x) * 2^d exactly (one nonzero product per output), both paths."""
    K = 384
    d = np.repeat(2.0 ** np.array([0, 10, -7]), 128)
    W = jnp.asarray(np.diag(d), jnp.float32)
    if fmt == "fp8":
        w, s = jax.jit(quant.quantize_fp8_weight)(W)
        assert sorted(np.unique(np.asarray(jax.lax.bitcast_convert_type(s, jnp.uint8)))[-3:]) == [112, 119, 129]
    else:
        w, s = W.astype(jnp.bfloat16), None
    for M, xdt, kw in [(2, jnp.bfloat16, {}), (3, jnp.float32, dict(gemv_acc="tile", splits=3)),
                       (6, jnp.bfloat16, dict(splits=3))]:
        x = jnp.asarray(_fp8_sim_cases(M, K, seed=M, huge=False), xdt)
        want = np.asarray(_fp8_sim(x), np.float32) * d
        np.testing.assert_array_equal(np.asarray(gpu.linear(x, w, s, x_fp8=True, interpret=True, **kw)), want)


def test_in_kernel_scale_decode():
    """E8M0 bytes decoded in the kernel == decoded by XLA first (bit for bit), both paths; codes >= 128 and 255
    (NaN: that O block's outputs are NaN, as in the reference)."""
    O, K = 256, 384
    node = _weight(O, K, "fp8", seed=50)
    codes = np.asarray(jax.lax.bitcast_convert_type(node["scale"], jnp.uint8)).copy()
    codes[0, 0], codes[1, 2] = 140, 255
    w, s = node["weight"], jax.lax.bitcast_convert_type(jnp.asarray(codes), jnp.float8_e8m0fnu)
    for M in (1, 5):
        x = _x((M, K), jnp.bfloat16, seed=51)
        ref = np.asarray(reference.linear(x, w, s))
        out = np.asarray(gpu.linear(x, w, s, interpret=True))
        np.testing.assert_array_equal(out, np.asarray(gpu.linear(x, w, s, scale_in_kernel=False, interpret=True)))
        assert np.isnan(out[:, 128:]).all() and np.isnan(ref[:, 128:]).all() and np.isfinite(out[:, :128]).all()
        _close(out[:, :128], ref[:, :128])


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_fp32_x_is_exact_to_fp32_rounding(fmt):
    """fp32 x: the reference and the kernel's 3-way bf16 split both equal float64 x @ W^T to fp32 rounding
    (taking only hi = bf16(x) would be ~1e-3 off)."""
    O, K, M = 128, 1024, 9
    node = _weight(O, K, fmt, seed=4)
    W = np.asarray(reference.dequantize(node["weight"], node.get("scale"), jnp.float32), np.float64)
    x = _x((M, K), jnp.float32, seed=5)
    y64 = np.asarray(x, np.float64) @ W.T
    bound = np.abs(np.asarray(x, np.float64)) @ np.abs(W).T           # sum |x_k W_ok|: the summation scale
    hi = np.asarray(gpu.split3(x)[:M], np.float64) @ W.T
    assert np.abs(hi - y64).max() / np.abs(y64).max() > 1e-4
    parts = np.asarray(gpu.split3(x), np.float64).reshape(3, M, K)
    np.testing.assert_array_equal(parts.sum(0), np.asarray(x, np.float64))  # hi + mid + lo == x exactly
    for y in (reference.linear(x, node["weight"], node.get("scale")),
              gpu.linear(x, node["weight"], node.get("scale"), interpret=True, block_n=32, splits=4)):
        err = np.abs(np.asarray(y, np.float64) - y64)
        assert np.linalg.norm(err) / np.linalg.norm(y64) < 1e-6
        assert (err / bound).max() < 1e-6


def test_dispatch_leading_dims_backends_and_threshold():
    O, K = 256, 384
    node = _weight(O, K, "fp8", seed=6)
    for xdt in (jnp.bfloat16, jnp.float32):
        x = _x((2, 3, K), xdt, seed=7)
        ref = lin.linear(x, node, backend="reference")
        assert ref.shape == (2, 3, O) and ref.dtype == jnp.float32
        _close(lin.linear(x, node, backend="gpu"), ref)
        ob = lin.linear(x, node, backend="gpu", out_dtype=jnp.bfloat16)
        assert ob.shape == (2, 3, O) and _bf16_ulps(ob, quant.round_to(ref, jnp.bfloat16)).max() <= 1
    # a bare bf16 weight array; bf16 x
    wb = _weight(O, K, "bf16", seed=8)["weight"]
    x = _x((4, K), jnp.bfloat16)
    _close(lin.linear(x, wb, backend="gpu"), reference.linear(x, wb))
    # above MAX_ROWS, fp32 and FP4 weights: the reference, bit for bit
    assert lin.uses_kernel(lin.MAX_ROWS, wb) and not lin.uses_kernel(lin.MAX_ROWS + 1, wb)
    xl = _x((lin.MAX_ROWS + 1, K), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(lin.linear(xl, node, backend="gpu")),
                                  np.asarray(lin.linear(xl, node, backend="reference")))
    w32 = wb.astype(jnp.float32)
    assert not lin.uses_kernel(4, w32)
    np.testing.assert_array_equal(np.asarray(lin.linear(x, w32, backend="gpu")),
                                  np.asarray(reference.linear(x, w32)))
    n4 = dict(zip(("weight", "scale"), quant.quantize_fp4_weight(w32)))
    np.testing.assert_array_equal(np.asarray(lin.linear(x, n4, backend="gpu")),
                                  np.asarray(reference.linear(x, n4["weight"], n4["scale"])))
    assert lin.default_backend("cpu") == "reference" and lin.default_backend("cuda") == "gpu"


def test_dispatch_gradients_equal_reference():
    O, K, M = 128, 256, 6
    ct = _x((M, O), jnp.float32, seed=9)
    for fmt, xdt, odt in [("bf16", jnp.bfloat16, jnp.float32), ("bf16", jnp.float32, jnp.bfloat16),
                          ("fp8", jnp.bfloat16, jnp.bfloat16), ("fp8", jnp.float32, jnp.float32)]:
        node = _weight(O, K, fmt, seed=10)
        x = _x((M, K), xdt, seed=11)

        def loss(x, w, backend):
            n = dict(node, weight=w)
            return jnp.sum(lin.linear(x, n, backend=backend, out_dtype=odt).astype(jnp.float32) * ct)

        argnums = (0, 1) if fmt == "bf16" else 0
        g_k, g_r = (jax.jit(jax.grad(loss, argnums=argnums), static_argnums=2)(x, node["weight"], be)
                    for be in ("gpu", "reference"))
        for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_r)):
            assert a.dtype == b.dtype and np.abs(np.asarray(b, np.float32)).max() > 0
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_dispatch_x_fp8():
    """The public API with x_fp8: the reference backend is fp8_sim then the reference linear (bit for bit); the gpu
    backend's kernel (GEMV and tensor-core row counts) matches it; K % 128 != 0 takes the reference; gradients equal
    the reference's -- dx that of the plain linear (fp8_sim's gradient is the identity), dw (bf16 weight) uses the
    quantised x."""
    O, K = 256, 384
    node = _weight(O, K, "fp8", seed=60)
    run = jax.jit(lambda x, n, backend: lin.linear(x, n, backend=backend, x_fp8=True), static_argnums=2)
    for shape in [(1, K), (2, 3, K)]:
        x = _x(shape, jnp.bfloat16, seed=61)
        ref = run(x, node, "reference")
        np.testing.assert_array_equal(np.asarray(ref), np.asarray(jax.jit(reference.linear)(
            _fp8_sim(x), node["weight"], node["scale"])))
        _close(run(x, node, "gpu"), ref)
    n208 = _weight(80, 208, "fp8", seed=3)
    x = _x((2, 208), jnp.bfloat16, seed=63)
    assert not lin.uses_kernel(2, n208["weight"], n208["scale"], x_fp8=True) and lin.uses_kernel(2, n208["weight"])
    np.testing.assert_array_equal(np.asarray(run(x, n208, "gpu")), np.asarray(run(x, n208, "reference")))
    O, K, M = 128, 256, 3
    ct = _x((M, O), jnp.float32, seed=64)
    for fmt in ("fp8", "bf16"):
        nd = _weight(O, K, fmt, seed=10)
        x = _x((M, K), jnp.bfloat16, seed=66)

        def loss(x, w, backend, xq=True, pre=False):
            xx = quant.fp8_sim(x, 128) if pre else x
            return jnp.sum(lin.linear(xx, dict(nd, weight=w), backend=backend, x_fp8=xq) * ct)

        argnums = (0, 1) if fmt == "bf16" else 0
        grad = lambda *a: jax.tree.leaves(jax.jit(jax.grad(loss, argnums=argnums), static_argnums=(2, 3, 4))(
            x, nd["weight"], *a))
        g_k, g_r = grad("gpu"), grad("reference")
        for a, b in zip(g_k, g_r):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        if fmt == "bf16":
            g_plain, g_pre = grad("reference", False), grad("reference", False, True)
            np.testing.assert_array_equal(np.asarray(g_r[0]), np.asarray(g_plain[0]))  # dx: identity through fp8_sim
            np.testing.assert_array_equal(np.asarray(g_r[1]), np.asarray(g_pre[1]))    # dw: of the quantised x
            assert not np.array_equal(np.asarray(g_r[1]), np.asarray(g_plain[1]))


def test_bad_input_raises():
    node = _weight(256, 384, "fp8", seed=12)
    x = _x((3, 384), jnp.bfloat16)
    with pytest.raises(ValueError, match="K=384"):
        lin.linear(_x((3, 256), jnp.bfloat16), node, backend="gpu")
    with pytest.raises(ValueError, match="scale shape"):
        lin.linear(x, dict(node, scale=node["scale"][:, :2]), backend="reference")
    with pytest.raises(ValueError, match="unknown backend"):
        lin.linear(x, node, backend="tpu")
    with pytest.raises(ValueError, match="scale shape"):
        gpu.linear(x, node["weight"], node["scale"][:1], interpret=True)
    w40 = _weight(40, 384, "bf16")["weight"]                             # O not a multiple of 16
    with pytest.raises(ValueError, match=r"\(40, 384\)"):
        gpu.linear(x, w40, interpret=True)
    with pytest.raises(ValueError, match="do not tile"):
        gpu.linear(x, node["weight"], node["scale"], block_n=32, splits=5, interpret=True)
    with pytest.raises(ValueError, match="block_k == 128"):                  # x_fp8: one block per x tile
        gpu.linear(x, node["weight"], node["scale"], x_fp8=True, block_k=64, interpret=True)
    n208 = _weight(80, 208, "fp8", seed=13)
    with pytest.raises(ValueError, match="x_fp8 needs K % 128"):
        gpu.linear(_x((2, 208), jnp.bfloat16), n208["weight"], n208["scale"], x_fp8=True, interpret=True)
    with pytest.raises(ValueError, match="gemv_acc"):
        gpu.linear(x, node["weight"], node["scale"], gemv_acc="row", interpret=True)
    with pytest.raises(ValueError, match="unroll=2"):                      # 3 steps per program
        gpu.linear(x[:1], node["weight"], node["scale"], block_k=128, splits=1, unroll=2, interpret=True)


# decode shapes: (rows M, O, K, weight dtype, x dtype)
DECODE = [(1, 32768, 1024, jnp.float8_e4m3fn, jnp.bfloat16), (64, 4096, 8192, jnp.float8_e4m3fn, jnp.bfloat16),
          (33, 1024, 4096, jnp.float8_e4m3fn, jnp.bfloat16), (8, 512, 4096, jnp.float8_e4m3fn, jnp.bfloat16),
          (16, 2048, 4096, jnp.float8_e4m3fn, jnp.bfloat16), (64, 4096, 2048, jnp.float8_e4m3fn, jnp.bfloat16),
          (1, 129280, 4096, jnp.bfloat16, jnp.float32), (64, 129280, 4096, jnp.bfloat16, jnp.float32)]


def test_launch_heuristic():
    for M, O, K, wd, xd in DECODE:
        rows = M if xd == jnp.bfloat16 else 3 * M
        bn, bk, splits, warps, stages = gpu.launch(rows, O, K, jnp.dtype(wd).itemsize)
        mp = gpu.padded_rows(rows)
        assert mp >= max(rows, 16) and mp & (mp - 1) == 0
        assert 128 % bn == 0 and O % bn == 0 and 128 % bk == 0 and K % bk == 0 and (K // bk) % splits == 0
        assert stages >= 3 and stages * (bn * jnp.dtype(wd).itemsize + 2 * mp) * bk <= gpu.SMEM_BUDGET
        assert bn * mp <= 16384 and warps in (4, 8)
        assert 16 * splits * rows <= K * jnp.dtype(wd).itemsize or splits == 1   # partials <= weight bytes / 2
    assert gpu.launch(1, 4096, 8192)[2] * 4096 // gpu.launch(1, 4096, 8192)[0] >= 264   # >= 2 programs per SM
    for rows, O, K, wb in [(1, 32768, 1024, 1), (1, 4096, 8192, 1), (1, 1024, 4096, 1), (4, 1024, 4096, 1),
                           (2, 512, 4096, 1), (3, 129280, 4096, 2), (1, 80, 208, 1)]:
        bn, bk, splits, warps, stages = gpu.gemv_launch(rows, O, K, wb)
        assert 128 % bn == 0 and O % bn == 0 and 128 % bk == 0 and K % bk == 0 and (K // bk) % splits == 0
        assert bn * bk * wb <= 8192 and warps == 4 and stages >= 1
        assert 16 * splits * rows <= K * wb or splits == 1
        if K % 128 == 0:
            assert bk == 128                                       # x_fp8 needs whole quantisation blocks
        steps = K // bk
        if O * K >= 132 * 2 * 8192 and steps // gpu.GEMV_MIN_STEPS * (O // bn) >= 264:
            assert (O // bn) * splits >= 264, (rows, O, K, bn, splits)       # 2 programs per SM where that
        assert splits == 1 or steps // splits >= gpu.GEMV_MIN_STEPS           # leaves GEMV_MIN_STEPS each
        assert (K // bk // splits) % gpu.GEMV_UNROLL == 0
    assert gpu.gemv_launch(1, 1024, 4096)[2] == 8 and gpu.gemv_launch(1, 4096, 8192)[2] == 8   # the sweep's best


def _lower_cuda(M, O, K, wd, xd, **kw):
    x, w = jax.ShapeDtypeStruct((M, K), xd), jax.ShapeDtypeStruct((O, K), wd)
    s = jax.ShapeDtypeStruct((O // 128, K // 128), jnp.float8_e8m0fnu) if wd != jnp.bfloat16 else None
    f = jax.jit(lambda x, w, s: gpu.linear(x, w, s, out_dtype=jnp.bfloat16, **kw))
    exp = export.export(f, platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    return exp(x, w, s).mlir_module()


def test_kernel_lowers_for_cuda():
    """Pallas -> Triton IR lowering at the decode shapes (no GPU needed): the tensor-core path in both dot
    orientations, with and without x_fp8; the GEMV path at M = 1, 2 (x_fp8, both accumulators) and for the fp32-x
    head at M = 1 (3 kernel rows)."""
    for M, O, K, wd, xd in DECODE[1:3] + DECODE[-1:]:
        for w_lhs in (True, False):
            assert "linear" in _lower_cuda(M, O, K, wd, xd, w_lhs=w_lhs)
    for xd in (jnp.bfloat16, jnp.float32):
        assert "linear_fp8" in _lower_cuda(33, 1024, 4096, jnp.float8_e4m3fn, xd, x_fp8=True)
    for M in (1, 2):
        for O, K in [(1024, 4096), (32768, 1024), (4096, 8192)]:
            for acc in gpu.GEMV_ACCS:
                assert "linear_fp8_gemv" in _lower_cuda(M, O, K, jnp.float8_e4m3fn, jnp.bfloat16, x_fp8=True,
                                                        gemv_acc=acc)
    assert "linear_fp8_gemv" in _lower_cuda(4, 1024, 4096, jnp.float8_e4m3fn, jnp.float32, x_fp8=True, unroll=1)
    assert "linear_bf16_gemv" in _lower_cuda(1, 129280, 4096, jnp.bfloat16, jnp.float32)
