#!/usr/bin/env python
"""Launch sweeps of the two decode matmul kernels at Flash shapes (GPU), to pick their defaults.

    python scripts/sweep_decode_kernels.py [--json F] [--quick] [--only linear,grouped] [--tokens 1,8,32]

1. `pallas_kernels.linear` (skinny FP8 linear) on wq_b [32768, 1024], wo_b [4096, 8192], wq_a [1024, 4096] at
   M = 1 and 32 rows: block_n x splits x stages (the automatic launch first), against XLA's dequantise + GEMM.
2. `pallas_kernels.grouped_matmul` with FP4 experts (w1 [256, 2048, 4096], w2 [256, 4096, 2048]) at decode:
   N = 6, 48, 192 rows (batch 1, 8, 32 with top-6; `--tokens`), routed uniformly at random; bytes = the touched
   experts. Launches: the automatic one (DECODE_DEFAULTS + `decode_split_k`), block_n x num_warps x split_k
   (1, 2, 4, 8, 16 where it divides the K steps; `--splits`), block_k 64, and the FP4 decode variants unsplit and
   at the automatic split. `--quick`: block_n 64/128, 4 warps, block_k 128, two variants (~13 launches per case).
Every case: microseconds per call (16 distinct inputs per jit, nothing shared), GB/s of the weight bytes it must
read and the fraction of the measured copy bandwidth; every kernel output is checked against the reference.

Examples (GPU): `python scripts/sweep_decode_kernels.py --only grouped --quick --json $OUT/grouped.json`;
`--only grouped --tokens 1 --splits 1,4,8,16`. CPU check of the script (Pallas interpret mode, small shapes):
`python scripts/sweep_decode_kernels.py --only grouped --quick --shrink 8 --reps 2 --tokens 1,8 --max-total-s 0`.
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
from pallas_kernels import linear as klin  # noqa: E402
from pallas_kernels.grouped_matmul import gpu as gmg  # noqa: E402
from pallas_kernels.linear import gpu as klg  # noqa: E402
from v4jax import bench, layers, quant  # noqa: E402

REPS = 16
SHRINK = 1
CPU = jax.default_backend() == "cpu"


def _per_call(fn, args_list):
    def many(args_list):
        acc = None
        for a in args_list:
            y = fn(*a).astype(jnp.float32).sum()
            acc = y if acc is None else acc + y
        return acc
    f = jax.jit(many)
    return bench.time_fn(f, [(args_list,)], min_samples=5, max_total_s=1.0) / len(args_list)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def sweep_linear(log, bw, quick):
    key = jax.random.PRNGKey(0)
    shapes = {k: (o // SHRINK, i // SHRINK) for k, (o, i) in
              {"wq_b": (32768, 1024), "wo_b": (4096, 8192), "wq_a": (1024, 4096)}.items()}
    best = {}
    for name, (O, K) in shapes.items():
        nodes = []
        for i in range(REPS):
            w = jax.random.normal(jax.random.fold_in(key, i), (O, K), jnp.float32) * 0.02
            w8, s = quant.quantize_fp8_weight(w)
            nodes.append((w8, s))
        for M in (1, 32):
            xs = [jax.random.normal(jax.random.fold_in(key, 50 + i), (M, K), jnp.bfloat16) for i in range(REPS)]
            ref = layers._matmul(xs[0], layers.weight({"weight": nodes[0][0], "scale": nodes[0][1]}))
            t = _per_call(lambda x, w8, s: layers._matmul(x, layers.weight({"weight": w8, "scale": s})),
                          [(x, *n) for x, n in zip(xs, nodes)])
            log(f"| linear {name} | {M} | xla dequant+gemm | {t * 1e6:.1f} | {O * K / t / 1e9:.0f} | "
                f"{100 * O * K / t / bw:.0f} | - |")
            auto = klg.launch(M, O, K, 1)
            cfgs = [dict()]
            for bn, sp, st in itertools.product((32, 64, 128), (1, 2, 4, 8, 16), (3, 5)):
                if quick and (st == 5 or sp in (2, 8)):
                    continue
                if (K // 128) % sp:
                    continue
                cfgs.append(dict(block_n=bn, splits=sp, num_stages=st, block_k=128))
            for c in cfgs:
                try:
                    f = lambda x, w8, s, c=c: klg.linear(x, w8, s, out_dtype=jnp.float32, interpret=CPU, **c)
                    t = _per_call(f, [(x, *n) for x, n in zip(xs, nodes)])
                    err = _rel(f(xs[0], *nodes[0]), ref)
                except Exception as e:  # noqa: BLE001
                    log(f"| linear {name} | {M} | {c or auto} | {type(e).__name__}: {str(e).splitlines()[0][:80]} |")
                    continue
                tag = c or f"auto {auto}"
                log(f"| linear {name} | {M} | {tag} | {t * 1e6:.1f} | {O * K / t / 1e9:.0f} | "
                    f"{100 * O * K / t / bw:.0f} | {err:.1e} |")
                k = (name, M)
                if err < 1e-3 and (k not in best or t < best[k][0]):
                    best[k] = (t, tag)
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


def sweep_grouped(log, bw, quick, tokens=(1, 8, 32), max_total_s=1.0, mma_only=False):
    """FP4 experts at decode. Setup kept short for the GPU: each weight [E, O, K] is generated and quantised once
    (on the device) and passed to every variant as a jit ARGUMENT (not a closed-over constant); one jit per variant
    runs the kernel on REPS distinct routings (the same kernel, compiled once) and returns the first output for the
    error check, so a variant costs one compile; the reference is computed once per case on the touched experts."""
    key = jax.random.PRNGKey(1)
    E, k = 256 // SHRINK, 6
    shapes = {k_: (o // SHRINK, i // SHRINK) for k_, (o, i) in {"w1": (2048, 4096), "w2": (4096, 2048)}.items()}
    best = {}
    for name, (O, K) in shapes.items():
        w4, s4 = jax.jit(lambda kk: quant.quantize_fp4_weight(
            jax.random.normal(kk, (E, O, K), jnp.bfloat16) * 0.02))(key)
        w4h = jax.jit(gmg.pack_fp4_halves)(w4)                           # the same nibbles, "halves" layout
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
            cfgs = grouped_configs(K, quick, auto, mma_only)
            log(f"experts {name} [{E}, {O}, {K}] FP4, batch {B} ({N} rows, {nbytes / 1e6:.1f} MB of touched "
                f"experts on average): {len(cfgs)} launches")
            for c in cfgs:
                def many(xs, gss, w, s, c=c):
                    acc, first = None, None
                    for x, g in zip(xs, gss):                              # (w: the layout c asks for)
                        y = gmg.grouped_matmul(x, w, g, s, interpret=CPU, **c)
                        first = y if first is None else first
                        acc = y.astype(jnp.float32).sum() if acc is None else acc + y.astype(jnp.float32).sum()
                    return acc, first
                f = jax.jit(many)
                tag = c or f"auto (DECODE_DEFAULTS, split_k={auto})"
                try:
                    w = w4h if c.get("fp4_layout") == "halves" else w4
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
        del w4, w4h, s4
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
        best.update({f"linear {k}": v for k, v in sweep_linear(log, bw, args.quick).items()})
    if "grouped" in args.only:
        tokens = tuple(int(v) for v in args.tokens.split(","))
        best.update({f"experts {k}": v for k, v in
                     sweep_grouped(log, bw, args.quick, tokens, args.max_total_s, args.mma_only).items()})
    log("best:")
    for k, (t, tag) in best.items():
        log(f"  {k}: {t * 1e6:.1f} us  {tag}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bw": bw, "lines": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
