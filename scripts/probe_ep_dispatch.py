#!/usr/bin/env python
"""Expert-parallel token exchange: the model's all-gather + reduce-scatter against ragged_all_to_all (issue 5).

    python scripts/probe_ep_dispatch.py [--tokens 4096,16384] [--dim 4096] [--experts 256] [--topk 6] [--json F]

On every visible device (one mesh axis "expert"; 2 x H200 with `nvidia-h200-x2`), with T tokens per device, hidden
`dim` bf16 activations and top-k routing drawn uniformly over `experts` experts split evenly over the devices, it
times the exchange around the expert computation (left out: the stand-ins below are one elementwise op), as the
MoE layer would run it inside `jax.shard_map`:

  gather  (`moe.routed_sum_expert_parallel`): all_gather the tokens [T, dim] bf16 and their ids over `expert`; each
          device computes its partial sums for all n*T tokens (stand-in: x * number of its experts among the token's
          top-k); psum_scatter of the fp32 partial sums back to the tokens' owners.
  a2a     ragged_all_to_all: each device sorts its tokens by the devices that own at least one of their experts
          (a token goes to each such device once), exchanges the per-destination counts (all_to_all), sends the rows
          (bf16), the receiver "computes" (stand-in: fp32 copy) and sends fp32 rows back with a second
          ragged_all_to_all; the owner adds them into its tokens (scatter-add).

Both stand-ins make the result a known multiple of x (k for gather, the number of destination devices for a2a);
the script checks it. Bytes per device: gather receives (n-1) T dim (2 + 4) bytes; a2a sends and receives the
token copies for other devices, T (n-1)/n (1 - (1 - 1/n)^k) dim (2 + 4) bytes on average.
ragged_all_to_all is not implemented on XLA:CPU ("UNIMPLEMENTED: HLO opcode `ragged-all-to-all`"), so the a2a
variant runs on GPUs only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from v4jax import bench  # noqa: E402

f32 = jnp.float32


def _excl_cumsum(v):
    return jnp.concatenate([jnp.zeros((1,), v.dtype), jnp.cumsum(v)[:-1]])


def make_fns(n: int, e_loc: int):
    def gather(x, ids):
        xa = jax.lax.all_gather(x, "expert", axis=0, tiled=True)                   # [n T, d]
        ia = jax.lax.all_gather(ids, "expert", axis=0, tiled=True)
        mine = jnp.sum(ia // e_loc == jax.lax.axis_index("expert"), axis=-1).astype(f32)
        y = xa.astype(f32) * mine[:, None]                                          # stand-in for the experts
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)  # [T, d] fp32

    def a2a(x, ids):
        T = x.shape[0]
        me = jax.lax.axis_index("expert")
        hit = jnp.any((ids // e_loc)[:, :, None] == jnp.arange(n)[None, None, :], axis=1)     # [T, n]
        sizes = jnp.sum(hit, axis=0).astype(jnp.int32)                                          # rows per dest
        dest = jnp.where(hit.T, jnp.arange(n, dtype=jnp.int32)[:, None], n).reshape(-1)       # [n T]
        order = jnp.argsort(dest, stable=True)
        tok = (order % T).astype(jnp.int32)                                                     # row -> token
        buf = x[tok]                                                                            # [n T, d]
        allsz = jax.lax.all_gather(sizes, "expert")                                             # [src, dst]
        recv = allsz[:, me]                                                                     # from each src
        src = jnp.arange(n)[:, None]
        out_off = jnp.sum(jnp.where(src < me, allsz, 0), axis=0).astype(jnp.int32)            # my chunk at dst
        got = jax.lax.ragged_all_to_all(buf, jnp.zeros((n * T,) + x.shape[1:], x.dtype), _excl_cumsum(sizes),
                                        sizes, out_off, recv, axis_name="expert")
        y = got.astype(f32)                                                                     # stand-in
        # back: my chunk for src s goes to where s sent it from (s's exclusive cumsum of its sizes, at me)
        back_off = jnp.sum(jnp.where(jnp.arange(n)[None, :] < me, allsz, 0), axis=1).astype(jnp.int32)
        ret = jax.lax.ragged_all_to_all(y, jnp.zeros((n * T,) + x.shape[1:], f32), _excl_cumsum(recv), recv,
                                        back_off, sizes, axis_name="expert")
        valid = (jnp.arange(n * T) < jnp.sum(sizes))[:, None]
        return jnp.zeros((T,) + x.shape[1:], f32).at[tok].add(jnp.where(valid, ret, 0))

    return gather, a2a


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384", help="tokens per device")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("expert",))
    e_loc = args.experts // n
    log, lines = bench.line_logger()
    log(f"{n} x {jax.devices()[0].device_kind}; dim {args.dim}, {args.experts} experts top-{args.topk}")
    log("| tokens/device | scheme | ms | MB sent+received per device | GB/s per device | check |")
    log("|---|---|---|---|---|---|")
    gather, a2a = make_fns(n, e_loc)
    rows = []
    with jax.set_mesh(mesh):
        for T in (int(t) for t in args.tokens.split(",")):
            k1, k2 = jax.random.split(jax.random.key(T))
            x = jax.random.normal(k1, (n * T, args.dim), jnp.bfloat16)
            ids = jnp.argsort(jax.random.uniform(k2, (n * T, args.experts)), axis=-1)[:, : args.topk].astype(jnp.int32)
            sh = NamedSharding(mesh, P("expert"))
            x, ids = jax.device_put(x, sh), jax.device_put(ids, sh)
            hit = np.asarray(jnp.any((ids // e_loc)[:, :, None] == jnp.arange(n), axis=1))
            own = np.repeat(np.arange(n), T)
            copies = int(hit.sum() - hit[np.arange(n * T), own].sum())        # rows sent to other devices
            for name, fn, mult, nbytes in (
                    ("gather", gather, np.full(n * T, args.topk), (n - 1) * T * args.dim * 6),
                    ("a2a", a2a, hit.sum(1), copies / n * args.dim * 6)):
                f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("expert"), P("expert")), out_specs=P("expert"),
                                          check_vma=False))
                try:
                    y = f(x, ids)
                    err = float(jnp.max(jnp.abs(y - x.astype(f32) * jnp.asarray(mult, f32)[:, None])))
                    t = bench.time_fn(f, [(x, ids)], max_total_s=1.0)
                except Exception as e:  # noqa: BLE001
                    log(f"| {T} | {name} | {type(e).__name__}: {str(e).splitlines()[0][:100]} | | | |")
                    continue
                log(f"| {T} | {name} | {t * 1e3:.3f} | {nbytes / 1e6:.0f} | {nbytes / t / 1e9:.0f} | "
                    f"{'ok' if err == 0 else f'max err {err:.1e}'} |")
                rows.append(dict(tokens=T, scheme=name, s=t, bytes=nbytes, err=err))
    if args.json:
        Path(args.json).write_text(json.dumps({"lines": lines, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
