"""mHC Sinkhorn projection for NVIDIA GPUs: Pallas with the Triton backend, forward and backward kernels.

What: for T independent n x n logit matrices x (the wrapper flattens c [..., n, n] to [T, n*n], entry j = r*n + k
is row r, column k), compute the reference (reference.py)
    a = softmax_rows(x) + eps;  a = a / (colsum(a) + eps);  iters - 1 times: a /= rowsum + eps, a /= colsum + eps
and its VJP.

Why: XLA runs the reference's fori_loop as ~4 kernels + a copy per iteration (~100 launches per call at
iters = 20; ~5.5 ms of a 37 ms decode step for 86 calls), and unrolled the chain makes XLA's compile take minutes.
Here one launch does the whole chain; the arithmetic is ~40 normalisations of 16 values per token.

Layout. Program i owns tokens [i*block_t, (i+1)*block_t) (block_t a power of two: Triton tensors must be). It loads
the n*n entries as n*n separate vectors of block_t tokens (x_ref[tok, j]: strided loads; the program's loads share
the same cache lines) and does ALL the arithmetic elementwise across those vectors: a row sum is the sum of n
vectors, a column sum likewise -- no cross-lane reductions, no shuffles. The iteration loop runs inside the kernel
(`lax.fori_loop` -> scf.for, carrying the n*n vectors). The token tail is handled by clamped loads (tokens >= T
re-read token T-1) and masked stores.

Numerics (forward). The reference's ops in XLA's form and order: softmax = exp(x - rowmax) * (1 / rowsum), + eps,
each normalisation u * (1 / (sum + eps)), sums taken sequentially ((u0 + u1) + u2) + u3 (XLA's order for a small
reduce). The reciprocal form is what XLA compiles the reference's `u / broadcast(d)` to (its algebraic simplifier
rewrites it -- seen in the optimised HLO on CPU); it is also 4 divisions per step instead of 16. Reciprocals are
IEEE round-to-nearest: Triton lowers fp32 `/` to the approximate div.full.f32 (<= 2 ulp), so the kernel emits
`rcp.rn.f32` by inline PTX (plain 1 / d in interpret mode, where XLA divides exactly). exp is libdevice's
__nv_expf. Measured on CPU (interpret mode vs the jitted reference): max |diff| 2.4e-7 on values <= 1, and the
kernel is as close to a float64 evaluation as the reference is (both ~2e-7 absolute, up to ~8e-6 relative on
small entries: 20 fp32 Sinkhorn iterations amplify rounding). The kernel-vs-reference residue is XLA's: XLA CPU
contracts some mul + add pairs into FMAs, differently per fusion (tests/test_kernels_sinkhorn.py). On a GPU,
differences can also come from exp (if XLA's exp differs from __nv_expf) and from FMA contraction on either side
(Triton contracts by default); expected a few ulp, not yet measured on hardware.

Backward. The forward used for training (`forward(..., save=True)`) also writes the residuals
res [iters - 1, n*n, T] fp32: the iterate entering each (row, column) pair -- 1.2 KiB per token at n = 4,
iters = 20 (under the model's per-block remat they live for one block's backward). The backward kernel loads the
cotangent and walks the pairs in reverse: it recomputes the pair's row step from the stored iterate (the same ops
as the forward, so the same values) and back-propagates the column step, then the row step, then the first column
step and the softmax (both recomputed from x). Each normalisation y = u / d, d = sum(u) + eps, back-propagates as
JAX differentiates the reference (`div`'s JVP transposed, in XLA's reciprocal form):
    du = g * (1 / d) + bcast(sum(-((g * (1 / (d * d))) * u)))
and the softmax as jax.nn.softmax's custom JVP transposed: h = p * g, dx = h + p * (-rowsum(h)).
Measured on CPU: max |kernel VJP - reference VJP| <= 7e-7 x max|grad| (n = 2..8, logits up to scale 1000).

Launch parameters: `launch` (unmeasured defaults: one token per thread); every one can be overridden.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32
_inline_asm = getattr(pltriton, "elementwise_inline_asm", None)   # (should a JAX drop it: Triton's `/`, <= 2 ulp)
MAX_N = 8          # n*n vectors live in registers (x 4 in the backward): beyond this the reference is the better choice


def launch(T: int, sms: int = 132) -> tuple[int, int]:
    """Default (block_t, num_warps) for T tokens: one token per thread (block_t = 32 * num_warps), block_t 128
    halved (down to 32) while that gives < 2 programs per SM (`sms`, H100: 132). Not tuned by measurement."""
    bt = 128
    while bt > 32 and -(-T // bt) < 2 * sms:
        bt //= 2
    return bt, bt // 32


def _recip(d, ieee: bool):
    """1 / d, correctly rounded: inline rcp.rn.f32 on the GPU (Triton's `/` is the approximate div.full.f32,
    <= 2 ulp); plain 1 / d in interpret mode (XLA divides exactly)."""
    if not ieee or _inline_asm is None:
        return 1.0 / d
    [q] = _inline_asm("rcp.rn.f32 $0, $1;", args=[d], constraints="=f,f", pack=1,
                      result_shape_dtypes=[jax.ShapeDtypeStruct(d.shape, f32)])
    return q


def _sum(vs):
    """Sequential sum ((v0 + v1) + v2) + ... -- XLA's order for a small reduce."""
    s = vs[0]
    for v in vs[1:]:
        s = s + v
    return s


