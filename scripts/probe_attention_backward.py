#!/usr/bin/env python
"""The sparse-attention backward at training shapes: reference VJP vs pool backward vs the Pallas/Triton kernel.

    python scripts/probe_attention_backward.py [--heads 16,64] [--seq 8192] [--methods reference,pool,kernel]
                                               [--sweep] [--json F]
    python scripts/probe_attention_backward.py --shrink 32          # a CPU check (kernels in interpret mode)

Shapes (`bench train --size 1b` at 8K tokens, and Flash's 64 heads): B = 1, S tokens, H heads, K = 512,
pool N = S window rows + S/4 compressed entries (CSA, m = 4), lists T = 128 window entries (s-127..s, -1 before
the start) + 512 top-k compressed entries (distinct, visible ones only: entry c is visible to query s when
c < (s+1)/4; -1 for the rest), bf16 q/kv/dO.

Methods (one jit each, time per call, the median of bench.time_fn):
  reference  the VJP of pallas_kernels.sparse_attention.reference (what `_bwd` ran for long pools before the kernel:
             it gathers [B, S, T, K] rows and scatter-adds their gradients)
  pool       backward.pool_backward (dense over the pool; `_bwd` uses it when N <= 8 T)
  kernel     gpu_backward.sparse_attention_bwd at its default launch; with --sweep also the launch variants of
             SWEEP (heads per program, list block, K chunk, warps, stages); a variant that fails to compile
             (e.g. Triton out of shared memory) is reported as "fail" with the error's first line
  banded     banded_backward.banded_backward with the lists' Layout (window band + causal compressed part, dense
             XLA matmuls, no atomics; what `_bwd` runs for the model's prefill lists since session 10)
  forward    gpu.sparse_attention (the forward kernel), for scale
Every method's results are checked against the exact gradient at the same (bf16-valued) inputs: pool_backward
on fp32 copies (fp32 "highest" matmuls, no bf16 rounding anywhere); the column is max |diff| / max |exact| per
output (dq / dkv / dsink; dkv's last bits vary run to run in the kernel: fp32 atomics). The reference VJP is not
the exact gradient either: JAX's VJP of its bf16 rounding of probabilities rounds dP to bf16. --no-check skips.
Other columns: ms per call, and the matmul TFLOP/s of the kernel's work (6 [H x K] x [K x T] products per row:
scores twice, dP, dq, two for dkv; the forward: 2) -- the same count for every backward method, so it is a speed
ratio, not each method's own arithmetic. XLA flags: the CLIs' defaults (v4jax.xla_flags) unless XLA_FLAGS sets them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4jax.xla_flags import apply_defaults  # noqa: E402

apply_defaults()                     # before JAX starts: the CLIs' XLA flags (Triton GEMMs off), as training runs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.sparse_attention import backward as pool_bw  # noqa: E402
from pallas_kernels.sparse_attention import banded_backward as bbw  # noqa: E402
from pallas_kernels.sparse_attention import gpu as sa_gpu  # noqa: E402
from pallas_kernels.sparse_attention import gpu_backward as gbw  # noqa: E402
from pallas_kernels.sparse_attention.reference import sparse_attention as reference  # noqa: E402
from v4jax import bench  # noqa: E402

WINDOW, TOPK, RATIO, K = 128, 512, 4, 512
SWEEP = [dict(num_warps=8),
         dict(block=64, num_warps=8),
         dict(block=16),
         dict(k_chunk=64),
         dict(k_chunk=256, num_warps=8),
         dict(k_chunk=512, num_warps=8),
         dict(num_stages=2),
         dict(heads_per_program=32, block=16, num_warps=8),
         dict(heads_per_program=32, block=32, k_chunk=64, num_warps=8),
         dict(heads_per_program=64, block=16, k_chunk=64, num_warps=8),
         dict(num_warps=8, num_stages=2),
         dict(block=16, num_warps=8),
         dict(k_chunk=64, num_warps=8),
         dict(block=64, k_chunk=64, num_warps=8)]


def make_inputs(S: int, H: int, K: int, window: int, topk: int, ratio: int, seed: int = 0):
    """q, kv, idx, sink, dO at one training shape (B = 1); see the module docstring."""
    C = S // ratio
    N = S + C
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(k[0], (1, S, H, K), jnp.bfloat16)
    kv = jax.random.normal(k[1], (1, N, K), jnp.bfloat16)
    sink = jax.random.normal(k[2], (H,), jnp.float32)
    g = jax.random.normal(k[3], (1, S, H, K), jnp.bfloat16)
    s = jnp.arange(S)[:, None]
    w = s - (window - 1) + jnp.arange(window)[None, :]
    w = jnp.where(w >= 0, w, -1)
    n_vis = (s + 1) // ratio                                                    # [S, 1]
    keys = jnp.where(jnp.arange(C)[None, :] < n_vis, jax.random.uniform(k[4], (S, C)), 2.0)
    top = jnp.argsort(keys, axis=1)[:, :topk].astype(jnp.int32)                 # distinct; visible ones first
    top = jnp.where(jnp.arange(top.shape[1])[None, :] < n_vis, top + S, -1)
    if top.shape[1] < topk:
        top = jnp.pad(top, ((0, 0), (0, topk - top.shape[1])), constant_values=-1)
    idx = jnp.concatenate([w, top], axis=1).astype(jnp.int32)[None]
    return q, kv, idx, sink, g


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="16,64")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--methods", default="reference,pool,kernel,banded,forward")
    ap.add_argument("--sweep", action="store_true", help="also time the kernel launch variants of SWEEP")
    ap.add_argument("--shrink", type=int, default=1,
                    help="divide S, K, the window and top-k by this (a CPU check: kernels run in interpret mode)")
    ap.add_argument("--no-check", action="store_true", help="skip the exact-gradient check")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sh = args.shrink
    S, Kd, W, TK = args.seq // sh, max(16, K // sh), max(1, WINDOW // sh), max(1, TOPK // sh)
    interpret = jax.default_backend() == "cpu"
    methods = args.methods.split(",")
    log, lines = bench.line_logger()
    log(f"device={jax.devices()[0].device_kind}  jax {jax.__version__}  interpret={interpret}  "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    res = []
    log("| H | S | N | T | method | launch | ms | TFLOP/s | err vs exact: dq / dkv / dsink | same bits twice |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    scale = K ** -0.5
    for H in (int(h) for h in args.heads.split(",")):
        q, kv, idx, sink, g = make_inputs(S, H, Kd, W, TK, RATIO)
        N, T = kv.shape[1], idx.shape[-1]
        flops = 6 * 2 * S * H * T * Kd
        fwd = jax.jit(lambda q, kv, idx, sink: sa_gpu.sparse_attention(q, kv, idx, sink, scale,
                                                                       interpret=interpret))
        out = fwd(q, kv, idx, sink)
        ref_fn = jax.jit(lambda q, kv, idx, sink, g: jax.vjp(
            lambda a, b, c: reference(a, b, idx, c, scale), q, kv, sink)[1](g))
        want = None
        if not args.no_check:
            f32 = lambda a: a.astype(jnp.float32)
            try:
                want = jax.jit(lambda q, kv, idx, sink, g: pool_bw.pool_backward(
                    f32(q), f32(kv), idx, sink, scale, f32(g)))(q, kv, idx, sink, g)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: no check, keep timing
                log(f"  exact gradient at H={H}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")

        def err(got):
            if want is None:
                return ""
            rel = []
            for a, b in zip(got, want):
                a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
                rel.append(f"{np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30):.1e}")
            return " / ".join(rel)

        cases = []
        if "reference" in methods:
            cases.append(("reference", "", ref_fn))
        if "pool" in methods:
            cases.append(("pool", "", jax.jit(lambda q, kv, idx, sink, g: pool_bw.pool_backward(
                q, kv, idx, sink, scale, g))))
        if "kernel" in methods:
            for kw in [dict()] + (SWEEP if args.sweep else []):
                if kw.get("heads_per_program", 0) > max(H, 16):
                    continue
                f = jax.jit(lambda q, kv, idx, sink, g, kw=kw: gbw.sparse_attention_bwd(
                    q, kv, idx, sink, out, g, scale, interpret=interpret, **kw))
                cases.append(("kernel", ",".join(f"{k}={v}" for k, v in kw.items()) or "default", f))
        if "banded" in methods:
            lay = bbw.Layout(window=W, comp_start=S, ratio=RATIO)
            cases.append(("banded", f"suits={bbw.suits(lay, N, T)}", jax.jit(
                lambda q, kv, idx, sink, g: bbw.banded_backward(q, kv, idx, sink, out, g, scale, lay))))
        for name, launch, fn in cases:
            try:
                got = fn(q, kv, idx, sink, g)
                again = fn(q, kv, idx, sink, g)
                same = all(bool(jnp.array_equal(a, b)) for a, b in zip(got, again))
                del again
                e = err(got)
                t = bench.time_fn(fn, [(q, kv, idx, sink, g)], min_samples=3, max_total_s=1.0)
            except Exception as ex:  # noqa: BLE001 - compile failures (resources) are results too
                log(f"| {H} | {S} | {N} | {T} | {name} | {launch} | fail | | {type(ex).__name__}: "
                    f"{str(ex).splitlines()[0][:120]} | |")
                continue
            res.append(dict(H=H, S=S, N=N, T=T, method=name, launch=launch, ms=t * 1e3, err=e, deterministic=same))
            log(f"| {H} | {S} | {N} | {T} | {name} | {launch} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} | {e} | "
                f"{'yes' if same else 'NO'} |")
            del got
        if "forward" in methods:
            t = bench.time_fn(fwd, [(q, kv, idx, sink)], min_samples=3, max_total_s=1.0)
            res.append(dict(H=H, S=S, N=N, T=T, method="forward", launch="", ms=t * 1e3, err=""))
            log(f"| {H} | {S} | {N} | {T} | forward | | {t * 1e3:.2f} | {flops / 3 / t / 1e12:.1f} | | |")
        del q, kv, idx, g, out, want
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results=res, lines=lines), indent=1))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
