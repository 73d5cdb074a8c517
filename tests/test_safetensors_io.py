"""Tests for v4jax.safetensors_io: round trips, interop with the `safetensors`
package, lazy memory-mapped reads, validation errors and write atomicity."""

from __future__ import annotations

import gc
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from v4jax.safetensors_io import (
    DTYPES,
    INDEX_NAME,
    CheckpointDir,
    SafetensorsError,
    SafetensorsFile,
    TensorInfo,
    TensorNotFoundError,
    dtype_name,
    write_index,
    write_safetensors,
)

# dtypes the `safetensors` package's numpy API (safetensors.numpy.load_file) can return
NUMPY_API_DTYPES = ["F64", "F32", "F16", "I64", "U64", "I32", "U32", "I16", "I8", "U8", "BOOL"]


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def _assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert _bytes(got) == _bytes(want)


def _random_array(rng: np.random.Generator, dt: str, shape: tuple[int, ...]) -> np.ndarray:
    np_dt = DTYPES[dt]
    n = int(np.prod(shape, dtype=np.int64))
    if dt == "BOOL":
        return (rng.integers(0, 2, size=n, dtype=np.uint8) == 1).reshape(shape)
    raw = rng.integers(0, 256, size=n * np_dt.itemsize, dtype=np.uint8)  # NaN payloads too
    return raw.view(np_dt).reshape(shape)


def _all_dtype_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for dt in DTYPES:
        out[f"{dt}.mat"] = _random_array(rng, dt, (3, 5))
        out[f"{dt}.odd"] = _random_array(rng, dt, (7,))  # odd byte counts for 1-byte dtypes
        out[f"{dt}.scalar"] = _random_array(rng, dt, ())
        out[f"{dt}.empty"] = _random_array(rng, dt, (0,))
        out[f"{dt}.empty2"] = _random_array(rng, dt, (4, 0, 2))
    return out


