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
from v4jax.bench import _rel, np_sparse_attention


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


# ---- split-list (flash-decoding) path -------------------------------------------------------------------
def _holes_inputs(seed=0, B=2, S=3, H=16, K=128, N=90, T=300):
    """make_inputs (ragged lists, -1 holes, an all-masked row at [0, 0], a full row) plus rows with whole masked
    64-blocks in the middle (a masked split), only the last block valid, only the first block valid."""
    q, kv, idx, sink = make_inputs(B, S, H, K, N, T, seed=seed)
    idx = np.array(idx).reshape(B * S, T)
    assert B * S >= 5
    full = np.random.default_rng(seed + 1).integers(0, N, T).astype(np.int32)
    t = np.arange(T)
    idx[1] = np.where((t >= 64) & (t < 192), -1, full)                   # masked blocks 1-2
    idx[2] = np.where(t >= (T - 1) // 64 * 64, full, -1)                 # only the last block
    idx[3] = np.where(t < 64, full, -1)                                  # only the first block
    return q, kv, jnp.asarray(idx.reshape(B, S, T)), sink


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_gpu_split_exact_equals_single_pass_and_reference(num_splits):
    """T = 300: 5 blocks (the last partial); 3 splits -> 2 blocks each, the last split padded (T not a multiple of
    the chunk). Exact (pre-pass) numerics: equal to the single-pass kernel up to fp32 rescale rounding."""
    q, kv, idx, sink = _holes_inputs(seed=num_splits)
    single = gpu.sparse_attention(q, kv, idx, sink, 0.1, num_splits=1, interpret=True)
    out = gpu.sparse_attention(q, kv, idx, sink, 0.1, num_splits=num_splits, interpret=True)
    ref = _ref(q, kv, idx, sink, scale=0.1)
    _close(out, ref)
    _close(out, single, tol=2e-4)
    assert not np.asarray(out)[0, 0].any()                                # the all-masked row is exactly 0


def test_gpu_split_inexact_within_tolerance():
    """exact=False (no pre-pass): each chunk rounds against its own running max -> not the reference's bits, but
    within the tests' bf16 tolerance; still exact with one split."""
    q, kv, idx, sink = _holes_inputs(seed=7)
    ref = _ref(q, kv, idx, sink, scale=0.1)
    out = gpu.sparse_attention(q, kv, idx, sink, 0.1, num_splits=5, exact=False, interpret=True)
    _close(out, ref)
    assert _rel(out, ref) > 2e-4                                         # it is not the exact path
    # ...and it is exactly the function the on-device bench check emulates for it
    import ml_dtypes
    emu = np_sparse_attention(q, kv, idx, sink, 0.1, splits=5).astype(np.float32).astype(ml_dtypes.bfloat16)
    assert _rel(out, emu) < 2e-4
    one = gpu.sparse_attention(q, kv, idx, sink, 0.1, num_splits=1, exact=False, interpret=True)
    _close(one, ref, tol=2e-4)


def test_gpu_split_launch_variants_and_fp32():
    """Launch variants compute the same function: register prefetch of the next block, pre-pass head groups
    different from the main kernel's (fp32: equal to the reference to fp32 rounding)."""
    q, kv, idx, sink = _holes_inputs(seed=9, H=4, K=128, T=200)
    ref = _ref(q, kv, idx, sink, scale=0.1)
    for kw in (dict(num_splits=2, prefetch=True, num_stages=1), dict(num_splits=1, prefetch=True)):
        _close(gpu.sparse_attention(q, kv, idx, sink, 0.1, interpret=True, **kw), ref)
    q, kv, idx, sink = make_inputs(1, 3, 16, 128, 40, 200, seed=4, dtype=jnp.float32)
    out = gpu.sparse_attention(q, kv, idx, sink, 0.1, num_splits=4, heads_per_program=8, prepass_heads=16,
                               interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_ref(q, kv, idx, sink, scale=0.1)), rtol=1e-5, atol=1e-5)


def test_gpu_split_matches_float64_emulation():
    """The exact split path computes the spec's numerics (host float64 emulation, rounded to bf16)."""
    import ml_dtypes
    q, kv, idx, sink = _holes_inputs(seed=21, B=1, S=5, H=4)
    out = np.asarray(gpu.sparse_attention(q, kv, idx, sink, 0.09, num_splits=5, interpret=True), np.float64)
    emu = np_sparse_attention(q, kv, idx, sink, 0.09).astype(np.float32).astype(ml_dtypes.bfloat16)
    emu = emu.astype(np.float64)
    assert np.linalg.norm(out - emu) / np.linalg.norm(emu) < 2e-4


