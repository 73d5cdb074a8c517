"""Benchmarks: python -m v4jax.bench <subcommand> ...

Subcommands (each is a function taking the parsed arguments; add yours with a parser in `_parsers`):
  kernels   sparse attention (and indexer scoring) kernels vs the jnp reference and dense-mask attention, at the
            Flash and Pro shapes, with roofline numbers measured in the same run (device copy, bf16 matmul).
  load      streaming checkpoint load: disk -> device GB/s and peak host RSS (v4jax/bench_load.py).
  moe       the MoE grouped matmul at Flash expert shapes, TFLOP/s vs bf16 peak (v4jax/bench_moe.py).
  train     a V4-shaped training step, tokens/s and MFU, Muon vs AdamW (v4jax/bench_train.py).

Timing: warm-up calls first (compilation excluded), then samples of n back-to-back calls (n chosen so that a sample
lasts a few ms; the inputs rotate among several sets so small pools are not served from L2), each sample ended
with block_until_ready; the reported time is the median sample / n.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

WINDOW = 128
KDIM = 512
MODELS = {"flash": dict(H=64, topk=512), "pro": dict(H=128, topk=1024)}


# ---- timing -------------------------------------------------------------------------------------------
def _sync(x):
    jax.block_until_ready(x)
    return x


def time_fn(fn, arg_sets, *, min_samples=7, target_sample_s=0.004, max_total_s=2.0, max_n=200) -> float:
    """Median seconds per call of fn(*args), rotating over arg_sets."""
    _sync(fn(*arg_sets[0]))                                                # compile + warm-up
    t0 = time.perf_counter()
    _sync(fn(*arg_sets[-1]))
    one = max(time.perf_counter() - t0, 1e-6)
    if one > 0.1:                                                          # slow: few samples, no more warm-up
        min_samples = 3
    else:
        for a in arg_sets[: min(len(arg_sets), 3)]:
            _sync(fn(*a))
    n = int(min(max_n, max(1, target_sample_s / one)))
    samples = []
    deadline = time.perf_counter() + max_total_s
    i = 0
    while len(samples) < min_samples or (time.perf_counter() < deadline and len(samples) < 50):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
            i += 1
        _sync(out)
        samples.append((time.perf_counter() - t0) / n)
        if len(samples) >= min_samples and time.perf_counter() > deadline:
            break
    return statistics.median(samples)


def _is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s or "OOM" in s


def _try_time(fn, arg_sets, **kw):
    try:
        return time_fn(fn, arg_sets, **kw), None
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
        return None, ("OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


# ---- roofline -----------------------------------------------------------------------------------------
def measure_copy_bw(nbytes=2 << 30) -> float:
    """Bytes/s of a device copy (bytes read + bytes written), through an elementwise op."""
    n = nbytes // 2
    xs = [jnp.full((n,), i, jnp.bfloat16) + jnp.arange(n, dtype=jnp.bfloat16) for i in range(2)]
    f = jax.jit(lambda x: x + jnp.bfloat16(1))
    t = time_fn(f, [(x,) for x in xs], min_samples=10)
    del xs
    return 2 * nbytes / t


def measure_matmul_peak(n=8192) -> float:
    """FLOP/s of an n^3 bf16 matmul (fp32 accumulate) on random data."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t = time_fn(f, [(a, b), (b, a)], min_samples=10)
    return 2 * n ** 3 / t


# ---- inputs -------------------------------------------------------------------------------------------
def decode_inputs(key, B, H, topk, ctx):
    """One decode step: the pool is [window ring | C = ctx/4 compressed entries], every list full."""
    C = ctx // 4
    N = WINDOW + C
    k = jax.random.split(key, 4)
    q = jax.random.normal(k[0], (B, 1, H, KDIM), jnp.bfloat16)
    kv = jax.random.normal(k[1], (B, N, KDIM), jnp.bfloat16)
    win = jnp.broadcast_to(jnp.arange(WINDOW, dtype=jnp.int32), (B, 1, WINDOW))
    comp = jax.random.randint(k[2], (B, 1, min(topk, C)), WINDOW, N, jnp.int32)
    idx = jnp.concatenate([win, comp], axis=-1)
    sink = jax.random.normal(k[3], (H,), jnp.float32)
    return q, kv, idx, sink


