"""Basic layers with the reference's numerics: RMSNorm, partial interleaved RoPE with YaRN, linears.

Linears come in the reference's three precisions (spec section 6):
  `linear_fp8`  the FP8 GEMM: activations quantised per token per 128 inputs (E4M3, power-of-two scale) when
                `cfg.quant_sim`, weights dequantised exactly from FP8/FP4 + E8M0, fp32 accumulation, output in the
                activation dtype. bf16 weights run the same graph without the weight format.
  `linear_bf16` a plain bf16 matmul (indexer `weights_proj`, the grouped `wo_a`).
  `linear_f32`  fp32 inputs and weights (router, compressor, head).

At decode sizes (2 to `pallas_kernels.linear.MAX_ROWS` rows) on an NVIDIA GPU, all three run the skinny Pallas
kernel `pallas_kernels.linear`: it reads each FP8/bf16 weight byte once and decodes it in registers, where XLA
would write a dequantised copy of the weight first and then call cuBLAS (5 bytes moved per FP8 parameter instead of
1). Same numerics (fp32 accumulation of exact products; fp32 inputs split exactly into three bf16 parts). For 1-4
rows `linear_fp8` makes one call that also quantises x to FP8 in registers (`fused_fp8_linear`).

Above that range on an NVIDIA GPU, fp32 linears with a bf16 weight (`linear_f32`: head, MTP head, compressor,
router -- all bf16 parameters, see params.py) run `split_matmul`: bf16 tensor-core GEMMs on exact bf16 parts of
the fp32 operands instead of a true fp32 GEMM (no tensor cores on H100), with a custom VJP; the same product up to
fp32 summation order (details in its docstring). Off GPU, and for fp32 / FP8 / FP4 weights, nothing changes.

The bf16 linears (`linear_fp8` / `linear_bf16` with bf16 activations) run `act_einsum`: the same forward, and a
custom VJP that feeds the bf16 cotangent of their bf16 output to bf16 x bf16 gradient GEMMs (autodiff would pass
the fp32 cotangent of the fp32 product: f32 x bf16 dots that XLA runs as fp32 SIMT GEMMs on GPU; same values up to
summation order). `split_dot_nt` is the fp32 x fp32 product with a skinny fp32 weight (the mHC mixes) on exact
bf16 parts, value and gradients. `scripts/list_f32_dots.py` lists the fp32 dots left in the training step.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import linear as skinny
from pallas_kernels.linear import reference as skinny_reference
from pallas_kernels._backend import platform_backend

from . import quant
from .config import ModelConfig

f32 = jnp.float32
bf16 = jnp.bfloat16


def act_dtype(cfg: ModelConfig):
    """The dtype the reference keeps activations in (bf16), or fp32 for tight equivalence tests."""
    return jnp.float32 if cfg.compute_dtype == "float32" else jnp.bfloat16


def weight(node: dict, dtype=jnp.bfloat16) -> jax.Array:
    """The logical weight of a linear: dequantised (exactly) if stored as FP8/FP4 + E8M0 scale."""
    w = node["weight"]
    if "scale" in node:
        if quant.is_fp4(w):
            return quant.dequant_fp4_weight(w, node["scale"], dtype)
        return quant.dequant_fp8_weight(w, node["scale"], dtype)
    return w.astype(dtype)


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w[out, in]^T with fp32 accumulation (true fp32 for fp32 inputs: no TF32 on GPU)."""
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=f32, precision="highest")


def uses_skinny(x: jax.Array, node: dict) -> bool:
    """Whether x @ node runs the skinny decode kernel: an NVIDIA GPU (not V4JAX_KERNELS=reference), 2 to
    MAX_ROWS rows, a bf16 or FP8 weight."""
    rows = math.prod(x.shape[:-1])
    # one row: XLA turns the product into a fused reduction that reads the FP8 weight once (measured 55-60% of
    # copy bandwidth on H100 against the kernel's 37-42%); from 2 rows on XLA dequantises first (14%)
    return (rows >= 2 and skinny.default_backend() == "gpu"
            and skinny.uses_kernel(rows, node["weight"], node.get("scale")))


