#!/usr/bin/env python
"""mHC Sinkhorn on the GPU: the jnp reference (XLA, fori_loop) against the Pallas kernels, forward and forward +
backward, at decode and training token counts.

    python scripts/probe_sinkhorn.py [--tokens 1,32,8192] [--n 4] [--iters 20] [--reps 16] [--json F]

Each case runs `reps` calls on distinct inputs inside one jit (as the model's decode step runs 86 of them), so
the per-call time includes the kernel launches and their gaps but not Python dispatch; it reports microseconds
per call and the compile time of the whole jit. "fwd+bwd" is jax.grad of sum(sinkhorn(c_i) * g) over the calls
(the kernel's custom VJP: the training forward writing residuals, then the backward kernel). Also prints the max
|kernel - reference| of the outputs and gradients (expected: a few ulp; CPU interpret mode measured 1.8e-7).

On CPU the kernel runs in interpret mode (a functional check of this script, not a timing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import sinkhorn as sk  # noqa: E402
from v4jax import bench  # noqa: E402

EPS = 1e-6


def _cases(n, iters, backend):
    """(forward fn, fwd+bwd fn), each jitted over a list of inputs (one call per input, nothing shared)."""
    def fwd(cs):
        return [sk.sinkhorn(c, iters, EPS, backend=backend) for c in cs]

    def loss(cs, gs):
        return sum(jnp.sum(sk.sinkhorn(c, iters, EPS, backend=backend) * g) for c, g in zip(cs, gs))

    return jax.jit(fwd), jax.jit(jax.grad(loss))


def _compile_s(f, *args):
    t0 = time.perf_counter()
    f.lower(*args).compile()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,32,8192", help="matrices per call (batch x sequence)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=16, help="calls per jit")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"n={a.n}, iters={a.iters}, {a.reps} calls per jit")
    if jax.default_backend() == "cpu":
        print("(CPU: the kernel runs in interpret mode -- a functional check, not a timing)")
    rows = []
    hdr = f"{'T':>6} {'mode':>8} {'reference us':>13} {'kernel us':>10} {'speedup':>8} " \
          f"{'ref compile s':>14} {'kern compile s':>15} {'max |diff|':>11}"
    print(hdr)
    print("-" * len(hdr))
    key = jax.random.PRNGKey(0)
    for T in (int(t) for t in a.tokens.split(",")):
        ks = jax.random.split(jax.random.fold_in(key, T), 2 * a.reps)
        cs = [jax.random.normal(k, (T, a.n, a.n), jnp.float32) * 3 for k in ks[:a.reps]]
        gs = [jax.random.normal(k, (T, a.n, a.n), jnp.float32) for k in ks[a.reps:]]
        fns = {be: _cases(a.n, a.iters, be) for be in ("reference", "gpu")}
        for mode, idx, args in (("fwd", 0, (cs,)), ("fwd+bwd", 1, (cs, gs))):
            res = {}
            for be in ("reference", "gpu"):
                f = fns[be][idx]
                comp = _compile_s(f, *args)
                us = bench.time_fn(f, [args], min_samples=5) / a.reps * 1e6
                res[be] = (us, comp, f(*args))
            diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
                       zip(jax.tree.leaves(res["gpu"][2]), jax.tree.leaves(res["reference"][2])))
            (ru, rc, _), (ku, kc, _) = res["reference"], res["gpu"]
            print(f"{T:>6} {mode:>8} {ru:>13.1f} {ku:>10.1f} {ru / ku:>7.1f}x {rc:>14.2f} {kc:>15.2f} {diff:>11.2e}")
            rows.append({"tokens": T, "mode": mode, "reference_us": ru, "kernel_us": ku, "reference_compile_s": rc,
                         "kernel_compile_s": kc, "max_abs_diff": diff})
    if a.json:
        Path(a.json).write_text(json.dumps({"device": jax.devices()[0].device_kind, "n": a.n, "iters": a.iters,
                                            "reps": a.reps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
