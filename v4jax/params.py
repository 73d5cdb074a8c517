"""Every parameter of the model, declared once.

`declare(cfg)` lists each parameter under its checkpoint name (`layers.3.attn.wq_a.weight`, ...) with its shape,
logical axes, checkpoint storage and initializer. Abstract shapes (`abstract_params`), random init (`init_params`)
and the logical axes used by sharding all come from this one table.

Storage kinds (how the official checkpoint holds a weight):
  "fp8"  FP8 e4m3 `[out, in]` + `.scale` E8M0 `[ceil(out/128), ceil(in/128)]`
  "fp4"  packed E2M1 int8 `[out, in/2]` + `.scale` E8M0 `[out, in/32]` (routed experts)
  else   the plain dtype ("bf16", "f32", "i32"); `tid2eid` is I64 in the files, int32 in memory.
Routed experts are stacked on a leading expert axis (`layers.L.ffn.experts.w1.weight` `[E, out, in]`); see
`checkpoint.official_view` for the per-expert names.

With dtype="native" a quantized weight becomes the pair `X.weight`, `X.scale`; with dtype="bf16" it is one bf16
`X.weight` holding the dequantized values.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import quant
from .config import ModelConfig

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32, "i32": jnp.int32}


@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]        # logical (dequantized) shape
    storage: str                  # "fp8" | "fp4" | "bf16" | "f32" | "i32"
    axes: tuple[str | None, ...]  # logical axis names, one per dim (see sharding.py)
    init: str                     # "normal" (std 1/sqrt(fan_in)) | "ones" | "zeros" | "small" | "sink" | "hash"


def _lin(out: int, inp: int, storage: str, axes: tuple[str | None, str | None]) -> Param:
    return Param((out, inp), storage, axes, "normal")


def _block(cfg: ModelConfig, layer: int, prefix: str, experts_storage: str, lin: str) -> dict[str, Param]:
    d, H, hd, hc = cfg.dim, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
    m = cfg.ratio(layer)
    g, E, F = cfg.o_groups, cfg.n_routed_experts, cfg.moe_intermediate_size
    p: dict[str, Param] = {}
    for sub in ("attn", "ffn"):
        p[f"hc_{sub}_fn"] = Param(((2 + hc) * hc, hc * d), "f32", ("hc_mix", "hc_embed"), "small")
        p[f"hc_{sub}_base"] = Param(((2 + hc) * hc,), "f32", ("hc_mix",), "hc_base")
        p[f"hc_{sub}_scale"] = Param((3,), "f32", (None,), "hc_scale")
    p["attn_norm.weight"] = Param((d,), "bf16", ("embed",), "ones")
    p["ffn_norm.weight"] = Param((d,), "bf16", ("embed",), "ones")
    a = "attn."
    p[a + "attn_sink"] = Param((H,), "f32", ("heads",), "sink")
    p[a + "q_norm.weight"] = Param((cfg.q_lora_rank,), "bf16", (None,), "ones")
    p[a + "kv_norm.weight"] = Param((hd,), "bf16", (None,), "ones")
    p[a + "wq_a.weight"] = _lin(cfg.q_lora_rank, d, lin, (None, "embed"))
    p[a + "wq_b.weight"] = _lin(H * hd, cfg.q_lora_rank, lin, ("q_heads", None))
    p[a + "wkv.weight"] = _lin(hd, d, lin, (None, "embed"))
    p[a + "wo_a.weight"] = _lin(g * cfg.o_lora_rank, H * hd // g, lin, ("o_groups", None))
    p[a + "wo_b.weight"] = _lin(d, g * cfg.o_lora_rank, lin, ("embed", "o_groups"))
    if m:
        c = 2 if m == 4 else 1
        cp = a + "compressor."
        p[cp + "ape"] = Param((m, c * hd), "f32", (None, None), "small")
        p[cp + "wkv.weight"] = Param((c * hd, d), "bf16", (None, "embed"), "normal")
        p[cp + "wgate.weight"] = Param((c * hd, d), "bf16", (None, "embed"), "normal")
        p[cp + "norm.weight"] = Param((hd,), "bf16", (None,), "ones")
    if m == 4:
        ip, nI, dI = a + "indexer.", cfg.index_n_heads, cfg.index_head_dim
        p[ip + "wq_b.weight"] = _lin(nI * dI, cfg.q_lora_rank, lin, ("index_heads", None))
        p[ip + "weights_proj.weight"] = Param((nI, d), "bf16", ("index_heads", "embed"), "normal")
        p[ip + "compressor.ape"] = Param((4, 2 * dI), "f32", (None, None), "small")
        p[ip + "compressor.wkv.weight"] = Param((2 * dI, d), "bf16", (None, "embed"), "normal")
        p[ip + "compressor.wgate.weight"] = Param((2 * dI, d), "bf16", (None, "embed"), "normal")
        p[ip + "compressor.norm.weight"] = Param((dI,), "bf16", (None,), "ones")
    f = "ffn."
    p[f + "gate.weight"] = Param((E, d), "bf16", ("router", "embed"), "normal")   # small: replicated
    if cfg.is_hash_layer(layer) and layer < cfg.n_layers:
        p[f + "gate.tid2eid"] = Param((cfg.vocab_size, cfg.num_experts_per_tok), "i32", ("vocab", None), "hash")
    else:
        p[f + "gate.bias"] = Param((E,), "f32", ("router",), "small")
    for w, shape in (("w1", (F, d)), ("w3", (F, d)), ("w2", (d, F))):
        ax = ("mlp", "embed") if w != "w2" else ("embed", "mlp")
        p[f + f"experts.{w}.weight"] = Param((E,) + shape, experts_storage, ("expert",) + ax, "normal")
        p[f + f"shared_experts.{w}.weight"] = Param(shape, lin, ax, "normal")
    return {prefix + k: v for k, v in p.items()}


def declare(cfg: ModelConfig) -> dict[str, Param]:
    """The full parameter table, in checkpoint order, keyed by checkpoint name (experts stacked)."""
    d, hc, V = cfg.dim, cfg.hc_mult, cfg.vocab_size
    lin = "fp8" if cfg.quantized else "bf16"
    experts = cfg.expert_dtype if cfg.quantized else "bf16"
    p: dict[str, Param] = {"embed.weight": Param((V, d), "bf16", ("vocab", "embed"), "embed")}
    for i in range(cfg.n_layers):
        p.update(_block(cfg, i, f"layers.{i}.", experts, lin))
    for j in range(cfg.n_mtp):
        pre = f"mtp.{j}."
        p.update(_block(cfg, cfg.n_layers + j, pre, experts, lin))
        p[pre + "e_proj.weight"] = _lin(d, d, lin, ("embed_out", "embed"))
        p[pre + "h_proj.weight"] = _lin(d, d, lin, ("embed_out", "embed"))
        for n in ("enorm", "hnorm", "norm"):
            p[pre + f"{n}.weight"] = Param((d,), "bf16", ("embed",), "ones")
        p[pre + "hc_head_fn"] = Param((hc, hc * d), "f32", (None, "hc_embed"), "small")
        p[pre + "hc_head_base"] = Param((hc,), "f32", (None,), "hc_base")
        p[pre + "hc_head_scale"] = Param((1,), "f32", (None,), "hc_scale")
    p["norm.weight"] = Param((d,), "bf16", ("embed",), "ones")
    p["head.weight"] = Param((V, d), "bf16", ("vocab", "embed"), "normal")
    p["hc_head_fn"] = Param((hc, hc * d), "f32", (None, "hc_embed"), "small")
    p["hc_head_base"] = Param((hc,), "f32", (None,), "hc_base")
    p["hc_head_scale"] = Param((1,), "f32", (None,), "hc_scale")
    return p


# ---- storage -> arrays -------------------------------------------------------------------------------
def _scale_shape(shape: tuple[int, ...], storage: str) -> tuple[int, ...]:
    *lead, out, inp = shape
    if storage == "fp8":
        return (*lead, math.ceil(out / 128), math.ceil(inp / 128))
    return (*lead, out, math.ceil(inp / 32))


def stored_leaves(name: str, p: Param, dtype: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays one declared parameter becomes: {name: struct} or {X.weight: ..., X.scale: ...}."""
    if p.storage in ("fp8", "fp4") and dtype == "native":
        base = name[: -len(".weight")]
        if p.storage == "fp8":
            w = jax.ShapeDtypeStruct(p.shape, jnp.float8_e4m3fn)
        else:
            w = jax.ShapeDtypeStruct(p.shape[:-1] + (p.shape[-1] // 2,), jnp.int8)
        return {name: w, base + ".scale": jax.ShapeDtypeStruct(_scale_shape(p.shape, p.storage),
                                                               jnp.float8_e8m0fnu)}
    if p.storage in ("fp8", "fp4"):
        return {name: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16)}
    return {name: jax.ShapeDtypeStruct(p.shape, DTYPES[p.storage])}


def _check_dtype(dtype: str) -> None:
    if dtype not in ("native", "bf16"):
        raise ValueError(f"dtype must be 'native' or 'bf16', got {dtype!r}")


def abstract_flat(cfg: ModelConfig, dtype: str = "native") -> dict[str, jax.ShapeDtypeStruct]:
    _check_dtype(dtype)
    out: dict[str, jax.ShapeDtypeStruct] = {}
    for name, p in declare(cfg).items():
        out.update(stored_leaves(name, p, dtype))
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b.c': x} -> {'a': {'b': {'c': x}}} (the params pytree)."""
    tree: dict[str, Any] = {}
    for name, v in flat.items():
        node = tree
        *path, leaf = name.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = v
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of unflatten: join keys with '.'."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def abstract_params(cfg: ModelConfig, dtype: str = "native") -> dict[str, Any]:
    """ShapeDtypeStruct pytree of the parameters; no memory is allocated."""
    return unflatten(abstract_flat(cfg, dtype))


def logical_axes(cfg: ModelConfig, dtype: str = "native") -> dict[str, Any]:
    """Pytree (same structure as params) of logical axis-name tuples; scales share their weight's axes."""
    flat: dict[str, Any] = {}
    for name, p in declare(cfg).items():
        for leaf in stored_leaves(name, p, dtype):
            flat[leaf] = p.axes
    return unflatten(flat)


# ---- random init ---------------------------------------------------------------------------------------
def _init_value(cfg: ModelConfig, name: str, p: Param, key) -> jax.Array:
    f32 = jnp.float32
    if p.init == "ones":
        return jnp.ones(p.shape, f32)
    if p.init == "zeros":
        return jnp.zeros(p.shape, f32)
    if p.init == "normal":
        return jax.random.normal(key, p.shape, f32) / math.sqrt(p.shape[-1])
    if p.init == "embed":
        return jax.random.normal(key, p.shape, f32)
    if p.init == "small":
        return 0.1 * jax.random.normal(key, p.shape, f32) / math.sqrt(p.shape[-1])
    if p.init == "hc_base":
        return 0.5 * jax.random.normal(key, p.shape, f32)
    if p.init == "hc_scale":
        return 1.0 + 0.1 * jax.random.normal(key, p.shape, f32)
    if p.init == "sink":
        return jax.random.normal(key, p.shape, f32)
    if p.init == "hash":  # k distinct experts per token id
        V, k = p.shape
        scores = jax.random.uniform(key, (V, cfg.n_routed_experts))
        return jax.lax.top_k(scores, k)[1].astype(jnp.int32)
    raise ValueError(f"{name}: unknown initializer {p.init!r}")


def quantize_leaf(name: str, p: Param, value: jax.Array) -> dict[str, jax.Array]:
    """A logical-valued weight -> its native stored arrays (quantised with the reference's scale rules)."""
    base = name[: -len(".weight")]
    if p.storage == "fp8":
        w, s = quant.quantize_fp8_weight(value)
    else:
        w, s = quant.quantize_fp4_weight(value)
    return {name: w, base + ".scale": s}


def init_params(cfg: ModelConfig, key: jax.Array, dtype: str = "bf16") -> dict[str, Any]:
    """Random parameters with the checkpoint's names; "native" quantises the FP8/FP4 weights like the files.

    Values are scaled so activations stay O(1) through the network. With dtype="bf16" the quantized weights hold
    exactly the values their native form dequantizes to, so both dtypes describe the same model for one key.
    """
    _check_dtype(dtype)
    flat: dict[str, jax.Array] = {}
    for name, p in declare(cfg).items():
        k = jax.random.fold_in(key, zlib.crc32(name.encode()))
        v = _init_value(cfg, name, p, k)
        if p.storage in ("fp8", "fp4"):
            native = quantize_leaf(name, p, v)
            if dtype == "native":
                flat.update(native)
            else:
                flat[name] = dequantize_leaf(p.storage, native[name], native[name[:-7] + ".scale"])
        elif p.storage == "i32":
            flat[name] = v
        else:
            flat[name] = v.astype(DTYPES[p.storage])
    return unflatten(flat)


_LEAF_INIT_CACHE: dict = {}
PER_EXPERT_BYTES = 1 << 30     # stacked-expert leaves whose fp32 draw per device exceeds this go expert by expert


def _per_expert(name: str, p: Param, outs) -> bool:
    if ".experts." not in name or len(p.shape) != 3 or p.init != "normal":
        return False
    return 4 * math.prod(outs[0].shard_shape(p.shape)) > PER_EXPERT_BYTES


def _quantized_value(cfg: ModelConfig, p: Param, dtype: str, v):
    if p.storage in ("fp8", "fp4"):
        w, s = quant.quantize_fp8_weight(v) if p.storage == "fp8" else quant.quantize_fp4_weight(v)
        return (w, s) if dtype == "native" else (dequantize_leaf(p.storage, w, s),)
    return (v if p.storage == "i32" else v.astype(DTYPES[p.storage]),)


def _expert_init_fn(cfg: ModelConfig, p: Param, dtype: str, outs):
    """A stacked [E, out, in] leaf drawn and quantised one expert at a time (expert e from fold_in(key, e)), inside
    a shard_map over the expert dimension's mesh axes: a device's peak is one expert's fp32 draw, not its whole
    shard's (Pro: 48 local experts x 3072 x 7168 fp32 = 4 GB per leaf, with the weights already filling HBM)."""
    spec0 = outs[0].spec[0] if len(outs[0].spec) else None
    one_p = Param(p.shape[1:], p.storage, p.axes[1:], p.init)

    def draw(key, e):
        return _quantized_value(cfg, one_p, dtype, _init_value(cfg, "", one_p, jax.random.fold_in(key, e)))

    if spec0 is None:
        return jax.jit(lambda k: jax.lax.map(lambda e: draw(k, e), jnp.arange(p.shape[0])), out_shardings=outs)
    axes = (spec0,) if isinstance(spec0, str) else tuple(spec0)
    mesh = outs[0].mesh
    n = math.prod(dict(mesh.shape)[a] for a in axes)
    e_loc = p.shape[0] // n

    def local(k):
        idx = 0
        for a in axes:
            idx = idx * dict(mesh.shape)[a] + jax.lax.axis_index(a)
        return jax.lax.map(lambda e: draw(k, idx * e_loc + e), jnp.arange(e_loc))
    specs = tuple(o.spec for o in outs)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=jax.sharding.PartitionSpec(), out_specs=specs),
                   out_shardings=outs)


