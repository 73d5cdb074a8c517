#!/usr/bin/env python
"""Decode-shaped linears on the GPU: what one FP8 / bf16-head matmul costs at M = 1..64 rows, per formulation.

    python scripts/probe_linear.py [--rows 1,32] [--json F]

Each case runs 16 calls inside one jit on 16 distinct weights and inputs (4 for the head), so nothing is
shared or served from L2, and reports
microseconds per call, the weight bytes per call and the achieved GB/s against the measured copy bandwidth.
Formulations: `xla` = v4jax.layers as the model runs it (weight dequantised by XLA, then a GEMM); `kernel` =
pallas_kernels.linear (if present); `bf16` = a plain bf16 weight of the same shape (cuBLAS, 2 bytes/param).
Run once with the default XLA flags of the CLIs and once with XLA_FLAGS=--xla_gpu_enable_triton_gemm=true to see
whether XLA fuses the dequantisation into a Triton GEMM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from v4jax import bench, layers, quant  # noqa: E402

SHAPES = {"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_b": (4096, 8192),
          "shared_w1": (2048, 4096), "shared_w2": (4096, 2048)}
HEAD = (129280, 4096)
REPS = 16


def _fp8_nodes(key, O, K, n):
    out = []
    for i in range(n):
        w = jax.random.normal(jax.random.fold_in(key, i), (O, K), jnp.float32) * 0.02
        w8, s = quant.quantize_fp8_weight(w)
        out.append({"weight": w8, "scale": s})
    return out


def _timed(fn, x, ws):
    """Seconds per call of fn over len(ws) distinct weights and inputs in one jit (nothing XLA could share)."""
    def many(x, ws):
        acc = None
        for i, w in enumerate(ws):
            y = fn(x + jnp.asarray(i, x.dtype), w).astype(jnp.float32)
            acc = y if acc is None else acc + y
        return acc
    f = jax.jit(many)
    return bench.time_fn(f, [(x, ws)], min_samples=7) / len(ws)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shrink", type=int, default=1, help="divide every weight dim by this (a CPU check)")
    args = ap.parse_args(argv)
    log, lines = bench.line_logger()
    log(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  device={jax.devices()[0].device_kind}")
    bw = bench.measure_copy_bw()
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    try:
        from pallas_kernels import linear as klin
    except ImportError:
        klin = None
    global HEAD
    sh = args.shrink
    shapes = {k: (o // sh, i // sh) for k, (o, i) in SHAPES.items()}
    HEAD = (HEAD[0] // sh, HEAD[1] // sh)

    def xla_fp8(x, w):          # what layers.linear_fp8 runs off the kernel path: XLA dequantise, then a GEMM
        return quant.round_to(layers._matmul(x, layers.weight(w, jnp.bfloat16)), jnp.bfloat16)
    key = jax.random.PRNGKey(0)
    rows = [int(r) for r in args.rows.split(",")]
    res = []
    log("| weight | M | formulation | us | weight MB | GB/s | % copy BW |")
    log("|---|---|---|---|---|---|---|")

    def report(name, M, form, t, nbytes):
        if t is None:
            log(f"| {name} | {M} | {form} | fail | | | |")
            return
        gbs = nbytes / t / 1e9
        res.append(dict(weight=name, M=M, form=form, us=t * 1e6, mb=nbytes / 1e6, gbs=gbs))
        log(f"| {name} | {M} | {form} | {t * 1e6:.1f} | {nbytes / 1e6:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f} |")

    for name, (O, K) in shapes.items():
        nodes = _fp8_nodes(key, O, K, REPS)
        wb = [jax.random.normal(jax.random.fold_in(key, 100 + i), (O, K), jnp.bfloat16) for i in range(REPS)]
        for M in rows:
            x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
            for form, fn, ws, nb in [
                    ("xla (quant_sim)", lambda x, w: xla_fp8(quant.fp8_sim(x, 128), w), nodes, O * K),
                    ("xla (no sim)", xla_fp8, nodes, O * K),
                    ("bf16 weight", lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32), wb, 2 * O * K)]\
                    + ([("kernel", lambda x, w: klin.linear(x, w, backend="gpu"), nodes, O * K)] if klin else []):
                try:
                    t = _timed(fn, x, ws)
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} M={M} {form}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    t = None
                report(name, M, form, t, nb)
        del nodes, wb

    head = [{"weight": jax.random.normal(jax.random.fold_in(key, i), HEAD, jnp.bfloat16) * 0.02} for i in range(4)]
    for M in rows:
        x = jax.random.normal(key, (M, HEAD[1]), jnp.float32)

        def split3(x, w):
            hi = x.astype(jnp.bfloat16)
            r = x - hi.astype(jnp.float32)
            mid = r.astype(jnp.bfloat16)
            lo = (r - mid.astype(jnp.float32)).astype(jnp.bfloat16)
            y = jnp.einsum("pmk,ok->pmo", jnp.stack([hi, mid, lo]), w["weight"], preferred_element_type=jnp.float32)
            return y[0] + y[1] + y[2]
        forms = [("xla linear_f32", lambda x, w: layers._matmul(x, layers.weight(w, jnp.float32))),
                 ("xla bf16x3", split3)]
        if klin:
            forms.append(("kernel (bf16x3)", lambda x, w: klin.linear(x, w, backend="gpu")))
        for form, fn in forms:
            try:
                t = _timed(fn, x, head)
            except Exception as e:  # noqa: BLE001
                log(f"  head M={M} {form}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                t = None
            report("head", M, form, t, 2 * HEAD[0] * HEAD[1])
    if args.json:
        Path(args.json).write_text(json.dumps(dict(bw=bw, flags=os.environ.get("XLA_FLAGS", ""), results=res,
                                                   lines=lines), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
