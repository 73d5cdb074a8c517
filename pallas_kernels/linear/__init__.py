"""Linear layer y = x @ W^T for decode-sized batches: one public function, backends picked by platform.

"gpu": a skinny Pallas/Triton kernel (gpu.py) that reads each weight byte once and decodes FP8 + E8M0 tiles in
registers -- for M <= MAX_ROWS rows, where the step is memory bound (up to gpu.GEMV_ROWS kernel rows on CUDA cores,
above on tensor cores). "reference": dequantise + einsum (XLA/cuBLAS), used for larger M, for weight formats the
kernel does not read (fp32, FP4), and off NVIDIA GPUs. x_fp8=True folds the activation FP8 simulation
`quant.fp8_sim(x, 128)` of `layers.linear_fp8` into the kernel (the reference runs it before its einsum).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._backend import platform_backend

from . import reference

BACKENDS = ("reference", "gpu")
MAX_ROWS = 64          # the kernel serves M <= 64 rows; above, XLA's GEMM (the reference) is the better choice
_KERNEL_WEIGHTS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float8_e4m3fn))


def default_backend(platform: str | None = None) -> str:
    """The backend used on `platform` (default: JAX's default backend); see pallas_kernels._backend."""
    return platform_backend(BACKENDS, platform)


def gemv_rows() -> int:
    """Rows of bf16 x (a third of that for fp32 x) that the kernel serves with its CUDA-core GEMV path."""
    from . import gpu
    return gpu.GEMV_ROWS


def uses_kernel(M: int, w: jax.Array, scale: jax.Array | None = None, *, x_fp8: bool = False) -> bool:
    """Whether the "gpu" backend runs the kernel for M rows of x (else the reference): 1 <= M <= MAX_ROWS and a
    bf16 or FP8 e4m3 weight (with or without E8M0 scale) whose dims are multiples of 16 (smaller, odd weights
    -- e.g. a router over 8 experts -- take the reference); with x_fp8, K a multiple of 128 (whole quantisation
    blocks)."""
    return (0 < M <= MAX_ROWS and w.dtype in _KERNEL_WEIGHTS and w.ndim == 2
            and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0 and w.shape[0] * w.shape[1] < 2 ** 31
            and (not x_fp8 or w.shape[1] % 128 == 0))


def _split(w_node):
    if isinstance(w_node, dict):
        return w_node["weight"], w_node.get("scale")
    return w_node, None


def _check(x, w, scale):
    if w.ndim != 2:
        raise ValueError(f"linear: weight must be [O, K], got shape {w.shape}")
    fp4 = scale is not None and w.dtype == jnp.int8
    O, K = w.shape[0], w.shape[1] * (2 if fp4 else 1)
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"linear: x {x.shape} does not end in K={K} (weight {w.shape} {w.dtype})")
    if scale is not None:
        want = (O, -(-K // 32)) if fp4 else (-(-O // 128), -(-K // 128))
        if scale.shape != want:
            raise ValueError(f"linear: scale shape {scale.shape} != {want} for weight {w.shape} {w.dtype}")
    return O, K


def _ref_node(x, w, scale, out_dtype, x_fp8=False):
    y = reference.linear(x, w, scale, x_fp8=x_fp8)     # x_fp8: fp8_sim first (identity gradient)
    if jnp.dtype(out_dtype) == jnp.bfloat16:      # a rounding XLA keeps (as quant.round_to): no excess precision
        y = jax.lax.reduce_precision(y, exponent_bits=8, mantissa_bits=7)
    return y.astype(out_dtype)


def _kernel(x, w, scale, out_dtype, x_fp8):
    from . import gpu
    return gpu.linear(x, w, scale, out_dtype=out_dtype, x_fp8=x_fp8, interpret=jax.default_backend() == "cpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _linear(x, w, scale, out_dtype, x_fp8):
    return _kernel(x, w, scale, out_dtype, x_fp8)


def _fwd(x, w, scale, out_dtype, x_fp8):
    return _kernel(x, w, scale, out_dtype, x_fp8), (x, w, scale)


def _bwd(out_dtype, x_fp8, res, g):
    x, w, scale = res
    if scale is None and w.dtype == jnp.bfloat16:
        _, vjp = jax.vjp(lambda x_, w_: _ref_node(x_, w_, None, out_dtype, x_fp8), x, w)
        dx, dw = vjp(g)
        return dx, dw, None
    _, vjp = jax.vjp(lambda x_: _ref_node(x_, w, scale, out_dtype, x_fp8), x)     # quantised weights are frozen
    (dx,) = vjp(g)
    return dx, None, None


_linear.defvjp(_fwd, _bwd)


def linear(x: jax.Array, w_node, *, out_dtype=jnp.float32, backend: str | None = None,
           x_fp8: bool = False) -> jax.Array:
    """x [..., K] (bf16 or fp32), w_node = {"weight": [O, K], optional "scale"} (or a bare weight) -> [..., O]
    in out_dtype: x times the exactly dequantised weight transposed, fp32 accumulation.

    Weight formats: bf16 / fp32; FP8 e4m3 + E8M0 [ceil(O/128), ceil(K/128)]; FP4 packed int8 [O, K/2] + E8M0
    [O, K/32] (reference only). bf16 output = RNE of the fp32 result, a rounding XLA keeps (`quant.round_to`).

    x_fp8: x is first replaced by `quant.fp8_sim(x, 128)` (per row, per 128 inputs: E4M3 with a power-of-two
    scale, as `layers.linear_fp8` under quant_sim): the reference runs fp8_sim then its einsum; the kernel computes
    the same values bit for bit in registers (gpu.fp8_sim_block), saving the two XLA kernels of fp8_sim.

    Numerics: bf16 x is used as is. fp32 x: the kernel splits it exactly into three bf16 parts (hi + mid + lo
    == x, see gpu.py), runs them as 3M rows and sums the three results (hi + mid) + lo in fp32 -- the fp32 x
    bf16-weight product to within fp32 summation rounding, as the reference's fp32 einsum (precision HIGHEST).
    (With x_fp8 no split is needed: the quantised values are exact in bf16.)

    backend: None picks by platform ("gpu" on NVIDIA GPUs, "reference" elsewhere; V4JAX_KERNELS=reference
    forces it). "gpu" runs the kernel when `uses_kernel(M, weight, x_fp8=x_fp8)` (M = rows of x after flattening
    the leading dims, 1..MAX_ROWS; a bf16/FP8 weight), else the reference; asked for on CPU, the kernel runs in
    interpret mode. Up to gpu.GEMV_ROWS kernel rows it takes its CUDA-core GEMV path, above the tensor cores.

    Differentiable (jax.custom_vjp): the forward is the kernel, the backward the reference's VJP -- dx, and dw for
    a bf16 weight; quantised (FP8/FP4) weights get no gradient (None). fp32 weights always take the reference.
    With x_fp8, dx is the reference's (fp8_sim has the identity gradient) and dw uses the quantised x.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"linear: unknown backend {backend!r}; available: {BACKENDS}")
    w, scale = _split(w_node)
    O, K = _check(x, w, scale)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    x_fp8 = bool(x_fp8)
    if backend == "reference" or not uses_kernel(x2.shape[0], w, scale, x_fp8=x_fp8):
        y = _ref_node(x2, w, scale, out_dtype, x_fp8)
    else:
        y = _linear(x2, w, scale, jnp.dtype(out_dtype), x_fp8)
    return y.reshape(*lead, O)