def init_params_sharded(cfg: ModelConfig, key: jax.Array, shardings: dict[str, Any], dtype: str = "native"
                        ) -> dict[str, Any]:
    """`init_params` generated directly on the devices: each parameter's arrays are produced (and, for FP8/FP4
    storage, quantised) by one jit whose outputs land on `shardings` (a pytree like `abstract_params(cfg, dtype)`,
    e.g. `sharding.param_shardings`), so nothing passes through host memory and a device holds only its shard.
    The values of `init_params` for the same key (up to float rounding: jit fuses the scaling). Jits are shared
    between parameters of equal shape/kind, so a full-size model compiles a few dozen small programs.
    Stacked-expert leaves too large to draw at once per device (> PER_EXPERT_BYTES of fp32) are drawn expert by
    expert with keys fold_in(key, expert): the same distribution, other values than `init_params`."""
    _check_dtype(dtype)
    sh = flatten(shardings)
    flat: dict[str, jax.Array] = {}
    for name, p in declare(cfg).items():
        names = list(stored_leaves(name, p, dtype))
        outs = tuple(sh[n] for n in names)
        sig = (p, dtype, outs, cfg.n_routed_experts if p.init == "hash" else None)
        fn = _LEAF_INIT_CACHE.get(sig)
        if fn is None and _per_expert(name, p, outs):
            fn = _LEAF_INIT_CACHE[sig] = _expert_init_fn(cfg, p, dtype, outs)
        if fn is None:
            fn = _LEAF_INIT_CACHE[sig] = jax.jit(lambda k, p=p: _quantized_value(cfg, p, dtype,
                                                                                 _init_value(cfg, "", p, k)),
                                                 out_shardings=outs)
        # One program in flight at a time: XLA:CPU can deadlock when several programs with collectives (a scale
        # block split across devices needs an all-reduce of its amax) are queued on a small host thread pool;
        # seen on a 2-core CI machine. The cost elsewhere is one sync per leaf.
        vals = jax.block_until_ready(fn(jax.random.fold_in(key, zlib.crc32(name.encode()))))
        flat.update(zip(names, vals))
    return unflatten(flat)


