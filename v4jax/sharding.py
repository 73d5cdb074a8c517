"""Device meshes and the ONE table from logical axes to mesh axes.

Mesh axes: `data` (batch), `expert` (routed experts; tokens are split over it as well), `seq` (sequence),
`tensor` (attention heads / output groups). A size-1 axis costs nothing, so 1 GPU, 2 GPUs or a TPU slice differ
only in the mesh shape:

    mesh = make_mesh({"expert": 2})          # or "data=2,expert=4", sizes multiply to the device count, -1 = rest
    with jax.set_mesh(mesh):
        params = place(cfg, params)          # every parameter on its NamedSharding
        logits = v4jax.forward(cfg, params, tokens)

Inside a mesh the MoE runs expert-parallel through `jax.shard_map` (see moe.py); everything else is placed by
this table and propagated by XLA.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from . import params as params_mod
from .config import ModelConfig

AXES = ("data", "expert", "seq", "tensor")

# logical axis (params.py declarations, activations) -> mesh axis; anything not listed is replicated
RULES: dict[str, str | tuple[str, ...] | None] = {
    "expert": "expert",        # stacked routed experts (the router, "router", stays replicated)
    "q_heads": "tensor",       # wq_b rows (head-major)
    "o_groups": "tensor",      # wo_a rows / wo_b columns (one output group per shard)
    "heads": "tensor",         # attn_sink
    "batch": "data",
    "seq_len": "seq",          # activations [B, S, ...]
    "tokens": ("data", "seq", "expert"),   # flattened B*S tokens inside the MoE
}


class MeshError(ValueError):
    """A mesh request that does not fit the devices or names an unknown axis."""


def rules_with(overrides: str | dict[str, str | None] | None) -> dict:
    """RULES with some logical axes mapped elsewhere: "q_heads=expert,o_groups=expert" or a dict; "none" (or None)
    replicates. Unknown logical axes are an error naming them."""
    if not overrides:
        return dict(RULES)
    if isinstance(overrides, str):
        pairs = [item.split("=", 1) for item in overrides.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise MeshError(f"sharding rules {overrides!r}: expected logical=mesh_axis items separated by commas")
        overrides = {k.strip(): (None if v.strip().lower() == "none" else v.strip()) for k, v in pairs}
    unknown = sorted(set(overrides) - set(RULES))
    if unknown:
        raise MeshError(f"sharding rules: unknown logical axes {unknown}; known: {sorted(RULES)}")
    bad = sorted(a for v in overrides.values() if v is not None
                 for a in ((v,) if isinstance(v, str) else tuple(v)) if a not in AXES)
    if bad:
        raise MeshError(f"sharding rules: unknown mesh axes {bad}; mesh axes are {list(AXES)}")
    return {**RULES, **overrides}


def parse_mesh_spec(spec: str | dict[str, int] | None, n_devices: int | None = None) -> dict[str, int]:
    """"data=2,expert=4" or {"expert": 4} -> sizes of all four axes (missing = 1, one -1 = the rest)."""
    n = n_devices if n_devices is not None else jax.device_count()
    if spec is None or spec == "":
        spec = {}
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            if "=" not in part:
                raise MeshError(f"mesh spec {spec!r}: expected axis=size pairs like 'data=2,expert=4'")
            k, v = part.split("=", 1)
            try:
                items[k.strip()] = int(v)
            except ValueError:
                raise MeshError(f"mesh spec {spec!r}: size of {k.strip()!r} is not an integer") from None
        spec = items
    unknown = [k for k in spec if k not in AXES]
    if unknown:
        raise MeshError(f"unknown mesh axis {unknown[0]!r}; axes are {AXES}")
    sizes = {a: int(spec.get(a, 1)) for a in AXES}
    rest = [a for a in AXES if sizes[a] == -1]
    if len(rest) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {rest}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise MeshError(f"mesh sizes must be positive (or -1): {sizes}")
    if rest:
        if n % fixed:
            raise MeshError(f"mesh {spec}: {n} devices are not divisible by {fixed}")
        sizes[rest[0]] = n // fixed
    if int(np.prod(list(sizes.values()))) != n:
        raise MeshError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, {n} are available")
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
    """A mesh with the four named axes (Auto axis types: XLA propagates shardings outside the shard_maps)."""
    devs = devices if devices is not None else jax.devices()
    sizes = parse_mesh_spec(spec, len(devs))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devs)


def _mesh_axes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_shape if hasattr(mesh, "axis_shape") else mesh.devices.shape))


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh, rules=None) -> P:
    """PartitionSpec for logical `axes` of an array of `shape`: a dim is sharded only if the mesh axis divides it."""
    rules = RULES if rules is None else rules
    sizes = dict(mesh.shape)
    out = []
    used: set[str] = set()
    for ax, dim in zip(axes, shape):
        target = rules.get(ax) if ax is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n in sizes and sizes[n] > 1 and n not in used)
        total = int(np.prod([sizes[n] for n in names])) if names else 1
        if names and dim % total == 0:
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    return P(*out)


def param_shardings(cfg: ModelConfig, mesh, dtype: str = "native", rules=None) -> dict[str, Any]:
    """NamedSharding pytree for the params of `cfg` (same structure as `abstract_params(cfg, dtype)`)."""
    shapes = params_mod.abstract_flat(cfg, dtype)
    axes = params_mod.flatten(params_mod.logical_axes(cfg, dtype))
    return params_mod.unflatten({k: NamedSharding(mesh, spec_for(axes[k], shapes[k].shape, mesh, rules))
                                 for k in shapes})


def place(cfg: ModelConfig, params: dict, mesh=None, rules=None) -> dict:
    """Put every parameter on its sharding (the current mesh if none is given)."""
    mesh = mesh or jax.sharding.get_mesh()
    if mesh is None or mesh.empty:
        raise MeshError("place: no mesh given and none is set (use jax.set_mesh(make_mesh(...)))")
    flat = params_mod.flatten(params)
    axes = params_mod.flatten(params_mod.logical_axes(cfg, _param_dtype(flat)))
    out = {k: jax.device_put(v, NamedSharding(mesh, spec_for(axes[k], v.shape, mesh, rules))) for k, v in flat.items()}
    return params_mod.unflatten(out)


def _param_dtype(flat: dict) -> str:
    return "native" if any(k.endswith(".scale") for k in flat) else "bf16"


def active_axis_size(name: str) -> int:
    """Size of mesh axis `name` in the mesh currently set (1 if none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or name not in mesh.axis_names:
        return 1
    return dict(mesh.shape)[name]


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """with_sharding_constraint by logical axes under the current mesh (no-op without one, and inside a shard_map,
    where the values are already per-device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.manual_axes:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))
