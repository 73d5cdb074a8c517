"""Optimisers for continued training: Muon (DeepSeek-V4 Algorithm 1) + AdamW, split by parameter name (spec 7).

Public API
  newton_schulz(G, steps, eps, dtype)   hybrid Newton-Schulz orthogonalisation, batched over leading dims
  muon(learning_rate, ...)              optax GradientTransformation implementing V4's Muon (incl. lr and wd)
  param_groups(params_or_names)         "muon" | "adamw" | "frozen" label per leaf, by checkpoint name
  make_optimizer(params, ...)           optax.multi_transform over those labels, fp32 state, optional clipping
  lr_schedule(peak, warmup, total, ...) linear warm-up -> constant -> cosine decay to `final`
  logical_row_splits(cfg, names)        optional: split fused tensors (wo_a groups, compressor halves) for Muon

Muon, as in the report (spec 7):
  M_t = mu M_{t-1} + G_t                       (plain sum, no (1 - mu) factor, no bias correction)
  O'  = NS(mu M_t + G_t)                       (Nesterov; NS(M_t) with nesterov=False)
  O   = O' * sqrt(max(n, m)) * 0.18            (update RMS matched to AdamW's, so one lr serves both)
  W  <- W (1 - lr wd) - lr O                   (decoupled weight decay, lr from the schedule at this step)
with NS = Frobenius normalisation then 10 quintic steps, (3.4445, -4.7750, 2.0315) x 8 then (2, -1.5, 0.5) x 2.
A tensor [..., n, m] is a batch of independent [n, m] matrices (stacked routed experts [E, out, in] are orthogonalised
and scaled one expert at a time, as the report's "each expert separately" requires).

Why not `optax.contrib.muon` (checked against optax 0.2.8): it does express the per-step coefficient table (a tuple
of (a, b, c) rows with ns_steps=10), the 0.18 * sqrt(max(fan_in, fan_out)) factor (`consistent_rms=0.18`), decoupled
lr-scaled weight decay, and batches of matrices (`MuonDimensionNumbers(reduction_axis=2, output_axis=1)` vmaps the
expert axis). It does not express V4's momentum: optax keeps an EMA  m_t = b m_{t-1} + (1 - b) g_t  with Adam-style
bias correction, and its Nesterov input is  b * m_t/(1 - b^(t+1)) + (1 - b) g_t/(1 - b^t).  Up to a global factor
(which the Frobenius normalisation removes) that is  b M_t + g_t (1 - b^(t+1))/(1 - b^t),  i.e. the current gradient
is over-weighted relative to V4's  mu M_t + G_t  at every finite step (by 1.95x at step 1 -- harmless there since
only G_1 exists --, 1.46x at step 2, ...; the two agree only as t -> infinity). It also runs NS in the momentum's dtype,
so "fp32 momentum, bf16 NS matmuls" cannot be had. (Run side by side on a 48x32 matrix with the same coefficients,
eps and scaling, the two updates agree to 2e-6 at step 1 and differ by ~11% from step 2 on.) So Muon is written
here (small; every step is checked against a numpy float64 reimplementation in tests/test_optim.py). AdamW,
clipping, masking and the group split are optax's.

Parameter groups (spec 7; unstated cases decided here):
  adamw   embed.weight, head.weight, every RMSNorm weight (`*norm.weight`: attn/ffn/q/kv/compressor/indexer, final,
          mtp enorm/hnorm/norm), `hc_*_base`, `hc_*_scale`; also `attn.attn_sink` [H] (a per-head logit bias) and
          `compressor.ape` [m, cD] (a table of additive position biases): neither is a linear map, so an
          orthogonalised update has no meaning for them -- they are treated like the other biases (hc_*_base).
  muon    every other `*.weight` (attention, shared/routed experts, compressor/indexer projections, mtp e_proj/h_proj,
          router `ffn.gate.weight` [E, d]) and `hc_*_fn`; all have ndim >= 2 (checked).
  frozen  `ffn.gate.tid2eid` (int hash table), quantisation scales `*.scale` (dtype="native" params; train on
          dtype="bf16" or fp32 weights instead), any non-floating leaf, and `ffn.gate.bias`: the router bias is
          updated by the auxiliary-loss-free balancing rule (bias += 0.001 * sign(mean load - load)), not by gradients,
          so the optimizer leaves it alone (its update is 0) and the training step must update it separately.
A name matching none of the rules raises, so a new parameter forces a decision here.

dtypes: all optimizer state (Muon momentum, Adam moments) is fp32, also for bf16 parameters: gradients and parameters
are cast to fp32 before the inner transforms and the updates are cast back to each parameter's dtype at the end
(note that adding an lr-sized update to bf16 weights rounds; keep fp32 master weights if that matters).

Fused tensors: by default a 2-D weight is one Muon matrix. `wo_a` [g*r, H*hd/g] is g independent per-group maps and
the ratio-4 compressors' `wkv`/`wgate` [2*c, d] are two halves; the report does not say how V4 split them.
`logical_row_splits(cfg, names)` gives {name: k} for those, to pass as `muon_kwargs={"row_splits": ...}`: each row
block is then orthogonalised and scaled (sqrt(max) of the block's shape) on its own.
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import params as P

f32 = jnp.float32

# The hybrid schedule of spec 7: 8 fast steps, then 2 steps of the (2, -1.5, 0.5) iteration that converges to 1.
NS_STEPS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2

MUON, ADAMW, FROZEN = "muon", "adamw", "frozen"


# ---- Newton-Schulz --------------------------------------------------------------------------------------
def newton_schulz(G: jax.Array, steps: Iterable[tuple[float, float, float]] = NS_STEPS, eps: float = 1e-7,
                  dtype=f32) -> jax.Array:
    """Approximate orthogonalisation U V^T of each matrix G[..., n, m] (batched over the leading dims).

    X0 = G / (||G||_F + eps) per matrix, then X <- a X + b (X X^T) X + c (X X^T)^2 X for each (a, b, c) in `steps`.
    Matrices with n > m are transposed first so that the Gram matrix X X^T is min(n, m) square. The matmuls run in
    `dtype` (bf16 as DeepSeek found stable; fp32 default); the norm is taken in fp32. Returns G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs [..., n, m] matrices, got shape {G.shape}")
    out_dtype = G.dtype
    tall = G.shape[-2] > G.shape[-1]
    X = jnp.swapaxes(G, -1, -2) if tall else G
    X32 = X.astype(f32)
    norm = jnp.sqrt(jnp.sum(X32 * X32, axis=(-2, -1), keepdims=True))
    X = (X32 / (norm + eps)).astype(dtype)
    # runs of equal coefficients become one loop each (8 + 2 by default): a small program, same arithmetic
    for (a, b, c), run in itertools.groupby(tuple(tuple(map(float, s)) for s in steps)):
        def body(_, X, a=a, b=b, c=c):
            A = X @ jnp.swapaxes(X, -1, -2)
            B = b * A + c * (A @ A)
            return a * X + B @ X
        X = jax.lax.fori_loop(0, len(list(run)), body, X)
    if tall:
        X = jnp.swapaxes(X, -1, -2)
    return X.astype(out_dtype)


