#!/usr/bin/env python
"""Run the decode kernels worth a hardware-counter look, a few times each, for Nsight Compute:

    XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none \
        --kernel-name regex:'grouped_matmul|sparse_attention' --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
        --section SchedulerStats python scripts/ncu_probe.py --reps 1 [--cases experts32,experts1,attn64]

Cases (Flash shapes, the model's own calls and launches):
  experts1 / experts32: the routed experts' w13 [256, 4096, 4096] FP4 in the halves layout (what
      `params.to_kernel_layout` gives), x FP8-representable (x_fp8: the FP8-dot decode launch), 1 / 32 tokens of
      top-6 routing; w2 [256, 4096, 2048] likewise.
  attn64: sparse attention decode, Flash B = 64, H = 64, K = 512, T = 640 entries per list, pool of 16K rows.
  topk<R>x<C>: the indexer top-k kernel (k = 512) on R rows of C bf16 scores, e.g. topk4096x16384 (prefill at 64K).
Each kernel runs 1 + --reps times (block_until_ready between). Run it with XLA_PYTHON_CLIENT_PREALLOCATE=false:
ncu saves and restores the device memory in use around every replayed kernel (JAX's preallocated pool: minutes).
Without ncu it prints the per-call time of each (a sanity check of the script).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.grouped_matmul import gpu as gmg  # noqa: E402
from pallas_kernels.sparse_attention import sparse_attention  # noqa: E402
from v4jax import quant  # noqa: E402

CPU = jax.default_backend() == "cpu"


def experts(tokens: int, shrink: int):
    E, k = 256 // shrink, 6
    out = []
    for name, (O, K) in (("w13", (4096, 4096)), ("w2", (4096, 2048))):
        O, K = O // shrink, K // shrink
        w4, s4 = jax.jit(lambda kk: quant.quantize_fp4_weight(
            jax.random.normal(kk, (E, O, K), jnp.bfloat16) * 0.02))(jax.random.key(0))
        w4h = jax.jit(quant.fp4_to_halves)(w4)
        rng = np.random.default_rng(tokens)
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(tokens)]).reshape(-1)
        sizes = jnp.asarray(np.bincount(ids, minlength=E).astype(np.int32))
        x = quant.fp8_sim(jax.random.normal(jax.random.key(1), (tokens * k, K), jnp.bfloat16), 128)
        f = jax.jit(lambda x, w, g, s: gmg.grouped_matmul(x, w, g, s, x_fp8=True, interpret=CPU))
        out.append((f"experts{tokens} {name}", f, (x, w4h, sizes, s4)))
    return out


def attention(B: int, shrink: int):
    H, K, T, N = 64 // shrink, 512 // shrink, 640 // shrink, 16384 // shrink
    ks = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(ks[0], (B, 1, H, K), jnp.bfloat16)
    kv = jax.random.normal(ks[1], (B, N, K), jnp.bfloat16)
    idx = jax.random.randint(ks[2], (B, 1, T), 0, N, jnp.int32)
    sink = jax.random.normal(ks[3], (H,), jnp.float32)
    f = jax.jit(lambda q, kv, idx, sink: sparse_attention(q, kv, idx, sink, K ** -0.5,
                                                          backend="gpu"))
    return [(f"attn{B}", f, (q, kv, idx, sink))]


def topk(rows: int, C: int, shrink: int):
    from pallas_kernels.indexer import gpu as ixg
    R, C, k = rows // shrink, C // shrink, 512 // shrink
    s = jax.random.normal(jax.random.key(3), (R, C), jnp.float32).astype(jnp.bfloat16)
    nv = jnp.full((R,), C, jnp.int32)
    f = jax.jit(lambda s, nv: ixg.index_topk(s, nv, k, interpret=CPU))
    return [(f"topk{rows}x{C}", f, (s, nv))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="experts1,experts32,attn64")
    ap.add_argument("--shrink", type=int, default=1, help="(a CPU check of the script) divide the shapes")
    ap.add_argument("--reps", type=int, default=3, help="timed calls after the first")
    args = ap.parse_args(argv)
    jobs = []
    for c in args.cases.split(","):
        if c.startswith("experts"):
            jobs += experts(int(c[7:]), args.shrink)
        elif c.startswith("attn"):
            jobs += attention(int(c[4:]), args.shrink)
        elif c.startswith("topk"):                                 # topk<rows>x<C>, k = 512
            jobs += topk(*map(int, c[4:].split("x")), args.shrink)
        else:
            raise SystemExit(f"ncu_probe: unknown case {c!r}")
    for name, f, a in jobs:
        jax.block_until_ready(f(*a))                       # compile + first call
        t = time.perf_counter()
        for _ in range(args.reps):
            jax.block_until_ready(f(*a))
        dt = (time.perf_counter() - t) / max(args.reps, 1)
        print(f"{name}: {dt * 1e6:.1f} us per call (host-timed, with dispatch)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
