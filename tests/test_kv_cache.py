"""Decode-cache storage formats (ModelConfig.kv_cache_format, spec 3.1/3.2).

"fp8" stores window rows and compressed entries as FP8 e4m3 nope dims + bf16 RoPE dims + UE8M0 scales (584 B at
Flash size) and indexer keys as FP4 + UE8M0 scales (68 B); "bf16" stores activations as the reference does. With
the quantisation simulations on (the default) the stored values are already FP8/FP4-rounded, so the two formats
hold the same numbers and decode must give bit-identical logits: the fp8 step gathers the rows a query reads,
dequantises them exactly and runs the same sparse attention over the same values in the same order.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import attention, compressor, indexer, quant
from v4jax.config import ConfigError, ModelConfig


def _bits(x):
    x = np.asarray(jnp.asarray(x, jnp.float32))
    return x.view(np.uint32)


def _run(cfg, params, toks, P):
    """Prefill P tokens, then decode the rest one by one -> (logits [B, S, V], final cache)."""
    lp, cache = v4jax.prefill(cfg, params, toks[:, :P], max_len=toks.shape[1])
    out = [lp]
    for i in range(P, toks.shape[1]):
        lg, cache = v4jax.decode_step(cfg, params, cache, toks[:, i])
        out.append(lg[:, None])
    return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("preset,P,S", [("tiny", 125, 262), ("tiny-pro", 3, 134)])
def test_fp8_cache_decode_equals_bf16_cache(preset, P, S):
    """quant_sim on (bf16 activations, FP8/FP4 simulations): logits bit-identical at every position. tiny decodes
    across two HCA entry completions (positions 127, 255) and many CSA blocks with top-k selection
    (S/4 > index_topk); tiny-pro (HCA layers 0, 1) starts almost from an empty cache."""
    cfg16 = ModelConfig.preset(preset)
    cfg8 = cfg16.replace(kv_cache_format="fp8")
    params = v4jax.init_params(cfg16, jax.random.key(0), dtype="native")
    toks = jax.random.randint(jax.random.key(1), (2, S), 0, cfg16.vocab_size)
    a, ca = _run(cfg16, params, toks, P)
    b, cb = _run(cfg8, params, toks, P)
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(_bits(b), _bits(a))
    # the stored rows decode to the bf16 cache's values, bit for bit; the streaming state is the same
    for la, lb in zip(ca["layers"], cb["layers"]):
        assert la.keys() == lb.keys()
        for k in la:
            if k in ("window", "comp"):
                assert lb[k].dtype == jnp.uint8 and lb[k].shape[-1] == attention.kv_bytes(cfg8)
                np.testing.assert_array_equal(_bits(attention.load_kv(cfg8, lb[k])), _bits(la[k]), err_msg=k)
            elif k == "index_keys":
                assert lb[k].dtype == jnp.uint8 and lb[k].shape[-1] == indexer.key_bytes(cfg8)
                np.testing.assert_array_equal(_bits(indexer.load_keys(cfg8, lb[k])), _bits(la[k]), err_msg=k)
            else:
                np.testing.assert_array_equal(np.asarray(lb[k]), np.asarray(la[k]), err_msg=k)


def test_fp8_cache_is_smaller():
    """The growing arrays (compressed entries, indexer keys) and the rings take fewer bytes, and the totals equal
    `cache_bytes` (shape-only accounting of the same arrays)."""
    cfg = ModelConfig.preset("tiny")
    L = 1024
    caches = {f: v4jax.init_cache(cfg.replace(kv_cache_format=f), 2, L) for f in ("bf16", "fp8")}
    nbytes = {f: sum(a.nbytes for a in jax.tree.leaves(c)) for f, c in caches.items()}
    for f in caches:
        assert nbytes[f] == attention.cache_bytes(cfg, L, f, batch=2)
    assert nbytes["fp8"] < nbytes["bf16"]
    for layer, (a, b) in enumerate(zip(caches["bf16"]["layers"], caches["fp8"]["layers"])):
        # tiny: head_dim 128 -> 64 FP8 + 64 bf16 + 1 scale, padded to 200 B (bf16: 256 B); keys 68 B vs 256 B
        assert b["window"].nbytes * 256 == a["window"].nbytes * 200
        if "comp" in a:
            assert b["comp"].nbytes * 256 == a["comp"].nbytes * 200
        if "index_keys" in a:
            assert b["index_keys"].nbytes * 256 == a["index_keys"].nbytes * 68


def test_cache_bytes_per_token_matches_spec_table():
    """Spec 3.2's derived table (growing part: compressed entries + indexer keys; rings excluded)."""
    flash, pro = ModelConfig.preset("flash"), ModelConfig.preset("pro")
    assert attention.kv_bytes(flash, "fp8") == 584 and indexer.key_bytes(flash, "fp8") == 68
    assert attention.kv_bytes(flash, "bf16") == 1024 and indexer.key_bytes(flash, "bf16") == 256
    assert round(attention.cache_bytes_per_token(flash, "fp8")) == 3514
    assert round(attention.cache_bytes_per_token(pro, "fp8")) == 5031
    assert attention.cache_bytes_per_token(flash, "bf16") == 6880
    assert attention.cache_bytes_per_token(pro, "bf16") == 9848
    assert attention.cache_bytes_per_token(flash.replace(kv_cache_format="fp8")) == \
        attention.cache_bytes_per_token(flash, "fp8")
    # the total (rings, fp32 compressor tails, whole blocks) grows by exactly the growing part per token
    for cfg in (flash, pro):
        for f in ("bf16", "fp8"):
            a, b = attention.cache_bytes(cfg, 1 << 16, f), attention.cache_bytes(cfg, 1 << 17, f)
            assert (b - a) / (1 << 16) == attention.cache_bytes_per_token(cfg, f)
            per_tok = attention.cache_bytes_per_token(cfg, f, seq_len=1 << 20)
            assert attention.cache_bytes_per_token(cfg, f) < per_tok < 1.01 * attention.cache_bytes_per_token(cfg, f)
    # 1M-token Flash sequence: 3.43 GiB of entries and keys (spec), plus 3.1 MiB of FP8 rings (43 x 128 x 584 B)
    # and 11.6 MiB of fp32 compressor tails (HCA: 128 x 512 x 2 x 4 B per layer)
    fixed = attention.cache_bytes(flash, 1 << 20, "fp8") - attention.cache_bytes_per_token(flash, "fp8") * 2 ** 20
    assert round(attention.cache_bytes_per_token(flash, "fp8") * 2 ** 20 / 2 ** 30, 2) == 3.43
    assert 14.5 < fixed / 2 ** 20 < 15


