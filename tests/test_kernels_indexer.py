"""Lightning-indexer kernels (pallas_kernels.indexer): Pallas scoring in interpret mode == the jnp reference.

The kernels are compared with the reference run op by op (eagerly): under jax.jit, XLA's excess-precision
simplification fuses away the reference's intermediate bf16 roundings (score -> bf16, weighted product -> bf16),
so a jitted reference is *not* the spec's bf16 function; the kernels round explicitly and match the eager one,
and a host emulation with explicit ml_dtypes roundings, exactly.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels.indexer as ix
from pallas_kernels.indexer import gpu, reference, tpu
from v4jax import indexer as v4_indexer


def make_inputs(B, S, nI, C, seed=0, dI=128):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, S, nI, dI), np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(0.1 * rng.standard_normal((B, S, nI), np.float32)).astype(jnp.bfloat16)
    keys = jnp.asarray(rng.standard_normal((B, C, dI), np.float32)).astype(jnp.bfloat16)
    return q, w, keys


def _same(out, ref):
    """Equal up to the head-sum order: a score may differ by one bf16 rounding step, rarely."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert np.mean(out != ref) < 0.01
    np.testing.assert_allclose(out, ref, rtol=2 ** -7, atol=1e-3 * np.abs(ref).max())


def test_reference_is_the_model_definition():
    assert reference.scores is v4_indexer.scores and reference.topk is v4_indexer.topk


def test_gpu_scores_equal_host_bf16_emulation():
    import ml_dtypes
    bf = ml_dtypes.bfloat16
    q, w, keys = make_inputs(2, 3, 4, 50, seed=4)
    qn, wn, kn = (np.asarray(a.astype(jnp.float32), np.float64) for a in (q, w, keys))
    s = np.einsum("bshd,bcd->bshc", qn, kn).astype(np.float32).astype(bf).astype(np.float32)
    s = (np.maximum(s, 0) * wn.astype(np.float32)[..., None]).astype(bf).astype(np.float32)
    emu = s.sum(axis=2).astype(bf).astype(np.float32)
    _same(gpu.index_scores(q, w, keys, interpret=True), emu)


@pytest.mark.parametrize("case", [(2, 5, 4, 77), (1, 3, 16, 300)])
def test_gpu_scores_interpret_match_reference(case):
    q, w, keys = make_inputs(*case, seed=sum(case))
    _same(gpu.index_scores(q, w, keys, interpret=True), reference.scores(q, w, keys))


def test_tpu_scores_interpret_match_reference():
    q, w, keys = make_inputs(2, 5, 4, 150, seed=1)                   # S and C not multiples of the tiles
    _same(tpu.index_scores(q, w, keys, interpret=pltpu.InterpretParams()), reference.scores(q, w, keys))


def test_dispatch_scores_topk_and_gradients():
    assert ix.default_backend("cpu") == "reference" and ix.default_backend("gpu") == "gpu"
    q, w, keys = make_inputs(1, 4, 4, 40, seed=2)
    s = reference.scores(q, w, keys)
    np.testing.assert_array_equal(np.asarray(ix.index_scores(q, w, keys)), np.asarray(s))   # CPU: the reference
    _same(ix.index_scores(q, w, keys, backend="gpu"), s)
    with pytest.raises(ValueError, match="unknown backend"):
        ix.index_scores(q, w, keys, backend="nope")
    n_visible = jnp.array([0, 3, 10, 40])
    top = ix.index_topk(s[0], n_visible, 8)
    np.testing.assert_array_equal(np.asarray(top), np.asarray(v4_indexer.topk(s[0], n_visible, 8)))
    assert (np.asarray(top[0]) == -1).all() and (np.asarray(top[1])[3:] == -1).all()
    # custom_vjp: gradients are the reference's
    qf, wf, kf = (a.astype(jnp.float32) for a in (q, w, keys))
    loss = lambda be: lambda *a: jnp.sum(ix.index_scores(*a, backend=be) ** 2)
    got = jax.jit(jax.grad(loss("gpu"), argnums=(0, 1, 2)))(qf, wf, kf)
    want = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(qf, wf, kf)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_kernels_lower_for_their_platforms():
    args = (jax.ShapeDtypeStruct((1, 64, 64, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 64, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 1000, 128), jnp.bfloat16))
    e = export.export(jax.jit(gpu.index_scores), platforms=["cuda"],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert "triton" in e.mlir_module()
    assert "tpu_custom_call" in export.export(jax.jit(tpu.index_scores), platforms=["tpu"])(*args).mlir_module()


def test_model_prefill_scores_through_the_dispatch(monkeypatch):
    """attention.prefill scores CSA entries through pallas_kernels.indexer.index_scores (the Pallas kernel on
    GPU/TPU; the jnp reference materialises [B, S, heads, C] fp32 scores -- 256 GiB at Flash size and 64K tokens):
    forcing the GPU kernel (interpret mode) gives the reference's prefill output and calls the kernel."""
    from v4jax import attention, params as P
    from v4jax.config import ModelConfig
    from v4jax.layers import rope_inv_freq
    cfg = ModelConfig.preset("tiny", compute_dtype="float32", quant_sim=False)
    layer = next(i for i in range(cfg.n_layers) if cfg.ratio(i) == 4)
    p = P.init_params(cfg, jax.random.key(0), "bf16")["layers"][str(layer)]["attn"]
    x = jax.random.normal(jax.random.key(1), (1, 64, cfg.dim), jnp.float32)
    want = attention.prefill(cfg, p, layer, x, rope_inv_freq(cfg, layer))[0]
    calls = []
    real = gpu.index_scores

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)
    monkeypatch.setattr(ix, "default_backend", lambda platform=None: "gpu")
    monkeypatch.setattr(gpu, "index_scores", spy)
    got = attention.prefill(cfg, p, layer, x, rope_inv_freq(cfg, layer))[0]
    assert calls, "the prefill did not go through the indexer dispatch"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
