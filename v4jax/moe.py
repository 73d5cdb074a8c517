"""Mixture of experts (spec 2.8): sqrt-softplus gate, hash or bias-corrected top-k routing, clamped SwiGLU.

Gate in fp32: a = sqrt(softplus(x W_g^T)). Score-routed layers select the top-k of a + bias (the bias only
selects); hash layers take the experts `tid2eid[token]`. Weights are the selected a, normalised to sum 1, times
`routed_scaling_factor`. Every expert (routed and shared) is SwiGLU with FP8-GEMM linears and the clamp
(up to [-limit, limit], gate <= limit); a routed expert's weight multiplies its hidden state before the down
projection. Routed outputs (bf16) are summed in fp32 in ascending expert id, then the shared expert is added.

`routed_sum` is the one reference dispatch: assignments sorted by expert and run as grouped matmuls with
`jax.lax.ragged_dot`; inside a mesh with an `expert` axis, `routed_sum_expert_parallel` runs it per device in
`jax.shard_map`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.grouped_matmul import grouped_matmul

from . import quant
from .config import ModelConfig
from .sharding import active_axis_size
from .layers import act_dtype, linear_f32, linear_fp8

f32 = jnp.float32


def route(cfg: ModelConfig, p: dict, layer: int, x: jax.Array, tokens: jax.Array):
    """x [..., d], tokens [...] -> (expert ids [..., k] int32, weights [..., k] fp32, gate scores a [..., E])."""
    a = jnp.sqrt(jax.nn.softplus(linear_f32(p, x)))
    if "tid2eid" in p:
        ids = p["tid2eid"][tokens].astype(jnp.int32)
    else:
        # top-k as a stable descending sort (ties: lower id first, like lax.top_k): XLA partitions a sort along
        # the token dims, while its TopK lowering flattens them and gathers a sequence-sharded input
        ids = jnp.argsort(-(a + p["bias"].astype(f32)), axis=-1, stable=True)[..., :cfg.num_experts_per_tok]
    w = jnp.take_along_axis(a, ids, axis=-1)
    w = w / jnp.sum(w, axis=-1, keepdims=True) * cfg.routed_scaling_factor
    return ids.astype(jnp.int32), w, a


def swiglu(cfg: ModelConfig, g: jax.Array, u: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """fp32 clamped SwiGLU of the bf16 projections; optional routing weight; result in activation dtype."""
    lim = cfg.swiglu_limit
    g, u = g.astype(f32), u.astype(f32)
    if lim > 0:
        u = jnp.clip(u, -lim, lim)
        g = jnp.minimum(g, lim)
    h = jax.nn.silu(g) * u
    if w is not None:
        h = w[..., None] * h
    return quant.round_to(h, act_dtype(cfg))


def shared_expert(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    if "w13" in p:                                                   # params.to_kernel_layout: one linear
        h = swiglu(cfg, *jnp.split(linear_fp8(cfg, p["w13"], x), 2, axis=-1))
    else:
        h = swiglu(cfg, linear_fp8(cfg, p["w1"], x), linear_fp8(cfg, p["w3"], x))
    return linear_fp8(cfg, p["w2"], h)


def _grouped(x: jax.Array, w_node: dict, sizes: jax.Array, dt, fp8_act: bool = False) -> jax.Array:
    """x [N, in] sorted by group, w_node {"weight" [E, out, in] (bf16, FP8 or packed FP4), "scale"?} -> [N, out]
    in dt: fp32 accumulation, rows past the groups 0. The Pallas grouped matmul on GPU (weights decoded in the
    kernel; FP8 x FP8 dots for quantised weights when fp8_act says x is `quant.fp8_sim` output), `ragged_dot`
    elsewhere."""
    return grouped_matmul(x, w_node, sizes, out_dtype=dt, fp8_act=fp8_act)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x: jax.Array, order: jax.Array, inv: jax.Array, k: int) -> jax.Array:
    """x[order // k] for a permutation `order` of T * k slots (slot s = row s // k's copy s % k) whose inverse is
    `inv`: the MoE's dispatch (k = top-k: each token's row once per routed expert, sorted by expert) and, with
    k = 1, its unsort. A row gather forward AND backward: the cotangent of row t is the fp32 sum over its k
    slots of g[inv[t * k + j]], j = 0..k-1 in order. Plain indexing would differentiate into a scatter-add (and
    the unsort was a scatter forward, `zeros.at[order].set(out)`: 7% of an 8 x 8K prefill on an H100)."""
    return x[order // k]


def _take_rows_fwd(x, order, inv, k):
    return x[order // k], (order, inv)


def _take_rows_bwd(k, res, g):
    order, inv = res
    gs = g[inv].reshape((-1, k) + g.shape[1:])
    dx = gs[:, 0].astype(f32)
    for j in range(1, k):
        dx = dx + gs[:, j].astype(f32)
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return dx.astype(g.dtype), zero(order), zero(inv)


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def routed_sum(cfg: ModelConfig, p: dict, x: jax.Array, ids: jax.Array, w: jax.Array, first=0) -> jax.Array:
    """The reference dispatch. Sum over each token's routed experts that `p` holds (experts first ..
    first + E_local - 1, stacked) of their outputs, in fp32, visiting experts in ascending id (experts held
    elsewhere add exactly 0). x [T, d], ids/w [T, k] -> [T, d] fp32.

    Assignments are sorted by expert and run as grouped matmuls (`jax.lax.ragged_dot`)."""
    T, k = ids.shape
    E_loc = p["w2"]["weight"].shape[0]
    dt = act_dtype(cfg)
    x = x.astype(dt)
    if cfg.quant_sim:
        x = quant.fp8_sim(x, 128)
    asc = jnp.argsort(ids, axis=-1)                                  # each token's experts in ascending id
    lid = jnp.take_along_axis(ids, asc, -1) - first
    w = jnp.take_along_axis(w, asc, -1)
    local = (lid >= 0) & (lid < E_loc)
    flat = jnp.where(local, lid, E_loc).reshape(-1)                  # E_loc = "not here": sorted last, no group
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=E_loc).astype(jnp.int32)
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype), unique_indices=True)
    xs = take_rows(x, order, inv, k)                                 # each token k times, sorted by expert
    if "w13" in p:                                                   # params.to_kernel_layout: one call
        gu = _grouped(xs, p["w13"], sizes, dt, cfg.quant_sim)
        g, u = jnp.split(gu, 2, axis=-1)
    else:
        g = _grouped(xs, p["w1"], sizes, dt, cfg.quant_sim)
        u = _grouped(xs, p["w3"], sizes, dt, cfg.quant_sim)
    h = swiglu(cfg, g, u, w.reshape(-1)[order])
    if cfg.quant_sim:
        h = quant.fp8_sim(h, 128)
    out = _grouped(h, p["w2"], sizes, dt, cfg.quant_sim)
    out = take_rows(out, inv, order, 1).reshape(T, k, -1)            # back to (token, slot) order
    out = jnp.where(local[..., None], out, 0)
    y = out[:, 0].astype(f32)
    for j in range(1, k):
        y = y + out[:, j].astype(f32)
    return y


def routed_sum_expert_parallel(cfg: ModelConfig, p: dict, x: jax.Array, ids: jax.Array, w: jax.Array):
    """`routed_sum` with the experts split over the mesh axis `expert`, inside `jax.shard_map`.
    x [B, S, d], ids/w [B, S, k] -> [B, S, d] fp32.

    When the tokens divide (batch over `data`, sequence over (`seq`, `expert`)), each device gathers the tokens
    of its expert group (all_gather over `expert`), runs its own experts, and the partial sums go back to the
    tokens' owners with one reduce-scatter. Otherwise (e.g. decode with a small batch) tokens stay replicated and
    the partial sums are all-reduced. Experts never move; only activations do.

    Why not ragged_all_to_all: at expert=2 both move the same bytes (top-6 routing reaches the other device for
    nearly every token), and `scripts/probe_ep_dispatch.py` on 2 x H200 measured the all-gather + reduce-scatter
    exchange 45-70x faster (4.3 ms against 302 ms at 32K tokens per device); XLA:CPU does not implement
    ragged_all_to_all at all (docs/benchmarks.md, session 5)."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(mesh.shape)
    B, S, d = x.shape
    n_data = sizes.get("data", 1)
    seq_axes = tuple(a for a in ("seq", "expert") if sizes.get(a, 1) > 1)
    scatter = B % n_data == 0 and S % int(np.prod([sizes[a] for a in seq_axes])) == 0
    tok = P("data" if n_data > 1 else None, seq_axes) if scatter else P()
    E_loc = cfg.n_routed_experts // sizes["expert"]

    def local(x, ids, w, pe):
        if scatter:
            x, ids, w = (jax.lax.all_gather(a, "expert", axis=1, tiled=True) for a in (x, ids, w))
        b, s, _ = x.shape
        y = routed_sum(cfg, pe, x.reshape(b * s, d), ids.reshape(b * s, -1), w.reshape(b * s, -1),
                       first=jax.lax.axis_index("expert") * E_loc).reshape(b, s, d)
        if scatter:
            return jax.lax.psum_scatter(y, "expert", scatter_dimension=1, tiled=True)
        return jax.lax.psum(y, "expert")

    pe_spec = jax.tree.map(lambda _: P("expert"), p)
    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, pe_spec), out_specs=tok,
                         check_vma=False)(x, ids, w, p)   # Pallas out_shapes carry no varying-axes info (JAX 0.11)


