"""Time jit lowering + XLA compilation of the model's pieces on the current backend (a diagnostic).

    python scripts/compile_probe.py [case ...]        cases: fwd, grad, block0..blockN, all (default)

Each case prints: jaxpr equations, lowering seconds, compile seconds. Run one case per process with a timeout
to find the piece whose compile does not finish."""
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import yaml

from v4jax import model, params as P
from v4jax.config import ModelConfig

y = yaml.safe_load(open("configs/demo.yaml"))
cfg = ModelConfig.preset("tiny", **{k: tuple(v) if isinstance(v, list) else v for k, v in y["model"]["overrides"].items()})
B, S = int(__import__("os").environ.get("PROBE_B", 4)), int(__import__("os").environ.get("PROBE_S", 512))
abs_params = P.abstract_params(cfg, "bf16")
tokens = jax.ShapeDtypeStruct((B, S), jnp.int32)


def count_eqns(jaxpr) -> int:
    n = 0
    for e in jaxpr.eqns:
        n += 1
        for sub in jax.core.jaxprs_in_params(e.params) if hasattr(jax.core, "jaxprs_in_params") else []:
            n += count_eqns(sub)
    return n


def probe(name, fn, *args):
    t0 = time.time()
    low = jax.jit(fn).lower(*args)
    t1 = time.time()
    hlo = low.as_text()
    comp = low.compile()
    t2 = time.time()
    print(f"{name:10s} hlo_chars={len(hlo):>9,d} lower={t1 - t0:6.1f}s compile={t2 - t1:7.1f}s", flush=True)
    return comp


def fwd(p, t):
    return model.forward(cfg, p, t)


def loss(p, t):
    out = model.forward_train(cfg, p, t, remat=True)
    return jnp.mean(out["logits"].astype(jnp.float32) ** 2) + jnp.mean(out["mtp_logits"] ** 2)


def block(layer, p, X, t):
    return model.block_forward(cfg, p, layer, X, t)


def block_grad(layer, p, X, t):
    return jax.grad(lambda p, X: jnp.sum(model._block(cfg, model.block_params(p, cfg, layer), layer, X, t)[0]
                                         .astype(jnp.float32)), argnums=(0, 1), allow_int=True)(p, X)


cases = sys.argv[1:] or ["all"]
print(f"backend={jax.default_backend()} jax={jax.__version__} B={B} S={S}", flush=True)
X = jax.ShapeDtypeStruct((B, S, cfg.hc_mult, cfg.dim), jnp.bfloat16)
for c in cases:
    if c in ("fwd", "all"):
        probe("fwd", fwd, abs_params, tokens)
    if c.startswith("block") or c == "all":
        layers = range(cfg.n_layers + 1) if c in ("all", "blocks") else [int(c[5:])]
        for i in layers:
            probe(f"block{i}", partial(block, i), abs_params, X, tokens)
    if c.startswith("bgrad") or c == "all":
        layers = range(cfg.n_layers + 1) if c in ("all", "bgrads") else [int(c[5:])]
        for i in layers:
            probe(f"bgrad{i}", partial(block_grad, i), abs_params, X, tokens)
    if c in ("grad", "all"):
        probe("grad", jax.grad(loss, allow_int=True), abs_params, tokens)

# component gradients of one block: gattnN (attention.prefill), gmoeN (moe), ghcN (mHC pre/post around nothing)
from v4jax import attention as A, moe as M
from v4jax.hyper import hc_post, hc_pre
from v4jax.layers import rope_inv_freq

x2 = jax.ShapeDtypeStruct((B, S, cfg.dim), jnp.bfloat16)


def g_attn(layer, p, x):
    pb = model.block_params(p, cfg, layer)
    return jax.grad(lambda pa, x: jnp.sum(A.prefill(cfg, pa, layer, x, rope_inv_freq(cfg, layer), None, None)[0]
                                          .astype(jnp.float32)), argnums=(0, 1), allow_int=True)(pb["attn"], x)


def g_moe(layer, p, x, t):
    pb = model.block_params(p, cfg, layer)
    return jax.grad(lambda pm, x: jnp.sum(M.moe(cfg, pm, layer, x, t).astype(jnp.float32)), argnums=(0, 1),
                    allow_int=True)(pb["ffn"], x)


def g_hc(layer, p, X):
    pb = model.block_params(p, cfg, layer)

    def f(pb, X):
        y, post, comb = hc_pre(X, pb["hc_attn_fn"], pb["hc_attn_scale"], pb["hc_attn_base"],
                               norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, iters=cfg.hc_sinkhorn_iters)
        return jnp.sum(hc_post(X, y, post, comb).astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1), allow_int=True)(pb, X)


for c in cases:
    if c.startswith("gattn"):
        probe(c, partial(g_attn, int(c[5:])), abs_params, x2)
    if c.startswith("gmoe"):
        probe(c, partial(g_moe, int(c[4:])), abs_params, x2, tokens)
    if c.startswith("ghc"):
        probe(c, partial(g_hc, int(c[3:])), abs_params, X)
