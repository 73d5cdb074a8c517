"""HF safetensors checkpoints: the official per-expert view of the params, loading and saving.

v4jax params are the official tensors under their official names, except that routed experts are stacked on a
leading expert axis (`layers.L.ffn.experts.w1.weight` [E, ...]) and `tid2eid` is int32 in memory (I64 in the
files). `official_view` / `from_official` convert between the two, for arrays and for ShapeDtypeStructs alike.

`load(path, dtype)` reads an HF directory (`config.json` + one or more `.safetensors`, with or without
`model.safetensors.index.json`). Every tensor is accounted for before anything is read: unknown, missing,
wrongly shaped or wrongly typed tensors raise one `CheckpointError` listing them all.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from . import params as P
from . import quant
from .config import ModelConfig
from .safetensors_io import CheckpointDir, SafetensorsError, dtype_name, write_index, write_safetensors


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the files and tensors."""


_EXPERT = re.compile(r"^(?P<pre>(?:layers|mtp)\.\d+\.ffn\.experts)\.(?P<w>w[123])\.(?P<kind>weight|scale)$")
_OFFICIAL_EXPERT = re.compile(r"^(?P<pre>(?:layers|mtp)\.\d+\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\."
                              r"(?P<kind>weight|scale)$")
_MAX_LISTED = 20


