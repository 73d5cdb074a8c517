"""Compile-only probe of the prefill's temporary memory (XLA's memory analysis) against the layer count and the
token chunk size: `python scripts/probe_prefill_memory.py --layers 4,8,16 --case 8x8192 --chunks 8192,0`.

No weights are allocated (abstract parameters), so it runs at Flash size on any device. A temp size that grows
with the layer count means per-layer buffers are alive at the same time (they should not be: the layers run one
after the other). `--zeros` swaps in the variant of v4jax.chunks.token_chunks that allocates its output buffers as
zeros up front (for comparison with the default)."""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def zeros_token_chunks(fn, chunk, *arrays):
    S = arrays[0].shape[1]
    if chunk <= 0 or chunk >= S:
        return fn(0, *arrays)
    n, tail = divmod(S, chunk)
    take = lambda a, s0, c: jax.lax.dynamic_slice_in_dim(a, s0, c, axis=1)
    shapes = jax.eval_shape(lambda *a: fn(jnp.int32(0), *a), *[take(a, 0, chunk) for a in arrays])
    bufs = jax.tree.map(lambda s: jnp.zeros((s.shape[0], S) + s.shape[2:], s.dtype), shapes)

    def body(i, bufs):
        out = fn(i * chunk, *[take(a, i * chunk, chunk) for a in arrays])
        return jax.tree.map(lambda b, o: jax.lax.dynamic_update_slice_in_dim(b, o, i * chunk, axis=1), bufs, out)
    bufs = jax.lax.fori_loop(0, n, body, bufs)
    if tail:
        out = fn(n * chunk, *[a[:, n * chunk:] for a in arrays])
        bufs = jax.tree.map(lambda b, o: b.at[:, n * chunk:].set(o), bufs, out)
    return bufs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flash")
    ap.add_argument("--layers", default="4,8")
    ap.add_argument("--case", default="8x8192")
    ap.add_argument("--chunks", default="8192")
    ap.add_argument("--mesh", default="expert=1")
    ap.add_argument("--zeros", action="store_true")
    ap.add_argument("--cpu-devices", type=int, default=None)
    ap.add_argument("--fp4-layout", default="checkpoint",
                    help="comma list of checkpoint / kernel / kernel-unfused (params.to_kernel_layout)")
    a = ap.parse_args()
    if a.cpu_devices:
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    from v4jax import attention, model, params as P, sharding as SH, xla_flags
    from v4jax.bench_full import make_config
    xla_flags.apply_defaults()
    if a.zeros:
        attention.token_chunks = model.token_chunks = zeros_token_chunks
    B, S = (int(v) for v in a.case.split("x"))
    for L in (int(v) for v in a.layers.split(",")):
        cfg = make_config(a.model, L)
        mesh = SH.make_mesh(a.mesh)
        with jax.set_mesh(mesh):
            shard = SH.param_shardings(cfg, mesh, "native", SH.rules_with(None))
            ap_ = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                               P.abstract_params(cfg, "native"), shard)
            toks = jax.ShapeDtypeStruct((B, S), jnp.int32,
                                        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            for layout, ct in ((lay, int(v)) for lay in a.fp4_layout.split(",") for v in a.chunks.split(",")):
                pl = ap_ if layout == "checkpoint" else P.to_kernel_layout(ap_, fuse_gate_up=layout == "kernel")
                t = time.time()
                m = model._prefill.lower(cfg, pl, toks, S + 1, True, ct).compile().memory_analysis()
                print(f"{a.model} layers={L} mesh={a.mesh} {B}x{S} chunk={ct} {layout}: temp "
                      f"{m.temp_size_in_bytes / 2**30:.2f} GiB, args {m.argument_size_in_bytes / 2**30:.2f} GiB "
                      f"(compile {time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
