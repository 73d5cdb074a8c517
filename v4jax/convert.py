"""Checkpoint conversion: python -m v4jax.convert

  python -m v4jax.convert SRC DST [--dtype native|bf16|fp8]     HF (or v4jax Orbax) dir -> v4jax Orbax dir
  python -m v4jax.convert SRC DST --format hf                    v4jax Orbax (or HF) dir -> the official HF layout
  python -m v4jax.convert --random CONFIG --to DIR [--seed N] [--layers N]
                                                                 a random checkpoint in the official HF layout

Both directions stream one block (layer) at a time, so host memory stays near one block (plus one HF shard when
writing HF). HF -> Orbax (native) -> HF gives back every tensor byte for byte; bf16/fp8-held weights are
re-quantized to the official formats with the reference's scale rules (the values survive exactly). Outputs are
written into a hidden temporary directory beside DST and renamed when complete; on any error nothing is left.

`--random CONFIG` takes a preset name (`tiny`, `flash`, ...) or a config.json (or a directory holding one);
`--layers N` keeps the first N layers (and the MTP block) of it, e.g. a few full-width Flash layers. Values have the
scales of `params.init_params` (activations stay O(1)); every official tensor has its own PRNG key (the seed
folded with the CRC32 of its name), so the result is deterministic and independent of the order of the work.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint as C
from . import params as P
from . import quant
from .config import PRESETS, ConfigError, ModelConfig
from .safetensors_io import SafetensorsError, write_index, write_safetensors


# ---- conversion ----------------------------------------------------------------------------------------
def convert(src: str, dst: str, *, format: str = "orbax", dtype: str = "native", max_shard_bytes: int = 4 << 30,
            progress: bool | None = None) -> None:
    """SRC (HF or v4jax Orbax directory) -> DST as a v4jax Orbax directory holding `dtype`, or as HF."""
    if format not in ("orbax", "hf"):
        raise ValueError(f"format must be 'orbax' or 'hf', got {format!r}")
    C._check_dtype(dtype)
    if format == "hf" and dtype != "native":
        raise ValueError("--dtype applies to --format orbax; an HF checkpoint always holds the official formats")
    if os.path.exists(dst):
        raise C.CheckpointError(f"{dst}: already exists; refusing to overwrite")
    cfg, blocks = C.iter_blocks(src, dtype, progress=progress)
    if format == "orbax":
        C.write_orbax(cfg, dtype, blocks, dst, tokenizer_dir=src)
    else:
        C.write_hf(cfg, (C.official_view(flat) for _, flat in blocks), dst, max_shard_bytes=max_shard_bytes,
                   tokenizer_dir=src)


# ---- random official-format checkpoints ----------------------------------------------------------------
def truncate_layers(cfg: ModelConfig, n: int) -> ModelConfig:
    """The first n layers of `cfg` (same widths), keeping the MTP entries of compress_ratios."""
    if not 1 <= n <= cfg.n_layers:
        raise ValueError(f"--layers must be in 1..{cfg.n_layers}, got {n}")
    ratios = cfg.compress_ratios[:n] + cfg.compress_ratios[cfg.n_layers:]
    return cfg.replace(num_hidden_layers=n, compress_ratios=ratios, num_hash_layers=min(cfg.num_hash_layers, n))


def random_config(spec: str, layers: int | None = None) -> ModelConfig:
    """A preset name or a config.json path (or a directory holding one), optionally cut to `layers` layers."""
    if spec in PRESETS:
        cfg = ModelConfig.preset(spec)
    elif os.path.exists(spec):
        cfg = ModelConfig.from_hf(spec)
    else:
        raise ConfigError(f"{spec}: neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json path")
    return truncate_layers(cfg, layers) if layers is not None else cfg


_BUCKETS = (1 << 10, 1 << 13, 1 << 16, 1 << 20)    # standard-normal chunk sizes: one compile each


@functools.partial(jax.jit, static_argnums=1)
def _normal_chunks(keys, size: int):
    return jax.vmap(lambda k: jax.random.normal(k, (size,), jnp.float32))(keys)


_fold_in = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


def _std_normal(keys, shape: tuple[int, ...]) -> jax.Array:
    """Standard normals [len(keys), *shape] (float32, on the default device), one tensor per key, from
    fixed-size chunks so that a handful of compiled generators serve every shape; piece i of a tensor comes
    from fold_in(key, i). A tensor's values depend only on its key (not on how many are made at once)."""
    n = math.prod(shape)
    size = next((b for b in _BUCKETS if b >= n), _BUCKETS[-1])
    parts = [_normal_chunks(_fold_in(keys, i), size) for i in range(-(-n // size))]
    flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return flat[:, :n].reshape((len(keys),) + tuple(shape))


@functools.partial(jax.jit, static_argnames=("storage",))
def _quantized_normal(z, storage: str):
    """FP8/FP4 weight from standard normals: N(0, 1/fan_in), quantized with the reference's rules."""
    w = z / math.sqrt(z.shape[-1])
    return quant.quantize_fp8_weight(w) if storage == "fp8" else quant.quantize_fp4_weight(w)


def _init_host(cfg: ModelConfig, p: P.Param, key) -> np.ndarray:
    """The value of one unquantized tensor, with the scales of `params.init_params` (see params._init_value)."""
    if p.init == "ones":
        return np.ones(p.shape, np.float32)
    if p.init == "zeros":
        return np.zeros(p.shape, np.float32)
    if p.init == "hash":                                # k distinct experts per token id: top-k of random scores
        V, k = p.shape
        scores = np.asarray(_std_normal(key[None], (V, cfg.n_routed_experts))[0])
        return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)
    scales = {"normal": 1 / math.sqrt(p.shape[-1]), "embed": 1.0, "small": 0.1 / math.sqrt(p.shape[-1]),
              "hc_base": 0.5, "sink": 1.0, "hc_scale": 0.1}
    if p.init not in scales:
        raise ValueError(f"random checkpoint: initializer {p.init!r} is not known to v4jax.convert")
    scale = scales[p.init]
    z = np.asarray(_std_normal(key[None], p.shape)[0])
    return (z * np.float32(scale) + np.float32(1.0 if p.init == "hc_scale" else 0.0)).astype(np.float32)


def _key(root, name: str):
    return jax.random.fold_in(root, zlib.crc32(name.encode()))


def random_tensors(cfg: ModelConfig, name: str, p: P.Param, root, max_chunk_bytes: int = 2 << 30
                   ) -> dict[str, np.ndarray]:
    """The official tensors (host numpy) of one declared parameter of a random checkpoint; every official
    tensor (each expert's too) has its own key: fold_in(root, crc32(official weight name))."""
    leaves = list(P.stored_leaves(name, p, "native"))
    m = C._EXPERT.match(name)
    if not m:
        key = _key(root, name)
        if p.storage in ("fp8", "fp4"):
            return dict(zip(leaves, (a[0] for a in _random_quantized(p, key[None]))))
        v = _init_host(cfg, p, key)
        if p.storage == "i32":
            return {name: v.astype(np.int64)}            # tid2eid: I64 in the files
        return {name: v.astype(P.DTYPES[p.storage])}
    # routed experts: one tensor and key per expert, made `chunk` experts at a time
    E, pe = p.shape[0], P.Param(p.shape[1:], p.storage, p.axes[1:], p.init)
    per = 16 * math.prod(pe.shape)                       # float32 value plus the quantizer's temporaries
    chunk = max(c for c in range(1, E + 1) if E % c == 0 and (c == 1 or c * per <= max_chunk_bytes))
    parts = [C._EXPERT.match(leaf) for leaf in leaves]
    out: dict[str, np.ndarray] = {}
    for e0 in range(0, E, chunk):
        names = [[f"{m['pre']}.{e}.{q['w']}.{q['kind']}" for q in parts] for e in range(e0, e0 + chunk)]
        keys = jnp.stack([_key(root, n[0]) for n in names])
        if p.storage in ("fp8", "fp4"):
            res = _random_quantized(pe, keys)
        else:
            z = np.asarray(_std_normal(keys, pe.shape))
            res = [(z / np.float32(math.sqrt(pe.shape[-1]))).astype(P.DTYPES[p.storage])]
        for i in range(chunk):
            out.update({n: r[i] for n, r in zip(names[i], res)})
    return out


def _random_quantized(p: P.Param, keys) -> list[np.ndarray]:
    """(weight, scale) stacks [len(keys), ...] as host arrays."""
    return [np.asarray(a) for a in _quantized_normal(_std_normal(keys, p.shape), p.storage)]


def random_block(cfg: ModelConfig, names: list[str], root) -> dict[str, np.ndarray]:
    """The official tensors (host numpy) of one block of a random checkpoint."""
    decl = P.declare(cfg)
    out: dict[str, np.ndarray] = {}
    for name in names:
        out.update(random_tensors(cfg, name, decl[name], root))
    return out


def write_random(cfg: ModelConfig, path: str, *, seed: int = 0, progress: bool | None = None) -> None:
    """Write a random checkpoint in the official layout: one safetensors file per block, generated and written
    one block at a time (host memory: about one block)."""
    root = jax.random.key(seed)
    groups = C._groups(cfg)
    inv = C.official_inventory(cfg)
    total = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in inv.values())
    prog = C.Progress("random", len(inv), total, progress)
    weight_map: dict[str, str] = {}
    try:
        with C._atomic_dir(path) as tmp:
            for i, (_, names) in enumerate(groups):
                tensors = random_block(cfg, names, root)
                fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                write_safetensors(os.path.join(tmp, fname), tensors, metadata={"format": "pt"})
                weight_map.update({n: fname for n in tensors})
                prog.update(len(tensors), sum(a.nbytes for a in tensors.values()))
                del tensors
            write_index(tmp, weight_map, total)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg.to_hf(), f, indent=2)
    finally:
        prog.close()


