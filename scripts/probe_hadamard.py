#!/usr/bin/env python
"""The indexer's Hadamard rotation: the butterfly (`quant.hadamard`) against one bf16 GEMM with the +-1 matrix.

    python scripts/probe_hadamard.py

For bf16 x every product x * (+-1) is exact and a bf16 x bf16 dot accumulates in fp32, so the GEMM form is the
same transform up to fp32 summation order (the result is rounded to bf16 either way). Prints time per call at the
model's decode and prefill shapes and the fraction of outputs that differ (and by how many bf16 steps).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from v4jax import bench, quant  # noqa: E402


def butterfly(x):
    """quant.hadamard's fp32 path (the butterfly), rounded back to x's dtype: what bf16 inputs ran before."""
    return quant.hadamard(x.astype(jnp.float32)).astype(x.dtype)


def main() -> int:
    print("| shape | butterfly us | GEMM us | outputs differing | max bf16 steps |")
    print("|---|---|---|---|---|")
    for shape in [(1, 1, 64, 128), (32, 1, 64, 128), (1, 4, 128), (1, 4096, 64, 128), (1, 16384, 64, 128)]:
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
        tb, _ = bench._try_time(jax.jit(butterfly), [(x,)])
        tg, _ = bench._try_time(jax.jit(quant.hadamard_gemm), [(x,)])
        a = np.asarray(jax.jit(butterfly)(x), np.float32)
        b = np.asarray(jax.jit(quant.hadamard_gemm)(x), np.float32)
        diff = a != b
        steps = np.abs(a.view(np.int32) - b.view(np.int32)).max() >> 16 if diff.any() else 0
        print(f"| {shape} | {tb * 1e6:.1f} | {tg * 1e6:.1f} | {diff.mean():.2e} | {steps} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
