#!/usr/bin/env python
"""Launch sweeps of the two decode matmul kernels at Flash shapes (GPU), to pick their defaults.

    python scripts/sweep_decode_kernels.py [--json F] [--quick] [--only linear,grouped] [--tokens 1,8,32]

1. `pallas_kernels.linear` (skinny FP8 linear) on wq_b [32768, 1024], wo_b [4096, 8192], wq_a [1024, 4096] at
   M = 1, 2, 4, 32 rows (`--rows`, `--linear-shapes`) with x FP8-simulated as `linear_fp8` does: XLA's fp8_sim +
   dequantise + einsum, the former kernel, and the new one (in-kernel fp8_sim and E8M0 decode, GEMV path for few
   rows) with its automatic launch and a launch sweep (`sweep_linear`).
2. `pallas_kernels.grouped_matmul` with FP4 experts (w1 [256, 2048, 4096], w2 [256, 4096, 2048]) at decode:
   N = 6, 48, 192 rows (batch 1, 8, 32 with top-6; `--tokens`), routed uniformly at random; bytes = the touched
   experts. Launches: the automatic one (DECODE_DEFAULTS + `decode_split_k`), block_n x num_warps x split_k
   (1, 2, 4, 8, 16 where it divides the K steps; `--splits`), block_k 64, and the FP4 decode variants unsplit and
   at the automatic split. `--quick`: block_n 64/128, 4 warps, block_k 128, two variants (~13 launches per case).
Every case: microseconds per call (16 distinct inputs per jit, nothing shared), GB/s of the weight bytes it must
read and the fraction of the measured copy bandwidth; every kernel output is checked against the reference.

Examples (GPU): `python scripts/sweep_decode_kernels.py --only grouped --quick --json $OUT/grouped.json`;
`--only grouped --tokens 1 --splits 1,4,8,16`; `--only linear --quick --rows 1,2 --json $OUT/linear.json`.
CPU check of the script (Pallas interpret mode, small shapes):
`python scripts/sweep_decode_kernels.py --only grouped --quick --shrink 8 --reps 2 --tokens 1,8 --max-total-s 0`,
`python scripts/sweep_decode_kernels.py --only linear --quick --shrink 8 --reps 2 --max-total-s 0`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import grouped_matmul as gm  # noqa: E402
from pallas_kernels.grouped_matmul import gpu as gmg  # noqa: E402
from pallas_kernels.linear import gpu as klg  # noqa: E402
from pallas_kernels.linear import reference as klref  # noqa: E402
from v4jax import bench, quant  # noqa: E402

REPS = 16
SHRINK = 1
CPU = jax.default_backend() == "cpu"


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


LINEAR_SHAPES = {"wq_b": (32768, 1024), "wo_b": (4096, 8192), "wq_a": (1024, 4096)}


def _linear_configs(M, O, K, quick):
    """Phase-1 launches of the new kernel (x_fp8=True) for M rows of an [O, K] FP8 weight: GEMV (M <= GEMV_ROWS):
    block_n x splits (every power-of-two split dividing the K steps; quick: within 4x of the automatic one); tensor
    cores: block_n x splits x stages as before (quick: stages 3, splits 1, 4, 16)."""
    steps = K // 128
    cfgs = []
    if M <= klg.GEMV_ROWS:
        auto = klg.gemv_launch(M, O, K, 1)
        for bn, sp in itertools.product((32, 64, 128), (1, 2, 4, 8, 16, 32, 64)):
            if O % bn or steps % sp or (quick and not auto[2] / 4 <= sp <= auto[2] * 4):
                continue
            cfgs.append(dict(block_n=bn, splits=sp))
        return cfgs
    for bn, sp, st in itertools.product((32, 64, 128), (1, 2, 4, 8, 16), (3, 5)):
        if O % bn or steps % sp or (quick and (st == 5 or sp in (2, 8))):
            continue
        cfgs.append(dict(block_n=bn, splits=sp, num_stages=st))
    return cfgs


def _gemv_variants(base, steps_per_program, quick):
    """Phase-2 GEMV launches around `base` (the fastest phase-1 launch): num_warps x accumulator x unroll x
    num_stages (quick: one change at a time, plus tile accumulator at 8 warps)."""
    unrolls = [u for u in (1, 2, 4) if steps_per_program % u == 0]
    if quick:
        out = [dict(num_warps=8), dict(gemv_acc="tile"), dict(gemv_acc="tile", num_warps=8), dict(num_stages=3)]
        out += [dict(unroll=u) for u in unrolls]
    else:
        out = [dict(num_warps=nw, gemv_acc=acc, unroll=u, num_stages=st) for nw, acc, u, st in
               itertools.product((4, 8), klg.GEMV_ACCS, unrolls, (1, 3))]
    return [dict(base, **v) for v in out]


def sweep_linear(log, bw, quick, rows=(1, 2, 4, 32), names=tuple(LINEAR_SHAPES), max_total_s=1.0):
    """The skinny FP8 linear at the Flash decode shapes (wq_b, wo_b, wq_a), M rows of bf16 x, as `linear_fp8` runs
    it under quant_sim: y = fp8_sim(x, 128) @ W^T. Rows per (shape, M):
      xla: fp8_sim + dequant + einsum -- what the model runs for one row (XLA fuses the dequantisation into its
           reduction) and, for more rows than the kernel serves, the dequantise-then-GEMM path;
      today: fp8_sim (XLA) + the tensor-core kernel with the E8M0 decode in XLA (the kernel before the GEMV path,
           in-kernel scale decode and x_fp8; at M = 1 the model does not use it);
      fp8_sim (XLA) + new kernel auto: the new kernel without x_fp8 (isolates the fp8_sim fusion);
      new x_fp8 ...: the new kernel with x_fp8=True: "auto" (the automatic path and launch), for M <= GEMV_ROWS the
           tensor-core path forced, then the launch sweep (`_linear_configs`, and for GEMV `_gemv_variants` around
           the fastest block_n x splits).
    us per call (REPS distinct weights and inputs in one jit; each output behind an optimization barrier so the
    kernel's split sum is not fused into the timing harness), GB/s and % of the copy bandwidth for the weight bytes
    (FP8 + scales), and err = max |y - ref| / max |ref| against the fp32 reference (fp8_sim, then dequantise +
    einsum): all paths compute exact products, so err is fp32 summation order (~1e-6)."""
    key = jax.random.PRNGKey(0)
    shapes = {k: (o // SHRINK, i // SHRINK) for k, (o, i) in LINEAR_SHAPES.items() if k in names}
    best = {}
    ref_fn = jax.jit(lambda x, w, s: klref.linear(x, w, s, x_fp8=True))
    for name, (O, K) in shapes.items():
        mk = jax.jit(lambda kk: quant.quantize_fp8_weight(jax.random.normal(kk, (O, K), jnp.float32) * 0.02))
        ws, ss = (list(v) for v in zip(*(mk(jax.random.fold_in(key, i)) for i in range(REPS))))
        nbytes = O * K + ss[0].size
        for M in rows:
            xs = [jax.random.normal(jax.random.fold_in(key, 50 + i), (M, K), jnp.bfloat16) for i in range(REPS)]
            ref = np.asarray(ref_fn(xs[0], ws[0], ss[0]), np.float64)
            gemv = M <= klg.GEMV_ROWS
            auto = klg.gemv_launch(M, O, K, 1) if gemv else klg.launch(M, O, K, 1)
            log(f"linear {name} [{O}, {K}] FP8, M = {M} ({'GEMV' if gemv else 'tensor cores'} by default; auto "
                f"launch {auto})")

            def run(tag, fn):
                def many(xs, ws, ss):
                    acc = first = None
                    for x, w, s in zip(xs, ws, ss):
                        y = jax.lax.optimization_barrier(fn(x, w, s))
                        first = y if first is None else first
                        acc = y if acc is None else acc + y
                    return acc, first
                f = jax.jit(many)
                try:
                    t = bench.time_fn(f, [(xs, ws, ss)], min_samples=5, max_total_s=max_total_s) / REPS
                    y = np.asarray(f(xs, ws, ss)[1], np.float64)
                    err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
                except Exception as e:  # noqa: BLE001
                    log(f"| linear {name} | {M} | {tag} | {type(e).__name__}: {str(e).splitlines()[0][:80]} |")
                    return None
                log(f"| linear {name} | {M} | {tag} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                    f"{100 * nbytes / t / bw:.0f} | {err:.1e} |")
                if err < 1e-4 and ((name, M) not in best or t < best[(name, M)][0]):
                    best[(name, M)] = (t, tag)
                return t

            sim = lambda x: quant.fp8_sim(x, 128)
            run("xla: fp8_sim + dequant + einsum", lambda x, w, s: jnp.einsum(
                "mk,ok->mo", sim(x), quant.dequant_fp8_weight(w, s), preferred_element_type=jnp.float32))
            run("today: fp8_sim (XLA) + kernel (tensor cores, XLA scale decode)", lambda x, w, s: klg.linear(
                sim(x), w, s, gemv=False, scale_in_kernel=False, interpret=CPU))
            run("fp8_sim (XLA) + new kernel auto", lambda x, w, s: klg.linear(sim(x), w, s, interpret=CPU))
            new = lambda c: (lambda x, w, s: klg.linear(x, w, s, x_fp8=True, interpret=CPU, **c))
            t_auto = run("new x_fp8 auto", new({}))
            gemv = M <= klg.GEMV_ROWS
            if gemv:
                run("new x_fp8 tensor cores (gemv=False) auto", new(dict(gemv=False)))
            timed = [(t_auto, {})]
            for c in _linear_configs(M, O, K, quick):
                timed.append((run(f"new x_fp8 {c}", new(c)), c))
            if gemv:
                t_best, c_best = min(((t, c) for t, c in timed if t is not None), key=lambda tc: tc[0],
                                     default=(None, {}))
                auto = klg.gemv_launch(M, O, K, 1)
                base = dict(block_n=c_best.get("block_n", auto[0]), splits=c_best.get("splits", auto[2]))
                for c in _gemv_variants(base, K // 128 // base["splits"], quick):
                    run(f"new x_fp8 {c}", new(c))
    return best


GROUPED_SPLITS = (1, 2, 4, 8, 16)


def grouped_configs(K, quick, auto_split, mma_only=False):
    """The launches tried for an FP4 expert weight with `K` inputs (every split_k dividing the K steps); mma_only:
    the automatic launch and the FP8 x FP8 (mma="fp8") ones."""
    cfgs = [dict()]                                                        # automatic (DECODE_DEFAULTS + rule)
    base = dict(block_m=16, num_stages=3, w_lhs=True)
    for bk, bn, nw, sk in itertools.product((128, 64), (32, 64, 128), (4, 8), GROUPED_SPLITS):
        if (K // bk) % sk or K % bk:
            continue
        if quick and (bk == 64 or bn == 32 or nw == 8):
            continue
        if bk == 64 and (bn != 128 or nw != 4 or sk not in (1, 4, 16)):
            continue
        cfgs.append(dict(base, block_n=bn, block_k=bk, num_warps=nw, split_k=sk))
    variants = [dict(fp4_decode="bits"), dict(fp4_decode="bits_exp"), dict(fp4_parity=True),
                dict(fp4_parity="permuted"), dict(fp4_decode="bits_exp", fp4_parity="permuted")]
    if quick:
        variants = variants[1:2] + variants[4:]
    for ex, sk in itertools.product(variants, sorted({1, auto_split})):
        cfgs.append(dict(base, block_n=128, block_k=128, num_warps=4, split_k=sk, **ex))
    if mma_only:
        cfgs = cfgs[:1]
    # FP8 x FP8 dots (mma="fp8"; x is FP8-representable per 128 columns here, so they are exact)
    for bn, nw, lhs, sk in itertools.product((64, 128), (4, 8), (True, False), sorted({1, auto_split})):
        if quick and (nw == 8 and bn == 64):
            continue
        if mma_only and quick and (nw == 8 or lhs):                  # the PTX / halves grid below covers these
            continue
        cfgs.append(dict(base, block_n=bn, block_k=128, num_warps=nw, w_lhs=lhs, split_k=sk, mma="fp8"))
    # the FP4 decode as inline PTX (4 bytes at a time) and the "halves" layout (no interleave, no split), around
    # the FP8-dot default launch (block_n 64, w as the right operand)
    for ex, (bk, bn, lhs), sk in itertools.product(
            (dict(fp4_decode="asm"), dict(fp4_layout="halves"), dict(fp4_layout="halves", fp4_decode="asm")),
            ((128, 64, False), (128, 64, True), (128, 128, True), (64, 64, False), (64, 128, True)),
            sorted({1, auto_split})):
        cfgs.append(dict(base, block_n=bn, block_k=bk, num_warps=4, w_lhs=lhs, split_k=sk, mma="fp8", **ex))
    return cfgs


GROUPED_SHAPES = {"w1": (2048, 4096), "w2": (4096, 2048), "w13": (4096, 4096)}     # w13: w1 and w3 joined


def sweep_grouped(log, bw, quick, tokens=(1, 8, 32), max_total_s=1.0, mma_only=False, names=("w1", "w2"),
                  model_only=False, model_splits=()):
    """FP4 experts at decode. Setup kept short for the GPU: each weight [E, O, K] is generated and quantised once
    (on the device) and passed to every variant as a jit ARGUMENT (not a closed-over constant); one jit per variant
    runs the kernel on REPS distinct routings (the same kernel, compiled once) and returns the first output for the
    error check, so a variant costs one compile; the reference is computed once per case on the touched experts."""
    key = jax.random.PRNGKey(1)
    E, k = 256 // SHRINK, 6
    shapes = {k_: (o // SHRINK, i // SHRINK) for k_, (o, i) in GROUPED_SHAPES.items() if k_ in names}
    best = {}
    for name, (O, K) in shapes.items():
        w4, s4 = jax.jit(lambda kk: quant.quantize_fp4_weight(
            jax.random.normal(kk, (E, O, K), jnp.bfloat16) * 0.02))(key)
        w4h = jax.jit(quant.fp4_to_halves)(w4)                          # the same nibbles, kernel layout
        w4u = jax.jit(lambda w: quant.fp4_to_halves(w, tiles=False))(w4)   # its halves without the 128-row tiles
        per_expert = O * K // 2 + O * K // 32
        for B in tokens:
            N = B * k
            xs, gss, touched = [], [], []
            rng = np.random.default_rng(B)
            for i in range(REPS):
                ids = np.stack([rng.choice(E, k, replace=False) for _ in range(B)]).reshape(-1)
                sizes = np.bincount(ids, minlength=E).astype(np.int32)
                touched.append(int((sizes > 0).sum()))
                xs.append(quant.fp8_sim(jax.random.normal(jax.random.fold_in(key, 100 + i), (N, K), jnp.bfloat16),
                                        128))                              # as the model's quant_sim leaves x
                gss.append(jnp.asarray(sizes))
            nbytes = float(np.mean(touched)) * per_expert
            used = np.flatnonzero(np.asarray(gss[0]))                      # the reference on the touched experts
            ref = gm.grouped_matmul(xs[0], {"weight": w4[used], "scale": s4[used]}, gss[0][used],
                                    backend="reference")
            auto = gmg.decode_split_k(N, E, O, K, block_n=gmg.DECODE_DEFAULTS["fp4"][1],
                                      block_k=gmg.DECODE_DEFAULTS["fp4"][2], w_bytes=gmg.W_BYTES["fp4"]) \
                if N < gmg.DECODE_ROWS_PER_GROUP * E else 1
            cfgs = ([dict(x_fp8=True), dict(x_fp8=True, fp4_layout="halves"),   # the model's calls: int8, kernel
                     dict(x_fp8=True, fp4_layout="untiled", fp4_tiles=False)]      # layout, and without tiles;
                    + [dict(x_fp8=True, fp4_layout="halves", split_k=sk) for sk in model_splits   # the kernel
                       if (K // gmg.DECODE_MMA_DEFAULTS["fp4h"][2]) % sk == 0]   # layout's launch at given splits
                    if model_only
                    else grouped_configs(K, quick, auto, mma_only))                     # dots as before (A/B)
            log(f"experts {name} [{E}, {O}, {K}] FP4, batch {B} ({N} rows, {nbytes / 1e6:.1f} MB of touched "
                f"experts on average): {len(cfgs)} launches")
            for c in cfgs:
                def many(xs, gss, w, s, c=c):
                    acc, first = None, None
                    for x, g in zip(xs, gss):                              # (w: the layout c asks for)
                        y = gmg.grouped_matmul(x, w, g, s, interpret=CPU,    # the layout is w's dtype
                                               **{k_: v for k_, v in c.items() if k_ != "fp4_layout"})
                        first = y if first is None else first
                        acc = y.astype(jnp.float32).sum() if acc is None else acc + y.astype(jnp.float32).sum()
                    return acc, first
                f = jax.jit(many)
                tag = c or f"auto (DECODE_DEFAULTS, split_k={auto})"
                try:
                    w = {"halves": w4h, "untiled": w4u}.get(c.get("fp4_layout"), w4)
                    t = bench.time_fn(f, [(xs, gss, w, s4)], min_samples=5, max_total_s=max_total_s) / REPS
                    err = _rel(f(xs, gss, w, s4)[1], ref)
                except Exception as e:  # noqa: BLE001
                    log(f"| experts {name} | {B} | {tag} | {type(e).__name__}: {str(e).splitlines()[0][:80]} |")
                    continue
                log(f"| experts {name} | {B} | {tag} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                    f"{100 * nbytes / t / bw:.0f} | {err:.1e} |")
                kk = (name, B)
                if err < 1e-3 and (kk not in best or t < best[kk][0]):
                    best[kk] = (t, tag)
        del w4, w4h, w4u, s4
    return best


def main(argv=None) -> int:
    global SHRINK, REPS
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="linear,grouped")
    ap.add_argument("--shrink", type=int, default=1, help="(a CPU check of the script) divide the shapes")
    ap.add_argument("--reps", type=int, default=16)
    ap.add_argument("--tokens", default="1,8,32", help="grouped: decode batches (tokens, top-6 rows each)")
    ap.add_argument("--splits", default=None, help="grouped: the split_k values to try (default 1,2,4,8,16)")
    ap.add_argument("--max-total-s", type=float, default=1.0, help="timing budget per launch")
    ap.add_argument("--mma-only", action="store_true", help="grouped: the automatic launch and the mma='fp8' ones")
    ap.add_argument("--rows", default="1,2,4,32", help="linear: rows M of x")
    ap.add_argument("--grouped-shapes", default="w1,w2", help=f"grouped: of {','.join(GROUPED_SHAPES)}")
    ap.add_argument("--grouped-model", action="store_true",
                    help="grouped: only the model's calls (x_fp8, the FP4 layouts, automatic launch); with --splits "
                         "also the kernel layout's launch at each split_k")
    ap.add_argument("--linear-shapes", default=",".join(LINEAR_SHAPES),
                    help=f"linear: weights among {','.join(LINEAR_SHAPES)}")
    args = ap.parse_args(argv)
    SHRINK, REPS = args.shrink, args.reps
    if args.splits:
        global GROUPED_SPLITS
        GROUPED_SPLITS = tuple(int(v) for v in args.splits.split(","))
    log, lines = bench.line_logger()
    bw = bench.measure_copy_bw(64 << 20) if CPU else bench.measure_copy_bw()
    log(f"device {jax.devices()[0].device_kind}, copy bandwidth {bw / 1e9:.0f} GB/s")
    log("| kernel | rows/batch | launch | us | GB/s | % copy BW | rel err |")
    log("|---|---|---|---|---|---|---|")
    best = {}
    if "linear" in args.only:
        best.update({f"linear {k}": v for k, v in sweep_linear(
            log, bw, args.quick, tuple(int(v) for v in args.rows.split(",")), tuple(args.linear_shapes.split(",")),
            args.max_total_s).items()})
    if "grouped" in args.only:
        tokens = tuple(int(v) for v in args.tokens.split(","))
        best.update({f"experts {k}": v for k, v in
                     sweep_grouped(log, bw, args.quick, tokens, args.max_total_s, args.mma_only,
                                   tuple(args.grouped_shapes.split(",")), args.grouped_model,
                                   GROUPED_SPLITS if args.splits else ()).items()})
    log("best:")
    for k, (t, tag) in best.items():
        log(f"  {k}: {t * 1e6:.1f} us  {tag}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bw": bw, "lines": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
