"""Minimal, strict, lazy reader/writer for the safetensors format.

File layout::

    u64 (little-endian) N | N bytes of JSON header | data buffer

The header maps tensor names to ``{"dtype", "shape", "data_offsets"}`` (offsets
relative to the start of the data buffer) plus an optional ``"__metadata__"``
object of string -> string.

Why not the ``safetensors`` package: its numpy API cannot return the dtypes the
DeepSeek-V4 checkpoints use (F8_E4M3, F8_E8M0, BF16), it copies every tensor
into memory, and its errors do not name the offending file.  Here every tensor
read is a zero-copy, read-only view into a ``np.memmap`` of its file, so a
large checkpoint can be streamed layer by layer, and every malformed input
raises :class:`SafetensorsError` naming the file (and the tensor).
"""

from __future__ import annotations

import collections
import glob
import json
import math
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "DTYPES",
    "dtype_name",
    "SafetensorsError",
    "TensorNotFoundError",
    "TensorInfo",
    "SafetensorsFile",
    "CheckpointDir",
    "write_safetensors",
    "write_index",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
]

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("v4jax.safetensors_io assumes a little-endian host")

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit as well
_MAX_LISTED = 20  # names listed in one error message before "and N more"
_OPEN_FILE_CACHE = 8  # memory-mapped files a CheckpointDir keeps open at once


class SafetensorsError(ValueError):
    """A malformed or inconsistent safetensors file / checkpoint directory."""


class TensorNotFoundError(SafetensorsError, KeyError):
    """A requested tensor is absent.  Catchable as ``KeyError`` too."""

    __str__ = BaseException.__str__  # KeyError would repr() the message


def dtype_name(np_dtype: Any) -> str:
    """safetensors dtype string (e.g. ``"BF16"``) for a numpy dtype."""
    try:
        dt = np.dtype(np_dtype)
    except TypeError as e:
        raise ValueError(f"unsupported dtype {np_dtype!r} for safetensors: {e}") from None
    if dt.byteorder in "<>":
        dt = dt.newbyteorder("=")
    for name, candidate in DTYPES.items():
        if dt == candidate:
            return name
    raise ValueError(
        f"unsupported dtype {dt!r} (name {dt.name!r}) for safetensors; "
        f"supported: {', '.join(str(d) for d in DTYPES.values())}"
    )


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, a key of DTYPES
    shape: tuple[int, ...]
    file: str
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def _fmt_names(names: Iterable[str], cap: int = _MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:cap])
    if len(names) > cap:
        shown += f", and {len(names) - cap} more"
    return shown


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates_hook(path: str):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise SafetensorsError(f"{path}: header has duplicate key {k!r}")
            out[k] = v
        return out

    return hook


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


