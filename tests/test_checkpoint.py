"""Checkpoints: HF load/save with full tensor accounting, Orbax save/restore, formats (native/bf16/fp8), sharded
placement on an 8-device CPU mesh, bounded host memory while streaming, and every kind of bad input."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import checkpoint as C
from v4jax import convert as CV
from v4jax import params as P
from v4jax.checkpoint import CheckpointError, official_view
from v4jax.safetensors_io import CheckpointDir, SafetensorsFile, write_index, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random official-format checkpoint of the tiny preset (one file per block)."""
    d = tmp_path_factory.mktemp("ck") / "tiny-hf"
    CV.write_random(v4jax.ModelConfig.preset("tiny"), str(d), seed=0)
    return d


@pytest.fixture(scope="module")
def tiny(hf_dir):
    return v4jax.load(hf_dir, dtype="native")


def _bytes(a):
    return np.asarray(a).view(np.uint8)


def _hf_tensors(d) -> dict:
    with CheckpointDir(str(d)) as ck:
        return {n: np.array(ck.read(n)) for n in ck.tensors}


def _assert_same_bytes(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert np.dtype(a[k].dtype) == np.dtype(b[k].dtype), k
        np.testing.assert_array_equal(_bytes(a[k]), _bytes(b[k]), err_msg=k)


def test_hf_layout_and_round_trip(hf_dir, tiny, tmp_path):
    cfg, params = tiny
    assert cfg == v4jax.ModelConfig.preset("tiny")
    out = tmp_path / "again"
    v4jax.save(cfg, params, out, format="hf", max_shard_bytes=1 << 20)
    files = sorted(os.listdir(out))
    assert "config.json" in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "layers.3.ffn.experts.7.w2.scale" in index["weight_map"]
    assert not any(".experts.w1." in k for k in index["weight_map"])          # per-expert names on disk
    with SafetensorsFile(out / index["weight_map"]["layers.0.ffn.gate.tid2eid"]) as f:
        assert f.tensors["layers.0.ffn.gate.tid2eid"].dtype == "I64"
    _assert_same_bytes(_hf_tensors(hf_dir), _hf_tensors(out))                   # HF -> v4jax -> HF: byte-identical
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]          # no temporary left behind


def test_bf16_and_fp8_formats(hf_dir, tiny, tmp_path):
    cfg, native = tiny
    nat = P.flatten(native)
    _, bf = v4jax.load(hf_dir, dtype="bf16")
    _, f8 = v4jax.load(hf_dir, dtype="fp8")
    bf, f8 = P.flatten(bf), P.flatten(f8)
    assert bf.keys() == P.abstract_flat(cfg, "bf16").keys()
    shapes = C.abstract_flat(cfg, "fp8")
    assert {k: (v.shape, v.dtype) for k, v in f8.items()} == {k: (v.shape, v.dtype) for k, v in shapes.items()}
    w = "layers.2.ffn.experts.w1"
    assert f8[w + ".weight"].dtype == jnp.float8_e4m3fn and f8[w + ".scale"].shape == (8, 1, 1)
    deq = jax.jit(P.dequantize_leaf, static_argnums=0)
    for name, p in P.declare(cfg).items():
        if p.storage not in ("fp8", "fp4"):
            np.testing.assert_array_equal(_bytes(bf[name]), _bytes(nat[name]), err_msg=name)
        elif name in ("layers.2.attn.wq_b.weight", "layers.3.ffn.experts.w1.weight", "mtp.0.ffn.experts.w2.weight"):
            s = name[:-7] + ".scale"
            ref = deq(p.storage, nat[name], nat[s])
            np.testing.assert_array_equal(np.asarray(bf[name]), np.asarray(ref), err_msg=name)
            np.testing.assert_array_equal(np.asarray(deq("fp8", f8[name], f8[s])), np.asarray(ref))
    # bf16 -> HF re-quantises with the reference's scale rules: the values survive exactly (the encoding may
    # differ: a tile whose largest code rounded down gets half the scale and doubled codes), and a second
    # round trip is byte-identical (the rules are idempotent)
    v4jax.save(cfg, P.unflatten(bf), tmp_path / "q1", format="hf")
    _, again = v4jax.load(tmp_path / "q1", dtype="bf16")
    _assert_same_bytes(bf, P.flatten(again))
    _, q1 = v4jax.load(tmp_path / "q1", dtype="bf16")
    v4jax.save(cfg, q1, tmp_path / "q2", format="hf")
    _assert_same_bytes(_hf_tensors(tmp_path / "q1"), _hf_tensors(tmp_path / "q2"))
    # fp8-held experts -> HF: back to FP4 with the same values
    v4jax.save(cfg, P.unflatten(f8), tmp_path / "f8hf", format="hf")
    _, back = v4jax.load(tmp_path / "f8hf", dtype="bf16")
    _assert_same_bytes(bf, P.flatten(back))


