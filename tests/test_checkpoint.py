import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import params as P
from v4jax.checkpoint import CheckpointError, official_view
from v4jax.safetensors_io import SafetensorsFile, write_safetensors


@pytest.fixture(scope="module")
def tiny():
    cfg = v4jax.ModelConfig.preset("tiny")
    return cfg, v4jax.init_params(cfg, jax.random.key(0), dtype="native")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny):
    cfg, params = tiny
    d = tmp_path_factory.mktemp("ck") / "tiny-hf"
    v4jax.save(cfg, params, d, format="hf", max_shard_bytes=1 << 20)
    return d


def _bytes(a):
    return np.asarray(a).view(np.uint8)


def test_hf_layout_and_round_trip(hf_dir, tiny):
    cfg, params = tiny
    files = sorted(os.listdir(hf_dir))
    assert "config.json" in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert "layers.3.ffn.experts.7.w2.scale" in index["weight_map"]
    assert not any(".experts.w1." in k for k in index["weight_map"])          # per-expert names on disk
    with SafetensorsFile(hf_dir / index["weight_map"]["layers.0.ffn.gate.tid2eid"]) as f:
        assert f.tensors["layers.0.ffn.gate.tid2eid"].dtype == "I64"
    cfg2, loaded = v4jax.load(hf_dir, dtype="native")
    assert cfg2 == cfg
    a, b = P.flatten(params), P.flatten(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(_bytes(a[k]), _bytes(b[k]), err_msg=k)


def test_bf16_load_and_requantising_save(hf_dir, tiny, tmp_path):
    cfg, params = tiny
    _, bf = v4jax.load(hf_dir, dtype="bf16")
    ref = P.flatten(v4jax.init_params(cfg, jax.random.key(0), dtype="bf16"))
    for k, v in P.flatten(bf).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(ref[k]), err_msg=k)
    # bf16 -> HF re-quantises with the reference's scale rules: the values survive exactly (the encoding may
    # differ: a tile whose largest code rounded down gets half the scale and doubled codes)
    v4jax.save(cfg, bf, tmp_path / "again", format="hf", max_shard_bytes=1 << 20)
    _, again = v4jax.load(tmp_path / "again", dtype="bf16")
    for k, v in P.flatten(again).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(ref[k]), err_msg=k)


def test_loaded_checkpoint_runs(hf_dir, tiny):
    cfg, params = tiny
    _, loaded = v4jax.load(hf_dir)
    toks = jnp.arange(10, dtype=jnp.int32)[None] % cfg.vocab_size
    np.testing.assert_array_equal(np.asarray(v4jax.forward(cfg, loaded, toks)),
                                  np.asarray(v4jax.forward(cfg, params, toks)))


def _single_file_ckpt(path, cfg, tensors):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    write_safetensors(str(path / "model.safetensors"), tensors)
    return path


@pytest.fixture(scope="module")
def official(tiny):
    return official_view(P.flatten(tiny[1]))


def test_every_tensor_accounted_for(tmp_path, tiny, official):
    cfg = tiny[0]
    t = dict(official)
    del t["layers.2.attn.indexer.wq_b.scale"]
    del t["layers.1.ffn.experts.3.w1.weight"]
    t["layers.0.attn.extra.weight"] = np.zeros(3, np.float32)
    t["layers.0.attn.attn_sink"] = t["layers.0.attn.attn_sink"].astype(np.float16)
    t["embed.weight"] = t["embed.weight"][:-1]
    d = _single_file_ckpt(tmp_path / "bad", cfg, t)
    with pytest.raises(CheckpointError) as e:
        v4jax.load(d)
    msg = str(e.value)
    for needle in ["missing tensors (2)", "layers.2.attn.indexer.wq_b.scale", "layers.1.ffn.experts.3.w1.weight",
                   "unexpected tensors (1)", "layers.0.attn.extra.weight (in model.safetensors)",
                   "wrong shape or dtype (2)", "layers.0.attn.attn_sink (in model.safetensors): F16[4], config "
                   "expects F32[4]", "embed.weight"]:
        assert needle in msg, (needle, msg)


def test_config_mismatch_is_reported(tmp_path, tiny, official):
    cfg = tiny[0]
    d = _single_file_ckpt(tmp_path / "other", cfg.replace(n_routed_experts=16), dict(official))
    with pytest.raises(CheckpointError, match=r"missing tensors \(\d+\)"):
        v4jax.load(d)


def test_bad_paths_and_files(tmp_path, tiny, official):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        v4jax.load(tmp_path / "nowhere")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ValueError, match="no such config file"):
        v4jax.load(tmp_path / "noconfig")
    d = _single_file_ckpt(tmp_path / "trunc", tiny[0], dict(official))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        v4jax.load(d)
    with pytest.raises(ValueError, match="dtype must be"):
        v4jax.load(d, dtype="fp16")


def test_save_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path, tiny):
    cfg, params = tiny
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        v4jax.save(cfg, params, tmp_path / "exists")
    broken = P.flatten(params)
    broken["layers.4.attn.wkv.weight"] = broken["layers.4.attn.wkv.weight"][:-1]
    with pytest.raises(CheckpointError, match="layers.4.attn.wkv.weight"):
        v4jax.save(cfg, P.unflatten(broken), tmp_path / "out")
    assert os.listdir(tmp_path) == ["exists"]