def _linear(x: jax.Array, node: dict, dt) -> jax.Array:
    """x @ W^T in fp32 (x already in its compute dtype dt: bf16, or fp32 for the fp32 linears)."""
    if uses_skinny(x, node):
        return skinny.linear(x, node, out_dtype=f32)
    if uses_split(x, node, dt):
        return split_matmul(x, node["weight"])
    return _matmul(x, weight(node, dt))


def _linear_act(x: jax.Array, node: dict, dt) -> jax.Array:
    """round_to(x @ W^T, dt) for x in the activation dtype dt: bf16 GEMMs go through `act_einsum` (a backward on
    tensor cores); the skinny kernel and the fp32 (compute_dtype="float32") paths as before."""
    if jnp.dtype(dt) == bf16 and not uses_skinny(x, node):
        return act_einsum("...i,oi->...o", x, weight(node, dt))
    return quant.round_to(_linear(x, node, dt), dt)


FUSED_DECODE_LINEAR = os.environ.get("V4JAX_DECODE_LINEAR") != "legacy"     # read at import; see fused_fp8_linear


def fused_fp8_linear(x: jax.Array, node: dict) -> bool:
    """Whether `linear_fp8` runs as one skinny-kernel call that also does the activation FP8 simulation in
    registers (`pallas_kernels.linear.linear(x_fp8=True)`): an NVIDIA GPU, bf16 activations, the rows the kernel's
    CUDA-core GEMV path serves (1 to `gemv_rows()`), an FP8/bf16 weight with whole 128-input blocks. There one call
    replaces fp8_sim's two XLA kernels, the E8M0 decode kernel and the GEMV (for one row XLA's fused reduction).
    More rows keep fp8_sim in XLA: in the tensor-core path the in-kernel quantisation, repeated by every program,
    made the 6-layer Flash decode at 32 rows slower (H100, docs/benchmarks.md session 7).
    V4JAX_DECODE_LINEAR=legacy restores the session 6 routing (fp8_sim in XLA, one row to XLA, 2+ rows to the
    tensor-core kernel) for A/B runs."""
    rows = math.prod(x.shape[:-1])
    return (FUSED_DECODE_LINEAR and x.dtype == bf16 and 1 <= rows <= skinny.gemv_rows()
            and skinny.default_backend() == "gpu"
            and skinny.uses_kernel(rows, node["weight"], node.get("scale"), x_fp8=True))


def linear_fp8(cfg: ModelConfig, node: dict, x: jax.Array) -> jax.Array:
    dt = act_dtype(cfg)
    x = x.astype(dt)
    if cfg.quant_sim and fused_fp8_linear(x, node):
        return quant.round_to(skinny.linear(x, node, out_dtype=f32, x_fp8=True), dt)
    if cfg.quant_sim:
        x = quant.fp8_sim(x, 128)
    return _linear_act(x, node, dt)


def linear_bf16(cfg: ModelConfig, node: dict, x: jax.Array) -> jax.Array:
    dt = act_dtype(cfg)
    return _linear_act(x.astype(dt), node, dt)


def linear_f32(node: dict, x: jax.Array) -> jax.Array:
    """fp32 x @ W^T (spec: fp32 inputs and math). A bf16 x is already exact in fp32, so it goes down as bf16: the
    skinny kernel and `split_matmul` then run one bf16 part instead of three (the same products), and the fp32
    einsum promotes it."""
    return _linear(x if x.dtype == bf16 else x.astype(f32), node, f32)


# ---- row lookups with a deterministic gradient ------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup(n_rows: int, table: jax.Array, ids: jax.Array) -> jax.Array:
    return table[ids]


def _lookup_fwd(n_rows, table, ids):
    return table[ids], ids


