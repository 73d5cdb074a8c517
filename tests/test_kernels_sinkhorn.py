"""mHC Sinkhorn (pallas_kernels.sinkhorn): the Pallas GPU kernels in interpret mode == the jnp reference.

CPU only: the Triton kernels run with interpret=True on small shapes (each distinct shape costs a ~1-3 s interpret
compile, so the shapes are few), and are lowered for cuda to catch Pallas -> Triton lowering errors without the
hardware.

Tolerances (measured on CPU, JAX 0.10.2, interpret mode vs the jitted reference):
* forward: max |kernel - reference| = 1.8e-7 here (n = 4, logits up to scale 300), 3e-8 (n = 2), 6e-8 (n = 3);
  2.4e-7 over 3 x 8192 random matrices (scripts/probe_sinkhorn.py-like inputs). Outputs are <= 1, so that is
  <= 2 ulp of 1; the kernel is as close to the float64 answer as the reference is. The residue is XLA's, not the
  kernel's: XLA CPU rewrites u / d as u * (1 / d) (the kernel computes that form) and then contracts some
  mul + add pairs into FMAs inside its fusions, differently per fusion. Asserted: <= 3e-7.
* gradient: max |kernel VJP - reference VJP| = 1.8e-7 x max|grad| (n = 4, iters = 20), 3.0e-7 x max|grad|
  (n = 2, iters = 1). Asserted: <= 1e-6 x max|grad|.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels.sinkhorn as sk
from pallas_kernels.sinkhorn import gpu, reference
from v4jax import hyper
from np_reference import np_sinkhorn

ITERS, EPS = 20, 1e-6
FWD_TOL = 3e-7
GRAD_TOL = 1e-6
_ref = jax.jit(reference.sinkhorn, static_argnums=(1, 2))


def _logits(shape, scales, seed=0):
    """Normal logits; leading index i scaled by scales[i] (large magnitudes saturate the softmax)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    s = np.asarray(scales, np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
    return jnp.asarray(x * s)


def _np64(c, iters, eps):
    """The reference's maths in float64 numpy (the exact answer to ~1e-16)."""
    return np_sinkhorn(np.asarray(c, np.float64), iters, eps)


def test_forward_matches_reference_and_is_doubly_stochastic():
    """[B, S, 4, 4] with 87 matrices (the default launch: 3 programs of 32, the last one 23 valid, masked),
    logits at scales 1, 30 and 300 (batch rows)."""
    c = _logits((3, 29, 4, 4), (1.0, 30.0, 300.0))
    y = sk.sinkhorn(c, ITERS, EPS, backend="gpu")
    assert y.shape == c.shape and y.dtype == jnp.float32
    assert gpu.launch(87) == (32, 1)
    r = _ref(c, ITERS, EPS)
    assert float(jnp.abs(y - r).max()) <= FWD_TOL
    exact = _np64(c, ITERS, EPS)                                         # both as close to the exact answer
    assert np.abs(np.asarray(y) - exact).max() <= 1.5 * np.abs(np.asarray(r) - exact).max() + 6e-8
    yn = np.asarray(y, np.float64)
    np.testing.assert_allclose(yn.sum(-2), 1, atol=1e-5)                 # columns: the last step
    np.testing.assert_allclose(yn[0].sum(-1), 1, atol=1e-3)              # rows, unit-scale logits
    np.testing.assert_allclose(yn.sum(-1), np.asarray(r, np.float64).sum(-1), atol=1e-6)
    assert (yn >= 0).all()


@pytest.mark.parametrize("n", [2, 3])
def test_forward_small_n(n):
    """n = 2 (n*n a power of two) and n = 3 (not: the kernel works on n*n separate vectors, any n <= MAX_N)."""
    c = _logits((5, n, n), (1.0, 3.0, 10.0, 100.0, 0.1), seed=n)
    y = sk.sinkhorn(c, ITERS, EPS, backend="gpu")
    assert float(jnp.abs(y - _ref(c, ITERS, EPS)).max()) <= FWD_TOL
    assert np.abs(np.asarray(y) - _np64(c, ITERS, EPS)).max() <= 5e-7


def _grads(c, g, iters):
    loss = lambda c, be: jnp.sum(sk.sinkhorn(c, iters, EPS, backend=be) * g)
    return [jax.jit(jax.grad(loss), static_argnums=1)(c, be) for be in ("gpu", "reference")]


def test_gradient_matches_reference_vjp():
    """Random cotangent; [2, 19, 4, 4] (38 matrices: a masked tail), logits at scales 1 and 300."""
    c = _logits((2, 19, 4, 4), (1.0, 300.0), seed=3)
    g = _logits(c.shape, (1.0, 1.0), seed=4)
    dk, dr = _grads(c, g, ITERS)
    scale = float(jnp.abs(dr).max())
    assert scale > 0 and dk.shape == c.shape
    assert float(jnp.abs(dk - dr).max()) <= GRAD_TOL * scale
    assert float(jnp.abs(dk[0] - dr[0]).max()) <= 5e-7 * float(jnp.abs(dr[0]).max())   # unit-scale logits
    # the softmax's invariance: each row's gradient sums to 0
    np.testing.assert_allclose(np.asarray(dk).sum(-1), 0, atol=1e-6 * scale)


def test_gradient_without_iterations():
    """iters = 1: one column normalisation, no (row, column) pairs -- no residuals in the kernels."""
    c = _logits((7, 2, 2), (1.0,) * 7, seed=5)
    g = _logits(c.shape, (1.0,) * 7, seed=6)
    dk, dr = _grads(c, g, 1)
    assert float(jnp.abs(dk - dr).max()) <= GRAD_TOL * float(jnp.abs(dr).max())


def test_dispatch_fallbacks_and_hyper():
    c = _logits((2, 4, 4), (1.0, 2.0), seed=7)
    # hyper.sinkhorn is the dispatch: on CPU the reference, bit for bit
    np.testing.assert_array_equal(np.asarray(hyper.sinkhorn(c, ITERS, EPS)),
                                  np.asarray(reference.sinkhorn(c, ITERS, EPS)))
    assert sk.default_backend("cpu") == "reference" and sk.default_backend("cuda") == "gpu"
    # inputs the kernel does not take run the reference on the "gpu" backend
    cb = c.astype(jnp.bfloat16)
    big = _logits((1, gpu.MAX_N + 1, gpu.MAX_N + 1), (1.0,))
    for x in (cb, big):
        assert not sk.uses_kernel(x, ITERS, EPS)
        np.testing.assert_array_equal(np.asarray(sk.sinkhorn(x, ITERS, EPS, backend="gpu"), np.float32),
                                      np.asarray(reference.sinkhorn(x, ITERS, EPS), np.float32))
    assert sk.uses_kernel(c, ITERS, EPS) and not sk.uses_kernel(c, ITERS, jnp.float32(EPS))
    with pytest.raises(ValueError, match="unknown backend"):
        sk.sinkhorn(c, ITERS, EPS, backend="tpu")
    with pytest.raises(ValueError, match=r"\[\.\.\., n, n\]"):
        sk.sinkhorn(c[..., :3], ITERS, EPS)
    with pytest.raises(ValueError, match="power of two"):
        gpu.forward(c.reshape(2, 16), n=4, iters=ITERS, eps=EPS, block_t=48, interpret=True)


def test_launch_heuristic():
    for T in (1, 32, 100, 8192, 33792, 10 ** 6):
        bt, nw = gpu.launch(T)
        assert bt & (bt - 1) == 0 and 32 <= bt <= 128 and bt == 32 * nw
    assert gpu.launch(1) == (32, 1) and gpu.launch(10 ** 6) == (128, 4)


def test_kernels_lower_for_cuda():
    """Pallas -> Triton IR lowering of the forward (with and without residuals) and the backward, no GPU needed."""
    dis = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for T, n in [(1, 4), (8192, 4), (33, 2), (5, 3)]:
        x = jax.ShapeDtypeStruct((T, n * n), jnp.float32)
        fwd = jax.jit(lambda x: gpu.forward(x, n=n, iters=ITERS, eps=EPS))
        assert "triton" in export.export(fwd, platforms=["cuda"], disabled_checks=dis)(x).mlir_module()
    x = jax.ShapeDtypeStruct((40, 16), jnp.float32)
    vjp = jax.jit(lambda x: jax.vjp(lambda c: sk._kernel(c, 4, ITERS, EPS, False), x)[1](x))
    assert export.export(vjp, platforms=["cuda"], disabled_checks=dis)(x).mlir_module().count("triton") >= 2
