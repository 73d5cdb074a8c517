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
1). Same numerics (fp32 accumulation of exact products; fp32 inputs split exactly into three bf16 parts).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import linear as skinny

from . import quant
from .config import ModelConfig

f32 = jnp.float32


def act_dtype(cfg: ModelConfig):
    """The dtype the reference keeps activations in (bf16), or fp32 for tight equivalence tests."""
    return jnp.float32 if cfg.compute_dtype == "float32" else jnp.bfloat16


def weight(node: dict, dtype=jnp.bfloat16) -> jax.Array:
    """The logical weight of a linear: dequantised (exactly) if stored as FP8/FP4 + E8M0 scale."""
    w = node["weight"]
    if "scale" in node:
        if w.dtype == jnp.int8:
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
    return _matmul(x, weight(node, dt))


def linear_fp8(cfg: ModelConfig, node: dict, x: jax.Array) -> jax.Array:
    dt = act_dtype(cfg)
    x = x.astype(dt)
    if cfg.quant_sim:
        x = quant.fp8_sim(x, 128)
    return quant.round_to(_linear(x, node, dt), dt)


def linear_bf16(cfg: ModelConfig, node: dict, x: jax.Array) -> jax.Array:
    dt = act_dtype(cfg)
    return quant.round_to(_linear(x.astype(dt), node, dt), dt)


def linear_f32(node: dict, x: jax.Array) -> jax.Array:
    return _linear(x.astype(f32), node, f32)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """fp32 inside, weight multiplied in fp32, result in x's dtype."""
    xf = x.astype(f32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return quant.round_to(y * w.astype(f32), x.dtype)


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