def _fusable(a: jax.Array, axis: int) -> bool:
    """Whether a leaf can be joined with another along `axis` on its sharding: that axis is not split over devices
    (each device then holds whole rows of both)."""
    sh = getattr(a, "sharding", None)
    if not isinstance(sh, jax.sharding.NamedSharding):
        return True
    spec = tuple(sh.spec) + (None,) * (a.ndim - len(sh.spec))
    return spec[axis] is None


def _delete(*arrays):
    for a in arrays:
        if isinstance(a, jax.Array):
            a.delete()


_GATE_UP = {".experts.": 1, ".shared_experts.": 0}      # FFN node -> its `out` axis (stacked experts: 1)
_FFN_LEAVES = tuple(f"{w}.{leaf}" for w in ("w1", "w2", "w3", "w13") for leaf in ("weight", "scale"))


def _ffn_nodes(flat: dict) -> dict[str, dict[str, jax.Array]]:
    """The quantised FFN nodes of a flat tree: prefix (e.g. "layers.3.ffn.experts.") -> {"w1.weight": .., ...}."""
    nodes: dict[str, dict] = {}
    for name in flat:
        for leaf in _FFN_LEAVES:
            if name.endswith("." + leaf) and name[: -len(leaf)].endswith(tuple(_GATE_UP)):
                nodes.setdefault(name[: -len(leaf)], {})[leaf] = flat[name]
    return {base: n for base, n in nodes.items() if any(k.endswith(".scale") for k in n)}


