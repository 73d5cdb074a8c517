"""Run with 8 CPU devices (in a subprocess of tests/test_sharding.py): sharded == unsharded."""
import jax

jax.config.update("jax_num_cpu_devices", 8)

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import v4jax  # noqa: E402
from v4jax import sharding as sh  # noqa: E402

out = {}
cfg = v4jax.ModelConfig.preset("tiny", quant_sim=False, compute_dtype="float32")
params = v4jax.init_params(cfg, jax.random.key(0), dtype="bf16")
# S = 512 so every seq shard is a multiple of 128 long; two packed documents, the boundary (300) inside a shard
S = 512
toks = jax.random.randint(jax.random.key(1), (2, S), 0, cfg.vocab_size)
seg = jnp.concatenate([jnp.ones((2, 300), jnp.int32), jnp.full((2, S - 300), 2, jnp.int32)], 1)
ref = v4jax.forward(cfg, params, toks, seg)
for spec in ["expert=8", "seq=4,expert=2", "data=2,seq=2,expert=2", "tensor=2,expert=4"]:
    mesh = sh.make_mesh(spec)
    with jax.set_mesh(mesh):
        ps = sh.place(cfg, params)
        t, sg = (jax.device_put(a, NamedSharding(mesh, P("data", "seq"))) for a in (toks, seg))
        got = v4jax.forward(cfg, ps, t, sg)
        hlo = jax.jit(lambda p, t, s: v4jax.forward(cfg, p, t, s)).lower(ps, t, sg).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather(" in line or "all-gather-start(" in line]
    shapes = [re.search(r"= \(?(\w+)\[([\d,]*)\]", g) for g in gathers]
    w1 = ps["layers"]["3"]["ffn"]["experts"]["w1"]["weight"]
    attn = ps["layers"]["0"]["attn"]
    out[spec] = {"err": float(jnp.max(jnp.abs(got - ref))), "expert_spec": str(w1.sharding.spec),
                 "head_specs": [str(attn[k]["weight"].sharding.spec) for k in ("wq_b", "wo_a")],
                 "local_experts": int(w1.addressable_shards[0].data.shape[0]),
                 # experts never move: no collective produces a full [E, F, D] expert stack
                 "gathers_experts": any(f"[{cfg.n_routed_experts},{cfg.moe_intermediate_size},{cfg.dim}]" in g
                                        for g in gathers),
                 # context parallelism: no float all-gather has a full-sequence dimension
                 "full_seq_float_gathers": [m.group(0) for m in shapes if m and m.group(1).startswith(("f", "bf"))
                                            and str(S) in m.group(2).split(",")]}

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


def decode_max_err(mesh, toks, prompt, n_steps, spec):
    """Max |sharded - unsharded| over the prefill logits and n_steps decode steps."""
    max_len = toks.shape[1] + 18
    lp, cache = v4jax.prefill(cfg, params, toks[:, :prompt], max_len=max_len)
    with jax.set_mesh(mesh):
        ps = sh.place(cfg, params)
        lps, caches = v4jax.prefill(cfg, ps, jax.device_put(toks[:, :prompt], NamedSharding(mesh, spec)),
                                    max_len=max_len)
        errs = [float(jnp.max(jnp.abs(lps - lp)))]
        for i in range(prompt, prompt + n_steps):
            a, cache = v4jax.decode_step(cfg, params, cache, toks[:, i])
            b, caches = v4jax.decode_step(cfg, ps, caches, toks[:, i])
            errs.append(float(jnp.max(jnp.abs(a - b))))
    return max(errs)


# decode with a sharded cache under data=2 x expert=4 (B=4: tokens split; B=1 would replicate)
out["decode_max_err"] = decode_max_err(mesh, jax.random.randint(jax.random.key(1), (4, 118), 0, cfg.vocab_size),
                                       100, 10, P("data"))
# decode after a context-parallel prefill (seq=4 x expert=2): the cache comes out of the seq shard_map
out["cp_decode_max_err"] = decode_max_err(sh.make_mesh("seq=4,expert=2"),
                                          jax.random.randint(jax.random.key(4), (2, 522), 0, cfg.vocab_size),
                                          512, 10, P(None, "seq"))
json.dump(out, sys.stdout)