def _raw_file(path, header, data: bytes = b"", *, length: int | None = None) -> str:
    """Write a hand-crafted file: header is a dict (JSON-encoded) or raw bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if length is None else length))
        f.write(h)
        f.write(data)
    return str(path)


def _expect_error(fn, *needles: str) -> SafetensorsError:
    with pytest.raises(SafetensorsError) as ei:
        fn()
    msg = str(ei.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in error message {msg!r}"
    return ei.value


# --------------------------------------------------------------------------- #
# dtypes
# --------------------------------------------------------------------------- #


def test_dtype_table_and_inverse():
    assert DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)
    assert DTYPES["F8_E5M2"] == np.dtype(ml_dtypes.float8_e5m2)
    assert DTYPES["F8_E8M0"] == np.dtype(ml_dtypes.float8_e8m0fnu)
    assert DTYPES["I8"] == np.dtype(np.int8)
    assert DTYPES["BOOL"] == np.dtype(bool)
    assert set(DTYPES) == {
        "BF16", "F16", "F32", "F64", "I8", "I16", "I32", "I64",
        "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0",
    }
    for name, dt in DTYPES.items():
        assert dtype_name(dt) == name
        assert dtype_name(dt.type) == name
    assert dtype_name(np.dtype(">f4")) == "F32"
    assert dtype_name(np.longlong) == "I64"
    for bad in (np.complex128, object, np.dtype("U3"), np.dtype([("a", "f4")])):
        with pytest.raises(ValueError) as ei:
            dtype_name(bad)
        assert str(np.dtype(bad)) in str(ei.value) or np.dtype(bad).name in str(ei.value)


# --------------------------------------------------------------------------- #
# Round trips
# --------------------------------------------------------------------------- #


def test_round_trip_every_dtype_bit_exact(tmp_path):
    tensors = _all_dtype_tensors()
    p = tmp_path / "all.safetensors"
    meta = {"format": "np", "note": "ünïcode ✓"}
    write_safetensors(p, tensors, metadata=meta)
    assert not os.path.exists(str(p) + ".tmp")

    with SafetensorsFile(p) as f:
        assert f.metadata == meta
        assert f.keys() == list(tensors)  # header keeps insertion order
        assert list(f.tensors) == list(tensors)
        size = os.path.getsize(p)
        (n,) = struct.unpack("<Q", open(p, "rb").read(8))
        assert n % 8 == 0
        for name, want in tensors.items():
            info = f.tensors[name]
            assert isinstance(info, TensorInfo)
            assert info.name == name and info.file == str(p)
            assert info.dtype == dtype_name(want.dtype)
            assert info.shape == want.shape
            assert info.nbytes == want.nbytes
            assert 8 + n <= info.offset and info.offset + info.nbytes <= size
            assert info.offset % want.dtype.itemsize == 0  # data aligned to item size
            got = f.read(name)
            _assert_bit_exact(got, want)
            assert not got.flags.writeable
            # Independent check of the on-disk bytes via TensorInfo.offset
            with open(p, "rb") as fh:
                fh.seek(info.offset)
                assert fh.read(info.nbytes) == _bytes(want)
        # data buffer is exactly covered (no gaps, no trailing bytes)
        assert sum(i.nbytes for i in f.tensors.values()) == size - 8 - n


def test_round_trip_values_and_special_inputs(tmp_path):
    # meaningful values (not just bytes): E8M0 scales, FP8, packed FP4 as I8
    scales = np.array([2.0**-10, 1.0, 2.0**5, 2.0**127], dtype=np.float32).astype(ml_dtypes.float8_e8m0fnu)
    w8 = np.array([[-448.0, 0.5], [1.75, 448.0]], dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    packed = np.array([0x12, -0x80, 0x7F, 0], dtype=np.int8)
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    non_contig = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    p = tmp_path / "v.safetensors"
    write_safetensors(p, {"s": scales, "w": w8, "p": packed, "be": big_endian,
                          "nc": non_contig, "pyscalar": np.int64(7)})
    f = SafetensorsFile(p)
    np.testing.assert_array_equal(f.read("s").astype(np.float32), [2.0**-10, 1.0, 32.0, 2.0**127])
    np.testing.assert_array_equal(f.read("w").astype(np.float32), [[-448.0, 0.5], [1.75, 448.0]])
    np.testing.assert_array_equal(f.read("p"), packed)
    assert f.tensors["be"].dtype == "I32"
    np.testing.assert_array_equal(f.read("be"), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(f.read("nc"), non_contig)
    assert f.read("pyscalar").shape == () and int(f.read("pyscalar")) == 7
    assert f.metadata == {}


def test_round_trip_jax_array(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4)
    p = tmp_path / "j.safetensors"
    write_safetensors(p, {"x": x})
    got = SafetensorsFile(p).read("x")
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    _assert_bit_exact(got, np.asarray(x))


def test_empty_tensor_dict(tmp_path):
    p = tmp_path / "none.safetensors"
    write_safetensors(p, {}, metadata={"a": "b"})
    f = SafetensorsFile(p)
    assert f.keys() == [] and f.metadata == {"a": "b"}


# --------------------------------------------------------------------------- #
# Interoperability with the `safetensors` package
# --------------------------------------------------------------------------- #


def test_ours_read_by_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors")
    stnp = pytest.importorskip("safetensors.numpy")
    tensors = _all_dtype_tensors(seed=1)
    p = tmp_path / "ours.safetensors"
    write_safetensors(p, tensors, metadata={"k": "v"})

    # Raw bytes for every dtype (the package validates offsets/contiguity here).
    got = dict(st.deserialize(p.read_bytes()))
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert got[name]["dtype"] == dtype_name(want.dtype)
        assert tuple(got[name]["shape"]) == want.shape
        assert bytes(got[name]["data"]) == _bytes(want), name

    with st.safe_open(str(p), framework="np") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(tensors)

    # numpy API: only the dtypes it supports
    sub = {k: v for k, v in tensors.items() if k.split(".")[0] in NUMPY_API_DTYPES}
    p2 = tmp_path / "ours_np.safetensors"
    write_safetensors(p2, sub)
    loaded = stnp.load_file(str(p2))
    assert set(loaded) == set(sub)
    for name, want in sub.items():
        _assert_bit_exact(loaded[name], want)


def test_safetensors_package_files_read_by_us(tmp_path):
    stnp = pytest.importorskip("safetensors.numpy")
    tensors = _all_dtype_tensors(seed=2)
    p = tmp_path / "theirs.safetensors"
    # save_file serialises ml_dtypes arrays (bfloat16, float8_*) as well
    stnp.save_file(tensors, str(p), metadata={"format": "pt"})
    f = SafetensorsFile(p)
    assert f.metadata == {"format": "pt"}
    assert set(f.keys()) == set(tensors)
    for name, want in tensors.items():
        assert f.tensors[name].dtype == dtype_name(want.dtype)
        _assert_bit_exact(f.read(name), want)


# --------------------------------------------------------------------------- #
# Laziness
# --------------------------------------------------------------------------- #


def test_read_is_lazy_memmap(tmp_path):
    psutil = pytest.importorskip("psutil")
    p = tmp_path / "big.safetensors"
    rng = np.random.default_rng(0)
    small = rng.standard_normal(1000, dtype=np.float32)
    big = {f"big{i}": np.full((10 * 2**20 // 4,), i, dtype=np.float32) for i in range(5)}
    write_safetensors(p, {**big, "small": small})
    del big
    gc.collect()
    assert os.path.getsize(p) > 50 * 10**6

    proc = psutil.Process()
    f = SafetensorsFile(p)
    rss0 = proc.memory_info().rss
    arrs = [f.read(f"big{i}") for i in range(5)]  # mapping all of them touches nothing
    x = f.read("small")
    _assert_bit_exact(x, small)  # touches ~4 KB
    assert float(arrs[3][12345]) == 3.0  # touches one page of a big tensor
    rss1 = proc.memory_info().rss
    assert rss1 - rss0 < 10 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"

    for a in [x, *arrs]:
        assert isinstance(a, np.memmap) or isinstance(a.base, np.memmap)
        assert not a.flags.writeable
        assert not a.flags.owndata
    with pytest.raises(ValueError):
        x[0] = 1.0


def test_arrays_survive_close(tmp_path):
    p = tmp_path / "c.safetensors"
    write_safetensors(p, {"a": np.arange(10, dtype=np.int64)})
    f = SafetensorsFile(p)
    a = f.read("a")
    f.close()
    np.testing.assert_array_equal(a, np.arange(10))
    np.testing.assert_array_equal(f.read("a"), np.arange(10))  # re-maps


# --------------------------------------------------------------------------- #
# Bad files
# --------------------------------------------------------------------------- #


def _good_header():
    return {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    _expect_error(lambda: SafetensorsFile(p), str(p), "no such file")


def test_directory_instead_of_file(tmp_path):
    _expect_error(lambda: SafetensorsFile(tmp_path), str(tmp_path), "directory")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _expect_error(lambda: SafetensorsFile(p), str(p), "not a safetensors file", "empty")


def test_short_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x02\x00\x00")
    _expect_error(lambda: SafetensorsFile(p), str(p), "not a safetensors file")


def test_garbage_bytes(tmp_path):
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"this is definitely not a safetensors file, just text\n" * 20)
    _expect_error(lambda: SafetensorsFile(p), str(p), "not a safetensors file")


def test_header_length_larger_than_file(tmp_path):
    p = _raw_file(tmp_path / "hlen.safetensors", b"{}", length=1000)
    _expect_error(lambda: SafetensorsFile(p), p, "header length 1000")


def test_header_length_implausible(tmp_path):
    p = _raw_file(tmp_path / "huge.safetensors", b"{}", length=2**40)
    _expect_error(lambda: SafetensorsFile(p), p, "implausible")


def test_truncated_data(tmp_path):
    p = tmp_path / "trunc.safetensors"
    write_safetensors(p, {"a": np.zeros(100, np.float32), "b": np.ones(100, np.float32)})
    full = p.read_bytes()
    p.write_bytes(full[:-10])
    e = _expect_error(lambda: SafetensorsFile(p), str(p), "truncated safetensors file",
                      f"header says {len(full)} bytes", f"file has {len(full) - 10}")
    assert "'a'" in str(e) or "'b'" in str(e)


def test_invalid_json(tmp_path):
    p = _raw_file(tmp_path / "json.safetensors", b'{"t": {"dtype": "F32",   ')
    _expect_error(lambda: SafetensorsFile(p), p, "not valid JSON")


def test_header_not_utf8(tmp_path):
    p = _raw_file(tmp_path / "utf.safetensors", b'{"\xff\xfe": 1}  ')
    _expect_error(lambda: SafetensorsFile(p), p, "UTF-8")


def test_header_not_object(tmp_path):
    p = _raw_file(tmp_path / "list.safetensors", b"[1, 2, 3]")
    _expect_error(lambda: SafetensorsFile(p), p, "not an object")


def test_duplicate_header_key(tmp_path):
    h = (b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
         b' "t": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}')
    p = _raw_file(tmp_path / "dup.safetensors", h, b"\0\0")
    _expect_error(lambda: SafetensorsFile(p), p, "duplicate", "'t'")


def test_unknown_dtype(tmp_path):
    h = _good_header()
    h["weird"] = {"dtype": "F7", "shape": [1], "data_offsets": [16, 17]}
    p = _raw_file(tmp_path / "dt.safetensors", h, bytes(17))
    _expect_error(lambda: SafetensorsFile(p), p, "tensor 'weird' has unknown dtype 'F7'")


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}, "needs 24 bytes"),
        ({"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2, 2.0], "data_offsets": [0, 16]}, "invalid shape"),
        ({"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [-4, 12]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [2, 2]}, "lacks data_offsets"),
        ([1, 2], "not an object"),
    ],
)
def test_bad_entry(tmp_path, entry, needle):
    p = _raw_file(tmp_path / "bad.safetensors", {"ok": {"dtype": "U8", "shape": [], "data_offsets": [0, 1]},
                                                  "bad": entry}, bytes(64))
    _expect_error(lambda: SafetensorsFile(p), p, "'bad'", needle)


def test_offsets_past_end_of_file(tmp_path):
    h = {"t": {"dtype": "F32", "shape": [4], "data_offsets": [100, 116]}}
    p = _raw_file(tmp_path / "past.safetensors", h, bytes(16))
    _expect_error(lambda: SafetensorsFile(p), p, "truncated", "'t'")


def test_overlapping_offsets(tmp_path):
    h = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
    }
    p = _raw_file(tmp_path / "ovl.safetensors", h, bytes(20))
    _expect_error(lambda: SafetensorsFile(p), p, "overlap", "'a'", "'b'")


def test_zero_size_tensor_inside_another_is_fine(tmp_path):
    h = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]},
    }
    p = _raw_file(tmp_path / "z.safetensors", h, bytes(16))
    f = SafetensorsFile(p)
    assert f.read("z").shape == (0, 3)


def test_bad_metadata(tmp_path):
    h = {"__metadata__": {"n": 3}, **_good_header()}
    p = _raw_file(tmp_path / "meta.safetensors", h, bytes(16))
    _expect_error(lambda: SafetensorsFile(p), p, "__metadata__")


def test_read_missing_tensor(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"a": np.zeros(2, np.float32)})
    f = SafetensorsFile(p)
    e = _expect_error(lambda: f.read("b"), str(p), "'b'")
    assert isinstance(e, TensorNotFoundError) and isinstance(e, KeyError)
    assert str(e).startswith(str(p))  # not repr()-quoted like a plain KeyError


# --------------------------------------------------------------------------- #
# CheckpointDir
# --------------------------------------------------------------------------- #


def _sharded_checkpoint(d, n_shards: int, per_shard: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    want, weight_map, total = {}, {}, 0
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = {}
        for j in range(per_shard):
            name = f"layers.{s}.w{j}"
            shard[name] = _random_array(rng, ["BF16", "F8_E4M3", "F8_E8M0", "I8", "F32"][j % 5], (3, 4))
            weight_map[name] = fname
            total += shard[name].nbytes
        write_safetensors(os.path.join(d, fname), shard)
        want.update(shard)
    write_index(d, weight_map, total)
    return want, weight_map, total


def test_checkpoint_dir_indexed(tmp_path):
    want, weight_map, total = _sharded_checkpoint(tmp_path, n_shards=11, per_shard=3)
    idx = json.loads((tmp_path / INDEX_NAME).read_text())
    assert idx == {"metadata": {"total_size": total}, "weight_map": weight_map}
    held = []
    with CheckpointDir(tmp_path) as ck:
        assert list(ck.tensors) == list(weight_map)
        assert len(ck.files) == 11
        for name, arr in want.items():  # 11 files > cache size: exercises eviction
            assert ck.tensors[name].file == os.path.join(str(tmp_path), weight_map[name])
            got = ck.read(name)
            _assert_bit_exact(got, arr)
            held.append((got, arr))
        for got, arr in held:  # arrays from evicted files stay valid
            _assert_bit_exact(got, arr)
        e = _expect_error(lambda: ck.read("nope"), str(tmp_path), "'nope'")
        assert isinstance(e, KeyError)
    _assert_bit_exact(*held[0])


def test_checkpoint_dir_single_and_multiple_files_without_index(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a": np.arange(3, dtype=np.int64)})
    ck = CheckpointDir(tmp_path)
    assert ck.keys() == ["a"]
    np.testing.assert_array_equal(ck.read("a"), [0, 1, 2])
    write_safetensors(tmp_path / "extra.safetensors", {"b": np.ones(2, ml_dtypes.bfloat16)})
    ck = CheckpointDir(tmp_path)
    assert set(ck.keys()) == {"a", "b"}
    assert ck.read("b").dtype == np.dtype(ml_dtypes.bfloat16)


def test_checkpoint_dir_missing(tmp_path):
    d = tmp_path / "absent"
    _expect_error(lambda: CheckpointDir(d), str(d), "does not exist")


def test_checkpoint_dir_empty(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _expect_error(lambda: CheckpointDir(tmp_path), str(tmp_path), "no *.safetensors")


def test_checkpoint_dir_index_missing_file(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32)})
    write_index(tmp_path, {"x": "a.safetensors", "y": "gone.safetensors"}, 8)
    _expect_error(lambda: CheckpointDir(tmp_path), INDEX_NAME, "gone.safetensors", "missing")


def test_checkpoint_dir_index_names_absent_tensor(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32)})
    write_index(tmp_path, {"x": "a.safetensors", "ghost": "a.safetensors"}, 8)
    _expect_error(lambda: CheckpointDir(tmp_path), INDEX_NAME, "'ghost'", "a.safetensors")


def test_checkpoint_dir_file_tensor_absent_from_index(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32),
                                                    "stray": np.zeros(1, np.float32)})
    write_index(tmp_path, {"x": "a.safetensors"}, 4)
    _expect_error(lambda: CheckpointDir(tmp_path), INDEX_NAME, "'stray'", "not in index")


def test_checkpoint_dir_error_list_is_capped(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32)})
    wm = {"x": "a.safetensors", **{f"ghost{i:02d}": "a.safetensors" for i in range(25)}}
    write_index(tmp_path, wm, 4)
    e = _expect_error(lambda: CheckpointDir(tmp_path), "25 tensor(s)", "and 5 more", "'ghost00'")
    assert "'ghost24'" not in str(e)


def test_checkpoint_dir_duplicates_without_index(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32)})
    write_safetensors(tmp_path / "b.safetensors", {"x": np.ones(1, np.float32)})
    _expect_error(lambda: CheckpointDir(tmp_path), "'x'", str(tmp_path / "a.safetensors"),
                  str(tmp_path / "b.safetensors"))


def test_checkpoint_dir_bad_shard_names_file(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32)})
    (tmp_path / "b.safetensors").write_bytes(b"junk")
    _expect_error(lambda: CheckpointDir(tmp_path), str(tmp_path / "b.safetensors"))


def test_checkpoint_dir_bad_index_json(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(1, np.float32)})
    (tmp_path / INDEX_NAME).write_text("{not json")
    _expect_error(lambda: CheckpointDir(tmp_path), INDEX_NAME)


# --------------------------------------------------------------------------- #
# Writing: atomicity and validation
# --------------------------------------------------------------------------- #


def _dir_listing(d) -> set[str]:
    return set(os.listdir(d))


def test_write_unsupported_dtype_leaves_nothing(tmp_path):
    p = tmp_path / "out.safetensors"
    tensors = {"good": np.zeros(1000, np.float32), "bad": np.zeros(3, np.complex128)}
    _expect_error(lambda: write_safetensors(p, tensors), str(p), "'bad'", "complex128")
    assert not p.exists()
    assert _dir_listing(tmp_path) == set()


class _ExplodingArray:
    """Looks like an array (dtype/shape) but fails when its data is requested."""

    def __init__(self, tmp_file):
        self.dtype = np.dtype(np.float32)
        self.shape = (4,)
        self.tmp_file = tmp_file
        self.tmp_existed = None

    def __array__(self, dtype=None, copy=None):
        self.tmp_existed = os.path.exists(self.tmp_file)
        raise RuntimeError("device lost mid-write")


def test_write_failure_midway_leaves_no_file(tmp_path):
    p = tmp_path / "out.safetensors"
    boom = _ExplodingArray(str(p) + ".tmp")
    with pytest.raises(RuntimeError, match="mid-write"):
        write_safetensors(p, {"good": np.arange(1000, dtype=np.float32), "boom": boom})
    assert boom.tmp_existed is True  # the failure really happened mid-write
    assert not p.exists()
    assert _dir_listing(tmp_path) == set()


def test_write_failure_keeps_previous_file(tmp_path):
    p = tmp_path / "out.safetensors"
    write_safetensors(p, {"old": np.arange(3, dtype=np.int32)})
    before = p.read_bytes()
    boom = _ExplodingArray(str(p) + ".tmp")
    with pytest.raises(RuntimeError):
        write_safetensors(p, {"new": np.zeros(8, np.float32), "boom": boom})
    assert p.read_bytes() == before
    assert _dir_listing(tmp_path) == {"out.safetensors"}


def test_write_rejects_bad_names_and_metadata(tmp_path):
    p = tmp_path / "x.safetensors"
    _expect_error(lambda: write_safetensors(p, {"__metadata__": np.zeros(1)}), "__metadata__")
    _expect_error(lambda: write_safetensors(p, {1: np.zeros(1)}), str(p))
    _expect_error(lambda: write_safetensors(p, {"a": np.zeros(1)}, metadata={"k": 1}), "metadata")
    assert _dir_listing(tmp_path) == set()


def test_write_index_metadata_and_atomic(tmp_path):
    write_index(tmp_path, {"a": "f.safetensors"}, 123, metadata={"format": "pt"})
    doc = json.loads((tmp_path / INDEX_NAME).read_text())
    assert doc == {"metadata": {"format": "pt", "total_size": 123}, "weight_map": {"a": "f.safetensors"}}
    assert _dir_listing(tmp_path) == {INDEX_NAME}
    with pytest.raises(SafetensorsError):
        write_index(tmp_path, {"a": "f.safetensors"}, -1)