def test_stored_rows_round_trip_simulated_values():
    """Re-quantising FP8/FP4-simulated values is lossless, including blocks whose largest value lands on the
    bottom of its scale's range (re-derived scale s/2) and all-zero blocks."""
    cfg = ModelConfig.preset("flash", kv_cache_format="fp8")
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (512, 512)) * jnp.exp(3 * jax.random.normal(k[1], (512, 1)))
    # row 0: zeros; row 1: amax 228 s (s = 2**-6) rounds to 224 s, stored with scale 2**-7; row 2: below the floor
    x = x.at[0].set(0.0).at[1, :448].set(228.0 * 2.0 ** -6).at[2, :448].set(1e-6)
    x = x.astype(jnp.bfloat16)
    kv = jax.jit(compressor.kv_quant_sim, static_argnums=0)(cfg, x)
    assert float(kv[1, 0]) == 3.5
    rows = jax.jit(attention.store_kv, static_argnums=0)(cfg, kv)
    assert rows.shape == (512, 584) and rows.dtype == jnp.uint8
    assert int(rows[1, 448 + 128]) == 127 - 7                  # the re-derived scale s/2
    np.testing.assert_array_equal(_bits(jax.jit(attention.load_kv, static_argnums=0)(cfg, rows)), _bits(kv))
    keys = jax.jit(lambda v: quant.fp4_sim(quant.hadamard(v), 32))(x[:, :128])
    keys = keys.at[3, :32].set(quant.fp4_sim(jnp.full((32,), 3.2, keys.dtype)))   # 3 s (s = 1): stored with s/2
    krows = jax.jit(indexer.store_keys, static_argnums=0)(cfg, keys)
    assert krows.shape == (512, 68) and krows.dtype == jnp.uint8
    assert float(keys[3, 0]) == 3.0 and int(krows[3, 64]) == 127 - 1
    np.testing.assert_array_equal(_bits(jax.jit(indexer.load_keys, static_argnums=0)(cfg, krows)), _bits(keys))


def test_kv_cache_format_is_a_runtime_option(tmp_path):
    cfg = ModelConfig.preset("tiny", kv_cache_format="fp8")
    raw = cfg.to_hf()
    assert "kv_cache_format" not in raw
    assert ModelConfig.from_dict({**raw, "kv_cache_format": "fp8"}).kv_cache_format == "bf16"   # never read
    assert ModelConfig.from_dict(raw, kv_cache_format="fp8") == cfg
    with pytest.raises(ConfigError, match="kv_cache_format"):
        ModelConfig.preset("tiny", kv_cache_format="fp4")


def test_generate_with_fp8_cache_equals_bf16_cache():
    """The Generator (prefill + on-device decode loop, empty-cache prompts fed through decode) runs on the fp8
    cache and samples what the bf16 cache samples."""
    from v4jax.generate import Generator
    from v4jax.tokenizer import build_byte_tokenizer
    tok = build_byte_tokenizer()
    cfg = ModelConfig.preset("tiny")
    params = v4jax.init_params(cfg, jax.random.key(0), dtype="native")
    prompts = [[tok.bos_id] + tok.encode("Hello, world! How are you?"), [tok.bos_id] + tok.encode("hi")]
    out = {}
    for f in ("bf16", "fp8"):
        gen = Generator(cfg.replace(kv_cache_format=f), params, tok, max_len=64, chunk=8, prefill_chunk=16)
        out[f] = [r.tokens for r in gen.generate(prompts, max_new_tokens=10, greedy=True)]
    assert out["fp8"] == out["bf16"] and all(len(t) == 10 for t in out["fp8"])