def _convert_nodes(params: dict, node_fn, donate: bool) -> dict:
    """params with each quantised FFN node's leaves replaced by node_fn(base, leaves) -> fn or None: fn maps the
    node's {leaf: array} to its new {leaf: array} (pure jnp, run as ONE jit per node); each new leaf takes the
    sharding of its source (`_source_leaf`: itself, or w13 <-> w1 / w3, whose specs are the same). donate: the
    node's old leaves are deleted once its new ones exist -- all of them; fn returns copies of what it keeps -- so
    each node frees one contiguous run of device memory that the next node's new leaves (the same sizes) fill.
    Converting leaf by leaf instead left two holes per layer that the joined w13 (twice their size) could not use:
    ~46 GiB of scattered holes per H200 on full Flash, and the prefill's one 17 GiB temp buffer found no room
    (session 7). Peak: one node above the weights. Abstract leaves
    (jax.ShapeDtypeStruct) give the abstract result."""
    flat = flatten(params)
    for base, leaves in _ffn_nodes(flat).items():
        fn = node_fn(base, leaves)
        if fn is None:
            continue
        out = jax.eval_shape(fn, leaves)                             # the new leaves' names (tracing only)
        shardings = {k: getattr(leaves[_source_leaf(k, leaves)], "sharding", None) for k in out}
        if any(isinstance(v, jax.ShapeDtypeStruct) for v in leaves.values()):
            new = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings[k]) for k, a in out.items()}
        else:
            named = all(isinstance(v, jax.sharding.NamedSharding) for v in shardings.values())
            new = jax.block_until_ready(jax.jit(fn, out_shardings=shardings if named else None)(leaves))
        for k in leaves:
            del flat[base + k]
        flat.update({base + k: v for k, v in new.items()})
        if donate:
            _delete(*(v for v in leaves.values() if all(v is not u for u in new.values())))
    return unflatten(flat)