def _groups(n: int, rows: bool):
    """(groups, of): the entry indices j = r*n + k of each row (rows=True) or column, and each entry's group."""
    if rows:
        return [[r * n + k for k in range(n)] for r in range(n)], [j // n for j in range(n * n)]
    return [[r * n + k for r in range(n)] for k in range(n)], [j % n for j in range(n * n)]


def _denominators(u, n: int, eps: float, rows: bool):
    """sum + eps of each row (rows=True) or column of the n*n vectors u: n vectors."""
    groups, _ = _groups(n, rows)
    return [_sum([u[j] for j in grp]) + eps for grp in groups]


def _normalise(u, n: int, eps: float, rows: bool, ieee: bool):
    """(u * (1 / d), d): one row or column normalisation (XLA's form of u / d, see the module docstring)."""
    d = _denominators(u, n, eps, rows)
    r = [_recip(v, ieee) for v in d]
    _, of = _groups(n, rows)
    return [u[j] * r[of[j]] for j in range(n * n)], d


def _normalise_vjp(g, u, d, n: int, rows: bool, ieee: bool):
    """Cotangent of u for y = u / d, d = sum(u) + eps (the n denominators), as JAX transposes `div` and XLA
    rewrites it: g * (1 / d) + bcast(sum(-((g * (1 / (d * d))) * u)))."""
    groups, of = _groups(n, rows)
    r = [_recip(v, ieee) for v in d]
    r2 = [_recip(v * v, ieee) for v in d]
    q = [(g[j] * r2[of[j]]) * u[j] for j in range(n * n)]
    s = [_sum([q[j] for j in grp]) for grp in groups]
    return [g[j] * r[of[j]] - s[of[j]] for j in range(n * n)]     # x + (-s) == x - s exactly


def _softmax(x, n: int, ieee: bool):
    """Row softmax exp(x - max) * (1 / sum) (jax.nn.softmax's ops in XLA's form)."""
    p = []
    for r in range(n):
        row = x[r * n:(r + 1) * n]
        m = row[0]
        for v in row[1:]:
            m = jnp.maximum(m, v)
        e = [jnp.exp(v - m) for v in row]
        inv = _recip(_sum(e), ieee)
        p += [v * inv for v in e]
    return p


def _tokens(T: int, bt: int):
    tok = pl.program_id(0) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt,), 0)
    return tok, jnp.minimum(tok, T - 1), tok < T          # (store index, clamped load index, store mask)


def _fwd_kernel(x_ref, *out_refs, T, n, iters, eps, bt, ieee, save):
    y_ref, r_ref = (out_refs[0], out_refs[1]) if save else (out_refs[0], None)
    nn = n * n
    tok, src, keep = _tokens(T, bt)
    x = [x_ref[src, j] for j in range(nn)]
    a = [p + eps for p in _softmax(x, n, ieee)]
    a, _ = _normalise(a, n, eps, False, ieee)

    def pair(k, a):
        a = list(a)
        if save:
            for j in range(nn):
                pltriton.store(r_ref.at[k, j, tok], a[j], mask=keep)
        a, _ = _normalise(a, n, eps, True, ieee)
        a, _ = _normalise(a, n, eps, False, ieee)
        return tuple(a)

    if iters > 1:
        a = jax.lax.fori_loop(0, iters - 1, pair, tuple(a))
    for j in range(nn):
        pltriton.store(y_ref.at[tok, j], a[j], mask=keep)