def test_gpu_auto_splits_from_shapes():
    """Splits only where rows x head groups leave the SMs idle (decode at small batch); divisors of the block count."""
    flash = lambda B, S=1, T=640: gpu.plan(B, S, 64, T, sms=132)
    pro = lambda B, S=1, T=1152: gpu.plan(B, S, 128, T, sms=132)
    assert flash(1)["P"] == 10 and flash(16)["P"] == 5 and flash(64)["P"] == 1
    assert pro(1)["P"] == 18 and pro(16)["P"] == 3 and pro(64)["P"] == 1
    assert flash(1, S=8192)["P"] == 1                                       # prefill: never split
    assert gpu.plan(1, 1, 64, 300, num_splits=3, sms=132)["bps"] == 2      # 5 blocks -> 2+2+1(padded)
    assert gpu.plan(1, 1, 64, 64, num_splits=4, sms=132)["P"] == 1         # never more splits than blocks
    for B in (1, 2, 4, 8, 16, 32):
        p = flash(B)
        assert p["P"] == 1 or p["programs"] >= 132 or p["P"] == p["nb"]


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


def test_dense_baseline_chunked_and_against_reference():
    """The bench's dense-mask baseline: in query chunks (lax.map, how long prefills fit) the same as in one piece,
    and close to the reference on lists without repeated entries (the mask counts an entry once)."""
    from v4jax.bench import dense_attention
    rng = np.random.default_rng(12)
    B, S, H, K, N, T = 2, 8, 4, 64, 40, 12
    q = jnp.asarray(rng.standard_normal((B, S, H, K), np.float32)).astype(jnp.bfloat16)
    kv = jnp.asarray(rng.standard_normal((B, N, K), np.float32)).astype(jnp.bfloat16)
    sink = jnp.asarray(rng.standard_normal(H, np.float32))
    idx = np.stack([[rng.permutation(N)[:T] for _ in range(S)] for _ in range(B)]).astype(np.int32)
    idx[:, :, -3:] = -1                                                       # masked tails
    idx = jnp.asarray(idx)
    whole = dense_attention(q, kv, idx, sink, 0.1)
    np.testing.assert_allclose(np.asarray(dense_attention(q, kv, idx, sink, 0.1, q_chunk=4), np.float32),
                               np.asarray(whole, np.float32), rtol=1e-6, atol=1e-6)
    _close(whole, _ref(q, kv, idx, sink, scale=0.1))


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
    q, kv, idx, sink = make_inputs(1, 2, 4, 128, 40, 200, seed=5, dtype=jnp.float32)
    assert gpu.plan(1, 2, 4, 200, interpret=True)["P"] == 4             # the dispatch takes the split path here
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


@pytest.mark.parametrize("kw", [dict(), dict(exact=False), dict(num_splits=3, prefetch=True, num_stages=1)])
def test_gpu_split_kernels_lower_for_cuda(kw):
    """The split path (pre-pass, split kernel, combine) lowers at the Flash / Pro decode shapes at batch 1."""
    for H, T in ((64, 640), (128, 1152)):
        f = jax.jit(lambda q, kv, i, s: gpu.sparse_attention(q, kv, i, s, 512 ** -0.5, **kw))
        exp = export.export(f, platforms=["cuda"],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
        mlir = exp(*_abstract(1, 1, H, 512, 4000, T)).mlir_module()
        assert mlir.count("__gpu$xla.gpu.triton") == (1 if kw.get("exact") is False else 2)


def test_tpu_kernel_lowers_for_tpu():
    """Pallas -> Mosaic lowering at the Pro decode shape (no TPU needed; Mosaic's own compiler is not run)."""
    f = jax.jit(lambda q, kv, i, s: tpu.sparse_attention(q, kv, i, s, 512 ** -0.5))
    assert "tpu_custom_call" in export.export(f, platforms=["tpu"])(*_abstract(2, 1, 128, 512, 5000, 1152)).mlir_module()


def test_launch_defaults_are_the_decode_launch_only_when_unpinned(monkeypatch):
    """gpu.launch_defaults (the dispatch's and the bench's launch): at decode with neither heads_per_program nor
    num_splits given, the sweep's single-pass launch (Flash 16 heads / 4 warps, Pro 64 / 8) where batch x heads
    fill the GPU; a pinned value or a prefill keeps the caller's (warps default 4)."""
    monkeypatch.setattr(gpu, "_num_sms", lambda: 132)
    assert gpu.launch_defaults(64, 1, 64, 640, None, None, None) == (16, 4)
    assert gpu.launch_defaults(64, 1, 128, 1152, None, None, None) == (64, 8)
    assert gpu.launch_defaults(1, 1, 64, 640, None, None, None) == (None, 4)          # split path: defaults
    assert gpu.launch_defaults(64, 1, 64, 640, None, 1, None) == (None, 4)            # num_splits pinned
    assert gpu.launch_defaults(64, 1, 64, 640, 32, None, 8) == (32, 8)                # heads pinned
    assert gpu.launch_defaults(1, 4096, 64, 640, None, None, None) == (None, 4)       # prefill
