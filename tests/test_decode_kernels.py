"""The model's decode with the GPU kernel paths forced on (Pallas interpret mode on CPU) equals its XLA paths.

On an NVIDIA GPU a decode step runs the skinny linear kernel (`pallas_kernels.linear`: FP8/bf16 weights decoded in
registers, fp32 inputs split into three bf16 parts) for every linear with at most 64 rows, one call per `wo_a`
group, and the grouped-matmul kernel with its decode launch (16-row tiles) for the routed experts. Here the
dispatches are told they are on a GPU, and the logits of several decode steps are compared with the default
(reference) paths of the same model.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.grouped_matmul as gm
import pallas_kernels.linear as skinny
import v4jax
from v4jax import layers
from v4jax.config import ModelConfig


def _decode(cfg, params, toks, P):
    _, cache = v4jax.prefill(cfg, params, toks[:, :P], max_len=toks.shape[1])
    out = []
    for i in range(P, toks.shape[1]):
        lg, cache = v4jax.decode_step(cfg, params, cache, toks[:, i])
        out.append(lg)
    return np.stack([np.asarray(o, np.float32) for o in out], 1)


@pytest.mark.parametrize("fp32", [True, False])
def test_decode_with_gpu_kernels_equals_reference(monkeypatch, fp32):
    # o_lora_rank 128: the per-group wo_a kernel calls slice whole 128-row scale blocks
    cfg = ModelConfig.preset("tiny", o_lora_rank=128)
    if fp32:     # (an FP8 cache would round the stored rows: a 1e-7 change could flip an FP8 rounding)
        cfg = cfg.replace(compute_dtype="float32", quant_sim=False)
    else:
        cfg = cfg.replace(kv_cache_format="fp8")
    params = v4jax.init_params(cfg, jax.random.key(0), dtype="native")
    toks = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
    ref = _decode(cfg, params, toks, 8)

    calls = []
    real = skinny.linear
    monkeypatch.setattr(skinny, "default_backend", lambda platform=None: "gpu")
    monkeypatch.setattr(skinny, "linear", lambda *a, **k: calls.append((a[0].shape, k.get("x_fp8", False)))
                        or real(*a, **k))
    monkeypatch.setattr(gm, "default_backend", lambda platform=None: "gpu")
    assert layers.uses_skinny(jnp.zeros((2, 1, 128), jnp.bfloat16), params["layers"]["0"]["attn"]["wq_a"])
    jax.clear_caches()                                  # decode_step is jitted: trace it again with the kernels
    got = _decode(cfg, params, toks, 8)
    assert calls and all(int(np.prod(s[:-1])) <= skinny.MAX_ROWS for s, _ in calls)
    # bf16 activations under quant_sim: the FP8 linears quantise x inside the kernel (layers.fused_fp8_linear)
    assert any(f for _, f in calls) != fp32
    assert np.isfinite(got).all()
    if fp32:
        # fp32 activations: the kernels' fp32 sums differ from XLA's only in summation order
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    else:
        # bf16 activations: a different summation order can flip a bf16 rounding, which later layers carry on
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < 2e-2, err
    jax.clear_caches()


def test_wo_a_groups_run_as_one_grouped_matmul(monkeypatch):
    """attention._output at decode on a GPU (40 rows, g groups): the g group products are ONE grouped-matmul call
    on the stored FP8 weight viewed as [g, r, in] (no slices, no dequantised copy), equal to the einsum path."""
    from v4jax import attention
    from v4jax.layers import rope_table
    from v4jax import quant
    cfg = ModelConfig.preset("tiny", o_lora_rank=128)
    B, H, hd, g = 40, cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
    fp8 = lambda k, shape: dict(zip(("weight", "scale"), quant.quantize_fp8_weight(
        0.05 * jax.random.normal(jax.random.key(k), shape, jnp.float32))))
    p = {"wo_a": fp8(3, (g * 128, H * hd // g)), "wo_b": fp8(4, (cfg.dim, g * 128))}
    o = jax.random.normal(jax.random.key(2), (B, 1, H, hd), jnp.bfloat16)
    cos, sin = rope_table(jnp.arange(B)[:, None], layers.rope_inv_freq(cfg, 0))
    ref = np.asarray(attention._output(cfg, p, o, cos, sin), np.float32)
    calls, real = [], attention.grouped_matmul
    monkeypatch.setattr(gm, "default_backend", lambda platform=None: "gpu")
    monkeypatch.setattr(attention, "grouped_matmul",
                        lambda x, node, gs, **k: calls.append((x.shape, node["weight"].shape, node["scale"].shape,
                                                               np.asarray(gs).tolist())) or real(x, node, gs, **k))
    got = np.asarray(attention._output(cfg, p, o, cos, sin), np.float32)
    assert calls == [((g * B, H * hd // g), (g, 128, H * hd // g), (g, 1, H * hd // g // 128), [B] * g)]
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 1e-2, err
