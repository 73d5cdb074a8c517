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


def all_gathers(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "all-gather(" in line or "all-gather-start(" in line]


def full_seq_float_gathers(gathers: list[str], S: int) -> list[str]:
    """The float all-gathers whose result has a dimension of the full sequence length S."""
    shapes = [re.search(r"= \(?(\w+)\[([\d,]*)\]", g) for g in gathers]
    return [m.group(0) for m in shapes if m and m.group(1).startswith(("f", "bf")) and str(S) in m.group(2).split(",")]


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
    gathers = all_gathers(hlo)
    w1 = ps["layers"]["3"]["ffn"]["experts"]["w1"]["weight"]
    attn = ps["layers"]["0"]["attn"]
    out[spec] = {"err": float(jnp.max(jnp.abs(got - ref))), "expert_spec": str(w1.sharding.spec),
                 "head_specs": [str(attn[k]["weight"].sharding.spec) for k in ("wq_b", "wo_a")],
                 "local_experts": int(w1.addressable_shards[0].data.shape[0]),
                 # experts never move: no collective produces a full [E, F, D] expert stack
                 "gathers_experts": any(f"[{cfg.n_routed_experts},{cfg.moe_intermediate_size},{cfg.dim}]" in g
                                        for g in gathers),
                 # context parallelism: no float all-gather has a full-sequence dimension
                 "full_seq_float_gathers": full_seq_float_gathers(gathers, S)}

# gradients (training path) under data=2 x expert=4; fp32 parameters (bf16 ones would round every gradient to bf16:
# ~8e-3 of a leaf's max whatever the sharding does)
tcfg = v4jax.ModelConfig.preset("tiny-pro", quant_sim=False, compute_dtype="float32")
f32_params = lambda p: jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, p)
tp = f32_params(v4jax.init_params(tcfg, jax.random.key(2), dtype="bf16"))
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


def rel_errors(g: dict, g_ref: dict) -> dict:
    """Per leaf: max |g - g_ref| / max |g_ref| (integer leaves, float0 gradients, are skipped)."""
    rel = {}
    for k, v in g_ref.items():
        if v.dtype == jax.dtypes.float0:
            continue
        v, w = np.asarray(v, np.float32), np.asarray(g[k], np.float32)
        rel[k] = float(np.max(np.abs(w - v))) / (float(np.max(np.abs(v))) + 1e-12)
    return rel


rel = rel_errors(g, g_ref)
out["grad_max_rel"] = max(rel.values())
out["grad_worst"] = max(rel, key=rel.get)

# gradients under context parallelism (seq=4 x expert=2, data=2 x seq=2 x expert=2): S = 512 so each seq shard
# is a multiple of 128 long, two packed documents with the boundary (300) inside a shard, the batch placed as
# bench_train does (rows over data, the sequence over seq). A 2-layer tiny-pro (CSA with hash routing, HCA, and
# the window-only MTP block: every cross-shard exchange, at half tiny-pro's compile time) with fp32 parameters,
# so the gradients come out in fp32: with bf16 parameters every leaf's error is about one bf16 ulp of its max
# (8e-3) whatever the sharding does, which would hide a wrong contribution from a few tokens.
ccfg = tcfg.replace(num_hidden_layers=2, num_hash_layers=1, compress_ratios=(4, 128, 0))
cp32 = f32_params(v4jax.init_params(ccfg, jax.random.key(2), dtype="bf16"))
ct = jax.random.randint(jax.random.key(5), (2, S), 0, ccfg.vocab_size)


def seg_loss(p, t, s):
    o = v4jax.forward_train(ccfg, p, t, s, remat=False)
    lp = jax.nn.log_softmax(o["logits"][:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, t[:, 1:, None], -1)) + 1e-2 * jnp.sum(o["balance"])


seg_grad = jax.jit(jax.grad(seg_loss, allow_int=True))
cg_ref = v4jax.params.flatten(seg_grad(cp32, ct, seg))   # seg: the forward's packed documents
for spec in ["seq=4,expert=2", "data=2,seq=2,expert=2"]:
    mesh_cp = sh.make_mesh(spec)
    with jax.set_mesh(mesh_cp):
        ps = sh.place(ccfg, cp32)
        t, sg = (jax.device_put(a, NamedSharding(mesh_cp, P("data", "seq"))) for a in (ct, seg))
        compiled = seg_grad.lower(ps, t, sg).compile()           # one compile: its HLO and its gradients
        rel = rel_errors(v4jax.params.flatten(compiled(ps, t, sg)), cg_ref)
    out[f"grad {spec}"] = {"max_rel": max(rel.values()), "worst": max(rel, key=rel.get),
                           "full_seq_float_gathers": full_seq_float_gathers(all_gathers(compiled.as_text()), S)}

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


# chunked prefill under expert=8 (4 chunks of 40 positions; S = 160 is no model dimension): no float all-gather of
# the full sequence (the chunk buffers once came out split over `expert` along the sequence, and every chunk's
# dynamic slice / update all-gathered the whole buffer). Values: sharding constraints do not change them, and the
# chunking itself is checked against the unchunked prefill in tests/test_prefill_chunked.py.
mesh8 = sh.make_mesh("expert=8")
with jax.set_mesh(mesh8):
    ps = sh.place(cfg, params)
    t = jax.device_put(jax.random.randint(jax.random.key(5), (4, 160), 0, cfg.vocab_size), NamedSharding(mesh8, P()))
    hlo = jax.jit(lambda p, t: v4jax.prefill(cfg, p, t, max_len=168, chunk_tokens=160)[0]).lower(ps, t).compile()
    out["chunked_prefill_full_seq_float_gathers"] = full_seq_float_gathers(all_gathers(hlo.as_text()), 160)

# decode with a sharded cache under data=2 x expert=4 (B=4: tokens split; B=1 would replicate)
out["decode_max_err"] = decode_max_err(mesh, jax.random.randint(jax.random.key(1), (4, 118), 0, cfg.vocab_size),
                                       100, 10, P("data"))
# decode after a context-parallel prefill (seq=4 x expert=2): the cache comes out of the seq shard_map
out["cp_decode_max_err"] = decode_max_err(sh.make_mesh("seq=4,expert=2"),
                                          jax.random.randint(jax.random.key(4), (2, 522), 0, cfg.vocab_size),
                                          512, 10, P(None, "seq"))
json.dump(out, sys.stdout)
