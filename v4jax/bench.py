"""Benchmarks: python -m v4jax.bench <subcommand> ...

Subcommands (each is a function taking the parsed arguments; add yours with a parser in `_parsers`):
  kernels   sparse attention (and indexer scoring) kernels vs the jnp reference and dense-mask attention, at the
            Flash and Pro shapes, with roofline numbers measured in the same run (device copy, bf16 matmul).
  load      streaming checkpoint load: disk -> device GB/s and peak host RSS (v4jax/bench_load.py).
  moe       the MoE grouped matmul at Flash expert shapes, TFLOP/s vs bf16 peak (v4jax/bench_moe.py).
  train     a V4-shaped training step, tokens/s and MFU, Muon vs AdamW (v4jax/bench_train.py).
  full      a complete Flash/Pro model at real size, native FP8/FP4 weights generated on the devices, experts
            sharded: prefill/decode throughput, memory, KV bytes/token, decode floor (v4jax/bench_full.py).

Timing: warm-up calls first (compilation excluded), then samples of n back-to-back calls (n chosen so that a sample
lasts a few ms; the inputs rotate among several sets so small pools are not served from L2), each sample ended
with block_until_ready; the reported time is the median sample / n. Decode kernels (tens of us) are timed as
chains of CHAIN dependent calls inside one jit (one host dispatch per chain; each call consumes the previous
output as its q), so host dispatch cannot hide a fast kernel; every timed decode output is checked against the
XLA reference on the same inputs.

`kernels` decode part: a launch sweep at 64K context (split counts exact / inexact, heads per program, warps,
stages, register prefetch) and the table rows for the automatic path of `sparse_attention` next to the
single-pass kernel; `scripts/bench_decode_quick.py` runs the same decode part alone (about 2 minutes).
"""
from __future__ import annotations

import argparse
import functools
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


def line_logger():
    """(log, lines): log(s) prints s at once and keeps it in lines (for a JSON dump or a closing table)."""
    lines: list[str] = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)
    return log, lines


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