def _source_leaf(name: str, leaves: dict) -> str:
    """The old leaf a converted FFN leaf comes from: itself, w1's for a joined w13, w13's for a split w1 / w3."""
    if name in leaves:
        return name
    w, leaf = name.split(".", 1)
    return f"w1.{leaf}" if w == "w13" else f"w13.{leaf}"


def _gate_up_axis(base: str) -> int:
    return next(ax for key, ax in _GATE_UP.items() if base.endswith(key))


def _to_kernel_node(fuse_gate_up: bool):
    def plan(base, lv):
        axis = _gate_up_axis(base)
        fp4 = {k for k, v in lv.items() if k.endswith(".weight") and v.dtype == jnp.int8 and
               f"{k[:-7]}.scale" in lv}
        fuse = fuse_gate_up and {"w1.weight", "w1.scale", "w3.weight", "w3.scale"} <= set(lv) and all(
            _fusable(lv[f"w1.{leaf}"], axis) for leaf in ("weight", "scale"))
        if not fp4 and not fuse:
            return None

        def fn(lv):
            out = dict(lv)
            if fuse:                                                 # F: a multiple of the 128-row scale block
                for leaf in ("weight", "scale"):
                    out[f"w13.{leaf}"] = jnp.concatenate([out.pop(f"w1.{leaf}"), out.pop(f"w3.{leaf}")], axis)
            # joined first, converted after: the kernel layout's 128-row tiles are a rule on the whole weight
            is4 = lambda k: k in fp4 or (k == "w13.weight" and "w1.weight" in fp4)
            return {k: quant.fp4_to_halves(v) if is4(k) else jnp.copy(v) for k, v in out.items()}
        return fn
    return plan


