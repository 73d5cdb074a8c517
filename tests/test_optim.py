"""Tests for v4jax.optim: Muon (spec 7, Algorithm 1) against a float64 numpy reimplementation, groups, schedule."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import v4jax
from v4jax import optim as O
from v4jax import params as P

STEPS = [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2
MU, GAMMA = 0.95, 0.18


# --------------------------------------------------------------------------- numpy float64 oracle
def np_ns(G, eps=1e-7):
    """Same iteration, written directly in float64, one matrix at a time."""
    G = np.asarray(G, np.float64)
    if G.ndim > 2:
        return np.stack([np_ns(g, eps) for g in G])
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (np.linalg.norm(X) + eps)
    for a, b, c in STEPS:
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if G.shape[0] > G.shape[1] else X


def np_muon_update(X, W, lr, wd):
    """-lr * (NS(X) * sqrt(max(n, m)) * 0.18 + wd * W) for X, W [..., n, m]."""
    n, m = X.shape[-2:]
    return -lr * (np_ns(X) * math.sqrt(max(n, m)) * GAMMA + wd * np.asarray(W, np.float64))


def rnd(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


ns_jit = jax.jit(O.newton_schulz, static_argnames=("steps", "eps", "dtype"))


# --------------------------------------------------------------------------- Newton-Schulz
@pytest.mark.parametrize("shape", [(64, 24), (24, 80), (48, 48), (3, 40, 24)], ids=["tall", "wide", "square", "batch"])
def test_ns_matches_numpy_f64(shape):
    G = rnd(np.random.default_rng(1), *shape)
    out = np.asarray(ns_jit(jnp.asarray(G)))
    assert out.shape == G.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, np_ns(G), rtol=0, atol=5e-6)  # observed ~4e-7


def test_ns_default_steps_are_spec():
    assert O.NS_STEPS == tuple(tuple(s) for s in STEPS)


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)])
def test_ns_singular_values_near_one(shape):
    rng = np.random.default_rng(2)
    n, m = shape
    k = min(n, m)
    U, _ = np.linalg.qr(rng.standard_normal((n, k)))
    V, _ = np.linalg.qr(rng.standard_normal((m, k)))
    s = np.geomspace(0.2, 5.0, k)  # condition number 25
    G = (U * s) @ V.T
    sv = np.linalg.svd(np.asarray(ns_jit(jnp.asarray(G, jnp.float32))), compute_uv=False)
    assert sv.min() > 0.7 and sv.max() < 1.2, (sv.min(), sv.max())
    # the same in bf16 matmuls (DeepSeek's setting) stays in a slightly wider band
    sv16 = np.linalg.svd(np.asarray(ns_jit(jnp.asarray(G, jnp.float32), dtype=jnp.bfloat16)), compute_uv=False)
    assert sv16.min() > 0.6 and sv16.max() < 1.3, (sv16.min(), sv16.max())
    # and the singular vectors are G's: NS(G) ~ U V^T
    np.testing.assert_allclose(np.asarray(ns_jit(jnp.asarray(G, jnp.float32))), U @ V.T, atol=0.2)


def test_ns_stack_equals_stack_of_ns():
    rng = np.random.default_rng(3)
    scales = np.array([1e-3, 1.0, 50.0, 7.0], np.float32)[:, None, None]
    G = rnd(rng, 4, 32, 20) * scales
    stacked = np.asarray(ns_jit(jnp.asarray(G)))
    single = np.stack([np.asarray(ns_jit(jnp.asarray(g))) for g in G])
    np.testing.assert_allclose(stacked, single, rtol=0, atol=1e-6)


def test_ns_zero_matrix_is_zero():
    assert np.all(np.asarray(ns_jit(jnp.zeros((8, 5)))) == 0)


# --------------------------------------------------------------------------- Muon transform
def run_muon(tx, W, grads):
    W = jnp.asarray(W)
    state = tx.init(W)
    update = jax.jit(tx.update)
    ups = []
    for g in grads:
        u, state = update(jnp.asarray(g), state, W)
        ups.append(np.asarray(u))
        W = optax.apply_updates(W, u)
    return ups, np.asarray(W), state


@pytest.mark.parametrize("shape", [(64, 24), (24, 80), (4, 16, 40)], ids=["tall", "wide", "experts"])
def test_muon_first_update_formula(shape):
    rng = np.random.default_rng(4)
    W, G = rnd(rng, *shape), rnd(rng, *shape)
    lr, wd = 0.02, 0.1
    (u,), _, _ = run_muon(O.muon(lr, weight_decay=wd), W, [G])
    # step 1: M_1 = G, Nesterov input mu*G + G
    np.testing.assert_allclose(u, np_muon_update((MU + 1) * G, W, lr, wd), rtol=0, atol=2e-5 * lr * 10)
    # the update RMS of O itself is 0.18 (up to the NS singular-value band): RMS(O') = 1/sqrt(max(n, m))
    (o,), _, _ = run_muon(O.muon(1.0, weight_decay=0.0), W, [G])
    rms = np.sqrt(np.mean(o.reshape(-1, *shape[-2:]) ** 2, axis=(-2, -1)))
    assert np.all((rms > 0.7 * GAMMA) & (rms < 1.2 * GAMMA)), rms


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_momentum_recursion_three_steps(nesterov):
    rng = np.random.default_rng(5)
    W0 = rnd(rng, 40, 24)
    grads = [rnd(rng, 40, 24) * s for s in (1.0, 0.3, 2.0)]
    sched = lambda t: 0.01 * (t + 1.0)  # the lr must be read at step count 0, 1, 2
    wd = 0.1
    ups, W_end, state = run_muon(O.muon(sched, weight_decay=wd, nesterov=nesterov), W0, grads)
    M = np.zeros((40, 24))
    W = W0.astype(np.float64)
    for t, g in enumerate(grads):
        M = MU * M + g
        X = MU * M + g if nesterov else M
        u = np_muon_update(X, W, 0.01 * (t + 1), wd)
        np.testing.assert_allclose(ups[t], u, rtol=0, atol=1e-5 * (t + 1))
        W = W + u
    np.testing.assert_allclose(np.asarray(state.momentum), M, rtol=1e-5, atol=1e-5)
    assert int(state.count) == 3 and state.momentum.dtype == jnp.float32


def test_muon_decoupled_weight_decay():
    rng = np.random.default_rng(6)
    W, G = rnd(rng, 32, 16), rnd(rng, 32, 16)
    lr, wd = 0.05, 0.1
    # zero gradient: W <- W (1 - lr wd) exactly, no Muon term
    _, W1, _ = run_muon(O.muon(lr, weight_decay=wd), W, [np.zeros_like(W)])
    np.testing.assert_allclose(W1, W * (1 - lr * wd), rtol=1e-6)
    # with a gradient, wd only adds -lr wd W (not passed through momentum / NS)
    (u_wd,), _, _ = run_muon(O.muon(lr, weight_decay=wd), W, [G])
    (u_0,), _, _ = run_muon(O.muon(lr, weight_decay=0.0), W, [G])
    np.testing.assert_allclose(u_wd - u_0, -lr * wd * W, rtol=1e-5, atol=1e-8)


def test_muon_experts_independent():
    rng = np.random.default_rng(7)
    E = 4
    W, G = rnd(rng, E, 24, 16), rnd(rng, E, 24, 16)
    tx = O.muon(0.01, weight_decay=0.1)
    G2 = G.copy()
    G2[0] *= 1000.0
    G2[1] = rnd(rng, 24, 16)
    ua, _, _ = run_muon(tx, W, [G, G])
    ub, _, _ = run_muon(tx, W, [G2, G2])
    for step in range(2):
        np.testing.assert_allclose(ub[step][2:], ua[step][2:], rtol=0, atol=1e-7)
        assert np.abs(ub[step][1] - ua[step][1]).max() > 1e-4
    # each expert is scaled by its own sqrt(max(24, 16)): equal to the per-expert numpy update
    np.testing.assert_allclose(ua[0], np_muon_update((MU + 1) * G, W, 0.01, 0.1), rtol=0, atol=1e-6)


def test_muon_bf16_ns_close_to_f32():
    rng = np.random.default_rng(8)
    W, G = rnd(rng, 48, 32), rnd(rng, 48, 32)
    (u32,), _, _ = run_muon(O.muon(1.0, weight_decay=0.0), W, [G])
    (u16,), _, s = run_muon(O.muon(1.0, weight_decay=0.0, ns_dtype=jnp.bfloat16), W, [G])
    assert u16.dtype == np.float32 and s.momentum.dtype == jnp.float32
    assert np.abs(u16 - u32).max() < 0.05 * np.abs(u32).max()


def test_muon_row_splits():
    rng = np.random.default_rng(9)
    W, G = rnd(rng, 2 * 12, 20), rnd(rng, 2 * 12, 20)
    tx = O.muon(0.01, weight_decay=0.0, row_splits={"w": 2})
    params = {"w": jnp.asarray(W)}
    u, _ = jax.jit(tx.update)({"w": jnp.asarray(G)}, tx.init(params), params)
    blocks = G.reshape(2, 12, 20)
    expect = np_muon_update((MU + 1) * blocks, W.reshape(2, 12, 20), 0.01, 0.0).reshape(24, 20)
    np.testing.assert_allclose(np.asarray(u["w"]), expect, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- groups on the tiny model
def random_like(abstract, rng, scale=1.0):
    """Random arrays with the given shapes/dtypes (numpy-generated: no per-shape compilation)."""
    def one(s):
        if jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.asarray((scale * rng.standard_normal(s.shape)).astype(np.float32)).astype(s.dtype)
        return jnp.zeros(s.shape, s.dtype)
    return jax.tree.map(one, abstract)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model's parameter tree (names, shapes, dtypes of init_params(cfg, key, "bf16")), random values.

    Built from the same `declare` table as init_params, which is too slow on CPU for a < 30 s test file."""
    cfg = v4jax.ModelConfig.preset("tiny")
    abstract = P.abstract_params(cfg, "bf16")
    return cfg, random_like(abstract, np.random.default_rng(0), 0.1)


