"""Skinny linear (pallas_kernels.linear): the Pallas GPU kernel in interpret mode == the dequantise + einsum reference.

CPU only: the Triton kernel runs with interpret=True on small shapes, and is lowered for cuda at the decode shapes
to catch Pallas->Triton lowering errors (e.g. non power-of-two tensors) without the hardware.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

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


def test_kernel_lowers_for_cuda():
    """Pallas -> Triton IR lowering at the decode shapes, both dot orientations (no GPU needed)."""
    for M, O, K, wd, xd in DECODE[1:3] + DECODE[-1:]:
        x, w = jax.ShapeDtypeStruct((M, K), xd), jax.ShapeDtypeStruct((O, K), wd)
        s = jax.ShapeDtypeStruct((O // 128, K // 128), jnp.float8_e8m0fnu) if wd != jnp.bfloat16 else None
        for w_lhs in (True, False):
            f = jax.jit(lambda x, w, s: gpu.linear(x, w, s, out_dtype=jnp.bfloat16, w_lhs=w_lhs))
            exp = export.export(f, platforms=["cuda"],
                                disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
            assert "triton" in exp(x, w, s).mlir_module()