def router_stats(cfg: ModelConfig, ids: jax.Array, a: jax.Array, B: int) -> dict:
    """Training statistics of one layer: expert load (tokens routed to each expert, for the aux-loss-free bias
    update) and the sequence-wise balance loss sum_i f_i P_i averaged over rows (DeepSeek-V3/V4 form:
    f_i = E/(k S) * #tokens of the row routed to i, P_i = mean over the row of a_i / sum_j a_j)."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    onehot = jax.nn.one_hot(ids, E, dtype=f32).sum(-2).reshape(B, -1, E)                   # [B, S, E]
    probs = (a / jnp.sum(a, -1, keepdims=True)).reshape(B, -1, E)
    S = onehot.shape[1]
    f = onehot.sum(1) * (E / (k * S))
    balance = jnp.mean(jnp.sum(f * probs.mean(1), -1))
    return {"load": onehot.sum((0, 1)), "balance": balance}


def moe(cfg: ModelConfig, p: dict, layer: int, x: jax.Array, tokens: jax.Array, with_routing: bool = False):
    """x [B, S, d] (normed), tokens [B, S] -> [B, S, d] (and, with_routing, the routing (ids [B,S,k], router
    scores [B,S,E]) that training statistics are computed from)."""
    B, S, d = x.shape
    ids, w, a = route(cfg, p["gate"], layer, x, tokens)                                     # [B, S, k|E]
    if active_axis_size("expert") > 1:
        y = routed_sum_expert_parallel(cfg, p["experts"], x, ids, w)
    else:
        k = ids.shape[-1]
        y = routed_sum(cfg, p["experts"], x.reshape(B * S, d), ids.reshape(B * S, k),
                       w.reshape(B * S, k)).reshape(B, S, d)
    if "shared_experts" in p:  # the shared expert stays local
        y = y + shared_expert(cfg, p["shared_experts"], x).astype(f32)
    y = quant.round_to(y, act_dtype(cfg))
    return (y, ids, a) if with_routing else y