def _to_checkpoint_node(base, lv):
    axis = _gate_up_axis(base)
    if "w13.weight" not in lv and not any(v.dtype == jnp.uint8 for v in lv.values()):
        return None

    def fn(lv):
        out = {}
        for k, v in lv.items():
            v = quant.fp4_from_halves(v) if v.dtype == jnp.uint8 else v    # untiled before the split
            if k.startswith("w13."):
                F = v.shape[axis] // 2
                out["w1" + k[3:]] = jax.lax.slice_in_dim(v, 0, F, axis=axis)
                out["w3" + k[3:]] = jax.lax.slice_in_dim(v, F, 2 * F, axis=axis)
            else:
                out[k] = jnp.copy(v)
        return out
    return fn


def to_kernel_layout(params: dict, donate: bool = False, fuse_gate_up: bool = True) -> dict:
    """Native params -> the form the GPU serving kernels read best: every FP4 weight (the routed experts: int8 in
    the checkpoint's packing) in the "halves" layout (uint8, `quant.fp4_to_halves`: per 64 inputs one scale block
    in the low nibbles and the next in the high ones, so the FP8 x FP8 dots need no nibble interleave; where out
    is a multiple of 128, stored in contiguous 4 KB tiles of 128 rows x 64 inputs, what one K step reads), and each
    FFN's w1 and w3 (routed and shared experts) joined into one `w13` node (weight and scale along `out`: one
    kernel for both, x read once; not where `out` is split over devices; fuse_gate_up=False keeps them apart).
    Same bytes; every path of the model takes either form (the reference paths unpack the halves; the MoE splits
    w13's output). Measured on an H100 (docs/benchmarks.md). Serving on NVIDIA GPUs only; `to_checkpoint_layout`
    (or loading again) before `v4jax.save`. donate: delete the input's FFN arrays as their replacements are made,
    node by node (needed when the experts fill the devices: the input tree is unusable afterwards; the memory
    stays contiguous, see `_convert_nodes`). Abstract params (jax.ShapeDtypeStruct leaves) give the abstract
    kernel-layout tree (for compile-only probes)."""
    return _convert_nodes(params, _to_kernel_node(fuse_gate_up), donate)


def to_checkpoint_layout(params: dict, donate: bool = False) -> dict:
    """Inverse of `to_kernel_layout`: w13 split back into w1 and w3, FP4 weights in the checkpoint's packing."""
    return _convert_nodes(params, _to_checkpoint_node, donate)


def dequantize_leaf(storage: str, w: jax.Array, scale: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    if storage == "fp8":
        return quant.dequant_fp8_weight(w, scale, dtype)
    return quant.dequant_fp4_weight(w, scale, dtype)


def count_params(cfg: ModelConfig, include_mtp: bool = True) -> int:
    """Number of logical parameters (FP4 values count once each)."""
    total = 0
    for name, p in declare(cfg).items():
        if include_mtp or not name.startswith("mtp."):
            total += int(np.prod(p.shape))
    return total
