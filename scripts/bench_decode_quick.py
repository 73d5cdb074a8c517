#!/usr/bin/env python
"""Quick decode bench of the GPU sparse attention (issue 4: split-list path), about 2 minutes on an H100.

    python scripts/bench_decode_quick.py [--json $OUT/decode.json] [--no-sweep] [--no-baselines] [--budget S]

1. correctness on the device (compiled kernels, not interpret mode): the dispatch's automatic path, the
   single-pass kernel, an exact split count and the inexact split (no max pre-pass) against a host float64
   emulation of the spec numerics (and of the inexact split's own numerics), and against the XLA reference; Flash
   and Pro decode shapes at batch 1 / 16 / 64 plus odd small shapes, -1 holes, ragged lists, an all-masked row.
2. roofline: device copy (bytes read + written) and bf16 matmul, measured now.
3. launch sweep at ctx 64K for batch 1 / 16 / 64: split counts (exact / inexact) and a few launch variants.
4. the decode table: Flash (H=64, T=640) and Pro (H=128, T=1152), batch 1 / 16 / 64, ctx 8K / 64K / 128K / 1M:
   the automatic path, the single-pass kernel, the jnp reference and dense-mask attention.
Every timed kernel output is also compared with the XLA reference on the same inputs ("check" column).
Timing: chains of 16 dependent calls in one jit (host dispatch amortised), median of >= 5 samples.
Progress goes to stdout (flush) with elapsed seconds; the tables are printed again at the end.
Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from v4jax import bench  # noqa: E402

QUICK_CASES = [(2, 3, 4, 128, 50, 150),            # odd: H=4 (padded to 16), T % 64 != 0, 3 blocks
               (1, 1, 64, 512, 4000, 640),          # Flash decode, batch 1 (auto: 10 splits)
               (16, 1, 128, 512, 3000, 1152),       # Pro decode, batch 16 (auto: 3 splits)
               (64, 1, 64, 512, 800, 640)]          # Flash decode, batch 64 (auto: one pass)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="flash,pro")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--ctx", default="8192,65536,131072,1048576")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch sweep at 64K")
    ap.add_argument("--full-sweep", action="store_true", help="more launch variants (slower)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the jnp reference / dense-mask timings")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; late rows skip baselines, then rows")
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 8), help="parallel compiles")
    ap.add_argument("--json", default=None)
    ap.add_argument("--interpret", action="store_true", help="CPU test of this script: kernels in interpret mode")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    log, lines = bench.line_logger()
    dev = jax.devices()[0]
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    log(f"device: {dev.device_kind} ({jax.default_backend()}, {getattr(dev, 'core_count', '?')} SMs), "
        f"jax {jax.__version__}; threads {args.threads}")
    ok = True
    if not args.no_check and (on_gpu or args.interpret):
        cases = QUICK_CASES if on_gpu else QUICK_CASES[:1]
        ok = bench.check_sparse_attention(log, "gpu", cases=cases, threads=args.threads, interpret=not on_gpu)
        log(f"check: {'all ok' if ok else 'FAILURES'}  [{time.perf_counter() - t0:.0f} s]")
    elif not args.no_check:
        log("check: no GPU; skipped (tests/test_kernels_sparse_attention.py covers interpret mode)")
    small = not on_gpu
    bw = bench.measure_copy_bw(64 << 20 if small else 1 << 30)
    peak = bench.measure_matmul_peak(512 if small else 8192)
    log(f"roofline: device copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {peak / 1e12:.0f} TFLOP/s  "
        f"[{time.perf_counter() - t0:.0f} s]")
    models = [m for m in args.models.split(",") if m]
    batches = tuple(int(b) for b in args.batches.split(","))
    ctxs = tuple(int(c) for c in args.ctx.split(","))
    sweep_ctx = 65536 if 65536 in ctxs else ctxs[0]
    sweep_rows, rows, sweep_lines, table = bench.run_decode(
        log, models=models, batches=batches, ctxs=ctxs, bw=bw, peak=peak, sweep_ctx=sweep_ctx,
        sweep=not args.no_sweep, full_sweep=args.full_sweep, baselines=not args.no_baselines,
        budget_s=args.budget, t_start=t0, threads=args.threads, max_total_s=0.25, interpret=args.interpret)
    bad = [r for r in rows if str(r.get("check", "")).startswith("FAIL")]
    bad += [r for r in sweep_rows if str(r.get("check", "")).startswith("FAIL")]
    ok &= not bad
    log("")
    log(f"roofline: device copy {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s; floor = max(bytes / "
        f"copy BW, flops / matmul peak); bytes = q + out + B x T x (1 KB row + 4 B index)")
    if len(sweep_lines) > 2:
        log(f"launch sweep at ctx {bench._ctx(sweep_ctx)} (sorted by time; 'x 1-pass' = speed-up over the single-pass "
            "kernel; exact splits add a block-max pre-pass launch):")
        for t in sweep_lines:
            log(t)
        log("")
    log("decode table (kernel = the automatic path of sparse_attention; splits = its split count, 1 = one pass):")
    for t in table:
        log(t)
    log(f"checks: {'all ok' if ok else 'FAILURES: ' + str(len(bad)) + ' timed outputs off the reference'}; "
        f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, copy_bw=bw, matmul_peak=peak, ok=ok,
                           sweep=sweep_rows, results=rows, log=lines), f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
