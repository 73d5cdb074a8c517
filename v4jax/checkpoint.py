"""Checkpoints: HF safetensors (the official layout) and v4jax Orbax directories; streaming load and save.

v4jax params are the official tensors under their official names, except that routed experts are stacked on a
leading expert axis (`layers.L.ffn.experts.w1.weight` [E, ...]) and `tid2eid` is int32 in memory (I64 in the
files). `official_view` / `from_official` convert between the two, for arrays and for ShapeDtypeStructs alike.

Loading streams one block at a time (`top` = embed/norm/head/hc_head, `layers.0`, ..., `mtp.0`): every tensor of
an HF directory is accounted for before anything is read (one `CheckpointError` lists unknown, missing, mis-shaped
and mis-typed tensors), then reader threads fetch only the bytes each device needs (`jax.make_array_from_callback`
over the target sharding, so on several hosts each reads its own slices): contiguous ranges with pread straight
into recycled host buffers, anything else through the memory map, a bounded prefetch window ahead so the disk and
the transfers overlap. Peak host memory is about one block plus that window (measured: 3.5 GB for a 20 GB
checkpoint of 3.6 GB blocks, docs/benchmarks.md). Formats ("dtype"):
  native  the checkpoint's own: FP8 e4m3 + E8M0 128x128 scales, packed FP4 experts (int8) + E8M0 per-32 scales
  bf16    every quantized weight dequantized (exactly) to bf16
  fp8     FP4 experts repacked losslessly to FP8 + E8M0 128x128 scales (spec 4.4); everything else native
Conversions run on the target devices (jit with the target shardings), after the native arrays are placed.

A v4jax Orbax directory is `v4jax.json` (the marker: config, dtype, blocks) beside one Orbax checkpoint per block
(`top/`, `layers.0/`, ...), so it too is written and restored one block at a time, restored directly into the
target shardings. Every output is written to a hidden temporary directory beside the target and renamed only when
complete.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from . import params as P
from . import quant
from .config import ConfigError, ModelConfig
from .safetensors_io import CheckpointDir, SafetensorsError, dtype_name, write_index, write_safetensors


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the files and tensors."""


DTYPES = ("native", "bf16", "fp8")
MARKER = "v4jax.json"
ORBAX_FORMAT = "v4jax-orbax"
ORBAX_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)

_EXPERT = re.compile(r"^(?P<pre>(?:layers|mtp)\.\d+\.ffn\.experts)\.(?P<w>w[123])\.(?P<kind>weight|scale)$")
_OFFICIAL_EXPERT = re.compile(r"^(?P<pre>(?:layers|mtp)\.\d+\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\."
                              r"(?P<kind>weight|scale)$")
_MAX_LISTED = 20


