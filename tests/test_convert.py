"""python -m v4jax.convert: HF <-> v4jax Orbax conversions, random official-format checkpoints, bad input."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import v4jax
from v4jax import checkpoint as C
from v4jax import convert as CV
from v4jax import params as P
from v4jax.safetensors_io import CheckpointDir, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A random tiny checkpoint with a tokenizer file beside it."""
    d = tmp_path_factory.mktemp("conv") / "hf"
    CV.write_random(v4jax.ModelConfig.preset("tiny"), str(d), seed=0)
    (d / "tokenizer.json").write_text('{"fake": true}')
    return d


def _tensors(d) -> dict:
    with CheckpointDir(str(d)) as ck:
        return {n: np.array(ck.read(n)) for n in ck.tensors}


def _same_bytes(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert np.dtype(a[k].dtype) == np.dtype(b[k].dtype), k
        np.testing.assert_array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8), err_msg=k)


def _no_leftovers(parent, allowed):
    assert sorted(os.listdir(parent)) == sorted(allowed), os.listdir(parent)


def test_hf_orbax_hf_native_is_byte_identical(src, tmp_path, capsys):
    assert CV.main([str(src), str(tmp_path / "orbax")]) == 0
    marker = json.loads((tmp_path / "orbax" / C.MARKER).read_text())
    assert marker["dtype"] == "native" and marker["config"]["model_type"] == "deepseek_v4"
    assert (tmp_path / "orbax" / "tokenizer.json").exists()
    assert CV.main([str(tmp_path / "orbax"), str(tmp_path / "hf"), "--format", "hf", "--max-shard-gb", "0.0005"]) == 0
    files = os.listdir(tmp_path / "hf")
    assert "tokenizer.json" in files and "config.json" in files and "model-00001-of-00006.safetensors" in files
    _same_bytes(_tensors(src), _tensors(tmp_path / "hf"))
    assert "wrote" in capsys.readouterr().out
    _no_leftovers(tmp_path, ["orbax", "hf"])


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_hf_orbax_hf_requantizes_to_the_same_values(src, tmp_path, dtype):
    assert CV.main([str(src), str(tmp_path / "orbax"), "--dtype", dtype]) == 0
    cfg, held = v4jax.load(tmp_path / "orbax", dtype=dtype)                   # restores what was stored
    assert {k: v.dtype for k, v in P.flatten(held).items()} == {k: v.dtype for k, v in
                                                                C.abstract_flat(cfg, dtype).items()}
    assert CV.main([str(tmp_path / "orbax"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    a, b = _tensors(src), _tensors(tmp_path / "hf")
    assert a.keys() == b.keys()
    quantized = {n for n in a if n.endswith(".scale")} | {n[:-6] + ".weight" for n in a if n.endswith(".scale")}
    _same_bytes({k: a[k] for k in a if k not in quantized}, {k: b[k] for k in b if k not in quantized})
    _, x = v4jax.load(src, dtype="bf16")
    _, y = v4jax.load(tmp_path / "hf", dtype="bf16")
    _same_bytes(P.flatten(x), P.flatten(y))                                    # the same values


def test_random_cli(tmp_path):
    out = tmp_path / "rand"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "v4jax.convert", "--random", "tiny", "--to", str(out), "--seed", "1",
                        "--layers", "3"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = v4jax.ModelConfig.from_hf(out)
    assert cfg == CV.truncate_layers(v4jax.ModelConfig.preset("tiny"), 3)
    assert cfg.compress_ratios == (0, 0, 4, 0) and cfg.num_hash_layers == 3
    cfg2, ck, _ = C.open_hf(out)                            # every official name, dtype and shape, nothing else
    ck.close()
    assert cfg2 == cfg and len(os.listdir(out)) == 2 + 4 + 1   # config, index, one file per block (top, 3, mtp)
    t = _tensors(out)
    assert t["layers.0.ffn.gate.tid2eid"].dtype == np.int64 and t["mtp.0.ffn.gate.bias"].dtype == np.float32
    assert t["layers.2.ffn.experts.7.w2.scale"].dtype == np.dtype("float8_e8m0fnu")
    # deterministic: each tensor from its own key, whatever process or order made it
    decl = P.declare(cfg)
    root = jax.random.key(1)
    for name in ["layers.2.attn.wq_b.weight", "layers.0.ffn.gate.tid2eid", "mtp.0.ffn.experts.w1.weight",
                 "embed.weight", "layers.1.hc_ffn_scale"]:
        _same_bytes({k: t[k] for k in CV.random_tensors(cfg, name, decl[name], root)},
                    CV.random_tensors(cfg, name, decl[name], root))
    name = "layers.1.ffn.experts.w3.weight"                  # per-expert keys: independent of the chunking
    _same_bytes(CV.random_tensors(cfg, name, decl[name], root, max_chunk_bytes=1),
                {k: t[k] for k in CV.random_tensors(cfg, name, decl[name], root)})
    other = CV.random_tensors(cfg, "embed.weight", decl["embed.weight"], jax.random.key(2))["embed.weight"]
    assert not np.array_equal(other, t["embed.weight"])
    # values keep activations sane: the scales of params.init_params
    w = np.asarray(v4jax.load(out, dtype="bf16")[1]["layers"]["2"]["attn"]["wq_b"]["weight"], np.float32)
    assert abs(w.std() * np.sqrt(w.shape[-1]) - 1) < 0.1
    assert CV.main(["--random", "nonexistent-preset", "--to", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_layers_option_keeps_full_width_and_mtp():
    flash = v4jax.ModelConfig.preset("flash")
    cfg = CV.random_config("flash", layers=2)
    assert cfg.num_hidden_layers == 2 and cfg.compress_ratios == (0, 0, 0) and cfg.num_hash_layers == 2
    assert cfg.hidden_size == flash.hidden_size and cfg.n_routed_experts == flash.n_routed_experts
    inv = C.official_inventory(cfg)
    assert inv["mtp.0.ffn.experts.255.w1.weight"].shape == (2048, 2048)
    assert inv["layers.1.ffn.experts.0.w2.scale"].shape == (4096, 64)
    assert not any(n.startswith("layers.2.") for n in inv)
    with pytest.raises(ValueError, match="--layers must be in 1..43"):
        CV.random_config("flash", layers=44)


def test_bad_input_writes_nothing(src, tmp_path, capsys):
    dst = tmp_path / "out"
    assert CV.main([str(tmp_path / "missing"), str(dst)]) == 2
    assert "missing: no such checkpoint directory" in capsys.readouterr().err
    # a truncated shard
    bad = tmp_path / "trunc"
    shutil.copytree(src, bad)
    f = bad / "model-00004-of-00007.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert CV.main([str(bad), str(dst)]) == 2
    assert "model-00004-of-00007.safetensors: truncated" in capsys.readouterr().err
    # a missing and an extra tensor
    cfg, params = v4jax.load(src)
    off = C.official_view(P.flatten(params))
    del off["layers.3.attn.wkv.scale"]
    off["layers.3.attn.bogus"] = np.zeros(2, np.float32)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps(cfg.to_hf()))
    write_safetensors(str(tmp_path / "odd" / "model.safetensors"), off)
    assert CV.main([str(tmp_path / "odd"), str(dst), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "layers.3.attn.wkv.scale" in err and "layers.3.attn.bogus (in model.safetensors)" in err
    # a non-power-of-two F32 scale in a late block fails the conversion half-way: no output, no temporary
    off = C.official_view(P.flatten(params))
    off["layers.3.attn.wkv.scale"] = off["layers.3.attn.wkv.scale"].astype(np.float32) * 3
    shutil.rmtree(tmp_path / "odd")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps(cfg.to_hf()))
    write_safetensors(str(tmp_path / "odd" / "model.safetensors"), off)
    for fmt in ("orbax", "hf"):
        assert CV.main([str(tmp_path / "odd"), str(dst), "--format", fmt]) == 2
        assert "tensor layers.3.attn.wkv.scale: float32 scale" in capsys.readouterr().err
    # an existing destination is never touched
    (tmp_path / "exists").mkdir()
    assert CV.main([str(src), str(tmp_path / "exists")]) == 2
    assert "exists: already exists" in capsys.readouterr().err
    _no_leftovers(tmp_path, ["trunc", "odd", "exists"])
    assert os.listdir(tmp_path / "exists") == []


def test_interrupted_conversion_leaves_nothing(src, tmp_path, monkeypatch):
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = C.write_safetensors
    monkeypatch.setattr(C, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        CV.convert(str(src), str(tmp_path / "hf"), format="hf", max_shard_bytes=1 << 20)
    assert len(calls) == 3
    _no_leftovers(tmp_path, [])