def expected_label(name):
    last = name.rsplit(".", 1)[-1]
    if last == "tid2eid" or name.endswith("ffn.gate.bias") or last == "scale":
        return "frozen"
    if (name in ("embed.weight", "head.weight") or name.endswith("norm.weight") or last in ("attn_sink", "ape")
            or re.search(r"hc_(attn|ffn|head)_(base|scale)$", name)):
        return "adamw"
    return "muon"


def test_param_groups_tiny(tiny):
    cfg, params = tiny
    labels = O.param_groups(params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    flat_l, flat_p = P.flatten(labels), P.flatten(params)
    assert set(flat_l) == set(flat_p)
    assert all(flat_l[n] == expected_label(n) for n in flat_l)
    groups = {g: {n for n, l in flat_l.items() if l == g} for g in ("muon", "adamw", "frozen")}
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_base", "hc_head_scale",
            "layers.0.attn.attn_sink", "layers.2.attn.compressor.ape", "layers.2.attn.indexer.compressor.ape",
            "layers.0.attn.q_norm.weight", "mtp.0.enorm.weight", "layers.1.hc_ffn_base"} <= groups["adamw"]
    assert {"layers.0.ffn.gate.tid2eid", "layers.4.ffn.gate.bias", "mtp.0.ffn.gate.bias"} <= groups["frozen"]
    assert {"layers.3.attn.wq_a.weight", "layers.3.ffn.experts.w1.weight", "layers.3.ffn.gate.weight",
            "layers.3.hc_attn_fn", "hc_head_fn", "mtp.0.e_proj.weight", "layers.2.attn.indexer.weights_proj.weight",
            "layers.2.attn.compressor.wkv.weight"} <= groups["muon"]
    assert all(flat_p[n].ndim >= 2 for n in groups["muon"])
    assert all(jnp.issubdtype(flat_p[n].dtype, jnp.floating) for n in groups["muon"] | groups["adamw"])
    # names only and flat dicts give the same labels
    assert O.param_groups(list(flat_p)) == flat_l
    assert O.param_groups(flat_p) == flat_l
    # native (quantized) storage: every `.scale` is frozen
    native = P.flatten(O.param_groups(P.abstract_params(cfg, "native")))
    scales = [n for n in native if n.endswith(".scale")]
    assert scales and all(native[n] == "frozen" for n in scales)
    with pytest.raises(ValueError):
        O.param_groups(["layers.0.attn.mystery"])


