#!/usr/bin/env python
"""The FP4 expert kernel's decode split at few tokens (GPU): time the kernel-layout launch at split_k = 1, 2, 4, 8,
16 for the Flash w13 / w2 at 1 and 2 tokens of top-6 routing, to see the wave quantisation (Nsight Compute,
session 12: at one token the default split 4 gives 768 programs for 4 x 132 resident slots, 1.45 waves).

    python scripts/probe_decode_split.py [--tokens 1,2] [--splits 1,2,4,8,16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.grouped_matmul import gpu as gmg  # noqa: E402
from v4jax import bench, quant  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2")
    ap.add_argument("--splits", default="1,2,4,8,16")
    args = ap.parse_args(argv)
    E, k, reps = 256, 6, 16
    for name, (O, K) in (("w13", (4096, 4096)), ("w2", (4096, 2048))):
        w4, s4 = jax.jit(lambda kk: quant.quantize_fp4_weight(
            jax.random.normal(kk, (E, O, K), jnp.bfloat16) * 0.02))(jax.random.key(0))
        wh = jax.jit(quant.fp4_to_halves)(w4)
        for B in (int(t) for t in args.tokens.split(",")):
            rng = np.random.default_rng(B)
            xs, gss = [], []
            for i in range(reps):
                ids = np.stack([rng.choice(E, k, replace=False) for _ in range(B)]).reshape(-1)
                gss.append(jnp.asarray(np.bincount(ids, minlength=E).astype(np.int32)))
                xs.append(quant.fp8_sim(jax.random.normal(jax.random.key(i), (B * k, K), jnp.bfloat16), 128))
            ref = None
            for s in (int(v) for v in args.splits.split(",")):
                def many(xs, gss, w, sc, s=s):
                    ys = [gmg.grouped_matmul(x, w, g, sc, x_fp8=True, split_k=s) for x, g in zip(xs, gss)]
                    return sum(y.astype(jnp.float32).sum() for y in ys), ys[0]
                f = jax.jit(many)
                try:
                    t = bench.time_fn(f, [(xs, gss, wh, s4)], min_samples=5, max_total_s=1.0) / reps
                    y = np.asarray(f(xs, gss, wh, s4)[1], np.float32)
                except Exception as e:  # noqa: BLE001
                    print(f"| {name} | {B} | {s} | {type(e).__name__} |")
                    continue
                ref = y if ref is None else ref
                err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
                print(f"| {name} | {B} | {s} | {t * 1e6:.1f} | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
