#!/usr/bin/env python
"""fp32 linears on the GPU: the fp32 einsum (precision HIGHEST, no tensor cores) vs `layers.split_matmul`
(exact bf16 parts of the fp32 operands through bf16 tensor-core GEMMs, custom VJP).

    python scripts/probe_f32_linear.py [--rows 4096,8192] [--shapes head,compressor] [--json F]
    python scripts/probe_f32_linear.py --shrink 64 --rows 64     # a quick CPU check that the script runs

Weights [O, K] bf16: the output head [129280, 4096] and a compressor-like [1024, 4096] (`--shapes`). For each
M (rows of x), times the forward (y = x @ W^T, fp32 out) and forward + backward (y, dx, dW through jax.vjp with a
fixed fp32 cotangent), each in its own jit, for the formulations
  einsum          `layers._matmul(x, W.astype(fp32))`: what `linear_f32` runs off the GPU path (the old GPU path);
  split           `layers.split_matmul(x, W)`, stacking picked by shape (what `linear_f32` runs now on GPU);
  split rows / split inner   the two stackings forced (see `layers._parts_dot`);
  split bf16-x    a bf16 x (the model's head/compressor/router inputs are bf16 activations): forward in one GEMM.
TFLOP/s counts the logical fp32 work, 2*M*O*K per product (fwd: 1 product, fwd+bwd: 3), so the split rows are
directly comparable with the einsum's (the split runs 3x / 9x that many bf16 FLOPs: 1x / 6x for bf16 x).

Before timing, a numerics check on the device at a small shape: split_matmul's forward, dx and dW (and the fp32
einsum's) against float64 on the host, relative to the summation scale sum |a||b| -- the forward and dx should be
~1e-7 (fp32 rounding; a bf16-rounded x would give ~1e-3, i.e. XLA dropped the split's roundings), dW (bf16x3,
before its bf16 rounding) <= 3 * 2^-16 ~ 4.6e-5.

The CLIs' default XLA flags (`v4jax.xla_flags`: Triton GEMMs off, cuBLAS for every matmul) are applied unless
XLA_FLAGS already names them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4jax.xla_flags import apply_defaults  # noqa: E402

apply_defaults()                                     # before JAX starts its backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from v4jax import bench, layers  # noqa: E402

f32, bf16 = jnp.float32, jnp.bfloat16
SHAPES = {"head": (129280, 4096), "compressor": (1024, 4096)}


def _forms():
    return {
        "einsum": (f32, lambda x, w: layers._matmul(x, w.astype(f32))),
        "split": (f32, lambda x, w: layers.split_matmul(x, w)),
        "split rows": (f32, lambda x, w: layers.split_matmul(x, w, stack="rows")),
        "split inner": (f32, lambda x, w: layers.split_matmul(x, w, stack="inner")),
        "split bf16-x": (bf16, lambda x, w: layers.split_matmul(x, w)),
    }


def _fwd_bwd(fn):
    def run(x, w, ct):
        y, vjp = jax.vjp(fn, x, w)
        dx, dw = vjp(ct)
        return y, dx, dw
    return run


def check_numerics(log, M=256, O=1024, K=4096) -> dict:
    """split_matmul (and the fp32 einsum) vs float64 on the host: max error / summation scale."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((M, K)) * np.exp2(r.integers(-20, 21, (M, K))), f32)
    w = jnp.asarray(r.standard_normal((O, K)) * 0.02, bf16)
    ct = jnp.asarray(r.standard_normal((M, O)), f32)
    X, W, G = (np.asarray(a.astype(f32), np.float64) for a in (x, w, ct))
    out = {}
    for name, fn in (("split", layers.split_matmul), ("einsum", lambda a, b: layers._matmul(a, b.astype(f32)))):
        y, dx, _ = jax.jit(_fwd_bwd(fn))(x, w, ct)
        e = lambda v, ex, sc: float((np.abs(np.asarray(v, np.float64) - ex) / sc).max())
        out[name] = dict(fwd=e(y, X @ W.T, np.abs(X) @ np.abs(W).T), dx=e(dx, G @ W, np.abs(G) @ np.abs(W)))
    out["split"]["dw_f32"] = float((np.abs(np.asarray(jax.jit(layers._dw)(ct, x), np.float64) - G.T @ X)
                                    / (np.abs(G).T @ np.abs(X))).max())
    xb = np.asarray(x.astype(bf16).astype(f32), np.float64)
    out["x rounded to bf16"] = dict(fwd=float((np.abs(xb @ W.T - X @ W.T) / (np.abs(X) @ np.abs(W).T)).max()))
    for k, v in out.items():
        log(f"  numerics [{M}x{K}] @ [{O}x{K}]^T  {k:18s} " + "  ".join(f"{a} {b:.2e}" for a, b in v.items()))
    ok = out["split"]["fwd"] < 1e-5 and out["split"]["dx"] < 1e-5 and out["split"]["dw_f32"] < 1e-4
    log(f"  numerics {'OK' if ok else 'FAILED (split roundings dropped?)'}")
    out["ok"] = ok
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="4096,8192")
    ap.add_argument("--shapes", default="head,compressor")
    ap.add_argument("--forms", default=",".join(_forms()))
    ap.add_argument("--no-bwd", action="store_true", help="time the forward only")
    ap.add_argument("--shrink", type=int, default=1, help="divide every dim (weight and rows) by this (a CPU check)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    log, lines = bench.line_logger()
    log(f"device={jax.devices()[0].device_kind}  XLA_FLAGS={__import__('os').environ.get('XLA_FLAGS', '')!r}  "
        f"split backend={layers.split_backend()}")
    sh = args.shrink
    numerics = check_numerics(log, *(max(16, v // sh) for v in (256, 1024, 4096)))
    forms = {k: v for k, v in _forms().items() if k in args.forms.split(",")}
    key = jax.random.PRNGKey(0)
    res = []
    log("| weight [O, K] | M | formulation | pass | ms | TFLOP/s (fp32-equivalent) | x einsum |")
    log("|---|---|---|---|---|---|---|")
    for sname in args.shapes.split(","):
        O, K = (max(16, v // sh) for v in SHAPES[sname])
        w = (jax.random.normal(jax.random.fold_in(key, 1), (O, K), f32) * 0.02).astype(bf16)
        for M in (max(16, int(m) // sh) for m in args.rows.split(",")):
            x32 = jax.random.normal(jax.random.fold_in(key, M), (M, K), f32)
            ct = jax.random.normal(jax.random.fold_in(key, M + 1), (M, O), f32)
            base = {}
            for fname, (xdt, fn) in forms.items():
                x = x32.astype(xdt)
                passes = [("fwd", jax.jit(fn), (x, w), 1)]
                if not args.no_bwd:
                    passes.append(("fwd+bwd", jax.jit(_fwd_bwd(fn)), (x, w, ct), 3))
                for pname, f, a, n in passes:
                    try:
                        t = bench.time_fn(f, [a], min_samples=5)
                    except Exception as e:  # noqa: BLE001
                        log(f"| {sname} [{O}, {K}] | {M} | {fname} | {pname} | fail: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]} | | |")
                        continue
                    tf = n * 2.0 * M * O * K / t / 1e12
                    if fname == "einsum":
                        base[pname] = t
                    rel = f"{base[pname] / t:.2f}x" if pname in base else ""
                    res.append(dict(weight=sname, O=O, K=K, M=M, form=fname, pass_=pname, ms=t * 1e3, tflops=tf))
                    log(f"| {sname} [{O}, {K}] | {M} | {fname} | {pname} | {t * 1e3:.2f} | {tf:.1f} | {rel} |")
            del x32, ct
        del w
    if args.json:
        Path(args.json).write_text(json.dumps(dict(numerics=numerics, results=res, lines=lines), indent=1))
    return 0 if numerics["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
