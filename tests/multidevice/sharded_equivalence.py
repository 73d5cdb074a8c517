"""Run with 8 CPU devices (in a subprocess of tests/test_sharding.py): sharded == unsharded."""
import jax

jax.config.update("jax_num_cpu_devices", 8)

import json  # noqa: E402
import sys  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import v4jax  # noqa: E402
from v4jax import sharding as sh  # noqa: E402

out = {}
cfg = v4jax.ModelConfig.preset("tiny", quant_sim=False, compute_dtype="float32")
params = v4jax.init_params(cfg, jax.random.key(0), dtype="bf16")
toks = jax.random.randint(jax.random.key(1), (4, 136), 0, cfg.vocab_size)
ref = v4jax.forward(cfg, params, toks)
for spec in ["expert=8", "seq=4,expert=2", "data=2,seq=2,expert=2"]:
    mesh = sh.make_mesh(spec)
    with jax.set_mesh(mesh):
        ps = sh.place(cfg, params)
        t = jax.device_put(toks, NamedSharding(mesh, P("data")))
        got = v4jax.forward(cfg, ps, t)
        hlo = jax.jit(lambda p, t: v4jax.forward(cfg, p, t)).lower(ps, t).compile().as_text()
    w1 = ps["layers"]["3"]["ffn"]["experts"]["w1"]["weight"]
    out[spec] = {"err": float(jnp.max(jnp.abs(got - ref))), "expert_spec": str(w1.sharding.spec),
                 "local_experts": int(w1.addressable_shards[0].data.shape[0]),
                 # experts never move: no collective produces a full [E, F, D] expert stack
                 "gathers_experts": f"all-gather(" in hlo and any(
                     f"[{cfg.n_routed_experts},{cfg.moe_intermediate_size},{cfg.dim}]" in line
                     for line in hlo.splitlines() if "all-gather" in line)}

# gradients (training path) under data=2 x expert=4
tcfg = v4jax.ModelConfig.preset("tiny-pro", quant_sim=False, compute_dtype="float32")
tp = v4jax.init_params(tcfg, jax.random.key(2), dtype="bf16")
tt = jax.random.randint(jax.random.key(3), (4, 48), 0, tcfg.vocab_size)


def loss(p, t):
    o = v4jax.forward_train(tcfg, p, t, remat=False)
    lp = jax.nn.log_softmax(o["logits"][:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, t[:, 1:, None], -1)) + 1e-2 * jnp.sum(o["balance"])


grad = jax.jit(jax.grad(loss, allow_int=True))
g_ref = v4jax.params.flatten(grad(tp, tt))
mesh = sh.make_mesh("data=2,expert=4")
with jax.set_mesh(mesh):
    g = v4jax.params.flatten(grad(sh.place(tcfg, tp), jax.device_put(tt, NamedSharding(mesh, P("data")))))
rel = {}
for k, v in g_ref.items():
    if v.dtype == jax.dtypes.float0:
        continue
    scale = float(jnp.max(jnp.abs(v.astype(jnp.float32)))) + 1e-12
    rel[k] = float(jnp.max(jnp.abs(g[k].astype(jnp.float32) - v.astype(jnp.float32)))) / scale
out["grad_max_rel"] = max(rel.values())
out["grad_worst"] = max(rel, key=rel.get)

# decode with a sharded cache under data=2 x expert=4 (B=4: tokens split; B=1 would replicate)
lp, cache = v4jax.prefill(cfg, params, toks[:, :100], max_len=136)
with jax.set_mesh(mesh):
    ps = sh.place(cfg, params)
    lps, caches = v4jax.prefill(cfg, ps, jax.device_put(toks[:, :100], NamedSharding(mesh, P("data"))), max_len=136)
    errs = [float(jnp.max(jnp.abs(lps - lp)))]
    for i in range(100, 110):
        a, cache = v4jax.decode_step(cfg, params, cache, toks[:, i])
        b, caches = v4jax.decode_step(cfg, ps, caches, toks[:, i])
        errs.append(float(jnp.max(jnp.abs(a - b))))
out["decode_max_err"] = max(errs)
json.dump(out, sys.stdout)