def _bwd_kernel(x_ref, *refs, T, n, iters, eps, bt, ieee):
    r_ref, g_ref, dx_ref = refs if iters > 1 else (None,) + refs
    nn = n * n
    tok, src, keep = _tokens(T, bt)
    g = [g_ref[src, j] for j in range(nn)]

    def pair(i, g):
        k = iters - 2 - i
        a = [r_ref[k, j, src] for j in range(nn)]
        b, rd = _normalise(a, n, eps, True, ieee)           # the pair's row step, recomputed
        cd = _denominators(b, n, eps, False)
        g = _normalise_vjp(list(g), b, cd, n, False, ieee)
        return tuple(_normalise_vjp(g, a, rd, n, True, ieee))

    if iters > 1:
        g = list(jax.lax.fori_loop(0, iters - 1, pair, tuple(g)))
    x = [x_ref[src, j] for j in range(nn)]
    p = _softmax(x, n, ieee)
    a0 = [v + eps for v in p]
    g = _normalise_vjp(g, a0, _denominators(a0, n, eps, False), n, False, ieee)
    h = [pj * gj for pj, gj in zip(p, g)]
    groups, of = _groups(n, True)
    s = [_sum([h[j] for j in grp]) for grp in groups]
    for j in range(nn):
        pltriton.store(dx_ref.at[tok, j], h[j] + p[j] * (-s[of[j]]), mask=keep)


def _check(x, n, iters):
    if x.ndim != 2 or x.shape[1] != n * n or x.dtype != f32:
        raise ValueError(f"sinkhorn(gpu): x must be fp32 [T, {n * n}], got {x.shape} {x.dtype}")
    if not 1 <= n <= MAX_N:
        raise ValueError(f"sinkhorn(gpu): n={n} unsupported (1 <= n <= {MAX_N})")
    if max(iters - 1, 1) * x.size >= 2 ** 31:
        raise ValueError(f"sinkhorn(gpu): {x.shape[0]} matrices x {iters} iterations overflow int32 offsets")


def _params(T, block_t, num_warps):
    bt, nw = launch(T)
    bt, nw = block_t or bt, num_warps or nw
    if bt & (bt - 1):
        raise ValueError(f"sinkhorn(gpu): block_t={bt} must be a power of two")
    return bt, nw


@functools.partial(jax.jit, static_argnames=("n", "iters", "eps", "save", "block_t", "num_warps", "interpret"))
def forward(x, *, n: int, iters: int, eps: float, save: bool = False, block_t: int | None = None,
            num_warps: int | None = None, interpret: bool = False):
    """x [T, n*n] fp32 logits (entry r*n + k = row r, column k) -> y [T, n*n] fp32, or (y, res) with save=True:
    res [iters - 1, n*n, T] fp32, the iterates entering each (row, column) pair (the backward's residuals;
    None when iters <= 1). One launch; block_t (power of two) / num_warps default to `launch(T)`."""
    _check(x, n, iters)
    T, nn = x.shape
    bt, nw = _params(T, block_t, num_warps)
    want, save = save, save and iters > 1
    out_shape = [jax.ShapeDtypeStruct((T, nn), f32)]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((iters - 1, nn, T), f32))
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, T=T, n=n, iters=iters, eps=eps, bt=bt, ieee=not interpret, save=save),
        grid=(-(-T // bt),),
        in_specs=[pl.no_block_spec],
        out_specs=[pl.no_block_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=1),
        interpret=interpret,
        name="sinkhorn_fwd",
    )(x)
    if want:
        return out[0], (out[1] if save else None)
    return out[0]


@functools.partial(jax.jit, static_argnames=("n", "iters", "eps", "block_t", "num_warps", "interpret"))
def backward(x, res, g, *, n: int, iters: int, eps: float, block_t: int | None = None,
             num_warps: int | None = None, interpret: bool = False):
    """VJP: x [T, n*n] fp32 logits, res (from forward(save=True); None when iters <= 1), g [T, n*n] cotangent of
    the output -> dx [T, n*n] fp32. One launch."""
    _check(x, n, iters)
    T, nn = x.shape
    bt, nw = _params(T, block_t, num_warps)
    args = [x] + ([res] if iters > 1 else []) + [g.astype(f32)]
    return pl.pallas_call(
        functools.partial(_bwd_kernel, T=T, n=n, iters=iters, eps=eps, bt=bt, ieee=not interpret),
        grid=(-(-T // bt),),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((T, nn), f32),
        compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=1),
        interpret=interpret,
        name="sinkhorn_bwd",
    )(*args)
