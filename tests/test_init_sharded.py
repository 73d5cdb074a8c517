"""init_params_sharded: on-device generation onto shardings equals init_params (8 CPU devices, subprocess)."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from v4jax import params as P, sharding as SH
    from v4jax.config import ModelConfig
    cfg = ModelConfig.preset("tiny")
    mesh = SH.make_mesh({"expert": 4, "data": 2})
    for dtype in ("native",):               # (bf16 differs only in the final dequantisation)
        sh = SH.param_shardings(cfg, mesh, dtype)
        want = P.flatten(P.init_params(cfg, jax.random.key(3), dtype))
        got = P.flatten(P.init_params_sharded(cfg, jax.random.key(3), sh, dtype))
        shs = P.flatten(sh)
        assert want.keys() == got.keys()
        for k in want:
            a, b = want[k], got[k]
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert b.sharding == shs[k], (k, b.sharding, shs[k])
            if a.dtype in (np.float32,):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8, err_msg=k)
            elif a.dtype == np.int32:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
            else:   # FP8/FP4 codes, E8M0 scales, bf16 (incl. dequantized) values: a 1-ulp input may round apart
                u = {1: np.uint8, 2: np.uint16}[a.dtype.itemsize]
                same = np.mean(np.asarray(a).view(u) == np.asarray(b).view(u))
                assert same > 0.999, (k, same)
        e = got["layers.2.ffn.experts.w1.weight"]
        assert e.addressable_shards[0].data.shape[0] == cfg.n_routed_experts // 4
    print("OK", len(P._LEAF_INIT_CACHE))
""")


def test_init_params_sharded_equals_init_params():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


PER_EXPERT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np
    from v4jax import params as P, sharding as SH, quant
    from v4jax.config import ModelConfig
    P.PER_EXPERT_BYTES = 0                      # every stacked-expert leaf goes expert by expert
    cfg = ModelConfig.preset("tiny")
    for spec in ({"expert": 4}, {"data": 4}):   # sharded over experts, and experts replicated
        mesh = SH.make_mesh(spec)
        sh = SH.param_shardings(cfg, mesh, "native")
        got = P.flatten(P.init_params_sharded(cfg, jax.random.key(5), sh, "native"))
        name = "layers.3.ffn.experts.w2.weight"
        decl = P.declare(cfg)[name]
        w, s = got[name], got[name[:-7] + ".scale"]
        assert w.sharding == P.flatten(sh)[name]
        key = jax.random.fold_in(jax.random.key(5), __import__("zlib").crc32(name.encode()))
        for e in (0, 5, 7):                     # expert e is drawn from fold_in(leaf key, e)
            v = jax.random.normal(jax.random.fold_in(key, e), decl.shape[1:]) / np.sqrt(decl.shape[-1])
            wq, sq = quant.quantize_fp4_weight(v)
            same = np.mean(np.asarray(w[e]).view(np.uint8) == np.asarray(wq).view(np.uint8))
            assert same > 0.999, (spec, e, same)
            np.testing.assert_array_equal(np.asarray(s[e]).view(np.uint8), np.asarray(sq).view(np.uint8))
        dq = np.asarray(P.dequantize_leaf("fp4", w, s), np.float32)
        assert abs(dq.std() * np.sqrt(decl.shape[-1]) - 1) < 0.1     # the init's scale
    print("OK")
""")


def test_init_params_sharded_per_expert_draws():
    r = subprocess.run([sys.executable, "-c", PER_EXPERT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