def test_fp8_experts_run_and_match_native(tmp_path):
    """The FP8 repack is lossless: a model on fp8-held experts gives the same logits as on native FP4."""
    cfg = v4jax.ModelConfig.preset("tiny").replace(num_hidden_layers=1, compress_ratios=(0, 0), num_hash_layers=1,
                                                   quant_sim=False, hc_sinkhorn_iters=2)   # (a faster compile)
    CV.write_random(cfg, str(tmp_path / "one"), seed=3)
    toks = jnp.arange(12, dtype=jnp.int32)[None] * 37 % cfg.vocab_size
    out = {}
    for dt in ("native", "fp8"):
        _, p = v4jax.load(tmp_path / "one", dtype=dt)
        out[dt] = np.asarray(v4jax.forward(cfg, p, toks))
    assert np.isfinite(out["native"]).all() and np.abs(out["native"]).mean() > 0
    np.testing.assert_array_equal(out["native"], out["fp8"])


@pytest.mark.parametrize("dtype,as_uint8", [("native", False), ("native", True), ("bf16", False), ("fp8", False)])
def test_orbax_round_trip(hf_dir, tiny, tmp_path, dtype, as_uint8):
    cfg, native = tiny
    _, params = v4jax.load(hf_dir, dtype=dtype)
    d = tmp_path / "orbax"
    C.save_orbax(cfg, params, d, tokenizer_dir=None, e8m0_as_uint8=as_uint8)
    marker = json.loads((d / C.MARKER).read_text())
    assert marker["dtype"] == dtype and marker["blocks"][0] == "top" and (d / "layers.0").is_dir()
    assert bool(marker["uint8_views"]) == (as_uint8 and dtype != "bf16")
    cfg2, back = v4jax.load(d, dtype=dtype)
    assert cfg2 == cfg
    _assert_same_bytes(P.flatten(params), P.flatten(back))                     # int8, fp8, e8m0 leaves included
    if dtype == "native":
        _, bf = v4jax.load(d, dtype="bf16")                                       # convert on restore
        _, ref = v4jax.load(hf_dir, dtype="bf16")
        _assert_same_bytes(P.flatten(ref), P.flatten(bf))
        v4jax.save(cfg, back, tmp_path / "hf", format="hf")                      # HF -> Orbax -> HF: identical
        _assert_same_bytes(_hf_tensors(hf_dir), _hf_tensors(tmp_path / "hf"))


def _single_file_ckpt(path, cfg, tensors, config=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config or cfg.to_hf()))
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
    d = _single_file_ckpt(tmp_path / "llama", cfg, dict(official), {**cfg.to_hf(), "model_type": "llama"})
    with pytest.raises(ValueError, match=r"llama/config.json: model_type is 'llama', expected 'deepseek_v4'"):
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
    f.write_bytes((64).to_bytes(8, "little") + b"{this is not json" + b" " * 100)
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        v4jax.load(d)
    with pytest.raises(ValueError, match="dtype must be"):
        v4jax.load(d, dtype="fp16")


def test_float32_power_of_two_scales(tmp_path, tiny, official):
    """Base checkpoints store float32 scales: accepted (converted exactly) when all are powers of two."""
    cfg, params = tiny
    t = {k: (v.astype(np.float32) if k.endswith(".scale") else v) for k, v in official.items()}
    _, got = v4jax.load(_single_file_ckpt(tmp_path / "f32", cfg, t))
    _assert_same_bytes(P.flatten(params), P.flatten(got))
    bad = "layers.3.ffn.experts.5.w2.scale"
    t[bad] = t[bad].copy()
    t[bad][1, 0] *= 1.5
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {bad}: float32 scale .* at \[1, 0\] is "
                                              r"not a power of two"):
        v4jax.load(_single_file_ckpt(tmp_path / "f32bad", cfg, t))


def test_orbax_bad_inputs(hf_dir, tiny, tmp_path):
    cfg, params = tiny
    d = tmp_path / "o"
    v4jax.save(cfg, params, d)
    shutil.rmtree(d / "layers.3")
    with pytest.raises(CheckpointError, match=r"layers.3: block directory missing"):
        v4jax.load(d)
    (d / C.MARKER).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match=r"v4jax.json: not a v4jax Orbax marker"):
        v4jax.load(d)
    d2 = tmp_path / "o2"
    v4jax.save(cfg, params, d2)
    for root, _, files in os.walk(d2 / "layers.1"):
        for f in files:
            if "manifest" in f or f.startswith("_"):
                os.remove(os.path.join(root, f))
    with pytest.raises(CheckpointError, match=r"layers.1: cannot restore block 'layers.1'"):
        v4jax.load(d2)


