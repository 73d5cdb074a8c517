"""`layers.split_matmul`: fp32 (or bf16) x times a bf16 weight as bf16 GEMMs on exact bf16 parts, custom VJP.

Runs on CPU: the tests call split_matmul directly (the model only takes it on GPU) and check it against float64
numpy. Tolerances (relative to the summation scale sum_k |x_k w_k|, which bounds any summation-order effect):
  forward and dx   <= 2^-20 (fp32 accumulation rounding; the split itself is exact), vs up to 2^-8 for x rounded to bf16;
  dw before its bf16 rounding  <= 4 * 2^-16 (bf16x3: three dropped pair terms of <= 2^-16 each, + accumulation);
  dw as returned (bf16)        <= that + one bf16 half-ulp (<= 2^-8 relative) of the fp32 value.
Also here: `layers.act_einsum` (bf16 linears: the backward as bf16 x bf16 GEMMs, autodiff's values up to
summation order) and `layers.split_dot_nt` (fp32 x fp32 with a skinny fp32 weight, the mHC mixes: value, dx and
dw within 2^-20 of float64 relative to the summation scale).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear as skinny
from v4jax import layers, quant
from np_reference import dot_dtypes

f32, bf16 = jnp.float32, jnp.bfloat16
TIGHT = 2.0 ** -20


def _x(shape, seed, wide=True):
    """fp32 values with random signs spanning many binades (2^-40 .. 2^20) when wide, plus tiny ones."""
    r = np.random.default_rng(seed)
    v = r.standard_normal(shape)
    if wide:
        v = v * np.exp2(r.integers(-40, 21, shape))
        flat = v.reshape(-1)
        flat[:: 7] = r.standard_normal(flat[:: 7].shape) * 1e-30        # tiny, still normal in bf16 (2^-100)
    return jnp.asarray(v, f32)


def _w(O, K, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((O, K)) * 0.05, bf16)


def _np(a):
    return np.asarray(jnp.asarray(a, f32), np.float64)


def _rel(got, exact, scale):
    """max |got - exact| / scale, elementwise, with the summation scale floored away from 0."""
    return float((np.abs(_np(got) - exact) / np.maximum(scale, 1e-300)).max())


@pytest.mark.parametrize("jit", [False, True])
def test_split_parts_are_exact(jit):
    x = _x((64, 96), seed=1)
    x = x.at[0, :6].set(jnp.asarray([3.0e38, -1.7e-38, 2.0 ** -100 * 1.2345678, 0.0, 2.0 ** -103 * (1 + 2.0 ** -23),
                                     -(2.0 ** -105) * (1 + 2.0 ** -22)], f32))
    f = jax.jit(layers.split_parts) if jit else layers.split_parts
    hi, mid, lo = f(x)
    assert hi.dtype == mid.dtype == lo.dtype == bf16
    total, ax = _np(hi) + _np(mid) + _np(lo), np.abs(_np(x))                 # float64 sum: exact
    normal = ax >= 2.0 ** -103                       # below, remainders < 2^-126 are flushed (subnormals)
    assert normal.sum() > 0.9 * x.size and (~normal).sum() > 0
    np.testing.assert_array_equal(total[normal], _np(x)[normal])
    assert (np.abs(total - _np(x))[~normal] < 2.0 ** -126).all()
    assert (np.abs(_np(mid)) <= 2.0 ** -8 * ax).all() and (np.abs(_np(lo)) <= 2.0 ** -16 * ax).all()
    assert np.count_nonzero(_np(mid)) > x.size // 2 and np.count_nonzero(_np(lo)) > x.size // 2
    (only,) = layers.split_parts(x.astype(bf16))                                  # bf16: its own part
    assert only.dtype == bf16


@pytest.mark.parametrize("stack", [None, "rows", "inner"])
@pytest.mark.parametrize("jit", [False, True])
def test_forward_matches_float64(stack, jit):
    O, K, M = 48, 320, 40
    w = _w(O, K, seed=2)
    x = _x((M, K), seed=3)
    f = jax.jit(layers.split_matmul, static_argnames="stack") if jit else layers.split_matmul
    y = f(x, w, stack=stack)
    assert y.dtype == f32 and y.shape == (M, O)
    W = _np(w)
    exact = _np(x) @ W.T
    scale = np.abs(_np(x)) @ np.abs(W).T
    assert _rel(y, exact, scale) < TIGHT
    # what the split buys: x rounded to bf16 alone is ~2^-9 off (up to 2^-8)
    assert _rel(_np(x.astype(bf16)) @ W.T, exact, scale) > 2.0 ** -12
    # and the fp32 einsum (the path it replaces) agrees to the same tolerance
    assert _rel(layers._matmul(x, w.astype(f32)), exact, scale) < TIGHT


def test_bf16_x_single_gemm_and_leading_dims():
    O, K = 32, 256
    w = _w(O, K, seed=4)
    x = _x((2, 3, 5, K), seed=5).astype(bf16)
    y = jax.jit(layers.split_matmul)(x, w)
    assert y.shape == (2, 3, 5, O) and y.dtype == f32
    exact = _np(x) @ _np(w).T
    assert _rel(y, exact, np.abs(_np(x)) @ np.abs(_np(w)).T) < TIGHT
    # one dot_general in the forward: bf16 x is not split
    jaxpr = jax.make_jaxpr(layers.split_matmul)(x, w)
    assert str(jaxpr).count("dot_general") == 1


@pytest.mark.parametrize("xdt", [f32, bf16])
@pytest.mark.parametrize("stack", [None, "rows", "inner"])
def test_gradients_match_float64(xdt, stack):
    O, K, lead = 40, 288, (3, 24)
    w = _w(O, K, seed=6)
    x = _x(lead + (K,), seed=7, wide=(xdt == f32)).astype(xdt)
    ct = _x(lead + (O,), seed=8)                                          # a cotangent spanning many binades

    def loss(x, w):
        return jnp.sum(layers.split_matmul(x, w, stack=stack) * ct)

    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert dx.dtype == xdt and dx.shape == x.shape and dw.dtype == bf16 and dw.shape == w.shape
    G, X, W = _np(ct).reshape(-1, O), _np(x).reshape(-1, K), _np(w)
    dx_exact = (G @ W).reshape(x.shape)
    dx_scale = (np.abs(G) @ np.abs(W)).reshape(x.shape)
    if xdt == f32:
        assert _rel(dx, dx_exact, dx_scale) < TIGHT
    else:                                                                 # rounded to bf16 as the cotangent
        assert _rel(dx, dx_exact, np.abs(dx_exact)) <= 2.0 ** -8 + TIGHT
    dw_exact, dw_scale = G.T @ X, np.abs(G).T @ np.abs(X)
    dw32 = jax.jit(layers._dw)(jnp.asarray(G, f32), x.reshape(-1, K))
    err32 = _rel(dw32, dw_exact, dw_scale)
    assert err32 < 4 * 2.0 ** -16
    if xdt == bf16:
        assert err32 < 2 * 2.0 ** -16
    bound = 2.0 ** -8 * np.abs(dw_exact) + (1 + 2.0 ** -8) * 4 * 2.0 ** -16 * dw_scale  # bf16 RNE + bf16x3
    assert (np.abs(_np(dw) - dw_exact) <= bound).all()
    # the same VJP through jax.vjp, unjitted
    _, vjp = jax.vjp(lambda x, w: layers.split_matmul(x, w, stack=stack), x, w)
    dx2, dw2 = vjp(ct)
    np.testing.assert_allclose(_np(dx2), _np(dx), rtol=2.0 ** -18, atol=0)
    np.testing.assert_allclose(_np(dw2), _np(dw), rtol=2.0 ** -7, atol=0)


def test_gradients_close_to_fp32_einsum():
    """The path it replaces: the same gradients up to summation order (dw: up to bf16 rounding flips)."""
    O, K, M = 64, 128, 96
    w = _w(O, K, seed=9)
    x = _x((M, K), seed=10, wide=False)
    ct = _x((M, O), seed=11, wide=False)
    new = jax.grad(lambda x, w: jnp.sum(layers.split_matmul(x, w) * ct), argnums=(0, 1))(x, w)
    old = jax.grad(lambda x, w: jnp.sum(layers._matmul(x, w.astype(f32)) * ct), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(_np(new[0]), _np(old[0]), rtol=1e-5, atol=1e-6)
    assert np.abs(_np(new[1]) - _np(old[1])).max() <= 2.0 ** -8 * np.abs(_np(old[1])).max()


def test_bad_inputs():
    with pytest.raises(TypeError):
        layers.split_matmul(jnp.zeros((4, 8), f32), jnp.zeros((3, 8), f32))
    with pytest.raises(ValueError):
        layers.split_matmul(jnp.zeros((4, 8), f32), jnp.zeros((3, 9), bf16))
    with pytest.raises(ValueError):
        layers.split_matmul(jnp.ones((4, 8), f32), jnp.zeros((3, 8), bf16), stack="cols")


def test_dispatch_picks_split_on_gpu_only(monkeypatch):
    O, K = 64, 128
    rows = skinny.MAX_ROWS + 8
    w = _w(O, K, seed=12)
    node = {"weight": w}
    w8, s8 = quant.quantize_fp8_weight(w.astype(f32))
    node8 = {"weight": w8, "scale": s8}
    node32 = {"weight": w.astype(f32)}
    x = _x((2, rows // 2, K), seed=13, wide=False)
    calls = []
    real = layers.split_matmul
    monkeypatch.setattr(layers, "split_matmul", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))

    assert layers.split_backend() == "reference"                         # CPU: nothing changes
    layers.linear_f32(node, x)
    assert not calls

    monkeypatch.setattr(layers, "split_backend", lambda: "gpu")
    y = layers.linear_f32(node, x)
    assert calls == [f32] and y.shape == (2, rows // 2, O) and y.dtype == f32
    exact = _np(x) @ _np(w).T
    assert _rel(y, exact, np.abs(_np(x)) @ np.abs(_np(w)).T) < TIGHT
    layers.linear_f32(node, x.astype(bf16))                              # bf16 x goes in unsplit
    assert calls == [f32, bf16]
    calls.clear()
    layers.linear_f32(node8, x)                                          # FP8 weight: its own path
    layers.linear_f32(node32, x)                                         # fp32 weight: the fp32 einsum
    layers.linear_f32(node, x[:, :1])                                    # <= MAX_ROWS rows: skinny / einsum
    assert not calls
    assert layers.uses_split(x, node, f32) and not layers.uses_split(x, node, bf16)
    # differentiable through the dispatch
    g = jax.grad(lambda w: jnp.sum(layers.linear_f32({"weight": w}, x)))(w)
    assert g.dtype == bf16 and calls


def test_reference_env_keeps_einsum(monkeypatch):
    monkeypatch.setenv("V4JAX_KERNELS", "reference")
    assert layers.split_backend() == "reference"


# ---- act_einsum: bf16 GEMMs with a bf16 result, backward bf16 x bf16 --------------------------------------
def _bf(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, bf16)


def _old_act(sub):
    """What linear_fp8 / linear_bf16 / attention._output computed before (and still do for fp32 activations)."""
    return lambda x, w: quant.round_to(jnp.einsum(sub, x, w, preferred_element_type=f32, precision="highest"), bf16)


@pytest.mark.parametrize("backend", ["reference", "gpu"])
@pytest.mark.parametrize("sub,xs,ws", [("bsi,oi->bso", (3, 20, 96), (40, 96)),
                                       ("bsgi,gri->bsgr", (2, 9, 4, 64), (4, 24, 64))])
def test_act_einsum_matches_fp32_product_and_float64(sub, xs, ws, backend, monkeypatch):
    monkeypatch.setattr(layers, "split_backend", lambda: backend)
    x, w = _bf(xs, 20), _bf(ws, 21, 0.05)
    y = jax.jit(lambda x, w: layers.act_einsum(sub, x, w))(x, w)
    assert y.dtype == bf16
    np.testing.assert_array_equal(_np(y), _np(jax.jit(_old_act(sub))(x, w)))          # same forward
    ct = _bf(y.shape, 22)
    grad = lambda x, w, c: jax.vjp(lambda a, b: layers.act_einsum(sub, a, b), x, w)[1](c)
    dts = {d for d in dot_dtypes(jax.make_jaxpr(grad)(x, w, ct).jaxpr)}
    assert dts == ({("bfloat16", "bfloat16")} if backend == "gpu" else {("bfloat16", "bfloat16"),
                                                                       ("float32", "float32")})
    if backend == "gpu" and sub.startswith("bsg"):
        return          # XLA:CPU cannot run this batched bf16 x bf16 -> f32 dot (the reason for "reference")
    new = jax.jit(grad)(x, w, ct)
    old = jax.jit(lambda x, w, c: jax.vjp(_old_act(sub), x, w)[1](c))(x, w, ct)
    X, W, G = _np(x), _np(w), _np(ct)
    sx, sw = layers._transposed_subscripts(sub)
    exact = (np.einsum(sx, G, W), np.einsum(sw, G, X))
    scale = (np.einsum(sx, np.abs(G), np.abs(W)), np.einsum(sw, np.abs(G), np.abs(X)))
    for got, ref, e, s in zip(new, old, exact, scale):
        assert got.dtype == bf16
        # one bf16 rounding (RNE, <= 2^-8 relative) of the fp32 sum of exact products
        assert (np.abs(_np(got) - e) <= 2.0 ** -8 * np.abs(e) + TIGHT * s).all()
        # = autodiff of the fp32-product formulation up to summation order: at most one bf16 ulp apart
        assert (np.abs(_np(got) - _np(ref)) <= 2.0 ** -7 * np.abs(_np(ref)) + TIGHT * s).all()


def test_act_einsum_backward_runs_bf16_dots_only(monkeypatch):
    monkeypatch.setattr(layers, "split_backend", lambda: "gpu")
    x, w = _bf((4, 32, 64), 23), _bf((48, 64), 24)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(layers.act_einsum("...i,oi->...o", x, w)
                                                         .astype(f32) ** 2), argnums=(0, 1)))(x, w)
    dots = dot_dtypes(jaxpr.jaxpr)
    assert len(dots) == 3 and all(d == ("bfloat16", "bfloat16") for d in dots)
    # the old formulation's backward: f32 cotangent x bf16 operand (fp32 SIMT GEMMs on a GPU)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(_old_act("...i,oi->...o")(x, w).astype(f32) ** 2),
                                    argnums=(0, 1)))(x, w)
    assert sum("float32" in d for d in dot_dtypes(jaxpr.jaxpr)) == 2
    with pytest.raises(TypeError):
        layers.act_einsum("...i,oi->...o", x.astype(f32), w)
    with pytest.raises(ValueError):
        layers.act_einsum("ij,jk->i", x[0], w.T)                       # k only in w: no transposed einsum


def test_bf16_linears_take_act_einsum(monkeypatch):
    import v4jax
    monkeypatch.setattr(layers, "split_backend", lambda: "gpu")
    cfg = v4jax.ModelConfig.preset("tiny")                              # bf16 activations, quant_sim on
    w = _bf((48, 64), 25, 0.05)
    x = _bf((2, 40, 64), 26)
    for lin in (layers.linear_fp8, layers.linear_bf16):
        y = lin(cfg, {"weight": w}, x)
        xq = quant.fp8_sim(x, 128) if lin is layers.linear_fp8 else x
        np.testing.assert_array_equal(_np(y), _np(_old_act("...i,oi->...o")(xq, w)))
        jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(lin(cfg, {"weight": w}, x).astype(f32)),
                                        argnums=(0, 1)))(x, w)
        assert all(d == ("bfloat16", "bfloat16") for d in dot_dtypes(jaxpr.jaxpr))


# ---- split_dot_nt: fp32 x fp32 with a skinny fp32 weight (the mHC mixes) -----------------------------------
@pytest.mark.parametrize("x_bf16", [False, True])
def test_split_dot_nt_matches_float64(x_bf16):
    N, M, K = 72, 24, 384
    x = _x((3, N // 3, K), seed=30, wide=not x_bf16)
    if x_bf16:
        x = x.astype(bf16).astype(f32)
    w = _x((M, K), seed=31, wide=False) * 0.1
    ct = _x((3, N // 3, M), seed=32)
    y, vjp = jax.vjp(lambda a, b: layers.split_dot_nt(a, b, x_bf16=x_bf16), x, w)
    dx, dw = jax.jit(vjp)(ct)
    assert y.dtype == dx.dtype == dw.dtype == f32 and dx.shape == x.shape and dw.shape == w.shape
    X, W, G = _np(x).reshape(N, K), _np(w), _np(ct).reshape(N, M)
    assert _rel(y.reshape(N, M), X @ W.T, np.abs(X) @ np.abs(W).T) < TIGHT
    assert _rel(dx.reshape(N, K), G @ W, np.abs(G) @ np.abs(W)) < TIGHT
    assert _rel(dw, G.T @ X, np.abs(G).T @ np.abs(X)) < TIGHT
    # the fp32 einsum it replaces agrees to the same tolerance; a bf16-rounded w would not
    ref = lambda a, b: jnp.einsum("...i,mi->...m", a, b, precision="highest")
    _, rvjp = jax.vjp(ref, x, w)
    rdx, rdw = rvjp(ct)
    assert _rel(rdw, G.T @ X, np.abs(G).T @ np.abs(X)) < TIGHT
    assert _rel(_np(x).reshape(N, K) @ _np(w.astype(bf16)).T, X @ W.T, np.abs(X) @ np.abs(W).T) > 2.0 ** -12
    # only bf16 dots, and a bf16 x is one part: 1 forward GEMM (x_bf16) or 3, 1 dx GEMM, 1 or 3 dw GEMMs
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(layers.split_dot_nt(a, b, x_bf16=x_bf16) * ct),
                                    argnums=(0, 1)))(x, w)
    dots = dot_dtypes(jaxpr.jaxpr)
    assert all(d == ("bfloat16", "bfloat16") for d in dots)
    assert len(dots) == (3 if x_bf16 else 7)
    with pytest.raises(TypeError):
        layers.split_dot_nt(x.astype(bf16), w)


# ---- layers.lookup: a row gather whose gradient is a deterministic fp32 segmented sum --------------------------
@pytest.mark.parametrize("dt", [f32, bf16])
def test_lookup_values_and_gradient(dt):
    """Forward = table[ids]; gradient = per-row fp32 sums of the cotangent rows (ids repeated, unsorted, some rows
    never read), rounded once to the table's dtype: against a float64 numpy sum."""
    rng = np.random.default_rng(3)
    V, d = 37, 24
    table = jnp.asarray(rng.standard_normal((V, d)), f32).astype(dt)
    ids = jnp.asarray(rng.integers(0, V // 2, (3, 41)), jnp.int32).at[0, :9].set(5)    # repeats, rows unread
    ct = jnp.asarray(rng.standard_normal((3, 41, d)) * 10.0 ** rng.integers(-3, 3, (3, 41, 1)), f32).astype(dt)
    y, vjp = jax.vjp(layers.lookup, table, ids)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(table[ids], np.float32))
    (dtab, _) = jax.jit(vjp)(ct)
    assert dtab.dtype == dt and dtab.shape == (V, d)
    want = np.zeros((V, d))
    np.add.at(want, np.asarray(ids).reshape(-1), np.asarray(ct, np.float64).reshape(-1, d))
    scale = np.zeros((V, d))
    np.add.at(scale, np.asarray(ids).reshape(-1), np.abs(np.asarray(ct, np.float64)).reshape(-1, d))
    got = np.asarray(dtab, np.float64)
    rnd = 2.0 ** -8 if dt == bf16 else 0.0                       # one rounding to bf16 at the end
    assert (np.abs(got - want) <= rnd * np.abs(want) + 64 * 2.0 ** -24 * scale).all()
    assert (got[np.setdiff1d(np.arange(V), np.asarray(ids))] == 0).all()


def test_embed_and_ape_gradients_have_no_scatter_add():
    """The model's embedding and the compressor's ape gradients (the training step's last scatter-adds with
    repeated indices, i.e. GPU atomics) go through layers.lookup: no scatter-add in their gradient programs."""
    import v4jax
    from v4jax import compressor, model
    cfg = v4jax.ModelConfig.preset("tiny", quant_sim=False, compute_dtype="float32")
    params = {"embed": {"weight": jnp.ones((cfg.vocab_size, cfg.dim), bf16)}}
    tokens = jnp.zeros((2, 9), jnp.int32)
    emb = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model._embed(cfg, p, tokens).astype(f32))))(params)
    m, D = 4, 16
    p = {"wkv": {"weight": jnp.ones((D, cfg.dim), bf16)}, "wgate": {"weight": jnp.ones((D, cfg.dim), bf16)},
         "ape": jnp.ones((m, D), f32)}
    x = jnp.ones((1, 9, cfg.dim), bf16)
    ape = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(compressor._project({**p, "ape": a}, x, jnp.arange(9), m)[1])))(
        p["ape"])
    for jaxpr in (emb, ape):
        assert "scatter-add" not in str(jaxpr) and "scatter_add" not in str(jaxpr)
        assert "scatter" in str(jaxpr)               # the unique-index write of each row's total


def test_lookup_is_the_plain_gather_under_a_multi_device_mesh():
    """Under a mesh of > 1 device the gradient is the gather's own (per-device scatter-add partials): the sort
    would all-gather sequence-split cotangents (tests/test_sharding.py, context parallelism)."""
    table, ids = jnp.ones((8, 4), f32), jnp.array([[1, 1, 3]])
    grad = lambda: str(jax.make_jaxpr(jax.grad(lambda t: jnp.sum(layers.lookup(t, ids))))(table))
    assert "scatter-add" not in grad()
    mesh = jax.sharding.AbstractMesh((2,), ("data",))
    with jax.sharding.use_abstract_mesh(mesh):
        assert "scatter-add" in grad()
