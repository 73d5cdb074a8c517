from collections import Counter
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import quant
from v4jax import checkpoint as C
from v4jax import params as P
from v4jax.safetensors_io import dtype_name

# Published checkpoints (spec 4.1): tensors, bytes, dtype counts.
PUBLISHED = {
    "flash": (69187, 159_609_485_896, {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34167, "I64": 3,
                                       "I8": 33792}),
    "pro": (145116, 864_704_792_696, {"BF16": 619, "F32": 590, "F8_E4M3": 528, "F8_E8M0": 71952, "I64": 3,
                                      "I8": 71424}),
}


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_official_inventory_reproduces_published_checkpoint(name):
    t = time.time()
    cfg = v4jax.ModelConfig.preset(name)
    shapes = v4jax.abstract_params(cfg, dtype="native")
    inv = C.official_view(P.flatten(shapes))
    n, nbytes, counts = PUBLISHED[name]
    assert len(inv) == n
    assert sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in inv.values()) == nbytes
    assert dict(Counter(dtype_name(np.dtype(s.dtype)) for s in inv.values())) == counts
    assert time.time() - t < 30


def test_flash_tensor_table():
    """Spot checks against spec 4.2 (Flash)."""
    inv = C.official_inventory(v4jax.ModelConfig.preset("flash"))
    def sd(n):
        return dtype_name(np.dtype(inv[n].dtype)), list(inv[n].shape)
    assert sd("embed.weight") == ("BF16", [129280, 4096])
    assert sd("hc_head_fn") == ("F32", [4, 16384])
    assert sd("layers.0.hc_attn_fn") == ("F32", [24, 16384])
    assert sd("layers.0.attn.wq_b.weight") == ("F8_E4M3", [32768, 1024])
    assert sd("layers.0.attn.wq_b.scale") == ("F8_E8M0", [256, 8])
    assert sd("layers.5.attn.wo_a.scale") == ("F8_E8M0", [64, 32])
    assert sd("layers.5.attn.wo_b.scale") == ("F8_E8M0", [32, 64])
    assert sd("layers.0.ffn.gate.tid2eid") == ("I64", [129280, 6])
    assert "layers.3.ffn.gate.tid2eid" not in inv and sd("layers.3.ffn.gate.bias") == ("F32", [256])
    assert sd("layers.7.ffn.experts.255.w1.weight") == ("I8", [2048, 2048])
    assert sd("layers.7.ffn.experts.0.w1.scale") == ("F8_E8M0", [2048, 128])
    assert sd("layers.7.ffn.experts.3.w2.weight") == ("I8", [4096, 1024])
    assert sd("layers.2.attn.compressor.ape") == ("F32", [4, 1024])
    assert sd("layers.3.attn.compressor.ape") == ("F32", [128, 512])
    assert sd("layers.2.attn.indexer.wq_b.scale") == ("F8_E8M0", [64, 8])
    assert sd("layers.2.attn.indexer.compressor.wkv.weight") == ("BF16", [256, 4096])
    assert "layers.3.attn.indexer.wq_b.weight" not in inv and "layers.0.attn.compressor.ape" not in inv
    assert sd("mtp.0.e_proj.scale") == ("F8_E8M0", [32, 32])
    assert "mtp.0.ffn.gate.bias" in inv and "mtp.0.attn.compressor.ape" not in inv
    assert not any(k.startswith("mtp.0.embed") or k.startswith("mtp.0.head") for k in inv)


def test_param_counts():
    assert round(P.count_params(v4jax.ModelConfig.preset("flash"), include_mtp=False) / 1e9, 2) == 284.33
    assert round(P.count_params(v4jax.ModelConfig.preset("flash")) / 1e9, 2) == 290.94
    assert round(P.count_params(v4jax.ModelConfig.preset("pro"), include_mtp=False) / 1e9, 1) == 1573.0


def test_official_view_round_trip_shapes_and_arrays():
    cfg = v4jax.ModelConfig.preset("tiny")
    flat = P.abstract_flat(cfg, "native")
    back = C.from_official(C.official_view(flat))
    assert back.keys() == flat.keys()
    assert all(back[k].shape == flat[k].shape and back[k].dtype == flat[k].dtype for k in flat)
    arrays = P.flatten(v4jax.init_params(cfg, jax.random.key(0), dtype="native"))
    official = C.official_view(arrays)
    e = official["layers.3.ffn.experts.5.w2.weight"]
    np.testing.assert_array_equal(e, np.asarray(arrays["layers.3.ffn.experts.w2.weight"][5]))
    assert official["layers.0.ffn.gate.tid2eid"].dtype == np.int64
    back = C.from_official(official)
    for k in arrays:
        np.testing.assert_array_equal(np.asarray(back[k]).view(np.uint8), np.asarray(arrays[k]).view(np.uint8))