def prefill_inputs(key, H, topk, S):
    """One prefill of S tokens: pool [S raw | S/4 entries]; causal window lists and random visible entries."""
    from v4jax.attention import window_idx_prefill
    n = S // 4
    k = jax.random.split(key, 4)
    q = jax.random.normal(k[0], (1, S, H, KDIM), jnp.bfloat16)
    kv = jax.random.normal(k[1], (1, S + n, KDIM), jnp.bfloat16)
    win = window_idx_prefill(S, WINDOW)[None]
    nvis = (jnp.arange(1, S + 1) // 4)[None, :, None]
    kk = min(topk, n)
    u = jax.random.uniform(k[2], (1, S, kk))
    comp = jnp.floor(u * jnp.maximum(nvis, 1)).astype(jnp.int32)
    comp = jnp.where(jnp.arange(kk)[None, None, :] < nvis, comp + S, -1)
    idx = jnp.concatenate([win, comp], axis=-1).astype(jnp.int32)
    sink = jax.random.normal(k[3], (H,), jnp.float32)
    return q, kv, idx, sink


def dense_attention(q, kv, idx, sink, scale):
    """Every query against all N pool entries, with a mask built from its index list (the naive baseline)."""
    B, S, H, K = q.shape
    N = kv.shape[1]
    b = jnp.arange(B)[:, None, None]
    s = jnp.arange(S)[None, :, None]
    mask = jnp.zeros((B, S, N), bool).at[b, s, jnp.where(idx >= 0, idx, N)].set(True, mode="drop")
    z = jnp.einsum("bshk,bnk->bshn", q, kv, preferred_element_type=jnp.float32) * scale
    z = jnp.where(mask[:, :, None, :], z, -jnp.inf)
    m = jnp.maximum(jnp.max(z, axis=-1, keepdims=True), sink[:, None])
    p = jnp.exp(z - m)
    denom = jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink[:, None] - m)
    o = jnp.einsum("bshn,bnk->bshk", p.astype(kv.dtype), kv, preferred_element_type=jnp.float32)
    return (o / denom).astype(q.dtype)


def _cost(q, kv, idx):
    """(bytes that must move, flops) of one sparse attention call: q, the gathered valid rows, idx, output."""
    B, S, H, K = q.shape
    valid = int(jnp.sum(idx >= 0))
    by = q.size * 2 + valid * K * kv.dtype.itemsize + idx.size * 4 + q.size * 2
    return by, 4 * H * K * valid


# ---- correctness on the device ------------------------------------------------------------------------
def np_sparse_attention(q, kv, idx, sink, scale, block=64):
    """Host float64 emulation of the reference numerics (spec section 6), to judge device results independently
    of XLA's own precision choices: per 64-block online softmax, p rounded to bf16 before P.V."""
    import ml_dtypes
    q, kv, sink = (np.asarray(a, np.float64) for a in (q, kv, sink))
    idx = np.asarray(idx)
    B, S, H, K = q.shape
    T = idx.shape[-1]
    out = np.zeros((B, S, H, K))
    for b in range(B):
        for s in range(S):
            m, l, acc = np.full(H, -np.inf), np.zeros(H), np.zeros((H, K))
            for j0 in range(0, T, block):
                ids = idx[b, s, j0:j0 + block]
                v = ids >= 0
                rows = kv[b][np.where(v, ids, 0)]
                z = (q[b, s] @ rows.T) * scale
                z[:, ~v] = -np.inf
                mn = np.maximum(m, z.max(1))
                mu = np.where(mn == -np.inf, 0.0, mn)
                al = np.where(m == -np.inf, 0.0, np.exp(m - mu))
                p = np.exp(z - mu[:, None])
                l = l * al + p.sum(1)
                acc = acc * al[:, None] + p.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64) @ rows
                m = mn
            out[b, s] = acc / (l + np.exp(sink - np.where(m == -np.inf, 0.0, m)))[:, None]
    return out


