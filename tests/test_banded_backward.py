"""The banded backward (banded_backward.py) equals the VJP of the jnp reference on lists built the way the model
builds them: window rows (with document starts), compressed entries with duplicates, -1 anywhere, S not a
multiple of the block, several query chunks, the context-parallel shard layout; and the dispatch uses it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import Layout, sparse_attention
from pallas_kernels.sparse_attention import banded_backward as bb
from pallas_kernels.sparse_attention.reference import sparse_attention as reference
from v4jax.attention import _offset, window_idx_prefill


def _lists(key, B, S, W, m, topk, doc_starts=()):
    """The prefill lists of v4jax.attention: window (masked before each token's document start) + top-k of the
    visible compressed entries (random picks, some -1, a duplicate), entries offset by S."""
    t = jnp.arange(S)
    ds = jnp.zeros((B, S), jnp.int32)
    for b, s in doc_starts:
        ds = ds.at[b, s:].set(s)
    w = window_idx_prefill(S, W, width=min(S, W))[None]
    idx = jnp.where(w >= ds[..., None], w, -1)
    if not m:
        return idx
    n_vis = (t + 1) // m
    first = (ds + m - 1) // m
    r = jax.random.uniform(key, (B, S, topk))
    c = first[..., None] + jnp.floor(r * jnp.maximum(n_vis[None] - first, 0)[..., None]).astype(jnp.int32)
    c = jnp.where(c < n_vis[None, :, None], c, -1)
    c = c.at[:, :, 1].set(c[:, :, 0])                                         # one entry listed twice
    c = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.2, c.shape), -1, c)
    return jnp.concatenate([idx, _offset(c, S)], axis=-1)


def _data(dtype, B, S, H, K, N, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(k[0], (B, S, H, K), jnp.float32).astype(dtype)
    kv = jax.random.normal(k[1], (B, N, K), jnp.float32).astype(dtype)
    sink = jax.random.normal(k[2], (H,))
    g = jax.random.normal(k[3], (B, S, H, K), jnp.float32).astype(dtype)
    return q, kv, sink, g


@jax.jit
def _ref_vjp(q, kv, idx, sink, g):
    out, vjp = jax.vjp(lambda a, b, c: reference(a, b, idx, c, 0.1), q, kv, sink)
    return out, vjp(g)


CASES = [  # (S, W, m, topk, block, chunk_elems, max_groups, doc starts)
    (45, 16, 4, 6, 8, None, 8, ((1, 20),)),     # CSA-like, S not a multiple of the block, a second document
    (45, 16, 4, 6, 8, 2000, 2, ((0, 30),)),     # 6 sub-chunks in 2 groups (scans), 2 compressed widths
    (40, 16, 8, 5, 16, 1500, 8, ((0, 9),)),     # HCA-like ratio, block = window
    (37, 12, 0, 0, 8, 700, 8, ((1, 5),)),       # window only, scanned sub-chunks; window not a multiple of block
    (10, 16, 0, 0, 8, None, 8, ()),             # S < window (width = S)
]


@pytest.mark.parametrize("case", CASES)
def test_banded_backward_equals_reference_vjp_f32(case):
    S, W, m, topk, block, chunk, groups, docs = case
    B, H, K = 2, 3, 32
    C = S // m if m else 0
    idx = _lists(jax.random.PRNGKey(7), B, S, W, m, topk, docs)
    q, kv, sink, g = _data(jnp.float32, B, S, H, K, S + C)
    out, want = _ref_vjp(q, kv, idx, sink, g)
    layout = Layout(window=min(S, W), comp_start=S if m else None, ratio=m)
    got = bb.banded_backward(q, kv, idx, sink, out, g, 0.1, layout, block=block, chunk_elems=chunk,
                             max_groups=groups)
    for w, h in zip(want, got):
        assert h.dtype == w.dtype and h.shape == w.shape
        np.testing.assert_allclose(np.asarray(h), np.asarray(w), atol=2e-6, rtol=1e-5)


def test_banded_backward_shard_layout_f32():
    """The context-parallel shard's lists (attention._prefill_shard): a local pool [W-1 rows of the previous shard |
    the shard's L rows | all compressed entries], window rows at local offset W - 1, no causal bound promised."""
    B, L, W, H, K, s0, m = 1, 24, 8, 2, 32, 24, 4
    C = (s0 + L) // m
    g_ = window_idx_prefill(L, W, start=s0, width=W)[None]
    win = jnp.where(g_ >= 0, g_ - s0 + (W - 1), -1)
    r = jax.random.randint(jax.random.PRNGKey(3), (B, L, 5), -1, C)
    n_vis = (s0 + jnp.arange(L) + 1) // m
    r = jnp.where(r < n_vis[None, :, None], r, -1)
    idx = jnp.concatenate([win, _offset(r, W - 1 + L)], axis=-1)
    q, kv, sink, g = _data(jnp.float32, B, L, H, K, W - 1 + L + C, seed=2)
    out, want = _ref_vjp(q, kv, idx, sink, g)
    got = bb.banded_backward(q, kv, idx, sink, out, g, 0.1, Layout(window=W, offset=W - 1, comp_start=W - 1 + L),
                             block=8)
    for w, h in zip(want, got):
        np.testing.assert_allclose(np.asarray(h), np.asarray(w), atol=2e-6, rtol=1e-5)


def test_banded_backward_bf16_close_to_fp32_gradient():
    """bf16 inputs: within 0.5% of max|grad| of the fp32 gradient at the same inputs (gpu_backward's bound)."""
    S, W, m, topk = 45, 16, 4, 6
    B, H, K = 2, 3, 32
    idx = _lists(jax.random.PRNGKey(5), B, S, W, m, topk, ((0, 13),))
    q, kv, sink, g = _data(jnp.bfloat16, B, S, H, K, S + S // m, seed=4)
    out, _ = _ref_vjp(q, kv, idx, sink, g)
    f32_ = lambda a: a.astype(jnp.float32)
    _, exact = _ref_vjp(f32_(q), f32_(kv), idx, sink, f32_(g))
    got = bb.banded_backward(q, kv, idx, sink, out, g, 0.1, Layout(window=W, comp_start=S, ratio=m), block=8)
    for e, h, x in zip(exact, got, (q, kv, sink)):
        assert h.dtype == x.dtype
        e, h = np.asarray(e, np.float32), np.asarray(h, np.float32)
        assert np.max(np.abs(h - e)) <= 0.005 * np.max(np.abs(e))


def test_dispatch_uses_banded_backward_with_a_layout(monkeypatch):
    """backend="gpu" with a layout: the custom VJP calls banded_backward (not the atomics kernel), gradients equal
    the reference's; the forward is unchanged."""
    S, W, m = 40, 16, 4
    idx = _lists(jax.random.PRNGKey(1), 1, S, W, m, 5)
    q, kv, sink, g = _data(jnp.float32, 1, S, 2, 32, S + S // m, seed=1)
    layout = Layout(window=W, comp_start=S, ratio=m)
    calls = []
    real = bb.banded_backward
    monkeypatch.setattr(bb, "banded_backward", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    f = lambda a, b, c: jnp.sum(sparse_attention(a, b, idx, c, 0.1, backend="gpu", layout=layout) * g)
    got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, kv, sink)
    assert calls == [layout]
    _, want = _ref_vjp(q, kv, idx, sink, g)
    for w, h in zip(want, got):
        np.testing.assert_allclose(np.asarray(h), np.asarray(w), atol=2e-6, rtol=1e-5)


def test_suits_keeps_the_dense_compressed_part_near_the_list_size():
    """CSA at 8K (2048 entries, half visible on average, top-k 512) and HCA (lists hold every entry): banded;
    CSA at 64K (16384 entries against top-k 512): the list-based backward."""
    csa = lambda S: Layout(window=128, comp_start=S, ratio=4)
    assert bb.suits(csa(8192), 8192 + 2048, 128 + 512)
    assert not bb.suits(csa(65536), 65536 + 16384, 128 + 512)
    assert bb.suits(Layout(window=128, comp_start=65536, ratio=128), 65536 + 512, 128 + 512)
    assert bb.suits(Layout(window=128), 8192, 128)
    assert not bb.suits(Layout(window=128, offset=127, comp_start=8192 + 127), 8192 + 127 + 8192, 128 + 512)


def test_dispatch_falls_back_where_the_dense_part_does_not_suit(monkeypatch):
    """A layout whose compressed pool is much wider than the lists: the list-based backward runs instead."""
    S, W, m = 40, 8, 2
    idx = _lists(jax.random.PRNGKey(4), 1, S, W, m, 2)
    q, kv, sink, g = _data(jnp.float32, 1, S, 2, 32, S + S // m, seed=5)
    layout = Layout(window=W, comp_start=S, ratio=m)
    assert not bb.suits(layout, S + S // m, idx.shape[-1])
    monkeypatch.setattr(bb, "banded_backward", lambda *a, **k: pytest.fail("banded backward used"))
    f = lambda a, b, c: jnp.sum(sparse_attention(a, b, idx, c, 0.1, backend="gpu", layout=layout) * g)
    got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, kv, sink)
    _, want = _ref_vjp(q, kv, idx, sink, g)
    for w, h in zip(want, got):
        np.testing.assert_allclose(np.asarray(h), np.asarray(w), atol=2e-6, rtol=1e-5)


def test_layout_rejects_nonsense():
    with pytest.raises(ValueError, match="Layout"):
        Layout(window=0)
    with pytest.raises(ValueError, match="Layout"):
        Layout(window=8, ratio=-1)


def test_model_prefill_gradient_through_banded_backward(monkeypatch, layer=2):      # tiny layer 2: CSA, m = 4
    """The model's own lists (attention.prefill with two documents) promise what Layout says: the attention
    sub-layer's gradient through the "gpu" dispatch (interpret mode, banded backward) equals the reference's."""
    import functools

    import v4jax
    from v4jax import attention
    from v4jax.layers import rope_inv_freq
    from v4jax.model import block_params

    cfg = v4jax.ModelConfig.preset("tiny", quant_sim=False, compute_dtype="float32")
    p = block_params(v4jax.init_params(cfg, jax.random.key(1), dtype="bf16"), cfg, layer)["attn"]
    p = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, p)
    S = 160
    x = jax.random.normal(jax.random.key(2), (1, S, cfg.dim), jnp.float32)
    ds = jnp.where(jnp.arange(S) >= 70, 70, 0)[None].astype(jnp.int32)
    r = jax.random.normal(jax.random.key(3), (1, S, cfg.dim), jnp.float32)

    def loss(x, p):
        out, _ = attention.prefill(cfg, p, layer, x, rope_inv_freq(cfg, layer), doc_start=ds)
        return jnp.sum(out * r)

    want = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, p)
    seen = []
    real = bb.banded_backward
    monkeypatch.setattr(bb, "banded_backward", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    monkeypatch.setattr(attention, "sparse_attention", functools.partial(sparse_attention, backend="gpu"))
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, p)
    m = cfg.ratio(layer)
    assert seen == [Layout(window=cfg.sliding_window, comp_start=S if m else None, ratio=m)]
    for w, h in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        if w.dtype == jnp.float32:
            np.testing.assert_allclose(np.asarray(h), np.asarray(w), atol=2e-5 * float(jnp.max(jnp.abs(w))) + 1e-7,
                                       rtol=2e-4)