def test_logical_row_splits_tiny(tiny):
    cfg, params = tiny
    splits = O.logical_row_splits(cfg, P.flatten(params))
    assert splits["layers.0.attn.wo_a.weight"] == cfg.o_groups
    assert splits["layers.2.attn.compressor.wkv.weight"] == 2  # ratio 4: two halves
    assert "layers.3.attn.compressor.wkv.weight" not in splits  # ratio 128: one matrix
    assert splits["layers.2.attn.indexer.compressor.wgate.weight"] == 2
    assert "layers.0.attn.wq_b.weight" not in splits


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_optimizer_steps_tiny_jit(tiny, kind):
    cfg, params = tiny
    if kind == "adamw":  # keep the test file fast: layer 2 (compressor + indexer), mtp and the top level suffice
        params = {**params, "layers": {"2": params["layers"]["2"]}}
    sched = O.lr_schedule(0.05, 2, 10, decay_steps=4, final=0.01)  # large enough to move bf16 weights
    splits = O.logical_row_splits(cfg, P.flatten(params)) if kind == "muon" else None
    tx = O.make_optimizer(params, lr_schedule=sched, clip_norm=1.0, optimizer=kind,
                          muon_kwargs={"row_splits": splits} if splits else None)
    state = tx.init(params)
    rng = np.random.default_rng(1)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    p = params
    for _ in range(3):
        p, state, u = step(p, state, random_like(abstract, rng))
    fp, f0, fu = P.flatten(p), P.flatten(params), P.flatten(u)
    labels = P.flatten(O.param_groups(params))
    for n in fp:
        assert fp[n].dtype == f0[n].dtype and fp[n].shape == f0[n].shape, n
        assert fu[n].dtype == f0[n].dtype, n
        if labels[n] == "frozen":
            assert np.array_equal(np.asarray(fp[n]), np.asarray(f0[n])), n
        else:
            assert np.all(np.isfinite(np.asarray(fp[n], np.float32))), n
            assert np.any(np.asarray(fu[n], np.float32) != 0), n
            assert not np.array_equal(np.asarray(fp[n]), np.asarray(f0[n])), n
    float_state = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 0]
    assert float_state and all(x.dtype == jnp.float32 for x in float_state)
    # the Muon momentum (or Adam moments) exist for the bf16 expert stack, in fp32
    bf16_expert = f0["layers.2.ffn.experts.w1.weight"]
    assert bf16_expert.dtype == jnp.bfloat16
    assert any(x.shape == bf16_expert.shape and x.dtype == jnp.float32 for x in float_state)
    muon_states = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, O.MuonState))
                   if isinstance(x, O.MuonState)]
    assert (len(muon_states) == 1) == (kind == "muon")