# ---- command line --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m v4jax.convert", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:6]))
    ap.add_argument("src", nargs="?", help="HF or v4jax Orbax checkpoint directory")
    ap.add_argument("dst", nargs="?", help="output directory (must not exist)")
    ap.add_argument("--format", choices=("orbax", "hf"), default="orbax", help="output kind (default: orbax)")
    ap.add_argument("--dtype", choices=C.DTYPES, default="native",
                    help="weights in an Orbax output: native (FP8/FP4 + E8M0), bf16, or fp8 (FP4 experts as FP8)")
    ap.add_argument("--max-shard-gb", type=float, default=4.0, help="HF output: largest shard file (GB)")
    ap.add_argument("--random", metavar="CONFIG", help="write a random checkpoint of CONFIG (preset or config.json)")
    ap.add_argument("--to", metavar="DIR", help="output directory of --random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="--random: keep the first N layers (and MTP)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="a progress line on stderr (default: when stderr is a terminal)")
    args = ap.parse_args(argv)
    try:
        if args.random is not None:
            if not args.to or args.src or args.dst:
                ap.error("--random CONFIG needs --to DIR and no SRC/DST")
            write_random(random_config(args.random, args.layers), args.to, seed=args.seed, progress=args.progress)
            print(f"wrote {args.to}")
            return 0
        if not args.src or not args.dst:
            ap.error("need SRC and DST (or --random CONFIG --to DIR)")
        convert(args.src, args.dst, format=args.format, dtype=args.dtype,
                max_shard_bytes=int(args.max_shard_gb * (1 << 30)), progress=args.progress)
        print(f"wrote {args.dst}")
        return 0
    except (C.CheckpointError, ConfigError, SafetensorsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