def check_kernels(log) -> bool:
    """Pallas kernels (compiled for this device) vs the jnp reference on small random inputs, plus gradients."""
    from pallas_kernels import indexer as ix
    from pallas_kernels.sparse_attention import sparse_attention
    from pallas_kernels.sparse_attention.reference import sparse_attention as ref
    ok = True
    backend = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(jax.default_backend())
    if backend is None:
        log("check: no GPU/TPU; skipped")
        return True
    cases = [(2, 3, 4, 128, 50, 150), (1, 5, 16, 512, 300, 200), (3, 1, 64, 512, 2000, 640),
             (2, 2, 128, 512, 5000, 1152), (1, 1, 64, 512, 100, 0 + 64), (2, 7, 16, 128, 33, 70)]
    for i, (B, S, H, K, N, T) in enumerate(cases):
        k = jax.random.split(jax.random.PRNGKey(100 + i), 4)
        q = jax.random.normal(k[0], (B, S, H, K), jnp.bfloat16)
        kv = jax.random.normal(k[1], (B, N, K), jnp.bfloat16)
        idx = jax.random.randint(k[2], (B, S, T), -1, N, jnp.int32)
        idx = idx.at[0, 0].set(-1)                                             # an all-masked row
        sink = jax.random.normal(k[3], (H,), jnp.float32)
        scale = K ** -0.5
        o = jax.jit(lambda *a: sparse_attention(*a, scale, backend=backend))(q, kv, idx, sink)
        r = jax.jit(lambda *a: ref(*a, scale))(q, kv, idx, sink)
        o, r = np.asarray(o, np.float32), np.asarray(r, np.float32)
        err = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))
        import ml_dtypes
        h = np_sparse_attention(q, kv, idx, sink, scale).astype(np.float32).astype(ml_dtypes.bfloat16)
        h = h.astype(np.float64)
        hn = max(np.linalg.norm(h), 1e-30)
        ek, er = float(np.linalg.norm(o - h) / hn), float(np.linalg.norm(r - h) / hn)
        good = np.isfinite(o).all() and err < 1e-2 and ek < 1e-3
        ok &= bool(good)
        log(f"check sparse_attention B={B} S={S} H={H} K={K} N={N} T={T}: kernel vs XLA reference {err:.2e}; "
            f"vs host f64 emulation (rounded to bf16): kernel {ek:.2e}, XLA reference {er:.2e} {'ok' if good else 'FAIL'}")
    # gradients through the dispatch (custom_vjp: reference backward)
    B, S, H, K, N, T = 1, 3, 16, 128, 40, 100
    k = jax.random.split(jax.random.PRNGKey(7), 5)
    q = jax.random.normal(k[0], (B, S, H, K), jnp.float32)
    kv = jax.random.normal(k[1], (B, N, K), jnp.float32)
    idx = jax.random.randint(k[2], (B, S, T), -1, N, jnp.int32)
    sink = jax.random.normal(k[3], (H,), jnp.float32)
    ct = jax.random.normal(k[4], (B, S, H, K), jnp.float32)
    loss = lambda be: lambda q, kv, s: jnp.sum(sparse_attention(q, kv, idx, s, 0.1, backend=be) * ct)
    g1 = jax.jit(jax.grad(loss(backend), argnums=(0, 1, 2)))(q, kv, sink)
    g2 = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(q, kv, sink)
    gerr = max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(g1, g2))
    ok &= gerr < 1e-4
    log(f"check grads (dq, dkv, dsink): max rel err {gerr:.2e} {'ok' if gerr < 1e-4 else 'FAIL'}")
    for i, (B, S, nI, C) in enumerate([(2, 5, 4, 77), (1, 33, 64, 300), (4, 1, 64, 1000)]):
        k = jax.random.split(jax.random.PRNGKey(200 + i), 3)
        q = jax.random.normal(k[0], (B, S, nI, 128), jnp.bfloat16)
        w = (0.1 * jax.random.normal(k[1], (B, S, nI))).astype(jnp.bfloat16)
        keys = jax.random.normal(k[2], (B, C, 128), jnp.bfloat16)
        o = np.asarray(jax.jit(lambda *a: ix.index_scores(*a, backend=backend))(q, w, keys), np.float32)
        r = np.asarray(jax.jit(ix.reference.scores)(q, w, keys), np.float32)
        ulp = np.abs(o - r) / (np.abs(r) + 1e-3 * np.abs(r).max())
        frac = float(np.mean(o != r))
        good = np.isfinite(o).all() and float(ulp.max()) <= 2 ** -7 and frac < 0.01
        ok &= bool(good)
        log(f"check index_scores B={B} S={S} nI={nI} C={C}: differing {frac:.2%}, max rel {ulp.max():.1e} "
            f"{'ok' if good else 'FAIL'}")
    return ok


