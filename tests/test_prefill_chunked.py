"""Chunked prefill (v4jax.chunks): each block's per-token work in token chunks gives the unchunked prefill's
logits and decode cache, and the compiled program needs less temporary memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import model
from v4jax.chunks import rows_per_chunk, token_chunks

EXACT = dict(quant_sim=False, compute_dtype="float32")


def test_token_chunks_equals_one_call_with_tail_and_start():
    x = jax.random.normal(jax.random.key(0), (3, 37, 5))
    y = jax.random.normal(jax.random.key(1), (3, 37))

    def fn(s0, xc, yc):     # position-dependent, two outputs of different shapes and dtypes
        pos = (s0 + jnp.arange(xc.shape[1]))[None, :, None]
        return {"a": xc * 2 + pos, "b": (yc[..., None] * xc).sum(-1).astype(jnp.bfloat16)}

    want = fn(0, x, y)
    for chunk in (1, 4, 10, 36, 37, 100, 0):
        got = jax.jit(lambda x, y, c=chunk: token_chunks(fn, c, x, y))(x, y)
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_rows_per_chunk():
    assert rows_per_chunk(1, 4096, 8192) == 0           # fits: no chunking
    assert rows_per_chunk(1, 65536, 8192) == 8192
    assert rows_per_chunk(8, 8192, 8192) == 1024
    assert rows_per_chunk(32, 8192, 0) == 0
    assert rows_per_chunk(16384, 2, 8192) == 1


SMALL = dict(num_hidden_layers=3, compress_ratios=(4, 128, 0, 0))    # CSA, HCA, window-only + MTP


@pytest.mark.parametrize("B,S,chunk_tokens", [(2, 300, 64), (1, 520, 200)])
def test_chunked_prefill_equals_unchunked(B, S, chunk_tokens):
    """Chunks of 32 / 200 positions (a tail chunk in both) over CSA and HCA layers with completed entries and
    indexer top-k: logits and every cache tensor equal the one-shot prefill (fp32, simulations off: only
    summation order may differ)."""
    cfg = v4jax.ModelConfig.preset("tiny", **EXACT, **SMALL)
    params = v4jax.init_params(cfg, jax.random.key(0), dtype="bf16")
    toks = jax.random.randint(jax.random.key(1), (B, S), 0, cfg.vocab_size)
    assert B * S > chunk_tokens and S % rows_per_chunk(B, S, chunk_tokens)
    l0, c0 = v4jax.prefill(cfg, params, toks, max_len=S + 8, chunk_tokens=0)
    l1, c1 = v4jax.prefill(cfg, params, toks, max_len=S + 8, chunk_tokens=chunk_tokens)
    scale = float(jnp.std(l0))
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), atol=5e-5 * scale + 1e-5)   # measured ~4e-6
    assert jax.tree.structure(c0) == jax.tree.structure(c1)
    for a, b in zip(jax.tree.leaves(c0), jax.tree.leaves(c1)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(b, a, atol=5e-5 * (np.std(a[np.isfinite(a)]) + 1e-3), rtol=0)


def test_chunked_prefill_uses_less_temporary_memory():
    cfg = v4jax.ModelConfig.preset("tiny", **SMALL)
    params = jax.eval_shape(lambda: v4jax.init_params(cfg, jax.random.key(0), dtype="bf16"))
    toks = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    temp = {ct: model._prefill.lower(cfg, params, toks, 1025, True, ct).compile().memory_analysis()
            .temp_size_in_bytes for ct in (0, 256)}
    assert temp[256] * 3 < temp[0], temp


def test_chunk_tokens_is_checked():
    cfg = v4jax.ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="chunk_tokens"):
        v4jax.prefill(cfg, {}, jnp.zeros((1, 4), jnp.int32), max_len=8, chunk_tokens=-1)