def _is_struct(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def official_view(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat v4jax params (or ShapeDtypeStructs) -> the official checkpoint's tensors (per-expert, I64 tid2eid).

    Arrays are returned as numpy arrays (host); structs as structs."""
    out: dict[str, Any] = {}
    for name, v in flat.items():
        m = _EXPERT.match(name)
        if m:
            for e in range(v.shape[0]):
                key = f"{m['pre']}.{e}.{m['w']}.{m['kind']}"
                out[key] = jax.ShapeDtypeStruct(v.shape[1:], v.dtype) if _is_struct(v) else np.asarray(v[e])
        elif name.endswith("gate.tid2eid"):
            out[name] = jax.ShapeDtypeStruct(v.shape, np.int64) if _is_struct(v) else np.asarray(v).astype(np.int64)
        else:
            out[name] = v if _is_struct(v) else np.asarray(v)
    return out


def from_official(tensors: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `official_view`: stack per-expert tensors (ascending expert id), tid2eid -> int32."""
    stacks: dict[str, dict[int, Any]] = {}
    out: dict[str, Any] = {}
    for name, v in tensors.items():
        m = _OFFICIAL_EXPERT.match(name)
        if m:
            stacks.setdefault(f"{m['pre']}.{m['w']}.{m['kind']}", {})[int(m["e"])] = v
        elif name.endswith("gate.tid2eid"):
            out[name] = jax.ShapeDtypeStruct(v.shape, jnp.int32) if _is_struct(v) else np.asarray(v, np.int32)
        else:
            out[name] = v
    for name, parts in stacks.items():
        if sorted(parts) != list(range(len(parts))):
            raise CheckpointError(f"{name}: expert ids {sorted(parts)} are not 0..{len(parts) - 1}")
        vs = [parts[e] for e in range(len(parts))]
        if _is_struct(vs[0]):
            out[name] = jax.ShapeDtypeStruct((len(vs),) + vs[0].shape, vs[0].dtype)
        else:
            out[name] = np.stack([np.asarray(v) for v in vs])
    return out


def official_inventory(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Name -> ShapeDtypeStruct of every tensor in the official checkpoint of this config (native dtypes)."""
    return official_view(P.abstract_flat(cfg, "native"))


# ---- loading -----------------------------------------------------------------------------------------
def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def check_tensors(ck: CheckpointDir, expected: dict[str, jax.ShapeDtypeStruct], where: str) -> None:
    """Raise one CheckpointError listing unknown, missing, mis-shaped and mis-typed tensors."""
    unknown = [f"{n} (in {os.path.basename(ck.tensors[n].file)})" for n in ck.tensors if n not in expected]
    missing = [n for n in expected if n not in ck.tensors]
    wrong = []
    for n, info in ck.tensors.items():
        if n not in expected:
            continue
        exp = expected[n]
        exp_dt = dtype_name(np.dtype(exp.dtype))
        if tuple(info.shape) != tuple(exp.shape) or info.dtype != exp_dt:
            wrong.append(f"{n} (in {os.path.basename(info.file)}): {info.dtype}{list(info.shape)}, "
                         f"config expects {exp_dt}{list(exp.shape)}")
    if unknown or missing or wrong:
        parts = [f"{where}: checkpoint does not match its config.json"]
        if missing:
            parts.append(_listing("missing tensors", missing))
        if unknown:
            parts.append(_listing("unexpected tensors", unknown))
        if wrong:
            parts.append(_listing("wrong shape or dtype", wrong))
        raise CheckpointError("\n".join(parts))


def _groups(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """Declared parameter names grouped by block (streaming unit): top level, layers.0, ..., mtp.0."""
    groups: dict[str, list[str]] = {}
    for name in P.declare(cfg):
        key = ".".join(name.split(".")[:2]) if name.startswith(("layers.", "mtp.")) else "top"
        groups.setdefault(key, []).append(name)
    return list(groups.items())


def _official_names(name: str, p: P.Param, n_experts: int) -> list[str]:
    """The official tensor names one declared parameter is stored under (native formats)."""
    out = []
    for leaf in P.stored_leaves(name, p, "native"):
        m = _EXPERT.match(leaf)
        out += [f"{m['pre']}.{e}.{m['w']}.{m['kind']}" for e in range(n_experts)] if m else [leaf]
    return out


def load_hf(path: str | os.PathLike, dtype: str = "native", *,
            put: Callable[[str, np.ndarray], jax.Array] | None = None) -> tuple[ModelConfig, dict]:
    """Read an HF V4 directory into (cfg, params). `put(name, array)` places each array (default:
    jnp.asarray on the default device). Tensors are read lazily (memory-mapped) one block at a time."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg = ModelConfig.from_hf(path)
    try:
        ck = CheckpointDir(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    with ck:
        check_tensors(ck, official_inventory(cfg), path)
        put = put or (lambda name, a: jnp.asarray(a))
        flat: dict[str, jax.Array] = {}
        decl = P.declare(cfg)
        for _, names in _groups(cfg):
            for name in names:
                p = decl[name]
                raw = {n: ck.read(n) for n in _official_names(name, p, cfg.n_routed_experts)}
                stored = from_official(raw)
                if dtype == "bf16" and p.storage in ("fp8", "fp4"):
                    w = jnp.asarray(stored[name])
                    s = jnp.asarray(stored[name[:-len(".weight")] + ".scale"])
                    flat[name] = put(name, P.dequantize_leaf(p.storage, w, s))
                else:
                    for leaf, a in stored.items():
                        flat[leaf] = put(leaf, a)
    return cfg, P.unflatten(flat)


def load(path: str | os.PathLike, dtype: str = "native") -> tuple[ModelConfig, dict]:
    """Load a checkpoint directory (HF safetensors) -> (cfg, params) with dtype "native" or "bf16"."""
    if dtype not in ("native", "bf16"):
        raise ValueError(f"dtype must be 'native' or 'bf16', got {dtype!r}")
    return load_hf(path, dtype)


# ---- saving ------------------------------------------------------------------------------------------
def _native_flat(cfg: ModelConfig, params: dict) -> dict[str, Any]:
    """Flat params in the checkpoint's native formats (bf16 weights re-quantised with the reference's rules)."""
    flat = P.flatten(params)
    out: dict[str, Any] = {}
    for name, p in P.declare(cfg).items():
        if name not in flat:
            raise CheckpointError(f"params have no tensor {name!r}")
        v = flat[name]
        if p.storage in ("fp8", "fp4") and cfg.quantized:
            scale_name = name[:-len(".weight")] + ".scale"
            if scale_name in flat:
                out[name], out[scale_name] = v, flat[scale_name]
            else:
                out.update(P.quantize_leaf(name, p, jnp.asarray(v, jnp.float32)))
        else:
            out[name] = v
    return out


def save_hf(cfg: ModelConfig, params: dict, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30,
            tokenizer_dir: str | None = None) -> None:
    """Write the official layout: model-0000N-of-0000M.safetensors + index + config.json.

    Written into a temporary directory beside `path` and renamed when complete."""
    path = os.fspath(path).rstrip("/")
    if os.path.exists(path):
        raise CheckpointError(f"{path}: already exists; refusing to overwrite")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-", dir=parent)
    try:
        native = _native_flat(cfg, params)
        expected = official_inventory(cfg)
        names = list(expected)
        sizes = {n: int(np.prod(expected[n].shape)) * np.dtype(expected[n].dtype).itemsize for n in names}
        shards: list[list[str]] = [[]]
        acc = 0
        for n in names:
            if shards[-1] and acc + sizes[n] > max_shard_bytes:
                shards.append([])
                acc = 0
            shards[-1].append(n)
            acc += sizes[n]
        # group source leaves by block so each is converted once
        official: dict[str, Any] = {}
        pending = dict(native)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for n in shard:
                if n not in official:
                    src = _source_leaf(n)
                    official.update(official_view({src: pending.pop(src)}))
                a = official.pop(n)
                if a.dtype != np.dtype(expected[n].dtype) or a.shape != tuple(expected[n].shape):
                    raise CheckpointError(f"{n}: params hold {a.dtype}{list(a.shape)}, the format needs "
                                          f"{np.dtype(expected[n].dtype)}{list(expected[n].shape)}")
                tensors[n] = a
                weight_map[n] = fname
            write_safetensors(os.path.join(tmp, fname), tensors, metadata={"format": "pt"})
        write_index(tmp, weight_map, sum(sizes.values()))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf(), f, indent=2)
        if tokenizer_dir:
            for fn in ("tokenizer.json", "tokenizer_config.json"):
                if os.path.exists(os.path.join(tokenizer_dir, fn)):
                    shutil.copy(os.path.join(tokenizer_dir, fn), tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _source_leaf(official_name: str) -> str:
    m = _OFFICIAL_EXPERT.match(official_name)
    return f"{m['pre']}.{m['w']}.{m['kind']}" if m else official_name


def save(cfg: ModelConfig, params: dict, path: str | os.PathLike, format: str = "hf", **kw) -> None:
    if format == "hf":
        return save_hf(cfg, params, path, **kw)
    raise ValueError(f"format must be 'hf' (Orbax checkpoints: see issue 3), got {format!r}")