def test_save_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path, tiny):
    cfg, params = tiny
    (tmp_path / "exists").mkdir()
    for fmt in ("orbax", "hf"):
        with pytest.raises(CheckpointError, match="already exists"):
            v4jax.save(cfg, params, tmp_path / "exists", format=fmt)
    broken = P.flatten(params)
    broken["layers.4.attn.wkv.weight"] = broken["layers.4.attn.wkv.weight"][:-1]
    for fmt in ("orbax", "hf"):
        with pytest.raises(CheckpointError, match="layers.4.attn.wkv.weight"):
            v4jax.save(cfg, P.unflatten(broken), tmp_path / "out", format=fmt)
    assert os.listdir(tmp_path) == ["exists"]


def _run(script: str, *args, timeout=120) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_sharded_load_and_restore_on_8_devices(hf_dir, tmp_path):
    """HF and Orbax directories land directly in a sharded layout: experts over 'expert', the rest replicated
    (default rules), or per caller-given shardings / sharding_for / rules."""
    out = _run("""
        import sys, jax
        jax.config.update("jax_num_cpu_devices", 8)
        import numpy as np, v4jax
        from jax.sharding import NamedSharding, PartitionSpec as PS
        from v4jax import params as P
        hf, tmp = sys.argv[1:3]
        mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
        E = "layers.2.ffn.experts.w1.weight"
        cfg, ref = v4jax.load(hf)
        ref = P.flatten(ref)
        def same(flat, want=ref):
            for k, v in want.items():
                assert np.array_equal(np.asarray(flat[k]).view(np.uint8), np.asarray(v).view(np.uint8)), k
        with jax.set_mesh(mesh):                               # the current mesh, default rules
            cfg, a = v4jax.load(hf)
        a = P.flatten(a)
        same(a)
        assert a[E].sharding.spec == PS("expert", None, None), a[E].sharding
        assert a[E].addressable_shards[0].data.shape == (2, 64, 64)
        assert a[E[:-7] + ".scale"].sharding.spec == PS("expert", None, None)
        assert a["embed.weight"].sharding.is_fully_replicated and len(a["embed.weight"].devices()) == 8
        v4jax.save(cfg, P.unflatten(a), tmp + "/orbax")        # save sharded params, restore onto the mesh
        _, b = v4jax.load(tmp + "/orbax", mesh=mesh)
        b = P.flatten(b)
        same(b)
        assert b[E].sharding.spec == PS("expert", None, None) and b["head.weight"].sharding.is_fully_replicated
        sh = {k: v.sharding for k, v in a.items()}
        sh["head.weight"] = NamedSharding(mesh, PS("data", None))
        _, c = v4jax.load(tmp + "/orbax", shardings=P.unflatten(sh))
        c = P.flatten(c)
        same(c)
        assert c["head.weight"].sharding.spec == PS("data", None)
        _, d = v4jax.load(hf, mesh=mesh, rules={"expert": ("data", "expert"), "vocab": "data"}, dtype="fp8")
        d = P.flatten(d)
        assert d[E].sharding.spec == PS(("data", "expert"), None, None), d[E].sharding
        assert d[E].addressable_shards[0].data.shape == (1, 64, 128) and d[E].dtype == jax.numpy.float8_e4m3fn
        assert d["embed.weight"].sharding.spec == PS("data", None)
        _, f8 = v4jax.load(hf, dtype="fp8")
        same(d, P.flatten(f8))
        def sharding_for(name, axes):
            return NamedSharding(mesh, PS("expert") if axes and axes[0] == "expert" else PS())
        _, e = v4jax.load(hf, dtype="bf16", sharding_for=sharding_for)
        e = P.flatten(e)
        assert e[E].sharding.spec == PS("expert") and e[E].dtype == jax.numpy.bfloat16
        assert e["embed.weight"].sharding.spec == PS()
        _, bf = v4jax.load(hf, dtype="bf16")
        same(e, P.flatten(bf))
        print("OK")
    """, hf_dir, tmp_path)
    assert "OK" in out


