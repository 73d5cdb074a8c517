"""v4jax.introspect: the KV-cache accounting against spec 3.2's derived numbers, and the indexer / mHC views
against the model they are taken from."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import introspect as I
from v4jax.config import ModelConfig

FLASH, PRO = ModelConfig.preset("flash"), ModelConfig.preset("pro")


# ---- cache accounting (spec 3.1 / 3.2) -------------------------------------------------------------------
def test_entry_and_key_bytes():
    for cfg in (FLASH, PRO):
        assert I.kv_entry_bytes(cfg, "fp8") == 584              # 448 FP8 + 64 bf16 + 7 UE8M0, padded to 8
        assert I.kv_entry_bytes(cfg, "bf16") == 1024
        assert I.index_key_bytes(cfg, "fp8") == 68              # report: FP4 + 4 UE8M0
        assert I.index_key_bytes(cfg, "fp8", indexer_keys="fp8") == 132    # SGLang: FP8 + one fp32 scale
        assert I.index_key_bytes(cfg, "bf16") == 256


@pytest.mark.parametrize("cfg, fmt, keys, want", [
    (FLASH, "fp8", "fp4", 3514), (FLASH, "fp8", "fp8", 3850), (PRO, "fp8", "fp4", 5031), (PRO, "fp8", "fp8", 5511),
    (FLASH, "bf16", "fp4", 6880), (PRO, "bf16", "fp4", 9848)])
def test_bytes_per_token_match_the_spec_table(cfg, fmt, keys, want):
    assert round(I.kv_bytes_per_token(cfg, fmt, keys)) == want


def test_whole_cache_at_one_million_tokens():
    n = 1 << 20
    flash = I.kv_cache_bytes(FLASH, n)
    # growing part: spec's 3.43 GiB per 1M-token sequence; rings: 43 layers x 128 rows x 584 B ~ 3.2 MB
    assert round((flash["compressed"] + flash["indexer"]) / 2 ** 30, 2) == 3.43
    assert flash["window"] == 43 * 128 * 584
    # fp32 streaming state (spec 3.1): CSA main [8, 1024] x2 + indexer [8, 256] x2, HCA [128, 512] x2
    assert flash["state"] == 21 * (2 * 4 * 8 * 1024 + 2 * 4 * 8 * 256) + 20 * 2 * 4 * 128 * 512
    assert flash["total"] == sum(v for k, v in flash.items() if k != "total")
    assert round((lambda d: d["compressed"] + d["indexer"])(I.kv_cache_bytes(PRO, n)) / 2 ** 30, 2) == 4.91
    bf16 = I.kv_cache_bytes(FLASH, n, "bf16")
    assert bf16["compressed"] + bf16["indexer"] == 6880 * n and bf16["window"] == 43 * 128 * 1024


def test_cache_grows_by_bytes_per_token_over_whole_blocks():
    for cfg in (FLASH, PRO, ModelConfig.preset("tiny")):
        for fmt in ("fp8", "bf16"):
            a, b = I.kv_cache_bytes(cfg, 1024, fmt)["total"], I.kv_cache_bytes(cfg, 1024 + 128, fmt)["total"]
            assert b - a == 128 * I.kv_bytes_per_token(cfg, fmt)
    empty = I.kv_cache_bytes(FLASH, 0)
    assert empty["window"] == empty["compressed"] == empty["indexer"] == 0 and empty["state"] > 0
    short = I.kv_cache_bytes(FLASH, 3)                  # no block complete yet: only window rows
    assert short["window"] == 43 * 3 * 584 and short["compressed"] == short["indexer"] == 0


def test_dense_baseline_and_the_reports_ratio():
    per_token = I.dense_kv_cache_bytes(1, n_layers=43)
    assert per_token == 2 * 43 * 8 * 128 * 2 == 176128
    assert I.dense_kv_cache_bytes(1000, n_layers=43) == 1000 * per_token
    assert I.dense_kv_cache_bytes(1, n_layers=2, kv_heads=4, head_dim=64, bytes_per_value=1) == 2 * 2 * 4 * 64
    # report: V4 needs ~2% of a bf16 GQA-8 (head 128) baseline's KV cache at 1M tokens
    for cfg in (FLASH, PRO):
        n = 1 << 20
        ratio = I.kv_cache_bytes(cfg, n)["total"] / I.dense_kv_cache_bytes(n, n_layers=cfg.n_layers)
        assert 0.018 < ratio < 0.022, ratio


def test_bad_accounting_arguments():
    with pytest.raises(ValueError, match="fmt"):
        I.kv_bytes_per_token(FLASH, "fp16")
    with pytest.raises(ValueError, match="indexer_keys"):
        I.kv_cache_bytes(FLASH, 10, "fp8", indexer_keys="int4")
    with pytest.raises(ValueError, match="n_tokens"):
        I.kv_cache_bytes(FLASH, -1)


# ---- indexer and mHC views of a tiny model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """Window-only, CSA and HCA layers; S = 64 tokens -> 16 compressed entries, top-8 of them."""
    cfg = ModelConfig.preset("tiny", num_hidden_layers=3, compress_ratios=(0, 4, 128, 0), num_hash_layers=1)
    params = v4jax.init_params(cfg, jax.random.key(0), dtype="bf16")
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size, jnp.int32)
    return cfg, params, tokens


def test_block_input_is_the_forward_pass_hidden_state(tiny):
    cfg, params, tokens = tiny
    _, hidden = v4jax.forward(cfg, params, tokens, return_hidden=True)
    np.testing.assert_array_equal(np.asarray(I.block_input(cfg, params, tokens, 1), np.float32),
                                  np.asarray(hidden[0], np.float32))
    with pytest.raises(ValueError, match="layer"):
        I.block_input(cfg, params, tokens, 3)


def test_indexer_selection(tiny):
    cfg, params, tokens = tiny
    out = jax.tree.map(np.asarray, I.indexer_selection(cfg, params, tokens, 1))
    B, S = tokens.shape
    C, k = S // 4, cfg.index_topk
    assert out["scores"].shape == (B, S, C) and out["topk"].shape == (B, S, k) and out["selected"].shape == (B, S, C)
    n_visible = (np.arange(S) + 1) // 4
    visible = np.arange(C)[None, None, :] < n_visible[None, :, None]
    assert np.array_equal(np.isfinite(out["scores"]), np.broadcast_to(visible, out["scores"].shape))
    for b in range(B):
        for t in range(S):
            top = out["topk"][b, t]
            chosen = top[top >= 0]
            assert len(chosen) == min(k, n_visible[t]) and len(set(chosen)) == len(chosen)
            assert np.all(top[len(chosen):] == -1) and np.all(chosen < n_visible[t])
            assert set(np.flatnonzero(out["selected"][b, t])) == set(chosen)
            s = out["scores"][b, t]
            assert np.all(np.diff(s[chosen]) <= 0)                          # best first
            rest = np.setdiff1d(np.arange(n_visible[t]), chosen)
            if len(rest) and len(chosen):
                assert s[chosen].min() >= s[rest].max()
    assert out["selected"][:, -1].sum(-1).tolist() == [k] * B                # selection matters at S = 64
    with pytest.raises(ValueError, match="not a CSA layer.*\\[1\\]"):
        I.indexer_selection(cfg, params, tokens, 2)
    with pytest.raises(ValueError, match="at least 4 tokens"):
        I.indexer_selection(cfg, params, tokens[:, :3], 1)


def test_mhc_mixing_is_doubly_stochastic(tiny):
    cfg, params, tokens = tiny
    out = jax.tree.map(np.asarray, I.mhc_mixing(cfg, params, tokens, 1))
    n = cfg.hc_mult
    for sub in ("attn", "ffn"):
        comb, post = out[sub]["comb"], out[sub]["post"]
        assert comb.shape == tokens.shape + (n, n) and post.shape == tokens.shape + (n,)
        assert comb.min() >= 0
        np.testing.assert_allclose(comb.sum(-1), 1, atol=1e-4)
        np.testing.assert_allclose(comb.sum(-2), 1, atol=1e-4)
        assert np.all((post > 0) & (post < 2))
    assert not np.allclose(out["attn"]["comb"], out["ffn"]["comb"])          # each sub-layer mixes on its own input
    # the attention matrices are hyper.hc_pre's on the block input
    p = params["layers"]["1"]
    _, _, comb = v4jax.hyper.hc_pre(I.block_input(cfg, params, tokens, 1), p["hc_attn_fn"], p["hc_attn_scale"],
                                    p["hc_attn_base"], norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps,
                                    iters=cfg.hc_sinkhorn_iters)
    np.testing.assert_allclose(out["attn"]["comb"], np.asarray(comb), rtol=1e-6, atol=1e-7)
