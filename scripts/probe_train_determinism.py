#!/usr/bin/env python
"""Is the training step bitwise reproducible on this device? Runs `bench train`'s step (v4jax.train's compiled
step, AdamW) from one initial state twice, for --steps steps each, and compares every leaf of the two final
states and the per-step losses bit for bit.

    python scripts/probe_train_determinism.py [--size 1b] [--steps 3] [--seq-len 4096] [--batch 2]
    python scripts/probe_train_determinism.py --size tiny --seq-len 256    # a CPU check of the script

Exact resume (same losses after a kill and a restart) needs a deterministic step: fp32 atomics (the list-based
sparse-attention backward's dKV, XLA scatter-adds with repeated indices) make the last bits of a GPU step depend on
thread timing. The report lists the leaves that differ, so the source can be found.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4jax.xla_flags import apply_defaults  # noqa: E402

apply_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from v4jax import bench_train as BT  # noqa: E402
from v4jax import params as P  # noqa: E402
from v4jax import train as T  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b", choices=sorted(BT.SIZES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--optimizer", default="adamw")
    args = ap.parse_args(argv)
    cfg = BT.model_for(args.size)
    flat = P.flatten(jax.jit(lambda k: P.init_params(cfg, k, dtype="bf16"))(jax.random.key(0)))
    spec = BT._spec(cfg, args.optimizer, 1)
    tx, sched = T.build_optimizer(spec, {n: flat[n].astype(jnp.float32) for n in spec.trainable})
    batch = BT._batch(cfg, 1, args.batch, args.seq_len)
    step = jax.jit(T.make_train_step(spec, tx, sched))
    make = jax.jit(lambda f: BT._state(spec, f, tx))

    def trajectory():
        s, losses = make(flat), []
        for _ in range(args.steps):
            s, m = step(s, batch)
            losses.append(np.asarray(m["loss"]))
        return jax.block_until_ready(s), losses

    a, la = trajectory()
    b, lb = trajectory()
    print(f"device {jax.devices()[0].device_kind}, size {args.size}, {args.steps} steps of {args.batch} x "
          f"{args.seq_len} tokens, {args.optimizer}")
    print("losses run 1:", [f"{float(x):.9g}" for x in la])
    print("losses run 2:", [f"{float(x):.9g}" for x in lb])
    diff = []
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    for (path, x), y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        if x.tobytes() != y.tobytes():
            n = int(np.sum(x != y)) if x.shape == y.shape else -1
            diff.append((jax.tree_util.keystr(path), n, x.size))
    same_loss = all(x.tobytes() == y.tobytes() for x, y in zip(la, lb))
    print(f"losses bitwise equal: {same_loss}; state leaves differing: {len(diff)} of {len(leaves_b)}")
    for name, n, size in sorted(diff, key=lambda t: -t[1])[:40]:
        print(f"  {name}: {n} of {size} elements differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