def _filler_checkpoint(cfg, path):
    """An official-layout checkpoint of filler bytes (valid for a native load), one file per block."""
    inv = C.official_inventory(cfg)
    os.makedirs(path)
    wm, total, sizes = {}, 0, {}
    for i, (block, names) in enumerate(C._groups(cfg)):
        t = {}
        for name in names:
            for n in C._official_names(name, P.declare(cfg)[name], cfg.n_routed_experts):
                s = inv[n]
                nb = int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                if n.endswith("tid2eid"):
                    t[n] = np.arange(np.prod(s.shape), dtype=np.int64).reshape(s.shape) % cfg.n_routed_experts
                else:
                    t[n] = np.full(nb, len(n) % 100 + 1, np.uint8).view(s.dtype).reshape(s.shape)
                sizes[block] = sizes.get(block, 0) + nb
        fn = f"model-{i + 1:05d}-of-{len(C._groups(cfg)):05d}.safetensors"
        write_safetensors(os.path.join(path, fn), t)
        wm.update({n: fn for n in t})
        del t
    write_index(path, wm, sum(sizes.values()))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    return sizes


def test_streaming_load_peak_host_memory(tmp_path):
    """12 wide layers (~480 MB): streaming holds about one layer (+ the prefetch window) in host memory, and a
    full load on CPU (where the params themselves live in host memory) holds no second copy of the model."""
    cfg = v4jax.ModelConfig.preset("tiny").replace(
        hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, q_lora_rank=256, o_lora_rank=256,
        moe_intermediate_size=2048, compress_ratios=(0, 0) + (4, 128) * 5 + (0,), num_hash_layers=1)
    sizes = _filler_checkpoint(cfg, str(tmp_path / "wide"))
    layer, total = max(sizes.values()), sum(sizes.values())
    assert layer > 30e6 and total > 12 * layer
    # Peak RSS from /proc/self/status VmHWM, reset through clear_refs: ru_maxrss would not do in a subprocess,
    # since Linux carries the parent's peak (here pytest's) over the exec into the child's ru_maxrss.
    out = _run("""
        import json, sys, jax, v4jax
        from v4jax import checkpoint as C
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
        def reset():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return status("VmRSS")
        jax.devices()
        cfg, ck, f32 = C.open_hf(sys.argv[1])
        base = reset()
        n = 0
        for block, flat in C.iter_hf(cfg, ck, f32, "native"):
            n += sum(a.nbytes for a in jax.block_until_ready(flat).values())
            del flat
        stream = status("VmHWM") - base
        base = reset()
        cfg, params = v4jax.load(sys.argv[1])
        full = status("VmHWM") - base
        print(json.dumps(dict(stream=stream, full=full, n=n)))
    """, tmp_path / "wide")
    r = json.loads(out.strip().splitlines()[-1])
    print(f"layer {layer / 1e6:.1f} MB, model {total / 1e6:.1f} MB: streaming peak +{r['stream'] / 1e6:.1f} MB, "
          f"full load peak +{r['full'] / 1e6:.1f} MB")
    assert r["n"] >= total - 1e6                                     # tid2eid is smaller in memory
    assert r["stream"] < 2.5 * layer, r
    assert r["full"] < total + 2.5 * layer, r


def test_reader_helpers():
    """Contiguous-run detection (pread path) and the host buffer pool's recycling rules."""
    shape = (4, 6, 8)
    full = (slice(None),) * 3
    assert C._contiguous(shape, full) == (0, 192)
    assert C._contiguous(shape, (slice(1, 3), slice(None), slice(None))) == (48, 96)
    assert C._contiguous(shape, (slice(2, 3), slice(1, 4), slice(None))) == (2 * 48 + 8, 24)
    assert C._contiguous(shape, (slice(None), slice(0, 3), slice(None))) is None
    assert C._contiguous(shape, (slice(None), slice(None), slice(0, 4))) is None
    assert C._contiguous(shape, (slice(0, 4, 2), slice(None), slice(None))) is None
    pool = C._BufferPool(budget=2 << 20)
    a, ba = pool.take((1 << 20,), np.uint8)
    b, bb = pool.take((1 << 20,), np.uint8)
    pool.placed(jnp.zeros(1), [ba], reuse=True)          # an accelerator copy: the buffer comes back
    pool.placed(jnp.zeros(1), [bb], reuse=False)         # a CPU array may alias it: never handed out again
    c, bc = pool.take((1 << 20,), np.uint8)              # within budget: a new buffer, no waiting
    d, bd = pool.take((1 << 20,), np.uint8)              # budget full: waits for `a`'s transfer, reuses it
    assert bc not in (ba, bb) and bd is ba
    s, none = pool.take((10,), np.float32)
    assert none is None and s.shape == (10,)


def test_progress_line(hf_dir, capsys):
    v4jax.load(hf_dir, progress=True)
    err = capsys.readouterr().err
    n = len(C.official_inventory(v4jax.ModelConfig.preset("tiny")))
    assert f"\rload: {n}/{n} tensors" in err and "GB/s" in err and err.endswith("\n")
    v4jax.load(hf_dir)                                   # not a terminal: silent
    assert capsys.readouterr().err == ""
