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
    from v4jax import attention, params as P, sharding as SH
    from v4jax.config import ModelConfig
    from v4jax.layers import rope_inv_freq
    cfg = ModelConfig.preset("tiny", compute_dtype="float32", quant_sim=False)
    layer = next(i for i in range(cfg.n_layers) if cfg.ratio(i) == 4)
    sh = SH.param_shardings(cfg, SH.make_mesh({}), "bf16")           # jitted init (init_params is eager, ~10 s)
    p = P.init_params_sharded(cfg, jax.random.key(0), sh, "bf16")["layers"][str(layer)]["attn"]
    x = jax.random.normal(jax.random.key(1), (1, 64, cfg.dim), jnp.float32)
    run = lambda: jax.jit(lambda p, x: attention.prefill(cfg, p, layer, x, rope_inv_freq(cfg, layer))[0])(p, x)
    want = run()
    calls = []
    real = gpu.index_scores

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)
    monkeypatch.setattr(ix, "default_backend", lambda platform=None: "gpu")
    monkeypatch.setattr(gpu, "index_scores", spy)
    got = run()
    assert calls, "the prefill did not go through the indexer dispatch"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _fp4_rows(keys):
    """The production cache's FP4 key rows of bf16 keys [B, C, dI] (v4jax.indexer.store_keys)."""
    from v4jax.config import ModelConfig
    return v4_indexer.store_keys(ModelConfig.preset("tiny", kv_cache_format="fp8"), keys)


def test_gpu_scores_of_fp4_cache_rows_equal_scores_of_their_keys():
    """Decode scoring straight from the FP4 cache rows (decoded in the kernel's registers) gives exactly the kernel's
    scores of the decoded bf16 keys, and the reference's up to the head-sum order; C not a multiple of the tile."""
    q, w, keys = make_inputs(2, 1, 16, 300, seed=6)
    rows = _fp4_rows(keys)
    assert rows.dtype == jnp.uint8 and rows.shape == (2, 300, 68)
    decoded = reference.fp4_rows_to_keys(rows)
    np.testing.assert_array_equal(np.asarray(gpu.index_scores(q, w, rows, interpret=True), np.float32),
                                  np.asarray(gpu.index_scores(q, w, decoded, interpret=True), np.float32))
    _same(gpu.index_scores(q, w, rows, interpret=True), reference.cached_scores(q, w, rows))
    with pytest.raises(ValueError, match="FP4 key rows of 67 bytes"):
        gpu.index_scores(q, w, rows[..., :67], interpret=True)


def test_cached_index_scores_dispatch():
    q, w, keys = make_inputs(1, 1, 4, 100, seed=8)
    rows = _fp4_rows(keys)
    want = reference.scores(q, w, v4_indexer.fp4_rows_to_keys(rows))
    np.testing.assert_array_equal(np.asarray(ix.cached_index_scores(q, w, rows)), np.asarray(want))   # CPU
    np.testing.assert_array_equal(np.asarray(ix.cached_index_scores(q, w, keys)),
                                  np.asarray(reference.scores(q, w, keys)))
    _same(ix.cached_index_scores(q, w, rows, backend="gpu"), want)
    _same(ix.cached_index_scores(q, w, rows, backend="tpu"), want)          # FP4 rows: the reference on TPU
    with pytest.raises(ValueError, match="unknown backend"):
        ix.cached_index_scores(q, w, rows, backend="nope")


# ---- top-k -----------------------------------------------------------------------------------------------------
def _tied_scores(R, C, seed):
    """bf16 scores with many ties, +0 and -0, and a few -inf (a score the reference keeps when visible)."""
    rng = np.random.default_rng(seed)
    s = rng.integers(-6, 40, (R, C)).astype(np.float32) * 0.25
    zero = rng.random((R, C)) < 0.1
    s = np.where(zero, np.where(rng.random((R, C)) < 0.5, 0.0, -0.0), s)
    s = np.where(rng.random((R, C)) < 0.02, -np.inf, s)
    return jnp.asarray(s).astype(jnp.bfloat16)


def test_desc_keys_order_is_the_fp32_total_order_descending():
    vals = np.array([np.nan, np.inf, 3.0, 1e-30, 0.0, -0.0, -1e-30, -2.5, -np.inf], np.float32)
    keys = np.asarray(gpu.desc_keys(jnp.asarray(vals)))
    assert (np.diff(keys) > 0).all() and keys.min() >= 0 and keys.max() < gpu.KEY_RANGE
    assert keys[-1] == gpu.NEG_INF_KEY