# ---- helpers ---------------------------------------------------------------------------------------------
def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_name(path) -> str:
    """A pytree path of dict keys -> the '.'-joined checkpoint name."""
    return ".".join(_key_str(k) for k in path)


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _lr_at(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


# ---- Muon ------------------------------------------------------------------------------------------------
class MuonState(NamedTuple):
    count: jax.Array  # int32 step counter (the lr schedule is evaluated at it)
    momentum: Any     # fp32 M_t, same structure as the params


def _split_rows(x: jax.Array, k: int) -> jax.Array:
    """[..., n, m] -> [..., k, n/k, m] (k independent row blocks)."""
    n, m = x.shape[-2:]
    if n % k:
        raise ValueError(f"cannot split {n} rows into {k} blocks")
    return x.reshape(x.shape[:-2] + (k, n // k, m))


def muon(learning_rate: float | Callable[[jax.Array], jax.Array], momentum: float = 0.95, weight_decay: float = 0.1,
         rms_scale: float = 0.18, ns_dtype=f32, nesterov: bool = True,
         ns_steps: Iterable[tuple[float, float, float]] = NS_STEPS, eps: float = 1e-7,
         row_splits: Mapping[str, int] | Callable[[str, tuple[int, ...]], int] | None = None,
         ) -> optax.GradientTransformation:
    """DeepSeek-V4 Muon as one optax transform (its output is the final update: -lr * (O + wd * W)).

    Every leaf must be [..., n, m]; leading dims are independent matrices. `learning_rate` is a float or a schedule
    evaluated at the 0-based step count. `weight_decay` needs `params` in update(); it is decoupled and lr-scaled:
    W <- W (1 - lr wd) - lr O. `row_splits` optionally maps a leaf's '.'-joined name (or (name, shape) via a
    callable) to a number k of equal row blocks that are orthogonalised and scaled separately. The momentum is fp32.
    """
    steps = tuple(tuple(float(c) for c in s) for s in ns_steps)
    mu = float(momentum)

    def n_splits(name: str, shape) -> int:
        if row_splits is None:
            return 1
        if callable(row_splits):
            return int(row_splits(name, tuple(shape)))
        return int(row_splits.get(name, 1))

    def init_fn(params):
        return MuonState(count=jnp.zeros([], jnp.int32),
                         momentum=jax.tree.map(lambda p: jnp.zeros(p.shape, f32), params))

    def update_fn(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError("muon with weight_decay needs params")
        lr = _lr_at(learning_rate, state.count)
        new_m = jax.tree.map(lambda m, g: mu * m + g.astype(f32), state.momentum, updates)
        looked_at = jax.tree.map(lambda m, g: mu * m + g.astype(f32), new_m, updates) if nesterov else new_m

        def one(path, x):
            if x.ndim < 2:
                raise ValueError(f"muon leaf {_path_name(path)} has shape {x.shape}; needs [..., n, m]")
            k = n_splits(_path_name(path), x.shape)
            xs = _split_rows(x, k) if k > 1 else x
            n, m = xs.shape[-2:]
            o = newton_schulz(xs, steps, eps, ns_dtype).astype(f32) * (math.sqrt(max(n, m)) * rms_scale)
            return o.reshape(x.shape)

        O = jax.tree_util.tree_map_with_path(one, looked_at)
        if weight_decay:
            O = jax.tree.map(lambda o, p: o + weight_decay * p.astype(f32), O, params)
        out = jax.tree.map(lambda o: -lr * o, O)
        return out, MuonState(count=optax.safe_increment(state.count), momentum=new_m)

    return optax.GradientTransformation(init_fn, update_fn)


# ---- parameter groups ------------------------------------------------------------------------------------
_HC_ADAMW = re.compile(r"(^|\.)hc_\w+_(base|scale)$")
_HC_MUON = re.compile(r"(^|\.)hc_\w+_fn$")


def label_for(name: str, value: Any = None) -> str:
    """The group of one parameter, from its checkpoint name (and, if given, its array: non-float -> frozen)."""
    if value is not None and hasattr(value, "dtype") and not jnp.issubdtype(value.dtype, jnp.floating):
        return FROZEN
    last = name.rsplit(".", 1)[-1]
    if last in ("tid2eid", "scale") or name.endswith("gate.bias"):
        return FROZEN
    if name in ("embed.weight", "head.weight") or name.endswith("norm.weight") or _HC_ADAMW.search(name):
        return ADAMW
    if last in ("attn_sink", "ape"):
        return ADAMW
    if last == "weight" or _HC_MUON.search(name):
        if value is not None and hasattr(value, "shape") and len(value.shape) < 2:
            raise ValueError(f"{name}: a Muon parameter must be a matrix, got shape {value.shape}")
        return MUON
    raise ValueError(f"no optimizer group rule for parameter {name!r}: add one in v4jax/optim.py")


def param_groups(params_or_names: Any) -> Any:
    """Label every leaf "muon" | "adamw" | "frozen" (see the module docstring for the rules).

    Accepts a nested params pytree (arrays or ShapeDtypeStructs; the result has the same structure), a flat
    {checkpoint name: array} dict (result: flat dict), or an iterable of names (result: {name: label}).
    """
    if isinstance(params_or_names, Mapping):
        nested = any(isinstance(v, Mapping) for v in params_or_names.values())
        flat = P.flatten(params_or_names) if nested else dict(params_or_names)
        labels = {n: label_for(n, v) for n, v in flat.items()}
        return P.unflatten(labels) if nested else labels
    return {n: label_for(n) for n in params_or_names}


def logical_row_splits(cfg, names: Iterable[str]) -> dict[str, int]:
    """{name: k} for fused tensors made of k independent row blocks: `attn.wo_a` (cfg.o_groups) and the
    overlapping-window compressors' `wkv`/`wgate` (two halves, rows = 2 * head dim). Optional (see module doc)."""
    out: dict[str, int] = {}
    for n in names:
        if n.endswith("attn.wo_a.weight") and cfg.o_groups > 1:
            out[n] = cfg.o_groups
        elif re.search(r"compressor\.(wkv|wgate)\.weight$", n):
            lm = re.match(r"(layers|mtp)\.(\d+)\.", n)
            layer = int(lm.group(2)) + (cfg.n_layers if lm.group(1) == "mtp" else 0)
            if ".indexer." in n or cfg.ratio(layer) == 4:
                out[n] = 2
    return out


# ---- the full optimizer ----------------------------------------------------------------------------------
def _fp32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` on fp32 copies of the float grads/params (so its state is fp32); cast updates to param dtypes."""
    def up(x):
        return x.astype(f32) if _is_float(x) else x

    def init_fn(params):
        return inner.init(jax.tree.map(up, params))

    def update_fn(updates, state, params=None):
        u, state = inner.update(jax.tree.map(up, updates), state,
                                None if params is None else jax.tree.map(up, params))
        if params is not None:
            u = jax.tree.map(lambda v, p: v.astype(p.dtype) if _is_float(p) else jnp.zeros_like(p), u, params)
        else:
            u = jax.tree.map(lambda v, g: v.astype(g.dtype) if _is_float(g) else v, u, updates)
        return u, state

    return optax.GradientTransformation(init_fn, update_fn)


ADAMW_DEFAULTS = dict(b1=0.9, b2=0.95, eps=1e-20, weight_decay=0.1)


def make_optimizer(params: Any, *, lr_schedule: float | Callable[[jax.Array], jax.Array],
                   muon_kwargs: Mapping[str, Any] | None = None, adamw_kwargs: Mapping[str, Any] | None = None,
                   clip_norm: float | None = None, optimizer: str = "muon") -> optax.GradientTransformation:
    """Muon for matrices + AdamW for embeddings/head/norms/biases + nothing for frozen leaves (spec 7).

    `params` (pytree, arrays or ShapeDtypeStructs) fixes the labels. optimizer="adamw" puts every trainable leaf on
    AdamW (the Muon-vs-AdamW baseline). `clip_norm` clips the global norm of the trainable grads first. Both inner
    optimizers take the same lr schedule (Muon's 0.18 * sqrt(max) scaling matches AdamW's update RMS). Defaults:
    muon(momentum .95, wd .1, rms_scale .18), AdamW(b1 .9, b2 .95, eps 1e-20, wd .1); kwargs override them.
    """
    if optimizer not in (MUON, ADAMW):
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {optimizer!r}")
    labels = param_groups(params)
    if optimizer == ADAMW:
        labels = jax.tree.map(lambda l: ADAMW if l == MUON else l, labels)
    akw = {**ADAMW_DEFAULTS, **(adamw_kwargs or {})}
    transforms = {ADAMW: optax.adamw(lr_schedule, **akw), FROZEN: optax.set_to_zero()}
    if optimizer == MUON:
        transforms[MUON] = muon(lr_schedule, **(muon_kwargs or {}))
    parts = []
    if clip_norm is not None:
        trainable = jax.tree.map(lambda l: l != FROZEN, labels)
        parts.append(optax.masked(optax.clip_by_global_norm(clip_norm), trainable))
    parts.append(optax.multi_transform(transforms, labels))
    return _fp32_state(optax.chain(*parts))


# ---- schedule --------------------------------------------------------------------------------------------
def lr_schedule(peak: float, warmup: int, total: int, *, decay_start_frac: float | None = None,
                decay_steps: int | None = None, final: float = 0.0, init: float = 0.0
                ) -> Callable[[jax.Array], jax.Array]:
    """lr(step): linear init -> peak over `warmup` steps, constant peak, cosine peak -> final, then final.

    The decay runs over [decay_start, total) with decay_start = total - decay_steps, or total * decay_start_frac,
    or (neither given) right after warm-up. Spec 7 (Flash): peak 2.7e-4, warmup 2000, final 2.7e-5.
    """
    if decay_steps is not None and decay_start_frac is not None:
        raise ValueError("give decay_steps or decay_start_frac, not both")
    if decay_steps is not None:
        start = total - int(decay_steps)
    elif decay_start_frac is not None:
        start = int(round(total * decay_start_frac))
    else:
        start = warmup
    if not 0 <= warmup <= start <= total:
        raise ValueError(f"need 0 <= warmup ({warmup}) <= decay start ({start}) <= total ({total})")
    span = max(total - start, 1)

    def schedule(step):
        t = jnp.asarray(step, f32)
        warm = init + (peak - init) * t / max(warmup, 1)
        frac = jnp.clip((t - start) / span, 0.0, 1.0)
        cos = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(t < warmup, warm, jnp.where(t < start, peak, cos)).astype(f32)

    return schedule