def _lookup_bwd(n_rows, ids, g):
    """d table[v] = sum of g over the positions that read row v, in fp32, rounded once to g's dtype.

    No scatter-add (XLA's GPU scatter-add of repeated indices is an atomic add: its summation order, hence its
    last bits, changes from run to run): the positions are sorted by row (stable), a segmented inclusive scan
    sums each row's run (`lax.associative_scan`: a fixed combination tree), and each run's total is written to
    its row by a scatter of unique indices."""
    d = g.shape[-1]
    flat = ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    sid = flat[order]
    gs = g.reshape(-1, d).astype(f32)[order]
    change = sid[1:] != sid[:-1]
    start = jnp.concatenate([jnp.ones((1,), bool), change])
    last = jnp.concatenate([change, jnp.ones((1,), bool)])

    def seg_sum(a, b):
        (fa, va), (fb, vb) = a, b
        return fa | fb, jnp.where(fb[..., None], vb, va + vb)

    _, sums = jax.lax.associative_scan(seg_sum, (start, gs))
    out = jnp.zeros((n_rows, d), f32).at[jnp.where(last, sid, n_rows)].set(sums, mode="drop")
    return out.astype(g.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids] for a 2-D table [V, d] and integer ids (any shape) -> [..., d], with a deterministic gradient.

    The gradient of a plain gather is a scatter-add, which XLA runs with atomics on a GPU: the embedding's and the
    compressor's `ape` gradients were the last run-to-run differences of the 1b training step once the attention
    backward was banded (scripts/probe_train_determinism.py; XLA's global --xla_gpu_deterministic_ops=true fixes it
    too, at +27% step time). Here each row's gradient is an fp32 sum in a fixed order (`_lookup_bwd`), rounded once
    to the table's dtype -- for a bf16 table also more accurate than a bf16 scatter-add. Ids must be in [0, V).

    Under a multi-device mesh (outside shard_map) it is the plain gather: the sort runs over all positions, so
    with the tokens split over `seq` or `data` SPMD would all-gather the full-sequence cotangent first (caught by
    tests/test_sharding.py's context-parallel test), while the scatter-add's per-device partials need only the
    all-reduce of the table gradient that the gather's gradient has anyway."""
    if table.ndim != 2:
        raise ValueError(f"lookup: table must be [V, d], got {table.shape}")
    if _sharded_mesh():
        return table[ids]
    return _lookup(table.shape[0], table, ids)


def _sharded_mesh() -> bool:
    """Whether a mesh with a (non-manual) axis of size > 1 is set: arrays may be split over devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return False
    return any(n > 1 for a, n in dict(mesh.shape).items() if a not in mesh.manual_axes)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """fp32 inside, weight multiplied in fp32, result in x's dtype."""
    xf = x.astype(f32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return quant.round_to(y * w.astype(f32), x.dtype)


# ---- fp32 linears as bf16 tensor-core GEMMs ---------------------------------------------------------------
def split_backend() -> str:
    """"gpu" where `_linear` runs fp32 x bf16-weight products as `split_matmul` (NVIDIA GPUs, unless
    V4JAX_KERNELS=reference), else "reference" (the fp32 einsum). Tests monkeypatch this."""
    return platform_backend(("reference", "gpu"))


def split_rows(rows: int) -> bool:
    """Whether a product over `rows` rows takes the bf16 split GEMMs: the split backend is "gpu" and there are more
    rows than the skinny decode kernel serves (up to MAX_ROWS rows it, or XLA's one-row reduction, keeps
    priority). Shared by `uses_split` and the mHC mixes (`hyper.uses_split_mixes`)."""
    return rows > skinny.MAX_ROWS and split_backend() == "gpu"


def uses_split(x: jax.Array, node: dict, dt) -> bool:
    """Whether an fp32-compute linear (dt fp32: `linear_f32`, and also `linear_fp8`/`linear_bf16` under
    compute_dtype="float32") runs `split_matmul`: the split backend is "gpu", the weight is a plain bf16 [O, K]
    matrix, and there are more rows than the skinny decode kernel serves (up to MAX_ROWS rows it, or XLA's one-row
    reduction, keeps priority). FP8/FP4 weights keep their dequantise-then-GEMM path. fp32 weights (none of the
    model's linears has one: params.py stores head, compressor and router weights bf16, and training feeds the
    model the bf16 rounding of its fp32 masters) keep the fp32 einsum: splitting both operands would take ~6 bf16
    products per pair for fp32 accuracy, and only bf16 weights are exact as one part."""
    w = node["weight"]
    return (jnp.dtype(dt) == f32 and "scale" not in node and w.dtype == bf16 and w.ndim == 2
            and split_rows(math.prod(x.shape[:-1])))


def split_parts(a: jax.Array) -> list[jax.Array]:
    """Exact bf16 parts of a bf16 or fp32 array (pallas_kernels.linear.reference.bf16_parts, which the skinny
    kernel uses too): [a] for bf16, [hi, mid, lo] with hi + mid + lo == a for fp32."""
    return skinny_reference.bf16_parts(a)


def _dot(a, b, ca: int, cb: int) -> jax.Array:
    """One bf16 GEMM with fp32 accumulation: a [N, C] x b (C on axis cb) -> [N, D] fp32 (exact products)."""
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=f32)


def _sum_blocks(y: jax.Array, n: int, axis: int) -> jax.Array:
    """Sum of the n equal blocks of y along axis, left to right in fp32."""
    m = y.shape[axis] // n
    out = jax.lax.slice_in_dim(y, 0, m, axis=axis)
    for i in range(1, n):
        out = out + jax.lax.slice_in_dim(y, i * m, (i + 1) * m, axis=axis)
    return out


def _parts_dot(a: jax.Array, b: jax.Array, cb: int, stack: str | None) -> jax.Array:
    """sum_p part_p(a) @ b for a [N, C] bf16/fp32 (its parts from `split_parts`) and a bf16 b with C on axis cb,
    as ONE GEMM -> fp32 [N, D]. Three parts are stacked either
      "rows":  [hi; mid; lo] as 3N rows -> [3N, D], summed (hi + mid) + lo in fp32 afterwards;
      "inner": [hi | mid | lo] along C against b repeated 3x along C -> [N, D] from one fp32 accumulation.
    Both are the exact-products sum, up to fp32 summation order. Default (None): the one moving fewer extra bytes
    -- "rows" writes and re-reads three fp32 outputs (~24 N D bytes), "inner" writes and re-reads a 3x copy of b
    (~12 C D bytes) -- i.e. "inner" iff C < 2N (the head forward at N >= 2048 rows; "rows" for its dx)."""
    ps = split_parts(a)
    if len(ps) == 1:
        return _dot(ps[0], b, 1, cb)
    N, C = a.shape
    stack = stack or ("inner" if C < 2 * N else "rows")
    if stack == "inner":
        return _dot(jnp.concatenate(ps, axis=1), jnp.concatenate([b] * 3, axis=cb), 1, cb)
    if stack != "rows":
        raise ValueError(f"split_matmul: stack must be None, 'rows' or 'inner', got {stack!r}")
    return _sum_blocks(_dot(jnp.concatenate(ps, axis=0), b, 1, cb), 3, 0)


def _dw(g: jax.Array, x: jax.Array) -> jax.Array:
    """g^T x in fp32 for fp32 g [N, O] and bf16/fp32 x [N, K] -> [O, K], as ONE GEMM over the stacked part pairs
    of combined order <= 1 ("bf16x3"): g_hi x_hi + g_hi x_mid + g_mid x_hi (bf16 x: g_hi x + g_mid x). The dropped
    pairs are each <= ~2^-16 |g_n x_n|, so |error| <= ~3 * 2^-16 * sum_n |g_n||x_n| (+ fp32 accumulation rounding),
    2^-16 for bf16 x -- far below the bf16 rounding of the weight gradient (up to 2^-8 relative)."""
    gp, xp = split_parts(g)[:2], split_parts(x)
    pairs = [(i, j) for i in range(len(gp)) for j in range(len(xp)) if i + j <= 1]
    lhs = jnp.concatenate([gp[i] for i, _ in pairs], axis=0)           # [P*N, O]
    rhs = jnp.concatenate([xp[j] for _, j in pairs], axis=0)           # [P*N, K]
    return _dot(lhs, rhs, 0, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _split_matmul2(x, w, stack):
    return _parts_dot(x, w, 1, stack)


def _split_matmul2_fwd(x, w, stack):
    return _parts_dot(x, w, 1, stack), (x, w)


def _split_matmul2_bwd(stack, res, g):
    x, w = res
    g = g.astype(f32)
    dx = _parts_dot(g, w, 0, stack)                      # g [N, O] @ w [O, K]: exact products (3 parts of g)
    return quant.round_to(dx, x.dtype), quant.round_to(_dw(g, x), w.dtype)


_split_matmul2.defvjp(_split_matmul2_fwd, _split_matmul2_bwd)


def split_matmul(x: jax.Array, w: jax.Array, *, stack: str | None = None) -> jax.Array:
    """x [..., K] (fp32, or bf16) @ w[O, K]^T for a bf16 w -> fp32 [..., O]: an fp32 linear on bf16 tensor cores.

    Why: on H100 a true fp32 GEMM (einsum precision HIGHEST) runs without tensor cores; the fp32 linears (head,
    compressor, router) were ~44% of a training step. Their weights are bf16, so only x needs splitting.

    Forward: x = hi + mid + lo exactly (`split_parts`; a bf16 x is its own single part), so x @ w^T is the sum of
    three bf16 x bf16 products, each exact in fp32, accumulated in fp32: the fp32 einsum's result up to fp32
    summation order (relative to sum_k |x_k w_k|: ~1e-7, not bf16's 4e-3). One GEMM on the stacked parts
    (`_parts_dot`; `stack` forces "rows" or "inner", default by shape), a bf16 x takes one plain GEMM.

    Backward (jax.custom_vjp, residuals x and w):
      dx = g @ w with the fp32 cotangent g split the same way: exact products, fp32 -- as the fp32 einsum's dx up to
           summation order; returned in x's dtype (a bf16 x gets the RNE of it, as the cotangent of an upcast).
      dw = g^T x: both operands fp32, so "bf16x3" (`_dw`): error <= ~3 * 2^-16 * sum_n |g_n x_n| before the
           result is rounded (RNE) to w's dtype bf16 -- the same rounding the fp32 path's weight upcast applies.
    Leading dims of x are flattened around the custom VJP. Cost: forward 3 bf16 GEMM units (1 for bf16 x), dx 3,
    dw 3 (2): 9 units against 3 fp32 units, with bf16 tensor cores ~15x faster than fp32 on H100."""
    if w.dtype != bf16 or w.ndim != 2:
        raise TypeError(f"split_matmul: weight must be bf16 [O, K], got {w.dtype} {w.shape}")
    if x.dtype not in (bf16, f32):
        x = x.astype(f32)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"split_matmul: x {x.shape} does not end in K={w.shape[1]} (weight {w.shape})")
    lead = x.shape[:-1]
    y = _split_matmul2(x.reshape(-1, x.shape[-1]), w, stack)
    return y.reshape(*lead, w.shape[0])


# ---- bf16 GEMMs with a bf16 result: the backward on tensor cores -----------------------------------------
def _transposed_subscripts(subscripts: str) -> tuple[str, str]:
    """"A,B->C" -> ("C,B->A", "C,A->B"): the einsums of the two operand gradients."""
    ins, out = subscripts.replace(" ", "").split("->")
    a, b = ins.split(",")
    for mine, other in ((a, b), (b, a)):
        if any(c not in other + out for c in mine.replace("...", "")):
            raise ValueError(f"act_einsum: index of one operand in neither the other nor the output: {subscripts}")
    return f"{out},{b}->{a}", f"{out},{a}->{b}"


def _einsum32(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(subscripts, a, b, preferred_element_type=f32, precision="highest")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _act_einsum(subscripts, x, w):
    return quant.round_to(_einsum32(subscripts, x, w), bf16)


def _act_einsum_fwd(subscripts, x, w):
    return _act_einsum(subscripts, x, w), (x, w)


def _act_einsum_bwd(subscripts, res, g):
    x, w = res
    sx, sw = _transposed_subscripts(subscripts)
    # bf16 operands on GPU (tensor cores); elsewhere their exact fp32 upcasts, as autodiff had them (XLA:CPU
    # rejects some batched bf16 x bf16 -> f32 dots: "Unsupported element type for DotThunk::Execute")
    cdt = bf16 if split_backend() == "gpu" else f32
    g, xc, wc = g.astype(cdt), x.astype(cdt), w.astype(cdt)
    return (quant.round_to(_einsum32(sx, g, wc), x.dtype), quant.round_to(_einsum32(sw, g, xc), w.dtype))


_act_einsum.defvjp(_act_einsum_fwd, _act_einsum_bwd)


def act_einsum(subscripts: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """round_to(einsum(subscripts, x, w) accumulated in fp32, bf16) for bf16 x and w -> bf16: the reference's bf16
    GEMM (a bf16 linear, `attention._output`'s grouped wo_a), with a backward that runs on bf16 tensor cores.

    Why: differentiating `round_to(einsum(..., preferred_element_type=f32), bf16)` gives the fp32 cotangent of the
    fp32 product to both transposed dots, i.e. f32 x bf16 dots (precision HIGHEST) that XLA runs as fp32 SIMT
    GEMMs on a GPU (issue 6: ~4.1 of the 4.3 TFLOP of fp32 GEMMs in the 1b training step, ~100 ms on H100).

    Exactness: the cotangent g of the bf16 output is bf16; autodiff's fp32 cotangent of the product is f32(g)
    exactly (the transposes of convert and reduce_precision keep bf16 values bf16). So here
      dx = round_to(g @ w-transpose, x.dtype), dw = round_to(g-transpose @ x, w.dtype)
    with g, w, x bf16 and fp32 accumulation (`preferred_element_type=f32`): the same exact products accumulated
    in fp32 and rounded once (RNE) to the operand dtypes, i.e. autodiff's result up to fp32 summation order.
    Where `split_backend()` is not "gpu" (CPU, V4JAX_KERNELS=reference) the gradient einsums take the fp32
    upcasts of g, x, w instead (XLA:CPU does not run every batched bf16 x bf16 -> f32 dot): autodiff's dots.
    The gradient einsums swap the output's subscripts with the operand's ("A,B->C": dA = "C,B->A", dB = "C,A->B"),
    so every index of an operand must appear in the other operand or the output."""
    if x.dtype != bf16 or w.dtype != bf16:
        raise TypeError(f"act_einsum: bf16 operands expected, got {x.dtype} and {w.dtype}")
    _transposed_subscripts(subscripts)
    return _act_einsum(subscripts, x, w)


# ---- fp32 x fp32 products with a skinny weight as bf16 tensor-core GEMMs ----------------------------------
def _xparts(x: jax.Array, x_bf16: bool) -> list[jax.Array]:
    return [x.astype(bf16)] if x_bf16 else split_parts(x)


def _sdot(xps: list[jax.Array], w: jax.Array) -> jax.Array:
    """sum_p xps[p] @ w^T for the bf16 parts of x [N, K] and fp32 w [M, K]: each x part against the row-stacked
    parts of w (one [N, 3M] GEMM per x part), blocks summed in fp32."""
    wst = jnp.concatenate(split_parts(w), axis=0)                                    # [3M, K]
    y = None
    for xp in xps:
        v = _sum_blocks(_dot(xp, wst, 1, 1), 3, 1)                                    # [N, M]
        y = v if y is None else y + v
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _split_dot_nt(x, w, x_bf16):
    return _sdot(_xparts(x, x_bf16), w)


def _split_dot_nt_fwd(x, w, x_bf16):
    xps = _xparts(x, x_bf16)
    return _sdot(xps, w), (xps, w)           # residuals: x's bf16 parts (one bf16 copy for x_bf16), w


def _split_dot_nt_bwd(x_bf16, res, g):
    xps, w = res
    g = g.astype(f32)
    gp, wp = split_parts(g), split_parts(w)
    # dx = g @ w [N, K]: all 9 part pairs stacked along the (small) contraction M -> one GEMM of exact products
    lhs = jnp.concatenate([gp[i] for i in range(3) for _ in range(3)], axis=1)      # [N, 9M]
    rhs = jnp.concatenate([wp[j] for _ in range(3) for j in range(3)], axis=0)      # [9M, K]
    dx = _dot(lhs, rhs, 1, 0)
    # dw = g^T x [M, K]: the parts of g side by side, contracted over N against each part of x
    gst = jnp.concatenate(gp, axis=1)                                                # [N, 3M]
    dw = None
    for xp in xps:
        v = _sum_blocks(_dot(gst, xp, 0, 0), 3, 0)                                    # [M, K]
        dw = v if dw is None else dw + v
    return dx, dw


_split_dot_nt.defvjp(_split_dot_nt_fwd, _split_dot_nt_bwd)


def split_dot_nt(x: jax.Array, w: jax.Array, *, x_bf16: bool = False) -> jax.Array:
    """x [..., K] @ w[M, K]^T for fp32 x and w -> fp32 [..., M], as bf16 tensor-core GEMMs: the fp32 einsum's
    (precision HIGHEST) result and gradients up to fp32 summation order. Meant for a skinny w (few rows M: the
    mHC mixes, M = 24 or 4, with K = n_hc * D), where the fp32 GEMMs run without tensor cores on a GPU.

    x_bf16: the caller guarantees x holds bf16 values (an upcast bf16 array, e.g. the mHC streams): x is then its
    own single exact part (cast back to bf16 inside, exactly) -- the dx returned stays fp32, unrounded.

    Exactness: x = sum of its exact bf16 parts (`split_parts`: 1 for x_bf16, else 3), w = w_hi + w_mid + w_lo;
    every product of two bf16 parts is exact in fp32, so summing all part pairs with fp32 accumulation gives the
    fp32 product up to summation order:
      y  = sum over x parts of x_p @ [w_hi; w_mid; w_lo]^T (one GEMM per x part, [N, 3M]), blocks summed in fp32;
      dx = g @ w with the fp32 cotangent g split in 3 too: all 9 pairs in ONE GEMM, stacked along the contraction
           (K' = 9M, small), output fp32 [N, K];
      dw = g^T @ x: [g_hi | g_mid | g_lo] ([N, 3M]) contracted over N with each x part, blocks summed in fp32.
    Costs (N rows): forward 3M x K x N per x part, dx 9M x K x N, dw 3M x K x N per x part, all on bf16 tensor
    cores, against M x K x N fp32 SIMT per product. Leading dims of x are flattened around the custom VJP.
    Limits: those of `split_parts` (|values| < 2^-103 lose parts below 2^-126; overflow above bf16's max)."""
    if x.dtype != f32 or w.dtype != f32 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise TypeError(f"split_dot_nt: fp32 x [..., K] and w [M, K] expected, got {x.dtype} {x.shape}, "
                        f"{w.dtype} {w.shape}")
    lead = x.shape[:-1]
    y = _split_dot_nt(x.reshape(-1, x.shape[-1]), w, bool(x_bf16))
    return y.reshape(*lead, w.shape[0])


# ---- RoPE ---------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig, layer: int) -> np.ndarray:
    """inv_freq [rd/2] (float32) of block `layer`: rope_theta without YaRN for ratio-0 layers,
    compress_rope_theta with the YaRN ramp otherwise (spec 2.4)."""
    rd = cfg.qk_rope_head_dim
    ratio = cfg.ratio(layer)
    base = cfg.compress_rope_theta if ratio else cfg.rope_theta
    inv = (1.0 / (np.float32(base) ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd)))).astype(np.float32)
    if ratio:
        low, high = yarn_range(cfg, base)
        ramp = np.clip((np.arange(rd // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
        inv = (inv / np.float32(cfg.rope_factor) * ramp + inv * (1 - ramp)).astype(np.float32)
    return inv


def yarn_range(cfg: ModelConfig, base: float) -> tuple[int, float]:
    """(low, high) correction dims of YaRN; high is nudged by 0.001 if equal to low (no zero division)."""
    rd, L = cfg.qk_rope_head_dim, cfg.original_max_position_embeddings

    def corr(rot: float) -> float:
        return rd * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(cfg.beta_fast)), 0)
    high = min(math.ceil(corr(cfg.beta_slow)), rd - 1)
    return low, (high + 0.001 if high == low else high)


def rope_table(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., rd/2] (fp32) for integer positions [...]."""
    ang = positions.astype(f32)[..., None] * jnp.asarray(inv_freq, f32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate the last 2*cos.shape[-1] dims of x as adjacent (re, im) pairs; fp32 math, result in x.dtype.
    cos/sin must broadcast against x.shape[:-1] + (rd/2,)."""
    rd = 2 * cos.shape[-1]
    head, tail = x[..., :-rd], x[..., -rd:]
    t = tail.astype(f32).reshape(tail.shape[:-1] + (rd // 2, 2))
    a, b = t[..., 0], t[..., 1]
    if inverse:
        sin = -sin
    rot = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(tail.shape)
    return jnp.concatenate([head, quant.round_to(rot, x.dtype)], axis=-1)