@pytest.mark.parametrize("case", [
    # R, C, k, n_visible, first, launch options (small max_group: several groups and levels of them)
    (3, 100, 10, [100, 50, 3], 0, {}),
    (2, 300, 20, [300, 250], [0, 40], {}),                   # earlier documents hidden
    (4, 40, 40, [40, 3, 0, 39], [0, 0, 0, 38], {}),          # k == C; an empty row; one visible entry
    (2, 1000, 20, [1000, 999], [0, 5], dict(max_group=128)),  # three levels of groups
    (1, 5000, 30, [4000], [77], dict(max_group=256, radix=4)),
    (2, 77, 9, [77, 60], 0, dict(radix=16)),
])
def test_gpu_topk_interpret_equals_reference(case):
    R, C, k, nv, first, kw = case
    s = _tied_scores(R, C, seed=C + k)
    nv, first = jnp.asarray(nv, jnp.int32), jnp.asarray(first, jnp.int32)
    got = np.asarray(gpu.index_topk(s, nv, k, first, interpret=True, **kw))
    want = np.asarray(reference.topk(s, nv, k, first))
    np.testing.assert_array_equal(got, want)


def test_gpu_topk_leading_dims_and_dispatch():
    s = _tied_scores(6, 64, seed=3).reshape(2, 3, 64)              # [B, S, C] with per-query n_visible / first
    nv = jnp.array([[10, 40, 64], [1, 2, 64]], jnp.int32)
    first = jnp.array([[0, 8, 8], [0, 0, 60]], jnp.int32)
    want = np.asarray(reference.topk(s, nv, 16, first))
    np.testing.assert_array_equal(np.asarray(ix.index_topk(s, nv, 16, first, backend="gpu")), want)
    np.testing.assert_array_equal(np.asarray(ix.index_topk(s, nv, 16, first)), want)      # CPU: the reference
    # fp32 scores (compute_dtype="float32" models) take the reference on every backend
    s32 = s.astype(jnp.float32) + 1e-3 * jnp.arange(64, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(ix.index_topk(s32, nv, 16, first, backend="gpu")),
                                  np.asarray(reference.topk(s32, nv, 16, first)))
    with pytest.raises(TypeError, match="bf16"):
        gpu.index_topk(s32, nv, 16, first, interpret=True)
    with pytest.raises(ValueError, match="k=65"):
        gpu.index_topk(s, nv, 65, first, interpret=True)
    with pytest.raises(ValueError, match="unknown backend"):
        ix.index_topk(s, nv, 4, backend="nope")


def test_model_prefill_topk_through_the_kernel(monkeypatch):
    """A bf16 model's CSA prefill takes its top-k through pallas_kernels.indexer.index_topk: with the GPU kernel
    forced (interpret mode) the layer output is bit-identical to the reference path's, and the kernel ran."""
    from v4jax import attention, params as P, sharding as SH
    from v4jax.config import ModelConfig
    from v4jax.layers import rope_inv_freq
    cfg = ModelConfig.preset("tiny")
    layer = next(i for i in range(cfg.n_layers) if cfg.ratio(i) == 4)
    sh = SH.param_shardings(cfg, SH.make_mesh({}), "bf16")           # jitted init (init_params is eager, ~10 s)
    p = P.init_params_sharded(cfg, jax.random.key(0), sh, "bf16")["layers"][str(layer)]["attn"]
    x = jax.random.normal(jax.random.key(1), (2, 64, cfg.dim), jnp.float32).astype(jnp.bfloat16)
    run = lambda: jax.jit(lambda p, x: attention.prefill(cfg, p, layer, x, rope_inv_freq(cfg, layer))[0])(p, x)
    want = run()
    calls = []
    real, dispatch = gpu.index_topk, ix.index_topk     # attention.indexer_kernels is the module ix

    def spy(s, *a, **k):
        calls.append(s.dtype)
        return real(s, *a, **k)
    monkeypatch.setattr(gpu, "index_topk", spy)
    monkeypatch.setattr(ix, "index_topk", lambda *a, **k: dispatch(*a, **k, backend="gpu"))
    got = run()
    assert calls == [jnp.bfloat16], calls
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_topk_groups_plan():
    # prefill rows: programs of at most 4096 entries; decode at 1M context: the first level fills the GPU
    assert gpu.topk_groups(8192, 2048, 512) == 2048
    assert gpu.topk_groups(4096, 16384, 512) == 4096 == gpu.TOPK_MAX_GROUP
    assert gpu.topk_groups(4096, 16384, 512, max_group=16384) == 16384
    assert gpu.topk_groups(1, 262144, 512) == 2048
    assert gpu.topk_groups(1, 65536, 512, first_level=False) == 4096
    assert gpu.topk_groups(1, 65536, 4096, first_level=False) == 65536 // 4   # never below 4k
