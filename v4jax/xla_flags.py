"""XLA flags the command-line tools set by default (before JAX starts its backend).

`--xla_gpu_enable_triton_gemm=false`: XLA's GPU compiler otherwise fuses V4's many small matmuls with their
neighbours into Triton GEMM fusions and autotunes each one; measured on an H100 (scripts/compile_probe.py, one CSA
block's gradient at the demo size): 101.7 s to compile by default, 14.0 s with autotuning off, 6.7 s with Triton
GEMMs off (cuBLAS for every matmul); the demo training step went from ~300 s to ~65 s of compilation. Library users
calling v4jax from their own programs can do the same: `v4jax.xla_flags.apply_defaults()` before the first JAX call,
or set XLA_FLAGS themselves. A flag the user already set in XLA_FLAGS is never overridden.

The trade-off (not yet measured): with Triton GEMMs off, an FP8 weight is dequantised to bf16 by its own kernel
before a cuBLAS matmul, while XLA's Triton GEMM fusion can dequantise inside the GEMM -- which matters for
bandwidth-bound decode of FP8 checkpoints. To compare, pass `XLA_FLAGS=--xla_gpu_enable_triton_gemm=true` to
`python -m v4jax.bench full` (longer compile, possibly faster decode).
"""
from __future__ import annotations

import os

DEFAULTS = {"--xla_gpu_enable_triton_gemm": "false"}


def apply_defaults() -> str:
    """Add the default flags that XLA_FLAGS does not already mention; returns the resulting XLA_FLAGS."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"{k}={v}" for k, v in DEFAULTS.items() if k not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return os.environ.get("XLA_FLAGS", "")