# ---- the kernels bench --------------------------------------------------------------------------------
def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def bench_kernels(args) -> int:
    from pallas_kernels.sparse_attention import gpu as sa_gpu
    from pallas_kernels.sparse_attention import sparse_attention
    from pallas_kernels.sparse_attention.reference import sparse_attention as ref

    t_start = time.perf_counter()
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if not args.skip_check:
        ok = check_kernels(log)
        log(f"check: {'all ok' if ok else 'FAILURES'}")
        if args.check_only:
            return 0 if ok else 1
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    bw = measure_copy_bw(64 << 20 if args.smoke else 2 << 30)
    peak = measure_matmul_peak(512 if args.smoke else 8192)
    log(f"roofline: device copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {peak / 1e12:.0f} TFLOP/s")

    models = [m for m in args.models.split(",") if m]
    results = []
    scale = KDIM ** -0.5

    def kernel_fn(cfg):
        if on_gpu and cfg:
            return jax.jit(lambda q, kv, i, s: sa_gpu.sparse_attention(q, kv, i, s, scale, **cfg))
        return jax.jit(lambda q, kv, i, s: sparse_attention(q, kv, i, s, scale))

    ref_fn = jax.jit(lambda q, kv, i, s: ref(q, kv, i, s, scale))
    dense_fn = jax.jit(lambda q, kv, i, s: dense_attention(q, kv, i, s, scale))

    # a small sweep of the GPU kernel's launch parameters on one decode and one prefill shape per model
    tuned = {}
    for model in models:
        H, topk = MODELS[model]["H"], MODELS[model]["topk"]
        for mode in ("decode", "prefill"):
            if not on_gpu or args.no_tune:
                tuned[(model, mode)] = {}
                continue
            if mode == "decode":
                sets = [decode_inputs(jax.random.PRNGKey(s), 64, H, topk, 65536) for s in range(2)]
            else:
                sets = [prefill_inputs(jax.random.PRNGKey(0), H, topk, 4096)]
            best, best_t = {}, None
            grid = ([(16, 4, 2), (32, 4, 2), (32, 4, 3), (64, 8, 2)] if mode == "decode" else
                    [(32, 4, 2), (32, 4, 3), (64, 8, 2)])
            for hb, nw, ns in grid:
                cfg = dict(heads_per_program=hb, num_warps=nw, num_stages=ns)
                t, err = _try_time(kernel_fn(cfg), sets, max_total_s=0.5)
                log(f"tune {model} {mode} hb={hb} warps={nw} stages={ns}: {'%.1f us' % (t * 1e6) if t else err}")
                if t and (best_t is None or t < best_t):
                    best, best_t = cfg, t
            tuned[(model, mode)] = best
            log(f"tune {model} {mode}: best {best}")
            del sets

    cases = []
    for model in models:
        if args.smoke:                                  # CPU smoke test of this script: tiny shapes
            cases += [(model, "decode", 2, 1024), (model, "prefill", 1, 256)]
            continue
        for B in (1, 16, 64):
            for ctx in (8192, 65536, 131072):
                cases.append((model, "decode", B, ctx))
        cases.append((model, "decode", 1, 1 << 20))
        for S in (8192, 32768, 65536):
            cases.append((model, "prefill", 1, S))
    hdr = ("| model | mode | batch | ctx | T | kernel us | GB/s | TFLOP/s | %copy BW | %matmul | floor us "
           "| ref us | x ref | dense us | x dense |")
    table = [hdr, "|" + "---|" * 15]
    for (model, mode, B, ctx) in cases:
        H, topk = MODELS[model]["H"], MODELS[model]["topk"]
        elapsed = time.perf_counter() - t_start
        if elapsed > args.time_budget:
            log(f"{model} {mode} B={B} ctx={ctx}: skipped (time budget)")
            continue
        try:
            if mode == "decode":
                kvbytes = B * (WINDOW + ctx // 4) * KDIM * 2
                nsets = int(min(16, max(1, math.ceil(200e6 / kvbytes))))
                sets = [decode_inputs(jax.random.PRNGKey(s), B, H, topk, ctx) for s in range(nsets)]
            else:
                sets = [prefill_inputs(jax.random.PRNGKey(0), H, topk, ctx)]
            _sync(sets)
        except Exception as e:  # noqa: BLE001
            log(f"{model} {mode} B={B} ctx={ctx}: inputs {'OOM' if _is_oom(e) else e}")
            continue
        q, kv, idx, _ = sets[0]
        T = idx.shape[-1]
        by, fl = _cost(q, kv, idx)
        tk, ek = _try_time(kernel_fn(tuned.get((model, mode), {})), sets)
        late = time.perf_counter() - t_start > args.time_budget * 0.8
        tr, er = (None, "skipped") if (args.no_baselines or late) else _try_time(ref_fn, sets, max_total_s=1.0)
        td, ed = (None, "skipped") if (args.no_baselines or late) else _try_time(dense_fn, sets, max_total_s=1.0)
        del sets, q, kv, idx
        floor = max(by / bw, fl / peak)
        row = dict(model=model, mode=mode, batch=B, ctx=ctx, T=T, bytes=by, flops=fl, kernel_s=tk, kernel_err=ek,
                   ref_s=tr, ref_err=er, dense_s=td, dense_err=ed, floor_s=floor)
        results.append(row)
        us = lambda t: None if t is None else t * 1e6
        cells = [model, mode, str(B), f"{ctx // 1024}K", str(T),
                 _fmt(us(tk)) if tk else ek,
                 _fmt(by / tk / 1e9, 0) if tk else "-",
                 _fmt(fl / tk / 1e12, 1) if tk else "-",
                 _fmt(100 * by / tk / bw, 0) if tk else "-",
                 _fmt(100 * fl / tk / peak, 0) if tk else "-",
                 _fmt(us(floor)),
                 _fmt(us(tr)) if tr else er, _fmt(tr / tk, 1) if (tr and tk) else "-",
                 _fmt(us(td)) if td else ed, _fmt(td / tk, 1) if (td and tk) else "-"]
        table.append("| " + " | ".join(cells) + " |")
        log(table[-1])

    # indexer scoring (one decode and one prefill shape)
    from pallas_kernels import indexer as ix
    itab = ["| indexer scores | B | S | C | kernel us | ref us | x ref | TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    if time.perf_counter() - t_start < args.time_budget:
        for (B, S, C) in (((2, 1, 256), (1, 64, 64)) if args.smoke else ((64, 1, 32768), (1, 8192, 2048))):
            k = jax.random.split(jax.random.PRNGKey(3), 3)
            qi = jax.random.normal(k[0], (B, S, 64, 128), jnp.bfloat16)
            wi = (0.1 * jax.random.normal(k[1], (B, S, 64))).astype(jnp.bfloat16)
            ki = jax.random.normal(k[2], (B, C, 128), jnp.bfloat16)
            tk, ek = _try_time(jax.jit(lambda *a: ix.index_scores(*a)), [(qi, wi, ki)])
            tr, er = _try_time(jax.jit(ix.reference.scores), [(qi, wi, ki)])
            fl = 2 * B * S * C * 64 * 128
            itab.append(f"| | {B} | {S} | {C} | {_fmt(tk * 1e6) if tk else ek} | {_fmt(tr * 1e6) if tr else er} "
                        f"| {_fmt(tr / tk, 1) if (tr and tk) else '-'} | {_fmt(fl / tk / 1e12, 1) if tk else '-'} |")
            log(itab[-1])

    log("")
    log(f"roofline: device copy {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s; "
        f"floor = max(bytes / copy BW, flops / matmul peak)")
    for t in table:
        log(t)
    for t in itab:
        log(t)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, copy_bw=bw, matmul_peak=peak,
                           tuned={f"{a}/{b}": c for (a, b), c in tuned.items()}, results=results), f, indent=1)
    log(f"total bench time {time.perf_counter() - t_start:.0f} s")
    return 0


# ---- command line -------------------------------------------------------------------------------------
def _parsers(sub):
    k = sub.add_parser("kernels", help="sparse attention / indexer kernels vs reference and dense attention")
    k.add_argument("--models", default="flash,pro", help="comma list of: " + ",".join(MODELS))
    k.add_argument("--no-baselines", action="store_true", help="time only the kernel")
    k.add_argument("--no-tune", action="store_true", help="skip the launch-parameter sweep")
    k.add_argument("--skip-check", action="store_true", help="skip the on-device correctness check")
    k.add_argument("--check-only", action="store_true", help="only the on-device correctness check")
    k.add_argument("--time-budget", type=float, default=420.0, help="seconds; later cases are skipped")
    k.add_argument("--json", default=None, help="write the raw results here")
    k.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU test of the script itself)")
    k.set_defaults(func=bench_kernels)
    # the other benches live in their own modules (imported here: they import helpers from this one)
    from v4jax import bench_load, bench_moe, bench_train
    bench_load.add_parser(sub)
    bench_moe.add_parser(sub)
    bench_train.add_parser(sub)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m v4jax.bench", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    _parsers(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