def test_adamw_group_matches_optax_adamw():
    """The AdamW side is optax.adamw with the spec's hyper-parameters, applied to fp32 copies of bf16 params."""
    p = {"embed": {"weight": jnp.asarray(np.random.default_rng(10).standard_normal((8, 4)), jnp.bfloat16)}}
    g = {"embed": {"weight": jnp.asarray(np.random.default_rng(11).standard_normal((8, 4)), jnp.bfloat16)}}
    tx = O.make_optimizer(p, lr_schedule=1e-2)
    u, _ = tx.update(g, tx.init(p), p)
    ref = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-20, weight_decay=0.1)
    f = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    ur, _ = ref.update(f(g), ref.init(f(p)), f(p))
    assert u["embed"]["weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(u["embed"]["weight"]),
                                  np.asarray(ur["embed"]["weight"].astype(jnp.bfloat16)))


# --------------------------------------------------------------------------- schedule
def test_lr_schedule_points():
    peak, final = 2.7e-4, 2.7e-5
    s = O.lr_schedule(peak, 2000, 100_000, decay_start_frac=0.8, final=final)
    v = lambda t: float(s(t))
    assert v(0) == 0.0
    assert v(1000) == pytest.approx(peak / 2, rel=1e-6)
    assert v(2000) == pytest.approx(peak, rel=1e-6)
    assert v(50_000) == pytest.approx(peak, rel=1e-6)
    assert v(80_000) == pytest.approx(peak, rel=1e-6)
    assert v(90_000) == pytest.approx((peak + final) / 2, rel=1e-5)
    assert v(85_000) == pytest.approx(final + (peak - final) * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
    assert v(100_000) == pytest.approx(final, rel=1e-5)
    assert v(200_000) == pytest.approx(final, rel=1e-5)
    # decay_steps form is the same schedule; jit-able on a traced step
    s2 = O.lr_schedule(peak, 2000, 100_000, decay_steps=20_000, final=final)
    ts = jnp.array([0, 1000, 2000, 79_999, 85_000, 100_000])
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(s2))(ts)), [v(int(t)) for t in ts], rtol=1e-6)
    with pytest.raises(ValueError):
        O.lr_schedule(peak, 2000, 1000, final=final)