def _is_struct(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")


# ---- the official per-expert view ------------------------------------------------------------------------
def official_view(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat v4jax params (or ShapeDtypeStructs) -> the official checkpoint's tensors (per-expert, I64 tid2eid).

    Arrays are returned as numpy arrays (host; experts are views of one host copy of the stack)."""
    out: dict[str, Any] = {}
    for name, v in flat.items():
        m = _EXPERT.match(name)
        if m:
            h = v if _is_struct(v) else np.asarray(v)
            for e in range(v.shape[0]):
                key = f"{m['pre']}.{e}.{m['w']}.{m['kind']}"
                out[key] = jax.ShapeDtypeStruct(v.shape[1:], v.dtype) if _is_struct(v) else h[e]
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


# ---- formats: native / bf16 / fp8 ----------------------------------------------------------------------
def _fmt(p: P.Param, dtype: str) -> str:
    """How one declared parameter is held under `dtype`: "fp8" | "fp4" | "bf16" | "f32" | "i32"."""
    if p.storage not in ("fp8", "fp4") or dtype == "native":
        return p.storage
    return "fp8" if dtype == "fp8" else "bf16"


def _structs(name: str, p: P.Param, fmt: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays one declared parameter is held as in format `fmt` ({X.weight[, X.scale]})."""
    if fmt in ("fp8", "fp4"):
        *lead, out, inp = p.shape
        if fmt == "fp8":
            w = jax.ShapeDtypeStruct(p.shape, jnp.float8_e4m3fn)
            s = (*lead, math.ceil(out / 128), math.ceil(inp / 128))
        else:
            w = jax.ShapeDtypeStruct((*lead, out, inp // 2), jnp.int8)
            s = (*lead, out, math.ceil(inp / 32))
        return {name: w, name[: -len(".weight")] + ".scale": jax.ShapeDtypeStruct(s, jnp.float8_e8m0fnu)}
    return {name: jax.ShapeDtypeStruct(p.shape, P.DTYPES[fmt])}


def abstract_flat(cfg: ModelConfig, dtype: str = "native") -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ShapeDtypeStructs of the params under dtype "native", "bf16" or "fp8" (FP4 experts as FP8)."""
    _check_dtype(dtype)
    out: dict[str, jax.ShapeDtypeStruct] = {}
    for name, p in P.declare(cfg).items():
        out.update(_structs(name, p, _fmt(p, dtype)))
    return out


def logical_axes(cfg: ModelConfig, dtype: str = "native") -> dict[str, Any]:
    """Pytree of logical axis names of every leaf under `dtype` (scales share their weight's axes)."""
    flat = {}
    for name, p in P.declare(cfg).items():
        flat.update({leaf: p.axes for leaf in _structs(name, p, _fmt(p, dtype))})
    return P.unflatten(flat)


def _convert_value(src: str, dst: str, w, s):
    if src == "fp4" and dst == "fp8":
        return quant.fp4_to_fp8_weight(w, s)                           # lossless (spec 4.4)
    v = w.astype(jnp.float32) if src == "bf16" else P.dequantize_leaf(src, w, s, jnp.float32)
    if dst == "bf16":
        return (v.astype(jnp.bfloat16),)
    return quant.quantize_fp8_weight(v) if dst == "fp8" else quant.quantize_fp4_weight(v)


@functools.lru_cache(maxsize=256)
def _converter(src: str, dst: str, out_shardings):
    return jax.jit(lambda w, s: tuple(_convert_value(src, dst, w, s)), out_shardings=out_shardings)


def convert_param(name: str, p: P.Param, src: str, dst: str, arrays: dict[str, Any],
                  shardings: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """One declared parameter's arrays from format `src` to `dst` (`_fmt` names), on the arrays' devices.

    fp4 -> fp8 is the lossless repack; -> bf16 dequantizes exactly; bf16/fp8 -> fp4/fp8 quantizes with the
    reference's scale rules (values that came from that format survive exactly)."""
    if src == dst:
        return dict(arrays)
    base = name[: -len(".weight")]
    outs = list(_structs(name, p, dst))
    sh = None
    if shardings is not None and all(shardings.get(k) is not None for k in outs):
        sh = tuple(shardings[k] for k in outs)
    res = _converter(src, dst, sh)(arrays[name], arrays.get(base + ".scale"))
    return dict(zip(outs, res))


def detect_dtype(cfg: ModelConfig, flat: dict[str, Any]) -> str:
    """Which of "native", "bf16", "fp8" a flat params dict is held in (CheckpointError if none fits)."""
    halves = [k for k, v in flat.items() if np.dtype(v.dtype) == np.uint8 and k.endswith(".weight")]
    if halves:
        raise CheckpointError(f"{halves[0]} (and {len(halves) - 1} more): FP4 weights in the GPU kernel layout "
                              "(uint8); convert with v4jax.params.to_checkpoint_layout(params) first")
    for dtype in DTYPES:
        exp = abstract_flat(cfg, dtype)
        if exp.keys() == flat.keys() and all(np.dtype(flat[k].dtype) == np.dtype(v.dtype) and
                                             tuple(flat[k].shape) == tuple(v.shape) for k, v in exp.items()):
            return dtype
    _check_flat(cfg, flat, "native" if any(k.endswith(".scale") for k in flat) else "bf16")
    raise CheckpointError("params mix formats (some quantized weights native, others not)")


def _check_flat(cfg: ModelConfig, flat: dict[str, Any], dtype: str) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped/typed leaves of in-memory params."""
    exp = abstract_flat(cfg, dtype)
    missing = [n for n in exp if n not in flat]
    unknown = [n for n in flat if n not in exp]
    wrong = [f"{n}: {np.dtype(flat[n].dtype)}{list(flat[n].shape)}, {dtype} params of this config need "
             f"{np.dtype(e.dtype)}{list(e.shape)}" for n, e in exp.items()
             if n in flat and (tuple(flat[n].shape) != tuple(e.shape) or np.dtype(flat[n].dtype) != np.dtype(e.dtype))]
    if missing or unknown or wrong:
        parts = ["params do not match their config"]
        for title, items in (("missing", missing), ("unexpected", unknown), ("wrong shape or dtype", wrong)):
            if items:
                parts.append(_listing(title, items))
        raise CheckpointError("\n".join(parts))


# ---- shardings -----------------------------------------------------------------------------------------
def default_rules(mesh) -> dict[str, Any]:
    """Logical axis -> mesh axis: the project's one table (`sharding.RULES`), or, without it, routed experts over
    'expert' and everything else replicated. Axes the mesh lacks are ignored."""
    try:
        from .sharding import RULES
        return dict(RULES)
    except ImportError:
        return {"expert": "expert"}


def logical_sharding(mesh, axes: tuple, shape: tuple[int, ...], rules: dict | None = None) -> NamedSharding:
    """NamedSharding of one array from its logical axes and a {logical axis: mesh axis or axes or None} table.

    A dimension stays replicated when its mesh axes are absent (or of size 1), already used, or do not divide
    its size."""
    rules = default_rules(mesh) if rules is None else rules
    spec: list[Any] = []
    used: set[str] = set()
    for ax, n in zip(tuple(axes) + (None,) * (len(shape) - len(axes)), shape):
        t = rules.get(ax) if ax is not None else None
        names = () if t is None else ((t,) if isinstance(t, str) else tuple(t))
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in names)
        if names and n % size == 0:
            spec.append(names[0] if len(names) == 1 else names)
            used.update(names)
        else:
            spec.append(None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def _fit(sharding, shape: tuple[int, ...]):
    """A NamedSharding adjusted to `shape`: dims its mesh axes do not divide become replicated."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    new = []
    for entry, n in zip(spec, shape):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        new.append(entry if n % math.prod(sharding.mesh.shape[a] for a in names) == 0 else None)
    return sharding if tuple(new) == spec[: len(shape)] else NamedSharding(sharding.mesh, PartitionSpec(*new))


class _Placement:
    """Target sharding of each leaf: from `shardings` (pytree), `sharding_for(name, axes)`, a mesh + rules (or
    the current mesh of `jax.set_mesh`), else None (the default device)."""

    def __init__(self, shardings=None, sharding_for=None, mesh=None, rules=None):
        self.flat = P.flatten(shardings) if shardings is not None else None
        self.fn = sharding_for
        if mesh is None and shardings is None and sharding_for is None:
            get = getattr(jax.sharding, "get_mesh", None)
            cur = get() if get else None
            mesh = None if cur is None or cur.empty else cur
        self.mesh, self.rules = mesh, rules

    def __call__(self, leaf: str, shape: tuple[int, ...], axes: tuple):
        if self.flat is not None:
            s = self.flat.get(leaf)
            s = getattr(s, "sharding", s)
        elif self.fn is not None:
            s = self.fn(leaf, axes)
        elif self.mesh is not None:
            s = logical_sharding(self.mesh, axes, shape, self.rules)
        else:
            s = None
        return None if s is None else _fit(s, shape)

    def param(self, name: str, p: P.Param, src: str, dst: str):
        """(shardings of the source leaves, shardings of the target leaves) of one declared parameter."""
        tgt = {k: self(k, s.shape, p.axes) for k, s in _structs(name, p, dst).items()}
        if src == dst:
            return tgt, tgt
        w = tgt[name]
        return {k: (None if w is None else _fit(w, s.shape)) for k, s in _structs(name, p, src).items()}, tgt


# ---- progress ------------------------------------------------------------------------------------------
class Progress:
    """One self-overwriting line on stderr: tensors and bytes done, rate. Shown when `enabled` (default: stderr
    is a terminal)."""

    def __init__(self, what: str, tensors: int, nbytes: int, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.what, self.total_t, self.total_b = what, tensors, nbytes
        self.t = self.b = 0
        self.t0 = self.last = time.perf_counter()
        self.lock = threading.Lock()

    def update(self, tensors: int, nbytes: int) -> None:
        with self.lock:
            self.t += tensors
            self.b += nbytes
            now = time.perf_counter()
            if self.enabled and (now - self.last > 0.2 or self.t >= self.total_t):
                self.last = now
                self._show(now)

    def _show(self, now: float) -> None:
        dt = max(now - self.t0, 1e-9)
        sys.stderr.write(f"\r{self.what}: {self.t}/{self.total_t} tensors, {self.b / 1e9:.2f}/"
                         f"{self.total_b / 1e9:.2f} GB, {self.b / 1e9 / dt:.2f} GB/s, {dt:.0f} s   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._show(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---- HF: reading ---------------------------------------------------------------------------------------
def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def check_tensors(ck: CheckpointDir, expected: dict[str, jax.ShapeDtypeStruct], where: str) -> set[str]:
    """Raise one CheckpointError listing unknown, missing, mis-shaped and mis-typed tensors.

    Returns the names of `.scale` tensors stored as F32 where E8M0 is expected (Base checkpoints); they are
    converted on reading if every value is a power of two."""
    unknown = [f"{n} (in {os.path.basename(ck.tensors[n].file)})" for n in ck.tensors if n not in expected]
    missing = [n for n in expected if n not in ck.tensors]
    wrong, f32_scales = [], set()
    for n, info in ck.tensors.items():
        if n not in expected:
            continue
        exp = expected[n]
        exp_dt = dtype_name(np.dtype(exp.dtype))
        if tuple(info.shape) == tuple(exp.shape) and info.dtype == "F32" and exp_dt == "F8_E8M0":
            f32_scales.add(n)
        elif tuple(info.shape) != tuple(exp.shape) or info.dtype != exp_dt:
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
    return f32_scales


def f32_scale_to_e8m0(a: np.ndarray, where: str) -> np.ndarray:
    """Exact power-of-two float32 scales -> E8M0 (2**-127 -> code 0); anything else raises CheckpointError."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    field, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    ok = (bits >> 31 == 0) & (((mant == 0) & (field > 0) & (field < 255)) | ((field == 0) & (mant == 0x400000)))
    if not ok.all():
        i = np.unravel_index(int(np.argmin(ok)), a.shape)
        raise CheckpointError(f"{where}: float32 scale {float(np.asarray(a)[i])!r} at {list(map(int, i))} is not "
                              f"a power of two; only power-of-two F32 scales can be converted to E8M0")
    return field.astype(np.uint8).view(E8M0)


@dataclass
class _Src:
    """A stored (native) leaf as it lies in the files: one tensor, or one per expert (stacked on axis 0)."""
    leaf: str
    names: list[str]
    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: bool
    nbytes: int


def _slice_len(n: int, s: slice) -> int:
    return len(range(n)[s])


class _BufferPool:
    """Host buffers recycled across leaves: first-touch page faults cost more than the copies themselves (in
    VMs especially: measured ~1 GB/s per thread), so on accelerators a buffer is reused once the transfer out
    of it has finished (`jax.block_until_ready` on the array made from it). Holds at most what is in flight at
    once; freed with the pool."""

    def __init__(self, budget: int):
        self.free: list[mmap.mmap] = []
        self.busy: deque = deque()                   # (array placed from the buffers, [buffers])
        self.budget, self.total = budget, 0          # new buffers are mapped while the total stays in budget

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, mmap.mmap | None]:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        if n < 1 << 20:
            return np.empty(shape, dtype), None
        while True:
            fit = [b for b in self.free if len(b) >= n]
            if fit or not self.busy or self.total + n <= self.budget:
                break
            arr, bufs = self.busy.popleft()
            jax.block_until_ready(arr)
            self.free += bufs
        if fit:
            buf = min(fit, key=len)
            self.free.remove(buf)
        else:
            while self.free and self.total + n > self.budget:    # make room: unmap idle buffers
                big = max(self.free, key=len)
                self.free.remove(big)
                self.total -= len(big)
            buf = _host_mmap(n)
            self.total += len(buf)
        return np.frombuffer(buf, dtype=dtype, count=math.prod(shape)).reshape(shape), buf

    def placed(self, arr, bufs: list, reuse: bool) -> None:
        """`reuse`: the array does not alias the buffers (never on CPU, where jax adopts aligned host buffers
        zero-copy: those buffers then belong to the array)."""
        bufs = [b for b in bufs if b is not None]
        if bufs and reuse:
            self.busy.append((arr, bufs))
        else:
            self.total -= sum(len(b) for b in bufs)

    def close(self) -> None:
        self.free.clear()
        self.busy.clear()


def _host_mmap(n: int) -> mmap.mmap:
    """An anonymous mapping (huge pages where offered: fewer page faults); unmapped when the last reference
    goes, so its memory returns to the OS at once."""
    m = mmap.mmap(-1, max(n, 1))
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return m


def _raw_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy with plain unsigned views, so numpy releases the GIL for the custom float dtypes too."""
    u = np.dtype(f"u{dst.dtype.itemsize}")
    np.copyto(dst.view(u), src.view(u))


def _contiguous(shape: tuple[int, ...], index: tuple) -> tuple[int, int] | None:
    """(first element, element count) when `index` selects one contiguous run of a C-ordered array."""
    sel = [range(n)[s] for n, s in zip(shape, index)]
    partial = [i for i, (r, n) in enumerate(zip(sel, shape)) if len(r) != n]
    k = partial[-1] if partial else 0                 # dims after k are whole; dim k a step-1 run; before it, one
    if len(sel[k]) > 1 and sel[k].step != 1 or any(len(r) != 1 for r in sel[:k]):
        return None
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    first = sum((r.start if len(r) else 0) * st for r, st in zip(sel, strides))
    return first, math.prod(len(r) for r in sel)


class _HFReader:
    """Reads index slices of stored leaves. Contiguous byte ranges (whole tensors, expert ranges, leading-axis
    slices) go straight from the file into the destination with pread, in pieces of at most `piece` bytes that
    reader threads run in parallel; anything else (inner-axis slices, I64 tid2eid -> int32, F32 scales -> E8M0)
    goes through the memory map. Only the selected bytes are read."""

    def __init__(self, ck: CheckpointDir, f32_scales: set[str], piece: int = 64 << 20):
        self.ck, self.f32, self.piece = ck, f32_scales, piece
        self.fds: dict[str, int] = {}
        self.lock = threading.Lock()

    def _fd(self, path: str) -> int:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
        self.ck.close()

    def willneed(self, names: list[str]) -> None:
        """Ask the kernel to start reading these tensors into the page cache (no-op where unsupported)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for n in names:
            info = self.ck.tensors[n]
            try:
                os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                return

    def _tensor(self, name: str) -> np.ndarray:
        a = self.ck.read(name)
        if name in self.f32:
            where = f"{os.path.basename(self.ck.tensors[name].file)}: tensor {name}"
            a = f32_scale_to_e8m0(a, where)
        elif name.endswith("gate.tid2eid"):
            a = a.astype(np.int32)
        return a

    def _pread(self, name: str, byte0: int, dst: np.ndarray) -> None:
        info = self.ck.tensors[name]
        fd, view, pos = self._fd(info.file), memoryview(dst.reshape(-1).view(np.uint8)), 0
        while pos < len(view):
            n = os.preadv(fd, [view[pos:]], info.offset + byte0 + pos)
            if n <= 0:
                raise CheckpointError(f"{info.file}: truncated safetensors file; cannot read tensor {name}")
            pos += n

    def _mapped(self, name: str, index: tuple, dst: np.ndarray) -> None:
        try:
            _raw_copy(dst, self._tensor(name)[index])
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        self.ck.close()                                   # drop the maps: their file pages leave the RSS

    def pieces(self, src: _Src, index: tuple, out: np.ndarray) -> list[Callable[[], None]]:
        """Callables that together fill `out` with `src[index]`."""
        index = tuple(index) + (slice(None),) * (len(src.shape) - len(index))
        parts = ([(src.names[e], index[1:], out[i]) for i, e in enumerate(range(len(src.names))[index[0]])]
                 if src.stacked else [(src.names[0], index, out)])
        jobs: list[Callable[[], None]] = []
        for name, idx, dst in parts:
            shape = self.ck.tensors[name].shape
            run = None if name in self.f32 or name.endswith("gate.tid2eid") else _contiguous(shape, idx)
            if run is None:
                jobs.append(functools.partial(self._mapped, name, idx, dst))
                continue
            flat, item = dst.reshape(-1), dst.dtype.itemsize
            step = max(1, self.piece // item)
            for k in range(0, run[1], step):
                jobs.append(functools.partial(self._pread, name, (run[0] + k) * item, flat[k:k + step]))
        return jobs


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _indices(shape: tuple[int, ...], sharding) -> list[tuple]:
    full = (slice(None),) * len(shape)
    if sharding is None or sharding.is_fully_replicated:
        return [full]
    seen: dict[tuple, tuple] = {}
    for idx in sharding.addressable_devices_indices_map(shape).values():
        idx = full if idx is None else tuple(idx)
        seen.setdefault(_index_key(idx), idx)
    return list(seen.values())


def _place(shape, dtype, sharding, host: dict[tuple, np.ndarray], put=None, leaf: str = ""):
    """A jax.Array from prefetched host slices ({index key: array}) on `sharding` (None: default device)."""
    if sharding is None:
        a = next(iter(host.values()))
        return put(leaf, a) if put is not None else jax.device_put(a)
    full = _index_key((slice(None),) * len(shape))
    return jax.make_array_from_callback(shape, sharding, lambda idx: host.get(_index_key(idx), host.get(full)),
                                        dtype=dtype)


def open_hf(path: str | os.PathLike) -> tuple[ModelConfig, CheckpointDir, set[str]]:
    """Validate an HF directory against its config.json: (cfg, CheckpointDir, names of F32 scales)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg = ModelConfig.from_hf(path)
    try:
        ck = CheckpointDir(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    probe = "layers.0.ffn.experts.0.w1.weight"
    if "expert_dtype" not in raw and cfg.quantized and probe in ck.tensors and \
            ck.tensors[probe].dtype == "F8_E4M3":                       # Base checkpoints: FP8 experts
        cfg = cfg.replace(expert_dtype="fp8")
    try:
        f32 = check_tensors(ck, official_inventory(cfg), path)
    except BaseException:
        ck.close()
        raise
    return cfg, ck, f32


def iter_hf(cfg: ModelConfig, ck: CheckpointDir, f32_scales: set[str] = frozenset(), dtype: str = "native", *,
            placement: _Placement | None = None, progress: bool | None = None, prefetch_bytes: int = 2 << 30,
            threads: int | None = None, put=None) -> Iterator[tuple[str, dict[str, jax.Array]]]:
    """Yield (block name, flat params of that block) in `dtype`, placed on their target shardings.

    Reader threads (`threads`, default min(16, cores)) fill a prefetch window of at most `prefetch_bytes` (and at
    most half the largest block, but always the next leaf) ahead of the placement, reading each leaf in pieces
    in parallel; peak host memory is about one block plus that window."""
    _check_dtype(dtype)
    placement = placement or _Placement()
    decl = P.declare(cfg)
    reader = _HFReader(ck, set(f32_scales))
    inv = official_inventory(cfg)
    # one job per stored leaf, in block order
    jobs: list[tuple[str, str, _Src, Any]] = []             # (block, declared name, source, sharding)
    params: list[tuple[str, str, str, str, Any]] = []       # (block, name, src fmt, dst fmt, target shardings)
    block_bytes: dict[str, int] = {}
    for block, names in _groups(cfg):
        for name in names:
            p = decl[name]
            src_fmt, dst_fmt = _fmt(p, "native"), _fmt(p, dtype)
            src_sh, tgt_sh = placement.param(name, p, src_fmt, dst_fmt)
            for leaf, st in _structs(name, p, src_fmt).items():
                m = _EXPERT.match(leaf)
                offs = [f"{m['pre']}.{e}.{m['w']}.{m['kind']}" for e in range(st.shape[0])] if m else [leaf]
                nb = sum(ck.tensors[n].nbytes for n in offs)
                jobs.append((block, name, _Src(leaf, offs, tuple(st.shape), np.dtype(st.dtype), bool(m), nb),
                             src_sh[leaf]))
                block_bytes[block] = block_bytes.get(block, 0) + nb
            params.append((block, name, src_fmt, dst_fmt, tgt_sh))
    window = max(1, min(prefetch_bytes, max(block_bytes.values()) // 2))
    prog = Progress("load", len(inv), sum(ck.tensors[n].nbytes for n in inv), progress)
    pool = ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1))
    pending: deque = deque()                          # (host slices, their buffers, piece futures) per leaf
    pool_bufs = _BufferPool(window + max(j[2].nbytes for j in jobs))
    block_first = {}                                  # block -> index of its first job (for readahead hints)
    for ji, j in enumerate(jobs):
        block_first.setdefault(j[0], ji)
    order = list(block_first)
    ahead = 0                                                  # bytes submitted, not yet placed
    nxt = 0

    def fill():
        nonlocal ahead, nxt
        while nxt < len(jobs) and (not pending or ahead + jobs[nxt][2].nbytes <= window):
            src, sh = jobs[nxt][2], jobs[nxt][3]
            b = jobs[nxt][0]
            if block_first[b] == nxt and order.index(b) + 1 < len(order):   # let the kernel read ahead
                nb = order[order.index(b) + 1]
                reader.willneed([n for j in jobs[block_first[nb]:] if j[0] == nb for n in j[2].names])
            host, bufs, futs = {}, [], []
            for i in _indices(src.shape, sh):
                out, buf = pool_bufs.take(tuple(_slice_len(n, s) for n, s in zip(src.shape, i)), src.dtype)
                host[_index_key(i)] = out
                bufs.append(buf)
                futs += [pool.submit(f) for f in reader.pieces(src, i, out)]
            pending.append((host, bufs, futs))
            ahead += src.nbytes
            nxt += 1

    try:
        pi, out = 0, {}
        raw: dict[str, jax.Array] = {}
        for ji, (block, name, src, sh) in enumerate(jobs):
            fill()
            host, bufs, futs = pending.popleft()
            for f in futs:
                f.result()
            ahead -= src.nbytes
            raw[src.leaf] = _place(src.shape, src.dtype, sh, host, put, src.leaf)
            pool_bufs.placed(raw[src.leaf], bufs, reuse=put is None and
                             all(d.platform != "cpu" for d in raw[src.leaf].devices()))
            del host, bufs, futs
            prog.update(len(src.names), src.nbytes)
            last_of_param = ji + 1 == len(jobs) or jobs[ji + 1][1] != name
            if last_of_param:
                _, _, sf, df, tgt = params[pi]
                out.update(convert_param(name, decl[name], sf, df, raw, tgt))
                raw, pi = {}, pi + 1
            if ji + 1 == len(jobs) or jobs[ji + 1][0] != block:
                yield block, out
                out = {}
    finally:
        for _, _, futs in pending:
            for f in futs:
                f.cancel()
        pool.shutdown(wait=True)
        pool_bufs.close()
        prog.close()
        reader.close()


def load_hf(path: str | os.PathLike, dtype: str = "native", *, shardings=None, sharding_for=None, mesh=None,
            rules=None, progress: bool | None = None, put: Callable[[str, np.ndarray], jax.Array] | None = None,
            prefetch_bytes: int = 2 << 30) -> tuple[ModelConfig, dict]:
    """Read an HF V4 directory into (cfg, params), streaming one block at a time (see `iter_hf`).

    `put(name, host_array)` overrides the placement of leaves that have no target sharding."""
    _check_dtype(dtype)
    cfg, ck, f32 = open_hf(path)
    flat: dict[str, jax.Array] = {}
    for _, block in iter_hf(cfg, ck, f32, dtype, placement=_Placement(shardings, sharding_for, mesh, rules),
                            progress=progress, prefetch_bytes=prefetch_bytes, put=put):
        flat.update(block)
    return cfg, P.unflatten(flat)


# ---- Orbax ---------------------------------------------------------------------------------------------
def is_orbax_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def read_marker(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(cfg, marker dict) of a v4jax Orbax directory."""
    mp = os.path.join(os.fspath(path), MARKER)
    try:
        with open(mp) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mp}: cannot read the v4jax marker: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != ORBAX_FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{mp}: not a v4jax Orbax marker (format {fmt!r}, expected {ORBAX_FORMAT!r})")
    if doc.get("version") != ORBAX_VERSION:
        raise CheckpointError(f"{mp}: marker version {doc.get('version')!r}, this v4jax reads {ORBAX_VERSION}")
    if doc.get("dtype") not in DTYPES or not isinstance(doc.get("blocks"), list):
        raise CheckpointError(f"{mp}: marker has no valid 'dtype' / 'blocks'")
    try:
        cfg = ModelConfig.from_dict(doc.get("config") or {})
    except ConfigError as e:
        raise CheckpointError(f"{mp}: config: {e}") from None
    return cfg, doc


@contextlib.contextmanager
def _atomic_dir(path: str | os.PathLike):
    """Yield a hidden temporary directory beside `path`; rename it to `path` on success, remove it on failure."""
    path = os.fspath(path).rstrip("/")
    if os.path.exists(path):
        raise CheckpointError(f"{path}: already exists; refusing to overwrite")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_tokenizer(src_dir: str | None, dst: str) -> None:
    if src_dir:
        for fn in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src_dir, fn)):
                shutil.copy(os.path.join(src_dir, fn), dst)


def _orbax_checkpointer():
    """An async Orbax PyTree checkpointer (the format StandardCheckpointer writes). Replica-parallel saving is
    off: on one host it only slices every replicated array into per-device pieces, one compile per shape."""
    import orbax.checkpoint as ocp
    th = ocp.type_handlers
    reg = th.create_type_handler_registry((jax.Array, th.ArrayHandler(use_replica_parallel=False)),
                                          (np.ndarray, th.NumpyHandler()))
    return ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=reg))


def write_orbax(cfg: ModelConfig, dtype: str, blocks: Iterable[tuple[str, dict[str, Any]]], path, *,
                tokenizer_dir: str | None = None, e8m0_as_uint8: bool = False) -> None:
    """Write (block, flat arrays) pairs as a v4jax Orbax directory (one Orbax checkpoint per block).

    Block i is written in the background while block i+1 is produced. `e8m0_as_uint8` stores E8M0 scales as
    their uint8 bytes (recorded in the marker, viewed back on restore), for Orbax versions without E8M0."""
    import orbax.checkpoint as ocp
    _check_dtype(dtype)
    with _atomic_dir(path) as tmp:
        ckptr = _orbax_checkpointer()
        names, viewed = [], []
        try:
            for block, flat in blocks:
                tree = {}
                for leaf, a in flat.items():
                    if e8m0_as_uint8 and np.dtype(a.dtype) == E8M0:
                        a = (a.view(np.uint8) if isinstance(a, np.ndarray) else
                             jax.lax.bitcast_convert_type(a, jnp.uint8))
                        viewed.append(leaf)
                    tree[leaf] = a
                ckptr.save(os.path.join(tmp, block), args=ocp.args.PyTreeSave(P.unflatten(tree)))
                names.append(block)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        _copy_tokenizer(tokenizer_dir, tmp)
        doc = {"format": ORBAX_FORMAT, "version": ORBAX_VERSION, "dtype": dtype, "blocks": names,
               "uint8_views": {leaf: "float8_e8m0fnu" for leaf in viewed}, "config": cfg.to_hf()}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(doc, f, indent=1)


def iter_orbax(path: str | os.PathLike, dtype: str = "native", *, placement: _Placement | None = None,
               progress: bool | None = None) -> Iterator[tuple[str, dict[str, jax.Array]]]:
    """Yield (block, flat params) of a v4jax Orbax directory, restored directly onto the target shardings."""
    import orbax.checkpoint as ocp
    _check_dtype(dtype)
    path = os.fspath(path)
    cfg, doc = read_marker(path)
    stored, viewed = doc["dtype"], doc.get("uint8_views", {})
    placement = placement or _Placement()
    decl = P.declare(cfg)
    groups = _groups(cfg)
    if [g for g, _ in groups] != doc["blocks"]:
        raise CheckpointError(f"{os.path.join(path, MARKER)}: blocks {doc['blocks'][:5]}... do not match the "
                              f"config's {[g for g, _ in groups][:5]}...")
    inv = abstract_flat(cfg, stored)
    prog = Progress("restore", len(inv), sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                                             for s in inv.values()), progress)
    default = SingleDeviceSharding(jax.local_devices()[0])
    ckptr = _orbax_checkpointer()
    try:
        for block, names in groups:
            target, plan = {}, []
            for name in names:
                p = decl[name]
                sf, df = _fmt(p, stored), _fmt(p, dtype)
                src_sh, tgt_sh = placement.param(name, p, sf, df)
                for leaf, st in _structs(name, p, sf).items():
                    dt = np.uint8 if leaf in viewed else st.dtype
                    target[leaf] = jax.ShapeDtypeStruct(st.shape, dt, sharding=src_sh[leaf] or default)
                plan.append((name, p, sf, df, tgt_sh, list(_structs(name, p, sf))))
            bdir = os.path.join(path, block)
            if not os.path.isdir(bdir):
                raise CheckpointError(f"{bdir}: block directory missing from the Orbax checkpoint")
            try:
                tree = P.unflatten(target)
                got = P.flatten(ckptr.restore(bdir, args=ocp.args.PyTreeRestore(
                    item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))))
            except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; name the block
                raise CheckpointError(f"{bdir}: cannot restore block {block!r}: {type(e).__name__}: "
                                      f"{str(e)[:2000]}") from None
            out = {}
            for name, p, sf, df, tgt_sh, leaves in plan:
                arrs = {k: (jax.lax.bitcast_convert_type(got[k], jnp.float8_e8m0fnu) if k in viewed else got[k])
                        for k in leaves}
                out.update(convert_param(name, p, sf, df, arrs, tgt_sh))
                prog.update(len(leaves), sum(a.nbytes for a in arrs.values()))
            yield block, out
    finally:
        ckptr.close()
        prog.close()


def load_orbax(path, dtype: str = "native", *, shardings=None, sharding_for=None, mesh=None, rules=None,
               progress: bool | None = None) -> tuple[ModelConfig, dict]:
    cfg, _ = read_marker(path)
    flat: dict[str, jax.Array] = {}
    for _, block in iter_orbax(path, dtype, placement=_Placement(shardings, sharding_for, mesh, rules),
                               progress=progress):
        flat.update(block)
    return cfg, P.unflatten(flat)


def save_orbax(cfg: ModelConfig, params: dict, path, *, tokenizer_dir: str | None = None,
               e8m0_as_uint8: bool = False) -> None:
    """Write in-memory params (any of the three dtypes, any sharding) as a v4jax Orbax directory."""
    flat = P.flatten(params)
    dtype = detect_dtype(cfg, flat)
    decl = P.declare(cfg)
    blocks = ((b, {leaf: flat[leaf] for n in names for leaf in _structs(n, decl[n], _fmt(decl[n], dtype))})
              for b, names in _groups(cfg))
    write_orbax(cfg, dtype, blocks, path, tokenizer_dir=tokenizer_dir, e8m0_as_uint8=e8m0_as_uint8)


# ---- HF: writing ---------------------------------------------------------------------------------------
def native_block(cfg: ModelConfig, names: list[str], flat: dict[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """The official tensors (host numpy) of one block of params held in `dtype` (re-quantized if needed)."""
    decl = P.declare(cfg)
    out: dict[str, Any] = {}
    for name in names:
        p = decl[name]
        src, dst = _fmt(p, dtype), p.storage
        arrs = {k: flat[k] for k in _structs(name, p, src)}
        out.update(convert_param(name, p, src, dst, arrs) if src != dst else arrs)
    return official_view(out)


def write_hf(cfg: ModelConfig, blocks: Iterable[dict[str, Any]], path, *, max_shard_bytes: int = 4 << 30,
             tokenizer_dir: str | None = None) -> None:
    """Write official tensors, given block by block in `_groups` order, as model-0000N-of-0000M.safetensors +
    index + config.json. A shard is written as soon as all its tensors have arrived."""
    inv = official_inventory(cfg)
    decl = P.declare(cfg)
    order = [n for _, names in _groups(cfg) for name in names
             for n in _official_names(name, decl[name], cfg.n_routed_experts)]
    sizes = {n: int(np.prod(inv[n].shape)) * np.dtype(inv[n].dtype).itemsize for n in order}
    shards: list[list[str]] = [[]]
    acc = 0
    for n in order:
        if shards[-1] and acc + sizes[n] > max_shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(n)
        acc += sizes[n]
    with _atomic_dir(path) as tmp:
        pending: dict[str, Any] = {}
        weight_map: dict[str, str] = {}
        si = 0
        for block in blocks:
            for n, a in block.items():
                exp = inv.get(n)
                if exp is None:
                    raise CheckpointError(f"{n}: not a tensor of this config's checkpoint")
                if np.dtype(a.dtype) != np.dtype(exp.dtype) or tuple(a.shape) != tuple(exp.shape):
                    raise CheckpointError(f"{n}: params hold {np.dtype(a.dtype)}{list(a.shape)}, the format needs "
                                          f"{np.dtype(exp.dtype)}{list(exp.shape)}")
                pending[n] = a
            while si < len(shards) and all(n in pending for n in shards[si]):
                fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, fname), {n: pending.pop(n) for n in shards[si]},
                                  metadata={"format": "pt"})
                weight_map.update({n: fname for n in shards[si]})
                si += 1
        if si < len(shards):
            missing = [n for s in shards[si:] for n in s if n not in pending]
            raise CheckpointError("params lack tensors of the checkpoint:\n" + _listing("missing", missing))
        write_index(tmp, weight_map, sum(sizes.values()))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf(), f, indent=2)
        _copy_tokenizer(tokenizer_dir, tmp)


def save_hf(cfg: ModelConfig, params: dict, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30,
            tokenizer_dir: str | None = None) -> None:
    """Write the official layout (names, dtypes, scale formats; bf16/fp8-held weights re-quantized with the
    reference's rules), written into a temporary directory beside `path` and renamed when complete."""
    if os.path.exists(os.fspath(path)):
        raise CheckpointError(f"{os.fspath(path)}: already exists; refusing to overwrite")
    flat = P.flatten(params)
    dtype = detect_dtype(cfg, flat)
    write_hf(cfg, (native_block(cfg, names, flat, dtype) for _, names in _groups(cfg)), path,
             max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer_dir)


# ---- public API ----------------------------------------------------------------------------------------
def iter_blocks(path, dtype: str = "native", *, shardings=None, sharding_for=None, mesh=None, rules=None,
                progress: bool | None = None, **kw) -> tuple[ModelConfig, Iterator[tuple[str, dict]]]:
    """(cfg, iterator of (block, flat params)) of either kind of directory: the streaming form of `load`."""
    _check_dtype(dtype)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    placement = _Placement(shardings, sharding_for, mesh, rules)
    if is_orbax_dir(path):
        cfg, _ = read_marker(path)
        return cfg, iter_orbax(path, dtype, placement=placement, progress=progress)
    cfg, ck, f32 = open_hf(path)
    return cfg, iter_hf(cfg, ck, f32, dtype, placement=placement, progress=progress, **kw)


def load(path: str | os.PathLike, dtype: str = "native", *, shardings=None, sharding_for=None, mesh=None,
         rules=None, progress: bool | None = None) -> tuple[ModelConfig, dict]:
    """Load an HF safetensors directory or a v4jax Orbax directory -> (cfg, params).

    dtype: "native" (the checkpoint's FP8/FP4 + E8M0), "bf16" or "fp8" (FP4 experts repacked to FP8).
    Placement: `shardings` (a params-shaped pytree of Shardings), else `sharding_for(name, logical_axes)`, else
    `mesh` (+ `rules`: {logical axis: mesh axis}; default: experts over 'expert'), else the mesh of
    `jax.set_mesh` if one is set, else the default device. `progress`: a line on stderr (default: if a TTY)."""
    cfg, blocks = iter_blocks(path, dtype, shardings=shardings, sharding_for=sharding_for, mesh=mesh, rules=rules,
                              progress=progress)
    flat: dict[str, jax.Array] = {}
    for _, block in blocks:
        flat.update(block)
    return cfg, P.unflatten(flat)


def save(cfg: ModelConfig, params: dict, path: str | os.PathLike, format: str = "orbax", **kw) -> None:
    """Save params as a v4jax Orbax directory (format="orbax") or in the official HF layout (format="hf")."""
    if format == "hf":
        return save_hf(cfg, params, path, **kw)
    if format == "orbax":
        if os.path.exists(os.fspath(path)):
            raise CheckpointError(f"{os.fspath(path)}: already exists; refusing to overwrite")
        return save_orbax(cfg, params, path, **kw)
    raise ValueError(f"format must be 'orbax' or 'hf', got {format!r}")
