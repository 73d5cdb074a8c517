"""The pool-form backward of sparse attention equals the VJP of the jnp reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.sparse_attention.backward as bw
from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.sparse_attention.reference import sparse_attention as reference


def _inputs(dtype, B=2, S=37, H=3, K=64, N=50, T=20, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(k[0], (B, S, H, K), jnp.float32).astype(dtype)
    kv = jax.random.normal(k[1], (B, N, K), jnp.float32).astype(dtype)
    idx = jax.random.randint(k[2], (B, S, T), -1, N)
    idx = idx.at[0, 3].set(-1)                 # an all-masked row
    idx = idx.at[1, 5, :4].set(7)              # the same entry listed 4 times
    idx = idx.at[1, 6, 10:].set(-1)            # a short list
    sink = jax.random.normal(k[3], (H,))
    g = jax.random.normal(k[4], (B, S, H, K), jnp.float32).astype(dtype)
    return q, kv, idx, sink, g


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_pool_backward_equals_reference_vjp_f32(monkeypatch, chunk_rows):
    q, kv, idx, sink, g = _inputs(jnp.float32)
    if chunk_rows:    # several query chunks, the last one padded
        monkeypatch.setattr(bw, "CHUNK_ELEMS", chunk_rows * q.shape[2] * kv.shape[1])
    _, vjp = jax.vjp(lambda a, b, c: reference(a, b, idx, c, 0.1), q, kv, sink)
    want = vjp(g)
    got = bw.pool_backward(q, kv, idx, sink, 0.1, g)
    for w, h in zip(want, got):
        assert h.dtype == w.dtype and h.shape == w.shape
        np.testing.assert_allclose(np.asarray(h), np.asarray(w), atol=5e-6, rtol=1e-5)
    assert float(jnp.max(jnp.abs(got[0][0, 3]))) == 0.0          # all-masked row: no gradient to q


def test_pool_backward_bf16_close_to_reference_vjp():
    q, kv, idx, sink, g = _inputs(jnp.bfloat16)
    _, vjp = jax.vjp(lambda a, b, c: reference(a, b, idx, c, 0.1), q, kv, sink)
    want = vjp(g)
    got = bw.pool_backward(q, kv, idx, sink, 0.1, g)
    for w, h in zip(want, got):     # bf16 outputs: a few bf16 ulps (the reference rounds block probabilities)
        w, h = np.asarray(w, np.float32), np.asarray(h, np.float32)
        assert np.max(np.abs(h - w)) <= 0.02 * np.max(np.abs(w)) + 1e-6


def test_dispatch_uses_pool_backward_for_small_pools():
    assert bw.use_pool_backward(640, 144) and not bw.use_pool_backward(80_000, 640)
    q, kv, idx, sink, g = _inputs(jnp.float32)
    f = lambda a, b, c: jnp.sum(sparse_attention(a, b, idx, c, 0.1, backend="gpu") * g)      # interpret mode
    want = jax.grad(lambda a, b, c: jnp.sum(reference(a, b, idx, c, 0.1) * g), argnums=(0, 1, 2))(q, kv, sink)
    got = jax.grad(f, argnums=(0, 1, 2))(q, kv, sink)
    for w, h in zip(want, got):
        np.testing.assert_allclose(np.asarray(h), np.asarray(w), atol=5e-6, rtol=1e-5)


def test_gpu_decode_launch_choice():
    """Decode launches from the H100 sweep: one pass at large batch uses 16 heads/program (H=64) or 64 heads and 8
    warps (H=128); small batches keep the split path's defaults."""
    from pallas_kernels.sparse_attention import gpu
    assert gpu._decode_launch(64, 64, 640, None) == (16, 4)
    assert gpu._decode_launch(64, 128, 1152, None) == (64, 8)
    assert gpu._decode_launch(1, 64, 640, None) == (None, 4)
    assert gpu._decode_launch(64, 64, 640, 8) == (16, 8)        # an explicit warp count is kept