class _TensorNames:
    """Name lookups shared by a file and a checkpoint directory (both hold `tensors`: name -> TensorInfo)."""

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class SafetensorsFile(_TensorNames):
    """One safetensors file.  The header is parsed and validated on construction;
    data is memory-mapped on the first :meth:`read` (one map per file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm: np.memmap | None = None
        self._lock = threading.Lock()
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse_header()

    # -- header ------------------------------------------------------------ #
    def _parse_header(self) -> None:
        p = self.path
        if not os.path.exists(p):
            raise SafetensorsError(f"{p}: no such file")
        if os.path.isdir(p):
            raise SafetensorsError(f"{p}: is a directory, not a safetensors file")
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    what = "empty file" if size == 0 else f"only {size} bytes"
                    raise SafetensorsError(
                        f"{p}: not a safetensors file ({what}; need at least 8 bytes "
                        f"for the header length)"
                    )
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES:
                    raise SafetensorsError(
                        f"{p}: not a safetensors file (header length {n} is implausible, "
                        f"limit {MAX_HEADER_BYTES})"
                    )
                if n > size - 8:
                    raise SafetensorsError(
                        f"{p}: not a safetensors file or truncated (header length {n} "
                        f"exceeds the {size - 8} bytes after the 8-byte length prefix)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise SafetensorsError(f"{p}: cannot read: {e}") from e
        if len(raw) != n:  # file shrank underneath us
            raise SafetensorsError(f"{p}: truncated header ({len(raw)} of {n} bytes)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SafetensorsError(f"{p}: not a safetensors file (header is not UTF-8: {e})") from None
        try:
            header = json.loads(text, object_pairs_hook=_no_duplicates_hook(p))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{p}: not a safetensors file (header is not valid JSON: {e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(
                f"{p}: not a safetensors file (header JSON is a {type(header).__name__}, "
                f"not an object)"
            )

        data_start = 8 + n
        buffer_size = size - data_start
        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
            ):
                raise SafetensorsError(
                    f"{p}: '__metadata__' must be an object mapping strings to strings"
                )
            self.metadata = dict(meta)

        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            where = f"{p}: tensor {name!r}"
            if not isinstance(entry, dict):
                raise SafetensorsError(f"{where}: header entry is not an object")
            missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
            if missing:
                raise SafetensorsError(f"{where}: header entry lacks {', '.join(missing)}")
            dt = entry["dtype"]
            if not isinstance(dt, str) or dt not in DTYPES:
                raise SafetensorsError(
                    f"{where} has unknown dtype {dt!r} (supported: {', '.join(DTYPES)})"
                )
            shape = entry["shape"]
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise SafetensorsError(
                    f"{where} has invalid shape {shape!r} (need a list of non-negative ints)"
                )
            offs = entry["data_offsets"]
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1]
            ):
                raise SafetensorsError(
                    f"{where} has invalid data_offsets {offs!r} (need [begin, end] with "
                    f"0 <= begin <= end)"
                )
            begin, end = offs
            need = DTYPES[dt].itemsize * math.prod(shape)
            if end - begin != need:
                raise SafetensorsError(
                    f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but "
                    f"dtype {dt} with shape {shape} needs {need} bytes"
                )
            if end > buffer_size:
                raise SafetensorsError(
                    f"{p}: truncated safetensors file (header says {data_start + end} bytes, "
                    f"file has {size}); tensor {name!r} ends past the end of the file"
                )
            if end > begin:
                spans.append((begin, end, name))
            self.tensors[name] = TensorInfo(
                name=name,
                dtype=dt,
                shape=tuple(shape),
                file=p,
                offset=data_start + begin,
                nbytes=need,
            )
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise SafetensorsError(
                    f"{p}: tensors {n0!r} and {n1!r} overlap (data_offsets [{b0}, {e0}] "
                    f"and [{b1}, {e1}])"
                )

    # -- access ------------------------------------------------------------ #
    def _map(self) -> np.memmap:
        with self._lock:
            if self._mm is None:
                try:
                    self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
                except (OSError, ValueError) as e:
                    raise SafetensorsError(f"{self.path}: cannot memory-map: {e}") from e
            return self._mm

    def read(self, name: str) -> np.ndarray:
        """Zero-copy, read-only array (an ``np.memmap`` view) of tensor ``name``."""
        info = self.tensors.get(name)
        if info is None:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}")
        mm = self._map()
        end = info.offset + info.nbytes
        if end > mm.shape[0]:
            raise SafetensorsError(
                f"{self.path}: truncated safetensors file (header says at least {end} bytes, "
                f"file has {mm.shape[0]}); cannot read tensor {name!r}"
            )
        return mm[info.offset:end].view(DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        """Drop this object's memory map.  Arrays already returned by :meth:`read`
        stay valid (they keep the map alive); a later :meth:`read` re-maps."""
        with self._lock:
            self._mm = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.tensors)} tensors)"


class CheckpointDir(_TensorNames):
    """A Hugging Face checkpoint directory: ``model.safetensors.index.json`` plus
    shards, or one / several ``*.safetensors`` files without an index."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._files: dict[str, SafetensorsFile] = {}
        self._open: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, Any] = {}
        self.index_path: str | None = None

        d = self.path
        if not os.path.exists(d):
            raise SafetensorsError(f"{d}: checkpoint directory does not exist")
        if not os.path.isdir(d):
            raise SafetensorsError(f"{d}: not a directory")
        index = os.path.join(d, INDEX_NAME)
        if not os.path.isfile(index):
            others = sorted(glob.glob(os.path.join(glob.escape(d), "*.safetensors.index.json")))
            index = others[0] if len(others) == 1 else None
        if index is not None:
            self.index_path = index
            self._load_indexed(index)
        else:
            self._load_unindexed()

    def _load_indexed(self, index: str) -> None:
        try:
            with open(index, "r", encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{index}: cannot parse index: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
            raise SafetensorsError(f"{index}: index has no 'weight_map' object")
        wm = doc["weight_map"]
        if not wm:
            raise SafetensorsError(f"{index}: index 'weight_map' is empty")
        bad = [k for k, v in wm.items() if not isinstance(v, str)]
        if bad:
            raise SafetensorsError(f"{index}: weight_map values must be file names; bad: {_fmt_names(bad)}")
        if isinstance(doc.get("metadata"), dict):
            self.metadata = dict(doc["metadata"])

        shards = list(dict.fromkeys(wm.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(self.path, s))]
        if missing:
            raise SafetensorsError(
                f"{index}: index references {len(missing)} missing file(s): {_fmt_names(missing)}"
            )
        for s in shards:
            fp = os.path.join(self.path, s)
            self._files[fp] = SafetensorsFile(fp)

        problems: list[str] = []
        for name, s in wm.items():
            if name not in self._files[os.path.join(self.path, s)].tensors:
                problems.append(f"{name!r} (index says {s}, not in that file)")
        for fp, sf in self._files.items():
            for name in sf.tensors:
                if name not in wm:
                    problems.append(f"{name!r} (in {os.path.basename(fp)}, not in index)")
                elif os.path.join(self.path, wm[name]) != fp:
                    problems.append(
                        f"{name!r} (also in {os.path.basename(fp)}, index says {wm[name]})"
                    )
        if problems:
            shown = "; ".join(problems[:_MAX_LISTED])
            if len(problems) > _MAX_LISTED:
                shown += f"; and {len(problems) - _MAX_LISTED} more"
            raise SafetensorsError(
                f"{index}: index and files disagree on {len(problems)} tensor(s): {shown}"
            )
        for name, s in wm.items():
            self.tensors[name] = self._files[os.path.join(self.path, s)].tensors[name]

    def _load_unindexed(self) -> None:
        paths = sorted(glob.glob(os.path.join(glob.escape(self.path), "*.safetensors")))
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            raise SafetensorsError(
                f"{self.path}: no *.safetensors files (and no {INDEX_NAME}) in directory"
            )
        dups: list[str] = []
        for fp in paths:
            sf = SafetensorsFile(fp)
            self._files[fp] = sf
            for name, info in sf.tensors.items():
                if name in self.tensors:
                    dups.append(f"{name!r} in {self.tensors[name].file} and {fp}")
                else:
                    self.tensors[name] = info
        if dups:
            shown = "; ".join(dups[:_MAX_LISTED])
            if len(dups) > _MAX_LISTED:
                shown += f"; and {len(dups) - _MAX_LISTED} more"
            raise SafetensorsError(
                f"{self.path}: {len(dups)} duplicate tensor name(s) across files without an "
                f"index: {shown}"
            )

    # -- access ------------------------------------------------------------ #
    @property
    def files(self) -> list[str]:
        return list(self._files)

    def read(self, name: str) -> np.ndarray:
        info = self.tensors.get(name)
        if info is None:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r} in checkpoint")
        sf = self._files[info.file]
        with self._lock:
            self._open[info.file] = None
            self._open.move_to_end(info.file)
            while len(self._open) > _OPEN_FILE_CACHE:
                old, _ = self._open.popitem(last=False)
                self._files[old].close()
        return sf.read(name)

    def close(self) -> None:
        with self._lock:
            for sf in self._files.values():
                sf.close()
            self._open.clear()

    def __enter__(self) -> "CheckpointDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointDir({self.path!r}, {len(self._files)} files, {len(self.tensors)} tensors)"


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def _atomic_write_bytes(path: str, payload: bytes) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array-like, numpy / ml_dtypes / jax) to ``path``.

    The header lists tensors in insertion order.  In the data buffer tensors are
    laid out by decreasing item size (stable), so every tensor is aligned to its
    item size (the header is padded with spaces to a multiple of 8 bytes); the
    buffer is contiguous without gaps, as the reference implementation requires.
    Arrays are streamed one at a time to ``path + ".tmp"``, which is fsynced and
    then renamed over ``path``; on any error the temporary file is removed.
    """
    path = os.fspath(path)
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise SafetensorsError(f"{path}: metadata must map strings to strings")

    # Pass 1: dtype/shape of every entry without materialising device arrays.
    specs: list[tuple[str, str, tuple[int, ...], int]] = []
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"{path}: invalid tensor name {name!r}")
        if not (hasattr(arr, "dtype") and hasattr(arr, "shape")):
            arr = np.asarray(arr)
        try:
            dt = dtype_name(arr.dtype)
        except ValueError as e:
            raise SafetensorsError(f"{path}: tensor {name!r}: {e}") from None
        shape = tuple(int(d) for d in arr.shape)
        specs.append((name, dt, shape, DTYPES[dt].itemsize * math.prod(shape)))

    order = sorted(range(len(specs)), key=lambda i: -DTYPES[specs[i][1]].itemsize)
    offsets: dict[int, tuple[int, int]] = {}
    pos = 0
    for i in order:
        offsets[i] = (pos, pos + specs[i][3])
        pos += specs[i][3]

    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    for i, (name, dt, shape, _) in enumerate(specs):
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": list(offsets[i])}
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    if len(hbytes) > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path}: header of {len(hbytes)} bytes exceeds {MAX_HEADER_BYTES}")

    values = list(tensors.values())
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for i in order:
                name, dt, shape, nbytes = specs[i]
                a = np.asarray(values[i])
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                if not a.flags.c_contiguous:
                    a = np.array(a, order="C")  # one array at a time, never the payload
                if a.shape != shape or a.dtype != DTYPES[dt]:
                    raise SafetensorsError(
                        f"{path}: tensor {name!r} changed while writing (expected {dt} "
                        f"{list(shape)}, got {a.dtype} {list(a.shape)})"
                    )
                if nbytes:
                    f.write(memoryview(a.reshape(-1).view(np.uint8)))
                del a
            if f.tell() != 8 + len(hbytes) + pos:  # pragma: no cover - defensive
                raise SafetensorsError(f"{path}: internal error, wrote {f.tell()} bytes")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_index(
    dir: str | os.PathLike,
    weight_map: Mapping[str, str],
    total_size: int,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write ``dir/model.safetensors.index.json``.

    ``metadata`` entries are merged into the index's ``"metadata"`` object next to
    ``total_size`` (which wins on conflict)."""
    d = os.fspath(dir)
    if not _is_int(total_size) or total_size < 0:
        raise SafetensorsError(f"{d}: total_size must be a non-negative int, got {total_size!r}")
    bad = [k for k, v in weight_map.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise SafetensorsError(f"{d}: weight_map must map strings to strings; bad: {_fmt_names(bad)}")
    meta = dict(metadata or {})
    meta["total_size"] = total_size
    doc = {"metadata": meta, "weight_map": dict(weight_map)}
    payload = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    _atomic_write_bytes(os.path.join(d, INDEX_NAME), payload)
