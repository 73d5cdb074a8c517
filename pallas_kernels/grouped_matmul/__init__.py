"""Grouped matmul over rows sorted by group (the MoE experts): one public function, backends picked by platform."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._backend import platform_backend
from .._weights import dequantize

from .reference import grouped_matmul as _reference

BACKENDS = ("reference", "gpu")


def default_backend(platform: str | None = None) -> str:
    """The backend used on `platform` (default: JAX's default backend); see pallas_kernels._backend."""
    return platform_backend(BACKENDS, platform)


def _split(w_node):
    if isinstance(w_node, dict):
        return w_node["weight"], w_node.get("scale")
    return w_node, None


def _ref_node(x, w, scale, group_sizes, out_dtype):
    y = _reference(x, dequantize(w, scale, x.dtype), group_sizes)
    if jnp.dtype(out_dtype) == jnp.bfloat16:      # a rounding XLA keeps (as quant.round_to): no excess precision
        y = jax.lax.reduce_precision(y, exponent_bits=8, mantissa_bits=7)
    return y.astype(out_dtype)


def _kernel(x, w, scale, group_sizes, out_dtype, transpose_w=False, launch=()):
    from . import gpu
    return gpu.grouped_matmul(x, w, group_sizes, scale, transpose_w=transpose_w, out_dtype=out_dtype,
                              interpret=jax.default_backend() == "cpu", **dict(launch))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gmm(x, w, scale, group_sizes, out_dtype, launch):
    return _kernel(x, w, scale, group_sizes, out_dtype, launch=launch)


def _fwd(x, w, scale, group_sizes, out_dtype, launch):
    return _kernel(x, w, scale, group_sizes, out_dtype, launch=launch), (x, w, scale, group_sizes)


def _bwd(out_dtype, launch, res, g):
    x, w, scale, group_sizes = res
    if scale is None:
        # dx[r] = dy[r] @ w[g(r)]: the kernel with the weight read as [E, in, out] (dy rounded to x's dtype, bf16)
        dy = g.astype(x.dtype)
        dx = _kernel(dy, w, None, group_sizes, x.dtype, transpose_w=True)
        if w.dtype == jnp.bfloat16:           # dw[e] = dy_e^T x_e: the dw kernel, on the same bf16 dy
            from . import gpu
            dw = gpu.grouped_matmul_dw(x, dy, group_sizes, out_dtype=w.dtype,
                                       interpret=jax.default_backend() == "cpu")
        else:                                 # fp32 weights: the reference's VJP (ragged_dot transpose), fp32 dy
            _, vjp = jax.vjp(lambda w_: _reference(x, w_, group_sizes), w)
            (dw,) = vjp(g.astype(jnp.float32))
        return dx, dw.astype(w.dtype), None, None
    # quantised weights are frozen: only dx, through the reference on the dequantised weight
    _, vjp = jax.vjp(lambda x_: _ref_node(x_, w, scale, group_sizes, jnp.float32), x)
    (dx,) = vjp(g.astype(jnp.float32))
    return dx, None, None, None


_gmm.defvjp(_fwd, _bwd)


def grouped_matmul(x: jax.Array, w_node, group_sizes: jax.Array, *, backend: str | None = None,
                   out_dtype=jnp.float32, launch: dict | None = None, fp8_act: bool = False) -> jax.Array:
    """x [N, in] (rows sorted by group), w_node = {"weight": [E, out, in], optional "scale"} (or a bare weight
    array), group_sizes [E] int32 -> [N, out] in out_dtype (fp32 by default); rows past sum(group_sizes) are 0.

    Weight formats (the params tree's, used natively): bf16/fp32; FP8 e4m3 + E8M0 [E, out/128, in/128];
    FP4 packed int8 [E, out, in/2] + E8M0 [E, out, in/32]. Numerics: the product of x with the exactly
    dequantised weight, fp32 accumulation, then out_dtype (bf16 output = RNE rounding that XLA keeps, as
    `quant.round_to`: the kernel rounds in-kernel, the reference through reduce_precision).

    backend: None picks by platform ("gpu": the Pallas/Triton kernel of gpu.py on NVIDIA GPUs, "reference":
    `jax.lax.ragged_dot` elsewhere); a non-bf16 x always takes the reference (the kernel multiplies bf16).
    The "gpu" backend asked for on CPU runs in Pallas interpret mode. launch: launch options of the forward kernel
    (`gpu.grouped_matmul`'s block_m ... split_k, e.g. {"split_k": 4}; default: its automatic choice, which at decode
    splits K over programs, `gpu.decode_split_k`); the backward's kernels keep their own defaults.

    Differentiable (jax.custom_vjp) w.r.t. x and a bf16/fp32 weight: dx by the same kernel with the weight read
    transposed; dw of a bf16 weight by the Pallas weight-gradient kernel (`gpu.grouped_matmul_dw`, fp32
    accumulation, rounded to bf16), of an fp32 weight by the reference's VJP (ragged_dot's transpose). The kernel
    path rounds dy to bf16 before both the dx and the weight-gradient products (the reference backend keeps it
    fp32). Quantised weights get no gradient (None); their dx goes through the reference's VJP.

    fp8_act: the caller guarantees x is FP8-representable per 128-column block (e4m3 times a power of two, what
    `quant.fp8_sim` returns). The GPU kernel may then run FP8 x FP8 dots (`gpu.grouped_matmul`'s x_fp8: at decode,
    FP4 weights, `in` a multiple of 128), equal to the bf16 dots up to the fp32 summation order.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"grouped_matmul: unknown backend {backend!r}; available: {BACKENDS}")
    w, scale = _split(w_node)
    group_sizes = group_sizes.astype(jnp.int32)
    if backend == "reference" or x.dtype != jnp.bfloat16:
        return _ref_node(x, w, scale, group_sizes, out_dtype)
    launch = dict(launch or {}, **({"x_fp8": True} if fp8_act and scale is not None else {}))
    return _gmm(x, w, scale, group_sizes, jnp.dtype(out_dtype), tuple(sorted(launch.items())))