def dense_attention(q, kv, idx, sink, scale, q_chunk: int | None = None):
    """Every query against all N pool entries, with a mask built from its index list (the naive baseline).
    q_chunk: the queries `q_chunk` positions at a time (`lax.map`; S a multiple of it), so long prefills fit in
    memory: the [B, S, H, N] scores of a 64K prefill would be ~280 GB at once."""
    B, S, H, K = q.shape
    if q_chunk and S > q_chunk:
        if S % q_chunk:
            raise ValueError(f"dense_attention: S={S} is not a multiple of q_chunk={q_chunk}")
        split = lambda a: jnp.moveaxis(a.reshape((B, S // q_chunk, q_chunk) + a.shape[2:]), 1, 0)
        out = jax.lax.map(lambda qi: dense_attention(qi[0], kv, qi[1], sink, scale), (split(q), split(idx)))
        return jnp.moveaxis(out, 0, 1).reshape(B, S, H, K)
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


DENSE_Q_CHUNK = 256     # prefill's dense baseline: [256, H, N] fp32 scores per step (Pro at 64K: ~2.3 GB)


def _cost(q, kv, idx):
    """(bytes that must move, flops) of one sparse attention call: q, the gathered valid rows, idx, output."""
    B, S, H, K = q.shape
    valid = int(jnp.sum(idx >= 0))
    by = q.size * 2 + valid * K * kv.dtype.itemsize + idx.size * 4 + q.size * 2
    return by, 4 * H * K * valid


# ---- correctness on the device ------------------------------------------------------------------------
def np_sparse_attention(q, kv, idx, sink, scale, block=64, splits=None):
    """Host float64 emulation of the reference numerics (spec section 6), to judge device results independently
    of XLA's own precision choices: per 64-block online softmax, p rounded to bf16 before P.V.

    splits=n emulates the GPU split path *without* its max pre-pass (gpu.sparse_attention(exact=False)): the list
    cut into n chunks of whole blocks as gpu.plan cuts it, each chunk's online softmax starting from -inf (its p
    rounded against the chunk's own running max), the chunks combined at the row's final max."""
    import ml_dtypes
    q, kv, sink = (np.asarray(a, np.float64) for a in (q, kv, sink))
    idx = np.asarray(idx)
    B, S, H, K = q.shape
    T = idx.shape[-1]
    nb = max(1, -(-T // block))
    bps = -(-nb // (splits or 1))
    out = np.zeros((B, S, H, K))
    for b in range(B):
        for s in range(S):
            parts = []
            for c0 in range(0, nb * block, bps * block):
                m, l, acc = np.full(H, -np.inf), np.zeros(H), np.zeros((H, K))
                for j0 in range(c0, min(c0 + bps * block, T), block):
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
                parts.append((m, l, acc))
            M = np.max([p[0] for p in parts], axis=0)
            mf = np.where(M == -np.inf, 0.0, M)
            num, den = np.zeros((H, K)), np.exp(sink - mf)
            for m, l, acc in parts:
                w = np.where(m == -np.inf, 0.0, np.exp(np.where(m == -np.inf, 0.0, m) - mf))
                num += w[:, None] * acc
                den += w * l
            out[b, s] = num / den[:, None]
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# B, S, H, K, N, T: small odd shapes, then the decode shapes (Flash H=64 T=640, Pro H=128 T=1152) at batch 1 / 16 /
# 64 (split path at 1 and 16, one pass at 64) and a T that is not a multiple of 64
SA_CHECK_CASES = [(2, 3, 4, 128, 50, 150), (1, 5, 16, 512, 300, 200), (3, 1, 64, 512, 2000, 640),
                  (2, 2, 128, 512, 5000, 1152), (1, 1, 64, 512, 100, 64), (2, 7, 16, 128, 33, 70),
                  (16, 1, 64, 512, 3000, 640), (16, 1, 128, 512, 3000, 1152), (64, 1, 64, 512, 800, 640),
                  (1, 1, 128, 512, 9000, 1000)]


def check_sparse_attention(log, backend, cases=SA_CHECK_CASES, threads: int = 8, interpret: bool = False) -> bool:
    """The dispatch (auto path) and, on GPU, the single-pass and split variants vs a host float64 emulation of the
    reference numerics (rounded to bf16) and vs the XLA reference, on random inputs with -1 holes, ragged tails
    and an all-masked row. Every variant must be finite, within 1e-3 of the emulation of its own numerics (the
    spec's, or for exact=False the split emulation), within 1e-2 of the XLA reference, and exactly 0 on the
    all-masked row. The kernels compile in parallel (compile_many). interpret=True: a CPU test of this check."""
    import ml_dtypes
    from pallas_kernels.sparse_attention import gpu as sa_gpu
    from pallas_kernels.sparse_attention import sparse_attention
    from pallas_kernels.sparse_attention.reference import sparse_attention as ref
    bf = lambda x: x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    inputs, jobs, variants = [], {}, {}
    for i, (B, S, H, K, N, T) in enumerate(cases):
        k = jax.random.split(jax.random.PRNGKey(100 + i), 5)
        q = jax.random.normal(k[0], (B, S, H, K), jnp.bfloat16)
        kv = jax.random.normal(k[1], (B, N, K), jnp.bfloat16)
        idx = jax.random.randint(k[2], (B, S, T), -1, N, jnp.int32)               # ~1/N holes anywhere
        holes = jax.random.uniform(k[3], (B, S, T)) < 0.1
        tail = jnp.arange(T) >= jax.random.randint(k[4], (B, S, 1), T // 2, T + 1)   # ragged valid lengths
        idx = jnp.where(holes | tail, -1, idx).at[0, 0].set(-1)                   # an all-masked row
        sink = jax.random.normal(k[3], (H,), jnp.float32)
        scale = K ** -0.5
        inputs.append((q, kv, idx, sink))
        vs = [("auto", dict(backend=backend), None)]
        if backend == "gpu":
            nb = -(-T // 64)
            vs.append(("1-pass", dict(num_splits=1), None))
            if nb > 1:
                vs += [(f"P={max(2, nb // 2)}", dict(num_splits=max(2, nb // 2)), None),
                       (f"P={nb} inexact", dict(num_splits=nb, exact=False), nb)]
        variants[i] = vs
        for name, kw, _ in vs:
            if "backend" in kw:
                fn = functools.partial(lambda q, kv, i, s, sc, kw: sparse_attention(q, kv, i, s, sc, **kw),
                                       sc=scale, kw=kw)
            else:
                fn = functools.partial(lambda q, kv, i, s, sc, kw: sa_gpu.sparse_attention(q, kv, i, s, sc, **kw),
                                       sc=scale, kw=dict(kw, interpret=interpret))
            jobs[(i, name)] = (jax.jit(fn), (q, kv, idx, sink))
    compiled = compile_many(jobs, log, threads=threads)
    ok = True
    for i, (B, S, H, K, N, T) in enumerate(cases):
        q, kv, idx, sink = inputs[i]
        scale = K ** -0.5
        r = np.asarray(jax.jit(lambda *a: ref(*a, scale))(q, kv, idx, sink), np.float64)
        emu = bf(np_sparse_attention(q, kv, idx, sink, scale))
        msgs = []
        for name, _, splits in variants[i]:
            exe = compiled[(i, name)]
            if isinstance(exe, str):
                ok = False
                msgs.append(f"{name} {exe}")
                continue
            want = emu if splits is None else bf(np_sparse_attention(q, kv, idx, sink, scale, splits=splits))
            o = np.asarray(exe(q, kv, idx, sink), np.float64)
            e_spec, e_ref = _rel(o, want), _rel(o, r)
            good = bool(np.isfinite(o).all() and e_spec < 1e-3 and e_ref < 1e-2 and not o[0, 0].any())
            ok &= good
            msgs.append(f"{name} {e_spec:.1e}/{e_ref:.1e}{'' if good else ' FAIL'}")
        log(f"check sparse_attention B={B} S={S} H={H} K={K} N={N} T={T} (auto: {sa_gpu.plan(B, S, H, T)['P']} "
            f"split(s)): err vs host f64 emulation / vs XLA reference: " + ", ".join(msgs)
            + f"; XLA reference vs emulation {_rel(r, emu):.1e}")
    return ok


def check_kernels(log, threads: int = 8) -> bool:
    """Pallas kernels (compiled for this device) vs the jnp reference on small random inputs, plus gradients."""
    from pallas_kernels import indexer as ix
    from pallas_kernels.sparse_attention import sparse_attention
    backend = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(jax.default_backend())
    if backend is None:
        log("check: no GPU/TPU; skipped")
        return True
    ok = check_sparse_attention(log, backend, threads=threads)
    # gradients through the dispatch (custom_vjp: reference backward); T = 200 at B*S = 3: the split path
    B, S, H, K, N, T = 1, 3, 16, 128, 40, 200
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


# ---- decode: chained timing, split sweep, table (shared with scripts/bench_decode_quick.py) -------------
CHAIN = 16          # calls per timed dispatch


# (rows, C, k) of the top-k table: decode (rows = batch) at 8K / 64K / 128K / 1M context, prefill (rows = queries)
TOPK_SHAPES = ((1, 2048, 512), (64, 16384, 512), (64, 32768, 1024), (1, 262144, 512), (1, 262144, 1024),
               (8192, 2048, 512), (4096, 16384, 512), (32768, 8192, 512))


def topk_chain(f, n=CHAIN):
    """jit-able (s, nv) -> n dependent calls of f(s, nv): each call's scores depend on the previous result (a select
    XLA cannot fold), so the n calls run in sequence in one dispatch."""
    def run(s, nv):
        def body(_, acc):
            return acc + jnp.sum(f(jnp.where(acc == -7, s * 2, s), nv)[..., :1])
        return jax.lax.fori_loop(0, n, body, jnp.int32(0))
    return run


def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def _ctx(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n >= 1024 else str(n)


def decode_sets(B, H, topk, ctx, n=CHAIN, seed=0, abstract=False):
    """A first q and n decode input sets (kv, idx, sink): pool [window ring | C = ctx/4 compressed entries], every
    list full (window 128 + top-k). The pools rotate over min(n, ceil(200 MB / pool)) distinct kv arrays (small
    pools are not served from L2), every set has its own random top-k list. abstract=True: ShapeDtypeStructs."""
    C = ctx // 4
    N = WINDOW + C
    T = WINDOW + min(topk, C)
    nkv = int(min(n, max(1, math.ceil(200e6 / (B * N * KDIM * 2)))))
    if abstract:
        S = jax.ShapeDtypeStruct
        kv, idx, sink = S((B, N, KDIM), jnp.bfloat16), S((B, 1, T), jnp.int32), S((H,), jnp.float32)
        return S((B, 1, H, KDIM), jnp.bfloat16), tuple((kv, idx, sink) for _ in range(n))
    ks = jax.random.split(jax.random.PRNGKey(seed), 2 + nkv + n)
    q = jax.random.normal(ks[0], (B, 1, H, KDIM), jnp.bfloat16)
    sink = jax.random.normal(ks[1], (H,), jnp.float32)
    kvs = [jax.random.normal(ks[2 + i], (B, N, KDIM), jnp.bfloat16) for i in range(nkv)]
    win = jnp.broadcast_to(jnp.arange(WINDOW, dtype=jnp.int32), (B, 1, WINDOW))
    sets = []
    for i in range(n):
        comp = jax.random.randint(ks[2 + nkv + i], (B, 1, T - WINDOW), WINDOW, N, jnp.int32)
        sets.append((kvs[i % nkv], jnp.concatenate([win, comp], axis=-1), sink))
    return q, tuple(sets)


def chain(f, n):
    """jit(q, sets) -> (q_n, q_1): n calls q_{i+1} = f(q_i, *sets[i % len(sets)]), each depending on the previous
    one (so XLA cannot overlap or drop them; one host dispatch for n calls), plus the first call's output (the
    result for sets[0] with the given q, for checking)."""
    def run(q, sets):
        first = None
        for i in range(n):
            q = f(q, *sets[i % len(sets)])
            first = q if first is None else first
        return q, first
    return jax.jit(run)


def compile_many(jobs: dict, log=None, threads: int = 8) -> dict:
    """{key: (jitted fn, abstract args)} -> {key: compiled executable | error string}. Lowering (Pallas -> Triton
    IR, Python) runs here; the XLA/Triton compiles run in a thread pool (they release the GIL). Use only for
    functions without XLA GEMM autotuning (the kernels): the autotuner measures on the device."""
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.perf_counter()
    lowered, out = {}, {}
    for key, (fn, args) in jobs.items():
        try:
            lowered[key] = fn.lower(*args)
        except Exception as e:  # noqa: BLE001
            out[key] = f"lowering error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"

    def comp(item):
        key, low = item
        try:
            return key, low.compile()
        except Exception as e:  # noqa: BLE001
            return key, ("OOM" if _is_oom(e) else f"compile error: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}")

    with ThreadPoolExecutor(max(1, threads)) as ex:
        for key, res in ex.map(comp, lowered.items()):
            out[key] = res
    if log:
        nerr = sum(isinstance(v, str) for v in out.values())
        log(f"compiled {len(jobs)} functions in {time.perf_counter() - t0:.1f} s ({threads} threads), {nerr} errors")
    return out


def time_chain(fn, q, sets, n, max_total_s=1.0, min_samples=7):
    """(seconds per call, output of the first call) of a chain(f, n) executable; the first run warms up."""
    out = fn(q, sets)
    _sync(out)
    t = time_fn(fn, [(q, sets)], min_samples=min_samples, target_sample_s=0.002, max_total_s=max_total_s, max_n=50)
    return t / n, out[1]


def cfg_name(cfg: dict) -> str:
    if not cfg:
        return "auto"
    parts = []
    if "num_splits" in cfg:
        parts.append(f"P={cfg['num_splits']}" + ("" if cfg["num_splits"] == 1 or cfg.get("exact", True)
                                                 else " inexact"))
    for k, short in (("heads_per_program", "hb"), ("num_warps", "w"), ("num_stages", "s"),
                     ("prepass_heads", "pre-hb")):
        if k in cfg:
            parts.append(f"{short}{cfg[k]}")
    if cfg.get("prefetch"):
        parts.append("prefetch")
    return " ".join(parts)


def decode_sweep_configs(H, T, B, full=False) -> list[dict]:
    """Launch variants of the GPU kernel for one decode shape. Small batch: split counts (the divisors of the block
    count), exact and not; batch >= 32: launch parameters and a few splits (the 60%-of-bandwidth target)."""
    nb = -(-T // 64)
    divs = [d for d in range(2, nb + 1) if nb % d == 0] or [1]
    cfgs = [{}, dict(num_splits=1)]
    if B < 32:
        mid = divs[len(divs) // 2]
        cfgs += [dict(num_splits=mid), dict(num_splits=divs[-1]), dict(num_splits=divs[-1], exact=False),
                 dict(num_splits=mid, prepass_heads=min(H, 64))]
        if full:
            cfgs += [dict(num_splits=d) for d in divs] + [dict(num_splits=d, exact=False) for d in divs]
            cfgs += [dict(num_splits=mid, heads_per_program=16), dict(num_splits=divs[-1], num_warps=8),
                     dict(num_splits=divs[0], num_stages=2)]
    else:
        # more programs per SM (2 splits; fewer pipeline stages = less shared memory per program), all heads in
        # one program (each row read once), register prefetch instead of Triton's pipeliner
        cfgs += [dict(num_splits=2), dict(num_splits=2, exact=False), dict(num_splits=2, exact=False, num_stages=2),
                 dict(num_splits=2, exact=False, num_stages=1, prefetch=True),
                 dict(num_splits=1, num_stages=4), dict(num_splits=1, heads_per_program=16),
                 dict(num_splits=1, heads_per_program=16, num_stages=2),
                 dict(num_splits=1, heads_per_program=64, num_warps=8),
                 dict(num_splits=2, exact=False, heads_per_program=64, num_warps=8),
                 dict(num_splits=1, prefetch=True, num_stages=1),
                 dict(num_splits=1, prefetch=True, num_stages=1, num_warps=8),
                 # 8 warps on the 16-head tile: the same tile over twice the threads (fewer registers per thread);
                 # the 4-warp launch runs 2 programs = 8 warps per SM (registers and shared memory), one wave
                 dict(num_splits=1, heads_per_program=16, num_warps=8),
                 dict(num_splits=1, heads_per_program=16, num_warps=8, num_stages=2),
                 dict(num_splits=1, heads_per_program=32, num_warps=8)]
        if full:
            cfgs += [dict(num_splits=divs[1 if len(divs) > 1 else 0], exact=False),
                     dict(num_splits=1, num_stages=2), dict(num_splits=1, num_warps=8),
                     dict(num_splits=2, heads_per_program=64, num_warps=8, prepass_heads=64),
                     dict(num_splits=1, heads_per_program=64, num_warps=8, num_stages=4)]
    seen, out = set(), []
    for c in cfgs:
        k = tuple(sorted(c.items()))
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def run_decode(log, *, models, batches, ctxs, bw, peak, sweep_ctx=65536, sweep=True, full_sweep=False,
               baselines=True, budget_s=1e9, t_start=None, threads=8, max_total_s=0.5, interpret=False):
    """The decode sweep (launch variants at ctx = sweep_ctx) and the decode table (auto path, 1-pass, reference,
    dense) for models x batches x ctxs. Every timed kernel output is checked against the XLA reference on the same
    inputs (rel. error < 1e-2; on GPU the jitted XLA reference itself is ~2e-3 from the spec numerics).
    Kernels: chains of CHAIN dependent calls per dispatch (compiled up front in parallel); reference and dense:
    plain calls rotating over the same input sets (each >= ~40 us: host dispatch stays hidden).
    Returns (sweep_rows, table_rows, sweep_lines, table_lines)."""
    from pallas_kernels.sparse_attention import gpu as sa_gpu
    from pallas_kernels.sparse_attention import sparse_attention
    from pallas_kernels.sparse_attention.reference import sparse_attention as ref
    t_start = t_start or time.perf_counter()
    scale = KDIM ** -0.5
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    gpu_kernel = on_gpu or interpret

    def kern(cfg):
        if gpu_kernel:
            return lambda q, kv, i, s: sa_gpu.sparse_attention(q, kv, i, s, scale, interpret=interpret, **cfg)
        return lambda q, kv, i, s: sparse_attention(q, kv, i, s, scale)

    def resolved(H, T, B, cfg):
        # the launch sparse_attention itself picks for cfg (its decode defaults apply only while num_splits and
        # heads_per_program are unset), made explicit so that equal launches share one key
        hb, nw = sa_gpu.launch_defaults(B, 1, H, T, cfg.get("heads_per_program"), cfg.get("num_splits"),
                                        cfg.get("num_warps"))
        p = sa_gpu.plan(B, 1, H, T, num_splits=cfg.get("num_splits"), heads_per_program=hb, interpret=interpret)
        c = dict(cfg, num_splits=p["P"], heads_per_program=p["hb"], num_warps=nw)
        if p["P"] == 1 or not c.get("exact", True):
            c.pop("prepass_heads", None)
        if p["P"] == 1:
            c.pop("exact", None)
        return tuple(sorted(c.items())), p

    shapes = [(m, B, ctx) for m in models for B in batches for ctx in ctxs]
    sweep_shapes = [(m, B, sweep_ctx) for m in models for B in batches] if (sweep and gpu_kernel) else []
    # every kernel function to compile: (model, B, ctx, resolved cfg) -> (cfg, plan)
    want = {}
    for (m, B, ctx) in shapes + sweep_shapes:
        H, topk = MODELS[m]["H"], MODELS[m]["topk"]
        T = WINDOW + min(topk, ctx // 4)
        cfgs = [{}, dict(num_splits=1)] if gpu_kernel else [{}]
        if (m, B, ctx) in sweep_shapes:
            cfgs = decode_sweep_configs(H, T, B, full=full_sweep)
        for cfg in cfgs:
            key, p = resolved(H, T, B, cfg)
            want.setdefault((m, B, ctx, key), (cfg, p))
    jobs = {}
    for (m, B, ctx, key), (cfg, p) in want.items():
        H, topk = MODELS[m]["H"], MODELS[m]["topk"]
        jobs[(m, B, ctx, key)] = (chain(kern(dict(key)), CHAIN), decode_sets(B, H, topk, ctx, abstract=True))
    log(f"decode: compiling {len(jobs)} kernel chains ({CHAIN} calls each) ... "
        f"[{time.perf_counter() - t_start:.0f} s]")
    compiled = compile_many(jobs, log, threads=threads)

    def cost(B, H, T):
        by = B * H * KDIM * 2 * 2 + B * T * (KDIM * 2 + 4)               # q + out + gathered rows + idx
        return by, 4 * H * KDIM * B * T

    sweep_rows = []

    def measure(m, B, ctx, data, key):
        exe = compiled[key]
        if isinstance(exe, str):
            return None, exe, None
        try:
            t, out = time_chain(exe, *data, CHAIN, max_total_s=max_total_s, min_samples=5)
            return t, None, out
        except Exception as e:  # noqa: BLE001
            return None, ("OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"), None

    ref_fn = lambda q, kv, i, s: ref(q, kv, i, s, scale)
    dense_fn = lambda q, kv, i, s: dense_attention(q, kv, i, s, scale)
    table_rows, table_lines = [], []
    hdr = ("| model | mode | batch | ctx | T | splits | kernel us | GB/s | TFLOP/s | %copy BW | %matmul | floor us "
           "| 1-pass us | x 1-pass | ref us | x ref | dense us | x dense | check |")
    table_lines += [hdr, "|" + "---|" * 19]
    sweep_lines = ["| model | batch | ctx | config | splits | programs | us | GB/s | %copy BW | x 1-pass | check |",
                   "|" + "---|" * 11]
    order = sorted(set(shapes) | set(sweep_shapes), key=lambda s: (models.index(s[0]), s[1], s[2]))
    for (m, B, ctx) in order:
        H, topk = MODELS[m]["H"], MODELS[m]["topk"]
        T = WINDOW + min(topk, ctx // 4)
        el = time.perf_counter() - t_start
        if el > budget_s:
            log(f"{m} decode B={B} ctx={ctx}: skipped (time budget, {el:.0f} s)")
            continue
        try:
            data = decode_sets(B, H, topk, ctx)
            _sync(data)
        except Exception as e:  # noqa: BLE001
            log(f"{m} decode B={B} ctx={ctx}: inputs {'OOM' if _is_oom(e) else e}")
            continue
        by, fl = cost(B, H, T)
        late = time.perf_counter() - t_start > budget_s * 0.8
        tr = er = td = ed = None
        arg_sets = [(data[0], *st) for st in data[1]]
        rj = jax.jit(ref_fn)
        try:
            r_out = rj(*arg_sets[0])                                     # the reference output for the checks
            _sync(r_out)
        except Exception:  # noqa: BLE001
            r_out = None
        if baselines and not late:
            # plain calls (>= ~40 us each, so host dispatch stays hidden), rotating over the input sets
            tr, er = _try_time(rj, arg_sets, max_total_s=max_total_s, min_samples=5)
            td, ed = _try_time(jax.jit(dense_fn), arg_sets, max_total_s=max_total_s, min_samples=3)
        else:
            er = ed = "skipped"

        def check(out):
            if out is None or r_out is None:
                return "-"
            o = np.asarray(out, np.float32)
            e = _rel(o, np.asarray(r_out, np.float32))
            return f"{e:.0e}" if (np.isfinite(o).all() and e < 1e-2) else f"FAIL {e:.0e}"

        keys = {cfg_key: v for (mm, BB, cc, cfg_key), v in want.items() if (mm, BB, cc) == (m, B, ctx)}
        times = {}
        for cfg_key, (cfg, p) in keys.items():
            t, err, out = measure(m, B, ctx, data, (m, B, ctx, cfg_key))
            times[cfg_key] = (t, err, check(out), p)
        auto_key, auto_p = resolved(H, T, B, {})
        one_key, _ = resolved(H, T, B, dict(num_splits=1))
        tk, ek, ck, _ = times[auto_key]
        t1, e1, _, _ = times.get(one_key, (None, "-", "-", None))
        del data, arg_sets
        us = lambda t: None if t is None else t * 1e6
        if (m, B, ctx) in sweep_shapes:
            for cfg_key, (t, err, chk, p) in sorted(times.items(), key=lambda kv: kv[1][0] or 1e9):
                cfg = dict(cfg_key)
                name = cfg_name(cfg) + (" (auto)" if cfg_key == auto_key else "")
                sweep_rows.append(dict(model=m, batch=B, ctx=ctx, config=cfg, auto=cfg_key == auto_key, splits=p["P"],
                                       programs=p["programs"], kernel_s=t, err=err, check=chk))
                cells = [m, str(B), _ctx(ctx), name, str(p["P"]), str(p["programs"]),
                         _fmt(us(t)) if t else err, _fmt(by / t / 1e9, 0) if t else "-",
                         _fmt(100 * by / t / bw, 0) if t else "-", _fmt(t1 / t, 2) if (t and t1) else "-", chk]
                sweep_lines.append("| " + " | ".join(cells) + " |")
                log(sweep_lines[-1])
        if (m, B, ctx) not in shapes:
            continue
        floor = max(by / bw, fl / peak)
        row = dict(model=m, mode="decode", batch=B, ctx=ctx, T=T, splits=auto_p["P"], bytes=by, flops=fl,
                   kernel_s=tk, kernel_err=ek, one_pass_s=t1, ref_s=tr, ref_err=er, dense_s=td, dense_err=ed,
                   floor_s=floor, check=ck)
        table_rows.append(row)
        cells = [m, "decode", str(B), _ctx(ctx), str(T), str(auto_p["P"]) if gpu_kernel else "-",
                 _fmt(us(tk)) if tk else ek,
                 _fmt(by / tk / 1e9, 0) if tk else "-",
                 _fmt(fl / tk / 1e12, 1) if tk else "-",
                 _fmt(100 * by / tk / bw, 0) if tk else "-",
                 _fmt(100 * fl / tk / peak, 0) if tk else "-",
                 _fmt(us(floor)),
                 _fmt(us(t1)) if t1 else (e1 or "-"), _fmt(t1 / tk, 2) if (t1 and tk) else "-",
                 _fmt(us(tr)) if tr else er, _fmt(tr / tk, 1) if (tr and tk) else "-",
                 _fmt(us(td)) if td else ed, _fmt(td / tk, 1) if (td and tk) else "-", ck]
        table_lines.append("| " + " | ".join(cells) + " |")
        log(table_lines[-1] + f"  [{time.perf_counter() - t_start:.0f} s]")
    return sweep_rows, table_rows, sweep_lines, table_lines


# ---- the kernels bench --------------------------------------------------------------------------------
def bench_kernels(args) -> int:
    from pallas_kernels.sparse_attention import gpu as sa_gpu
    from pallas_kernels.sparse_attention import sparse_attention
    from pallas_kernels.sparse_attention.reference import sparse_attention as ref

    t_start = time.perf_counter()
    log, lines = line_logger()
    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if not args.skip_check:
        ok = check_kernels(log, threads=args.threads)
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

    # decode: split sweep + table rows (chained timing, every output checked against the reference)
    if args.smoke:
        batches, ctxs, sweep_ctx = (1, 4), (1024,), 1024
    else:
        batches, ctxs, sweep_ctx = (1, 16, 64), (8192, 65536, 131072, 1 << 20), 65536
    sweep_rows, dec_rows, sweep_lines, dec_lines = run_decode(
        log, models=models, batches=batches, ctxs=ctxs, bw=bw, peak=peak, sweep_ctx=sweep_ctx,
        sweep=not args.no_tune, full_sweep=args.full_sweep, baselines=not args.no_baselines,
        budget_s=args.time_budget * 0.7, t_start=t_start, threads=args.threads,
        max_total_s=0.2 if args.smoke else 0.6, interpret=args.interpret)
    results += dec_rows

    # prefill: one pass (the split path is for small batches); a small launch sweep, then the rows
    def kernel_fn(cfg):
        if on_gpu and cfg:
            return jax.jit(lambda q, kv, i, s: sa_gpu.sparse_attention(q, kv, i, s, scale, **cfg))
        return jax.jit(lambda q, kv, i, s: sparse_attention(q, kv, i, s, scale))

    ref_fn = jax.jit(lambda q, kv, i, s: ref(q, kv, i, s, scale))
    dense_fn = jax.jit(lambda q, kv, i, s: dense_attention(q, kv, i, s, scale, q_chunk=DENSE_Q_CHUNK))
    tuned = {}
    for model in models:
        H, topk = MODELS[model]["H"], MODELS[model]["topk"]
        if not on_gpu or args.no_tune or time.perf_counter() - t_start > args.time_budget * 0.75:
            tuned[model] = {}
            continue
        sets = [prefill_inputs(jax.random.PRNGKey(0), H, topk, 4096)]
        best, best_t = {}, None
        for hb, nw, ns in [(32, 4, 2), (32, 4, 3), (64, 8, 2)]:
            cfg = dict(heads_per_program=hb, num_warps=nw, num_stages=ns)
            t, err = _try_time(kernel_fn(cfg), sets, max_total_s=0.5)
            log(f"tune {model} prefill hb={hb} warps={nw} stages={ns}: {'%.1f us' % (t * 1e6) if t else err}")
            if t and (best_t is None or t < best_t):
                best, best_t = cfg, t
        tuned[model] = best
        log(f"tune {model} prefill: best {best}")
        del sets
    table = list(dec_lines)
    for model in models:
        H, topk = MODELS[model]["H"], MODELS[model]["topk"]
        for S in ((256,) if args.smoke else (8192, 32768, 65536)):
            elapsed = time.perf_counter() - t_start
            if elapsed > args.time_budget:
                log(f"{model} prefill S={S}: skipped (time budget)")
                continue
            try:
                sets = [prefill_inputs(jax.random.PRNGKey(0), H, topk, S)]
                _sync(sets)
            except Exception as e:  # noqa: BLE001
                log(f"{model} prefill S={S}: inputs {'OOM' if _is_oom(e) else e}")
                continue
            q, kv, idx, _ = sets[0]
            T = idx.shape[-1]
            by, fl = _cost(q, kv, idx)
            tk, ek = _try_time(kernel_fn(tuned.get(model, {})), sets)
            late = time.perf_counter() - t_start > args.time_budget * 0.8
            tr, er = (None, "skipped") if (args.no_baselines or late) else _try_time(ref_fn, sets, max_total_s=1.0)
            td, ed = (None, "skipped") if (args.no_baselines or late) else _try_time(dense_fn, sets, max_total_s=1.0)
            del sets, q, kv, idx
            floor = max(by / bw, fl / peak)
            results.append(dict(model=model, mode="prefill", batch=1, ctx=S, T=T, splits=1, bytes=by, flops=fl,
                                kernel_s=tk, kernel_err=ek, ref_s=tr, ref_err=er, dense_s=td, dense_err=ed,
                                floor_s=floor))
            us = lambda t: None if t is None else t * 1e6
            cells = [model, "prefill", "1", _ctx(S), str(T), "1",
                     _fmt(us(tk)) if tk else ek,
                     _fmt(by / tk / 1e9, 0) if tk else "-",
                     _fmt(fl / tk / 1e12, 1) if tk else "-",
                     _fmt(100 * by / tk / bw, 0) if tk else "-",
                     _fmt(100 * fl / tk / peak, 0) if tk else "-",
                     _fmt(us(floor)), "-", "-",
                     _fmt(us(tr)) if tr else er, _fmt(tr / tk, 1) if (tr and tk) else "-",
                     _fmt(us(td)) if td else ed, _fmt(td / tk, 1) if (td and tk) else "-", "-"]
            table.append("| " + " | ".join(cells) + " |")
            log(table[-1])

    # indexer scoring (one decode and one prefill shape)
    from pallas_kernels import indexer as ix
    itab = ["| indexer scores | B | S | C | kernel us | ref us | x ref | TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    if time.perf_counter() - t_start < args.time_budget:
        for (B, S, C) in (((2, 1, 256), (1, 64, 64)) if args.smoke else
                          ((64, 1, 32768), (1, 8192, 2048), (1, 32768, 8192), (1, 65536, 16384))):
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

    # indexer top-k over bf16 scores: the kernel (pallas_kernels.indexer.gpu.index_topk) against jax.lax.top_k
    ttab = ["| indexer top-k | rows | C | k | kernel us | lax.top_k us | x top_k | scores GB/s | % copy BW | same |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    if time.perf_counter() - t_start < args.time_budget:
        for (R, C, kk) in (((2, 300, 20), (3, 64, 64)) if args.smoke else TOPK_SHAPES):
            s = jax.random.normal(jax.random.PRNGKey(R + C), (R, C), jnp.float32).astype(jnp.bfloat16)
            nv = jnp.full((R,), C, jnp.int32)
            fk = lambda s, nv, kk=kk: ix.index_topk(s, nv, kk)
            fr = lambda s, nv, kk=kk: ix.reference.topk(s, nv, kk)
            tk, ek = _try_time(jax.jit(topk_chain(fk)), [(s, nv)])
            tr, er = _try_time(jax.jit(topk_chain(fr)), [(s, nv)])
            try:
                same = "yes" if np.array_equal(np.asarray(jax.jit(fk)(s, nv)), np.asarray(jax.jit(fr)(s, nv))) else "NO"
            except Exception as e:  # noqa: BLE001 - a benchmark reports
                same = "OOM" if _is_oom(e) else "error"
            tk, tr = (t / CHAIN if t else None for t in (tk, tr))
            gbs = 2 * R * C / tk / 1e9 if tk else None
            ttab.append(f"| | {R} | {C} | {kk} | {_fmt(tk * 1e6) if tk else ek} | {_fmt(tr * 1e6) if tr else er} | "
                        f"{_fmt(tr / tk, 1) if (tr and tk) else '-'} | {_fmt(gbs, 0)} | "
                        f"{_fmt(100 * gbs * 1e9 / bw, 0) if gbs else '-'} | {same} |")
            log(ttab[-1])

    log("")
    log(f"roofline: device copy {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s; "
        f"floor = max(bytes / copy BW, flops / matmul peak); decode timed as chains of {CHAIN} dependent calls")
    if len(sweep_lines) > 2:
        log("decode launch sweep (sorted by time per shape; programs of the main kernel; exact splits add a "
            "block-max pre-pass of rows x blocks x head groups programs):")
        for t in sweep_lines:
            log(t)
        log("")
    for t in table:
        log(t)
    for t in itab + ttab:
        log(t)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, copy_bw=bw, matmul_peak=peak,
                           tuned_prefill=tuned, sweep=sweep_rows, results=results), f, indent=1, default=str)
    log(f"total bench time {time.perf_counter() - t_start:.0f} s")
    return 0


# ---- command line -------------------------------------------------------------------------------------
def _parsers(sub):
    k = sub.add_parser("kernels", help="sparse attention / indexer kernels vs reference and dense attention")
    k.add_argument("--models", default="flash,pro", help="comma list of: " + ",".join(MODELS))
    k.add_argument("--no-baselines", action="store_true", help="time only the kernel")
    k.add_argument("--no-tune", action="store_true", help="skip the launch-parameter sweeps (decode splits, prefill)")
    k.add_argument("--skip-check", action="store_true", help="skip the on-device correctness check")
    k.add_argument("--check-only", action="store_true", help="only the on-device correctness check")
    k.add_argument("--time-budget", type=float, default=420.0, help="seconds; later cases are skipped")
    k.add_argument("--json", default=None, help="write the raw results here")
    k.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU test of the script itself)")
    k.add_argument("--full-sweep", action="store_true", help="more launch variants in the decode sweep")
    k.add_argument("--threads", type=int, default=8, help="parallel kernel compiles")
    k.add_argument("--interpret", action="store_true",
                   help="(CPU test of the script) run the GPU kernel in interpret mode instead of the dispatch")
    k.set_defaults(func=bench_kernels)
    # the other benches live in their own modules (imported here: they import helpers from this one)
    from v4jax import bench_full, bench_load, bench_moe, bench_train
    bench_full.add_parser(sub)
    bench_load.add_parser(sub)
    bench_moe.add_parser(sub)
    bench_train.add_parser(sub)


def main(argv=None) -> int:
    from .xla_flags import apply_defaults
    apply_defaults()
    ap = argparse.ArgumentParser(prog="python -m v4jax.bench", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    _parsers(sub)
    args = ap.parse_args(argv)
    rc = args.func(args)
    # some subcommands return their results dict: exit 0 for those, not sys.exit(dict)'s status 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
