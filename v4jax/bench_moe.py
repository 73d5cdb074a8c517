"""MoE grouped-matmul bench: `bench_moe(args)` (to be wired as `python -m v4jax.bench moe`; until then
`python -m v4jax.bench_moe ...` runs it with the same arguments).

One MoE layer's three grouped matmuls at the Flash expert shapes (w1, w3: [256, 2048, 4096]; w2: [256, 4096,
2048]; top-6 routing drawn uniformly at random) for 4K..64K tokens: g = x W1^T, u = x W3^T per expert (x [6T, 4096]
sorted by expert), then out = h W2^T (h [6T, 2048]), each result rounded to bf16 as `v4jax.moe.routed_sum` does.
Timed: the ragged_dot reference; the Pallas/Triton kernel (pallas_kernels/grouped_matmul/gpu.py) with bf16,
FP8 (+128x128 E8M0) and FP4 (+1x32 E8M0) weights decoded in-kernel; the capacity-padded batched einsum
(capacity = max group size rounded up to 128, computed on the host). TFLOP/s count the useful flops
(3 x 2 x 6T x 4096 x 2048); the roofline (device copy, bf16 matmul) is measured in the same run.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import quant
from v4jax.bench import _fmt, _is_oom, _try_time, line_logger, measure_copy_bw, measure_matmul_peak

E, D, F, TOPK = 256, 4096, 2048, 6           # Flash: routed experts, hidden, expert intermediate, experts per token
# fp4h: the kernel layout (quant.fp4_to_halves: halves, 128-row tiles); fp4u: its halves without the tiles (A/B)
FORMATS = ("bf16", "fp8", "fp4", "fp4h", "fp4u", "fp8-mma", "fp4-mma", "fp4h-mma", "fp4u-mma")


# ---- inputs -------------------------------------------------------------------------------------------
def routing(key, T, E=E, k=TOPK):
    """group_sizes [E] of T tokens each routed to k distinct experts drawn uniformly at random."""
    _, ids = jax.lax.top_k(jax.random.uniform(key, (T, E)), k)
    return jnp.bincount(ids.reshape(-1), length=E).astype(jnp.int32)


def weights(key, E, out, inp, fmt):
    """Random weight node {"weight", optional "scale"} in the given storage format (not all zeros: real timings)."""
    k1, k2 = jax.random.split(key)
    if fmt == "bf16":
        return {"weight": (0.02 * jax.random.normal(k1, (E, out, inp), jnp.float32)).astype(jnp.bfloat16)}
    if fmt == "fp8":
        w = jnp.clip(64 * jax.random.normal(k1, (E, out, inp), jnp.bfloat16), -448, 448).astype(jnp.float8_e4m3fn)
        codes = jax.random.randint(k2, (E, -(-out // 128), -(-inp // 128)), 112, 120, jnp.int32).astype(jnp.uint8)
        return {"weight": w, "scale": jax.lax.bitcast_convert_type(codes, jnp.float8_e8m0fnu)}
    w = jax.random.randint(k1, (E, out, inp // 2), -128, 128, jnp.int32).astype(jnp.int8)
    codes = jax.random.randint(k2, (E, out, inp // 32), 118, 124, jnp.int32).astype(jnp.uint8)
    w = quant.fp4_to_halves(w) if fmt == "fp4h" else quant.fp4_to_halves(w, tiles=False) if fmt == "fp4u" else w
    return {"weight": w,
            "scale": jax.lax.bitcast_convert_type(codes, jnp.float8_e8m0fnu)}


# ---- on-device correctness ----------------------------------------------------------------------------
def check_grouped_matmul(log, cfg=None) -> bool:
    """Kernel (compiled for this device) vs a host float64 product with the exactly dequantised weight."""
    from pallas_kernels.grouped_matmul import dequantize, gpu
    cfg = cfg or {}
    ok = True
    rng = np.random.default_rng(0)
    cases = [(1000, 512, 384, 8, "bf16"), (777, 256, 320, 5, "bf16"), (1000, 512, 384, 8, "fp8"),
             (1000, 512, 384, 8, "fp4"), (600, 384, 256, 4, "bf16T")]
    for i, (N, K, O, Eg, fmt) in enumerate(cases):
        k = jax.random.PRNGKey(10 + i)
        sizes = rng.multinomial(N - 37, np.ones(Eg) / Eg).astype(np.int32)
        sizes[1] = 0                                                            # an empty group
        gs = jnp.asarray(sizes)
        x = jax.random.normal(k, (N, K), jnp.bfloat16)
        tr = fmt == "bf16T"
        node = weights(jax.random.fold_in(k, 1), Eg, K if tr else O, O if tr else K, fmt[:4])
        for out_dtype in (jnp.float32, jnp.bfloat16):
            o = gpu.grouped_matmul(x, node["weight"], gs, node.get("scale"), transpose_w=tr, out_dtype=out_dtype,
                                   **cfg)
            o = np.asarray(o.astype(jnp.float32), np.float64)
            wd = np.asarray(dequantize(node["weight"], node.get("scale"), jnp.float32), np.float64)
            xh = np.asarray(x.astype(jnp.float32), np.float64)
            ref = np.zeros((N, O))
            s = 0
            for e in range(Eg):
                we = wd[e] if tr else wd[e].T
                ref[s:s + sizes[e]] = xh[s:s + sizes[e]] @ we
                s += sizes[e]
            err = float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
            tail = float(np.abs(o[s:]).max()) if s < N else 0.0
            tol = 1e-5 if out_dtype == jnp.float32 else 4e-3
            good = bool(np.isfinite(o).all() and err < tol and tail == 0.0)
            ok &= good
            log(f"check {fmt} N={N} K={K} O={O} E={Eg} out={jnp.dtype(out_dtype).name}: rel err vs host f64 "
                f"{err:.1e}, rows past the groups max|.| {tail} {'ok' if good else 'FAIL'}")
    return ok


# ---- the bench ----------------------------------------------------------------------------------------
def bench_moe(args) -> int:
    from pallas_kernels.grouped_matmul import capacity, gpu
    from pallas_kernels.grouped_matmul.reference import grouped_matmul as ref_gmm

    t_start = time.perf_counter()
    log, lines = line_logger()
    dev = jax.devices()[0]
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    interpret = not on_gpu
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    ok = True
    if not args.skip_check:
        if on_gpu:
            ok = check_grouped_matmul(log)
            log(f"check: {'all ok' if ok else 'FAILURES'}")
        else:
            log("check: no GPU; skipped")
        if args.check_only:
            return 0 if ok else 1
    smoke = args.smoke
    e, d, f = (8, 256, 128) if smoke else (E, D, F)
    bw = measure_copy_bw(64 << 20 if smoke else 2 << 30)
    peak = measure_matmul_peak(512 if smoke else 8192)
    log(f"roofline: device copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {peak / 1e12:.0f} TFLOP/s")

    key = jax.random.PRNGKey(0)
    fmts = [m for m in args.formats.split(",") if m]
    bad = [fm for fm in fmts if fm not in FORMATS]
    if bad:
        raise SystemExit(f"bench moe: unknown --formats {bad}; choose from {FORMATS}")
    base = lambda fm: fm.split("-")[0]           # "fp4-mma": FP4 weights, FP8 x FP8 dots (mma="fp8")
    Wb = {b: (weights(jax.random.fold_in(key, 1), e, f, d, b), weights(jax.random.fold_in(key, 3), e, f, d, b),
              weights(jax.random.fold_in(key, 2), e, d, f, b)) for b in {base(fm) for fm in fmts}}
    W = {fm: Wb[base(fm)] for fm in fmts}
    jax.block_until_ready(W)

    @functools.lru_cache(maxsize=None)
    def _kernel_layer(cfg_items):
        cfg = dict(cfg_items)

        def layer(x, h, gs, w1, w3, w2):
            mm = lambda a, n: gpu.grouped_matmul(a, n["weight"], gs, n.get("scale"), out_dtype=jnp.bfloat16,
                                                 interpret=interpret, **cfg)
            return mm(x, w1), mm(x, w3), mm(h, w2)
        return jax.jit(layer)

    def launch(cfg, fm):                         # "-mma" formats: the FP8 x FP8 dots
        return dict(cfg, **({"mma": "fp8"} if fm.endswith("-mma") else {}),
                    **({"fp4_tiles": False} if base(fm) == "fp4u" else {}))

    def kernel_layer(cfg, fm="bf16"):
        return _kernel_layer(tuple(sorted(launch(cfg, fm).items())))

    def ref_layer(x, h, gs, w1, w3, w2):
        mm = lambda a, n: ref_gmm(a, n["weight"], gs).astype(jnp.bfloat16)
        return mm(x, w1), mm(x, w3), mm(h, w2)

    ref_layer = jax.jit(ref_layer)

    def cap_layer(cap):
        def layer(x, h, gs, w1, w3, w2):
            mm = lambda a, n: capacity.grouped_matmul(a, n["weight"], gs, capacity=cap, out_dtype=jnp.bfloat16)
            return mm(x, w1), mm(x, w3), mm(h, w2)
        return jax.jit(layer)

    def inputs(T, seed=0):
        k = jax.random.split(jax.random.PRNGKey(100 + seed), 3)
        gs = routing(k[0], T, e)
        N = T * TOPK
        # FP8-representable per 128 columns (as the model's quant_sim leaves them): the mma="fp8" kernels are exact
        x = quant.fp8_sim(jax.random.normal(k[1], (N, d), jnp.bfloat16), 128)
        h = quant.fp8_sim(jax.random.normal(k[2], (N, f), jnp.bfloat16), 128)
        return jax.block_until_ready((x, h, gs))

    # -- launch sweep at one size (w1/w3/w2 of a layer) --------------------------------------------------
    best = {fm: {} for fm in fmts}
    T_tune = 256 if smoke else args.tune_tokens
    if on_gpu and not args.no_tune:
        x, h, gs = inputs(T_tune)
        fl = 3 * 2 * T_tune * TOPK * d * f
        # (block_m, block_n, block_k, warps, stages, w_lhs); a first sweep (docs/benchmarks.md) also had bf16
        # 128/128/64/8/3, 64/128/64/4/4, 256/128/64/8/3, fp8 128/256/64/8/3 and fp4 128/256/64/8/3: all slower
        grids = {"bf16": [(128, 256, 64, 8, 3, False), (128, 256, 64, 8, 4, False), (128, 128, 64, 4, 4, False)],
                 "fp8": [(128, 128, 128, 8, 3, False), (128, 128, 128, 8, 3, True), (128, 128, 64, 4, 4, True),
                         (256, 128, 64, 8, 3, True)],
                 "fp4": [(128, 128, 64, 4, 4, False), (128, 128, 64, 4, 4, True), (256, 128, 64, 8, 3, True),
                         (128, 128, 128, 8, 3, True)],
                 "fp8-mma": [(128, 128, 128, 8, 3, False), (128, 256, 128, 8, 3, False), (256, 128, 128, 8, 3, True),
                             (128, 128, 128, 4, 4, False)],
                 "fp4h": [(128, 128, 64, 4, 4, False), (128, 128, 64, 4, 4, True), (256, 128, 64, 8, 3, True),
                          (128, 128, 128, 8, 3, True)],
                 "fp4h-mma": [(128, 128, 64, 4, 4, False), (128, 128, 128, 8, 3, False),
                              (256, 128, 128, 8, 3, True)],
                 "fp4-mma": [(128, 128, 64, 4, 4, False), (128, 128, 128, 8, 3, False), (128, 256, 128, 8, 3, False),
                             (256, 128, 128, 8, 3, True)]}
        for fm in fmts:
            bt = None
            for bm, bn, bk, nw, ns, lhs in grids[fm.replace("fp4u", "fp4h")]:    # fp4u: the tiled layout's grid
                if time.perf_counter() - t_start > args.time_budget * 0.4:
                    break
                cfg = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, w_lhs=lhs)
                t, err = _try_time(kernel_layer(cfg, fm), [(x, h, gs, *W[fm])], max_total_s=0.5)
                log(f"tune {fm} {T_tune // 1024}K tokens bm={bm} bn={bn} bk={bk} warps={nw} stages={ns} w_lhs={lhs}: "
                    + (f"{t * 1e3:.2f} ms, {fl / t / 1e12:.0f} TFLOP/s" if t else err))
                if t and (bt is None or t < bt):
                    best[fm], bt = cfg, t
            log(f"tune {fm}: best {best[fm]}")
        del x, h, gs

    def agreement(x, h, gs, log, T) -> bool:
        """Kernel (tuned configs) vs independent XLA products at this size: ragged_dot where it fits, and the
        capacity einsum (cuBLAS) on the same (dequantised) weights; relative norms of the bf16 outputs."""
        from pallas_kernels.grouped_matmul import dequantize
        rel = lambda p, q: float(jnp.linalg.norm((p - q).astype(jnp.float32)) / jnp.linalg.norm(q.astype(jnp.float32)))
        good = True
        cap = capacity.capacity_for(gs)
        a = kernel_layer(best["bf16"])(x, h, gs, *W["bf16"])
        refs = [("capacity einsum", cap_layer(cap))] + ([("ragged_dot", ref_layer)] if T <= args.ref_max_tokens else [])
        for name, fn in refs:
            try:
                b = fn(x, h, gs, *W["bf16"])
            except Exception as ex:  # noqa: BLE001
                log(f"{T} tokens: {name} failed: {'OOM' if _is_oom(ex) else type(ex).__name__}")
                continue
            errs = [rel(p, q) for p, q in zip(a, b)]
            good &= max(errs) < 1e-2
            log(f"{T} tokens: kernel bf16 vs {name} rel err (w1, w3, w2): " + ", ".join(f"{v:.1e}" for v in errs))
            del b
        del a
        for fm in fmts:
            if fm == "bf16":
                continue
            n1 = W[fm][0]
            p = gpu.grouped_matmul(x, n1["weight"], gs, n1["scale"], out_dtype=jnp.bfloat16, interpret=interpret,
                                   **launch(best[fm], fm))
            q = capacity.grouped_matmul(x, dequantize(n1["weight"], n1["scale"]), gs, capacity=cap,
                                        out_dtype=jnp.bfloat16)
            err = rel(p, q)
            good &= err < 1e-2
            log(f"{T} tokens: kernel {fm} vs capacity einsum on the dequantised weight, rel err (w1): {err:.1e}")
            del p, q
        return good

    tokens = [256, 512] if smoke else [int(t) * 1024 for t in args.tokens.split(",")]
    cols = (["ragged_dot"] if not args.no_ref else []) + [f"kernel {fm}" for fm in fmts] + \
           (["capacity einsum"] if not args.no_capacity else [])
    hdr = "| tokens | rows | max group | " + " | ".join(f"{c} ms | TFLOP/s | % peak" for c in cols) + \
          " | floor ms (bf16 w) |"
    table = [hdr, "|" + "---|" * (4 + 3 * len(cols))]
    results = []
    ref_last = None
    for T in tokens:
        if time.perf_counter() - t_start > args.time_budget:
            log(f"{T} tokens: skipped (time budget)")
            continue
        try:
            x, h, gs = inputs(T)
        except Exception as ex:  # noqa: BLE001
            log(f"{T} tokens: inputs {'OOM' if _is_oom(ex) else ex}")
            continue
        N = T * TOPK
        fl = 3 * 2 * N * d * f
        by = 3 * e * d * f * 2 + N * d * 2 * 2 + N * f * 2 + 2 * N * f * 2 + N * d * 2
        floor = max(fl / peak, by / bw)
        gmax = int(jnp.max(gs))
        row = dict(tokens=T, rows=N, max_group=gmax, flops=fl, floor_s=floor)
        cells = [f"{T // 1024}K" if T >= 1024 else str(T), str(N), str(gmax)]
        for c in cols:
            late = time.perf_counter() - t_start > args.time_budget * 0.9
            if c == "ragged_dot":
                if late or T > args.ref_max_tokens or (ref_last and ref_last[1] * T / ref_last[0] > args.ref_max_s):
                    t, err = None, "skipped"
                else:
                    t, err = _try_time(ref_layer, [(x, h, gs, *W["bf16"])], max_total_s=1.0)
                    if t:
                        ref_last = (T, t)
            elif c.startswith("kernel"):
                fm = c.split()[1]
                t, err = _try_time(kernel_layer(best[fm], fm), [(x, h, gs, *W[fm])], max_total_s=1.0)
            else:
                cap = capacity.capacity_for(gs)
                t, err = (None, "skipped") if late else _try_time(cap_layer(cap), [(x, h, gs, *W["bf16"])],
                                                                   max_total_s=1.0)
            row[c] = t if t else err
            log(f"{T} tokens {c}: " + (f"{t * 1e3:.2f} ms, {fl / t / 1e12:.0f} TFLOP/s" if t else err))
            cells += [_fmt(t * 1e3, 2), _fmt(fl / t / 1e12, 0), _fmt(100 * fl / t / peak, 0)] if t else [err, "-", "-"]
        if T == tokens[0] and "bf16" in fmts:
            try:
                ok &= agreement(x, h, gs, log, T)
            except Exception as ex:  # noqa: BLE001
                log(f"{T} tokens: agreement check failed to run: {type(ex).__name__}: {str(ex)[:200]}")
        cells.append(_fmt(floor * 1e3, 2))
        table.append("| " + " | ".join(cells) + " |")
        results.append(row)
        log(table[-1])
        del x, h, gs

    log("")
    log(f"roofline: device copy {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s; launch configs {best}")
    for t in table:
        log(t)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, copy_bw=bw, matmul_peak=peak, tuned=best,
                           check_ok=ok, results=results), fh, indent=1)
    log(f"total bench time {time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


def add_parser(sub):
    """Register the `moe` subcommand on an argparse subparsers object (for v4jax/bench.py's _parsers)."""
    k = sub.add_parser("moe", help="MoE grouped matmuls (ragged_dot vs Pallas kernel bf16/FP8/FP4 vs einsum)")
    k.add_argument("--tokens", default="1,2,4,8,16,32,64", help="comma list of token counts in K (x1024)")
    k.add_argument("--formats", default="bf16,fp8,fp4",
                   help="kernel weight formats: bf16,fp8,fp4,fp4h (FP4 in the kernel layout), fp4u (its halves "
                        "without the 128-row tiles) and fp8-mma,fp4-mma,fp4h-mma,fp4u-mma (FP8 x FP8 dots, mma='fp8')")
    k.add_argument("--tune-tokens", type=int, default=16384, help="token count of the launch sweep")
    k.add_argument("--no-tune", action="store_true", help="skip the launch-parameter sweep (kernel defaults)")
    k.add_argument("--no-ref", action="store_true", help="skip the ragged_dot reference")
    k.add_argument("--no-capacity", action="store_true", help="skip the capacity-padded einsum")
    k.add_argument("--ref-max-tokens", type=int, default=2048,
                   help="ragged_dot only up to this many tokens (XLA's GPU fallback expands x to [N, E, in]: OOM "
                        "from 4K tokens at the Flash shapes on an 80 GB H100)")
    k.add_argument("--ref-max-s", type=float, default=1.5, help="skip ragged_dot once predicted above this (s)")
    k.add_argument("--skip-check", action="store_true", help="skip the on-device correctness check")
    k.add_argument("--check-only", action="store_true", help="only the on-device correctness check")
    k.add_argument("--time-budget", type=float, default=300.0, help="seconds; later cases are skipped")
    k.add_argument("--json", default=None, help="write the raw results here")
    k.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU test of the script itself)")
    k.set_defaults(func=bench_moe)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m v4jax.bench_moe")
    sub = ap.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(["moe"] + sys.argv[1:] if len(sys.argv) < 2 or sys.argv[1] != "moe" else sys.argv[1:]))
