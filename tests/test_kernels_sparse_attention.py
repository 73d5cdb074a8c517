"""Sparse attention kernels (pallas_kernels.sparse_attention): Pallas in interpret mode == the jnp reference.

CPU only: the GPU kernel (Triton backend) runs with interpret=True, the TPU kernel with
interpret=pltpu.InterpretParams(); both are also lowered for their real platform (cuda / tpu) to catch lowering
errors without the hardware. Shapes are tiny: interpret mode is slow (the TPU one simulates every row DMA).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import sparse_attention as sa
from pallas_kernels.sparse_attention import gpu, reference, tpu
from v4jax.bench import np_sparse_attention


def make_inputs(B, S, H, K, N, T, seed=0, dtype=jnp.bfloat16):
    """Random q/kv/sink and index lists with ragged valid lengths, -1 holes in the middle and all-masked rows."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, S, H, K), np.float32)).astype(dtype)
    kv = jnp.asarray(rng.standard_normal((B, N, K), np.float32)).astype(dtype)
    sink = jnp.asarray(rng.standard_normal(H, np.float32))
    idx = rng.integers(0, N, (B, S, T)).astype(np.int32)
    holes = rng.random((B, S, T)) < 0.15                                      # -1 in the middle of lists
    lengths = rng.integers(0, T + 1, (B, S, 1))                               # ragged: -1 tail after length
    idx = np.where(holes | (np.arange(T) >= lengths), -1, idx)
    if T:
        idx[0, 0] = -1                                                        # one all-masked row
        idx[-1, -1] = rng.integers(0, N, T)                                   # one full row
    return q, kv, jnp.asarray(idx, jnp.int32), sink


def _close(out, ref, tol=1e-2):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < tol, err
    # bf16 output: at most a rounding step apart, element-wise
    np.testing.assert_allclose(out, ref, rtol=2 ** -7, atol=2 ** -9 * max(np.abs(ref).max(), 1e-30))


_ref = jax.jit(reference.sparse_attention, static_argnames="scale")


# B, S, H, K, N, T: lists shorter than / equal to / longer than one block, T not a multiple of 64, H = 4 / 16
GPU_CASES = [(2, 3, 4, 128, 50, 150), (1, 2, 16, 512, 300, 64), (2, 3, 16, 128, 33, 5)]


@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernel_interpret_matches_reference(case):
    q, kv, idx, sink = make_inputs(*case, seed=sum(case))
    scale = case[3] ** -0.5
    out = gpu.sparse_attention(q, kv, idx, sink, scale, interpret=True)
    _close(out, _ref(q, kv, idx, sink, scale=scale))


def test_gpu_kernel_heads_per_program_and_fp32():
    q, kv, idx, sink = make_inputs(1, 2, 16, 128, 40, 100, seed=3, dtype=jnp.float32)
    out = gpu.sparse_attention(q, kv, idx, sink, 0.1, heads_per_program=8, interpret=True)
    ref = _ref(q, kv, idx, sink, scale=0.1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


# the TPU interpreter is slow: two cases cover multi-step lists, T % 128 != 0, row chunking with padding
# (rows_per_call not dividing B*S), H = 4 and 16, K = 128 and 512, all-masked steps (skipped)
TPU_CASES = [((2, 3, 4, 128, 50, 150), dict(rows_per_call=4)), ((1, 2, 16, 512, 200, 100), dict(block_k=64))]


@pytest.mark.parametrize("case,kw", TPU_CASES)
def test_tpu_kernel_interpret_matches_reference(case, kw):
    q, kv, idx, sink = make_inputs(*case, seed=sum(case))
    scale = case[3] ** -0.5
    out = tpu.sparse_attention(q, kv, idx, sink, scale, interpret=pltpu.InterpretParams(), **kw)
    _close(out, _ref(q, kv, idx, sink, scale=scale))


def test_reference_matches_float64_emulation():
    """The jnp reference (on CPU) computes the spec's numerics: compare with a host float64 emulation."""
    import ml_dtypes
    q, kv, idx, sink = make_inputs(2, 2, 4, 128, 60, 150, seed=11)
    ref = np.asarray(_ref(q, kv, idx, sink, scale=0.09), np.float64)
    emu = np_sparse_attention(q, kv, idx, sink, 0.09).astype(np.float32).astype(ml_dtypes.bfloat16)
    emu = emu.astype(np.float64)
    assert np.linalg.norm(ref - emu) / np.linalg.norm(emu) < 1e-3


def test_empty_index_list():
    q, kv, idx, sink = make_inputs(1, 2, 4, 128, 5, 0)
    assert not np.asarray(gpu.sparse_attention(q, kv, idx, sink, 0.1, interpret=True)).any()
    assert not np.asarray(tpu.sparse_attention(q, kv, idx, sink, 0.1, interpret=pltpu.InterpretParams())).any()


def test_dispatch_backend_choice():
    assert sa.default_backend("cpu") == "reference"
    assert sa.default_backend("gpu") == "gpu" and sa.default_backend("cuda") == "gpu"
    assert sa.default_backend("tpu") == "tpu"
    q, kv, idx, sink = make_inputs(1, 1, 4, 128, 5, 3)
    with pytest.raises(ValueError, match="unknown backend"):
        sa.sparse_attention(q, kv, idx, sink, 0.1, backend="cuda-graph")
    # on CPU the default is the reference itself
    f = jax.jit(lambda *a: sa.sparse_attention(*a, 0.1))
    np.testing.assert_array_equal(np.asarray(f(q, kv, idx, sink)), np.asarray(_ref(q, kv, idx, sink, scale=0.1)))


def test_dispatch_gradients_equal_reference():
    """custom_vjp: the Pallas forward, the reference's VJP backward -> grads w.r.t. q, kv, sink equal the ref's."""
    q, kv, idx, sink = make_inputs(1, 2, 4, 128, 40, 64, seed=5, dtype=jnp.float32)
    ct = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape, np.float32))

    def loss(backend):
        return lambda q, kv, s: jnp.sum(sa.sparse_attention(q, kv, idx, s, 0.1, backend=backend) * ct)

    (out, got), (ref, want) = (jax.jit(jax.value_and_grad(loss(be), argnums=(0, 1, 2)))(q, kv, sink)
                               for be in ("gpu", "reference"))
    np.testing.assert_allclose(float(out), float(ref), rtol=1e-5)          # forward: the kernel's value
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def _abstract(B, S, H, K, N, T):
    return (jax.ShapeDtypeStruct((B, S, H, K), jnp.bfloat16), jax.ShapeDtypeStruct((B, N, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, S, T), jnp.int32), jax.ShapeDtypeStruct((H,), jnp.float32))


def test_gpu_kernel_lowers_for_cuda():
    """Pallas -> Triton IR lowering at the Flash decode shape (no GPU needed)."""
    f = jax.jit(lambda q, kv, i, s: gpu.sparse_attention(q, kv, i, s, 512 ** -0.5))
    exp = export.export(f, platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    assert "triton" in exp(*_abstract(2, 1, 64, 512, 1000, 640)).mlir_module()


def test_tpu_kernel_lowers_for_tpu():
    """Pallas -> Mosaic lowering at the Pro decode shape (no TPU needed; Mosaic's own compiler is not run)."""
    f = jax.jit(lambda q, kv, i, s: tpu.sparse_attention(q, kv, i, s, 512 ** -0.5))
    assert "tpu_custom_call" in export.export(f, platforms=["tpu"])(*_abstract(2, 1, 128, 512, 5000, 1152)).mlir_module()
