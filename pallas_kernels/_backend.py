"""The one rule every kernel dispatch uses to pick its backend."""
from __future__ import annotations

import os

import jax


def platform_backend(available: tuple[str, ...], platform: str | None = None) -> str:
    """"gpu" on NVIDIA GPUs, "tpu" on TPUs (if the kernel has that backend), else "reference".
    V4JAX_KERNELS=reference forces the plain-jnp definitions (debugging, A/B checks)."""
    if os.environ.get("V4JAX_KERNELS") == "reference":
        return "reference"
    platform = platform or jax.default_backend()
    kind = {"cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(platform, "reference")
    return kind if kind in available else "reference"