def test_native_and_bf16_init_describe_the_same_model():
    cfg = v4jax.ModelConfig.preset("tiny")
    nat = P.flatten(v4jax.init_params(cfg, jax.random.key(3), dtype="native"))
    bf = P.flatten(v4jax.init_params(cfg, jax.random.key(3), dtype="bf16"))
    decl = P.declare(cfg)
    for name, p in decl.items():
        if p.storage in ("fp8", "fp4"):
            w = P.dequantize_leaf(p.storage, nat[name], nat[name[:-7] + ".scale"])
            np.testing.assert_array_equal(np.asarray(w), np.asarray(bf[name]))
            assert bf[name].dtype == jnp.bfloat16
        else:
            np.testing.assert_array_equal(np.asarray(nat[name]), np.asarray(bf[name]))
    assert nat["layers.3.ffn.experts.w1.weight"].dtype == jnp.int8
    assert nat["layers.3.ffn.experts.w1.scale"].dtype == jnp.float8_e8m0fnu
    # hash tables hold k distinct experts per token
    t = np.asarray(nat["layers.0.ffn.gate.tid2eid"])
    assert t.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert all(len(set(r)) == len(r) for r in t) and t.max() < cfg.n_routed_experts


def test_logical_axes_cover_every_leaf():
    cfg = v4jax.ModelConfig.preset("tiny")
    axes = P.flatten(P.logical_axes(cfg, "native"))
    shapes = P.abstract_flat(cfg, "native")
    assert axes.keys() == shapes.keys()
    assert all(len(axes[k]) == len(shapes[k].shape) for k in shapes)


def test_kernel_layout_params(tmp_path):
    """to_kernel_layout: the FP4 expert weights become uint8 in the halves layout and each layer's w1/w3 one w13
    node (nothing else changes), the model's logits are bit-identical, to_checkpoint_layout restores the bytes,
    and save refuses the kernel layout with the fix in its message."""
    cfg = v4jax.ModelConfig.preset("tiny")
    params = v4jax.init_params(cfg, jax.random.key(0), dtype="native")
    kp = P.to_kernel_layout(params)
    flat, kflat = P.flatten(params), P.flatten(kp)
    gone = sorted(set(flat) - set(kflat))
    assert {k.split(".ffn.")[1] for k in gone} == {f"{e}.{w}.{leaf}" for e in ("experts", "shared_experts")
                                                  for w in ("w1", "w3") for leaf in ("weight", "scale")}
    tiled = 0
    for k in (k for k in gone if ".w1." in k):                 # w13 = [w1; w3] along out (kernel layout for FP4:
        j = kflat[k.replace(".w1.", ".w13.")]                  # the joined weight's halves, tiled by its rule)
        w1, w3 = flat[k], flat[k.replace(".w1.", ".w3.")]
        fp4 = k.endswith("weight") and quant.is_fp4(w1)
        conv = quant.fp4_to_halves if fp4 else (lambda a: a)
        assert j.dtype == (jnp.uint8 if fp4 else w1.dtype)
        axis = 1 if ".experts." in k else 0
        np.testing.assert_array_equal(np.asarray(j), np.asarray(conv(jnp.concatenate([w1, w3], axis))))
        tiled += fp4 and quant.fp4_tiled(j.shape)
    assert tiled        # the tiny preset's w13 [E, 2 * 64, d / 2] is stored in 128-row tiles
    changed = sorted(k for k in kflat if k in flat and kflat[k].dtype != flat[k].dtype)
    assert changed and all(k.endswith(".ffn.experts.w2.weight") for k in changed)
    assert all(kflat[k].dtype == jnp.uint8 for k in changed)
    same = [k for k in kflat if k in flat and k not in changed]       # outside the FFN nodes: the same arrays;
    assert all(kflat[k] is flat[k] for k in same if ".ffn.experts." not in k and ".shared_experts." not in k)
    assert all(np.array_equal(np.asarray(kflat[k]), np.asarray(flat[k])) for k in same)   # inside: copies
    back = P.flatten(P.to_checkpoint_layout(kp))
    assert back.keys() == flat.keys()
    assert all(np.array_equal(np.asarray(back[k]), np.asarray(flat[k])) for k in changed + gone)
    kp2 = P.flatten(P.to_kernel_layout(P.unflatten(back), donate=True))   # donate: every old FFN leaf is freed
    ffn = [k for k in back if ".experts." in k or ".shared_experts." in k]
    assert ffn and all(back[k].is_deleted() for k in ffn)
    assert not any(back[k].is_deleted() for k in back if k not in ffn)
    assert kp2.keys() == kflat.keys() and all(np.array_equal(np.asarray(kp2[k]), np.asarray(kflat[k])) for k in kflat)
    toks = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(v4jax.forward(cfg, kp, toks)), np.asarray(v4jax.forward(cfg, params, toks)))
    with pytest.raises(C.CheckpointError, match="to_checkpoint_layout"):
        v4jax.save(cfg, kp, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
