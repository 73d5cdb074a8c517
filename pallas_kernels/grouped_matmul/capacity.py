"""The alternative to the kernel: a capacity-padded batched einsum (no dropped tokens), measured against it.

Rows sorted by group are gathered into [E, capacity, in] (slot c of group e = row start_e + c, zero past the
group), one batched matmul `einsum('ecd,efd->ecf')` runs on the vendor library, and each row gathers its result
back. `capacity` must be static and >= max(group_sizes) (no token dropped): under jit that is a host-side number
(a device->host sync per call, or a worst-case bound such as N). Costs beyond the matmul: the [E, capacity, in]
gather and the [N, out] gather back, and the padded rows' flops.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def capacity_for(group_sizes, multiple: int = 128) -> int:
    """max group size rounded up to `multiple` (host: concrete group_sizes only)."""
    m = int(jax.device_get(jnp.max(group_sizes))) if group_sizes.size else 0
    return max(multiple, -(-m // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("capacity", "out_dtype"))
def grouped_matmul(x, w, group_sizes, *, capacity: int, out_dtype=jnp.float32):
    """x [N, in] sorted by group, w [E, out, in], group_sizes [E] -> [N, out] (rows past the groups: 0).
    Requires capacity >= max(group_sizes) (not checked under jit)."""
    N = x.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    slot = jnp.arange(capacity, dtype=jnp.int32)
    src = starts[:, None] + slot[None, :]                                     # [E, cap]
    valid = slot[None, :] < sizes[:, None]
    xe = jnp.where(valid[..., None], x[jnp.minimum(src, N - 1)], 0).astype(x.dtype)
    y = jnp.einsum("ecd,efd->ecf", xe, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)
    r = jnp.arange(N, dtype=jnp.int32)
    e = jnp.minimum(jnp.searchsorted(ends, r, side="right"), sizes.shape[0] - 1)
    c = jnp.clip(r - starts[e], 0, capacity - 1)
    return jnp.where((r < ends[-1])[:, None], y[e, c], 0).astype(out_dtype)
