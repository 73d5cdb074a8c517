#!/usr/bin/env python
"""How long the indexer's top-k takes, and what a sort of 16-bit keys would take instead (issue 4, item 2).

    python scripts/probe_topk.py [--quick]

The index scores are bf16 (spec 2.7), so each score is a 16-bit key. `jax.lax.top_k` on the fp32 upcast sorts
fp32 values with a float comparator. The candidates here give the same indices in the same order (descending
score in fp32 total order, so +0 before -0; equal scores by ascending index):
  * top_k      the model's path (`v4jax.indexer.topk`: visibility mask, fp32 top_k);
  * sort16     a stable sort of (int16 key, int32 position) pairs, first k kept;
  * sort32     one int32 key (16-bit score key << 16 | position), keys only (C <= 65536);
  * two_level  top_k within groups of 4096 entries, then top_k of the groups' candidates;
  * kernel     `pallas_kernels.indexer.gpu.index_topk` (threshold select per row, then a sort of k survivors).
Times are per call from chains of 16 dependent calls in one jit (host dispatch excluded).
Every candidate is checked against top_k on scores with many ties, +-0, -inf and masked entries. The index scores
kernel is timed at the same shapes for scale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from v4jax import bench  # noqa: E402
from v4jax import indexer  # noqa: E402

f32 = jnp.float32


def desc_key16(s):
    """bf16 scores -> int16 keys whose ascending order is the scores' descending fp32 total order."""
    b = jax.lax.bitcast_convert_type(s.astype(jnp.bfloat16), jnp.int16)
    m = b ^ ((b >> 15) & jnp.int16(0x7FFF))          # ascending total order
    return ~m


def visible_mask(C, n_visible, first=0):
    j = jnp.arange(C)
    return (j < jnp.asarray(n_visible)[..., None]) & (j >= jnp.asarray(first)[..., None])


def topk_sort16(s, n_visible, k):
    vis = jnp.broadcast_to(visible_mask(s.shape[-1], n_visible), s.shape)
    key = desc_key16(jnp.where(vis, s, -jnp.inf))
    pos = jnp.broadcast_to(jnp.arange(s.shape[-1], dtype=jnp.int32), s.shape)
    _, idx = jax.lax.sort((key, pos), dimension=-1, num_keys=1, is_stable=True)
    idx = idx[..., :k]
    return jnp.where(jnp.take_along_axis(vis, idx, axis=-1), idx, -1)


def topk_sort32(s, n_visible, k):
    C = s.shape[-1]
    vis = jnp.broadcast_to(visible_mask(C, n_visible), s.shape)
    key = desc_key16(jnp.where(vis, s, -jnp.inf)).astype(jnp.int32)
    comp = (key << 16) | jnp.arange(C, dtype=jnp.int32)
    idx = jax.lax.sort(comp, dimension=-1)[..., :k] & 0xFFFF
    return jnp.where(jnp.take_along_axis(vis, idx, axis=-1), idx, -1)


def topk_two_level(s, n_visible, k, group=4096):
    """top_k within groups of `group` entries, then top_k of the candidates (exact: same indices and order)."""
    R, C = s.shape
    if C <= group or C % group:
        return topk_model(s, n_visible, k)
    vis = visible_mask(C, n_visible)
    v = jnp.where(vis, s.astype(f32), -jnp.inf).reshape(R, C // group, group)
    cv, ci = jax.lax.top_k(v, min(k, group))                              # [R, G, k]
    ci = ci + (jnp.arange(C // group, dtype=jnp.int32) * group)[None, :, None]
    _, j = jax.lax.top_k(cv.reshape(R, -1), k)
    idx = jnp.take_along_axis(ci.reshape(R, -1), j, axis=-1)
    return jnp.where(jnp.take_along_axis(vis, idx, axis=-1), idx, -1)


def topk_kernel(s, n_visible, k):
    from pallas_kernels.indexer import gpu
    return gpu.index_topk(s, n_visible, k, interpret=jax.default_backend() == "cpu")


def select_only(s, n_visible, k):
    from pallas_kernels.indexer import gpu
    nv = jnp.broadcast_to(n_visible, s.shape[:1])
    keys, pos = gpu._select(s, nv, jnp.zeros_like(nv), k, from_scores=True, max_group=gpu.TOPK_MAX_GROUP,
                            interpret=jax.default_backend() == "cpu")
    return keys + pos


def sort_only(s, n_visible, k):
    comp = jax.lax.bitcast_convert_type(s[:, :k], jnp.int16).astype(jnp.int32) & 0x3FFFFFF
    return jax.lax.sort(comp, dimension=-1)


def kernel_variant(**kw):
    def fn(s, n_visible, k):
        from pallas_kernels.indexer import gpu
        return gpu.index_topk(s, n_visible, k, interpret=jax.default_backend() == "cpu", **kw)
    return fn


def topk_model(s, n_visible, k):
    return indexer.topk(s, n_visible, k)


def scores_with_ties(key, R, C, nvis):
    k1, k2 = jax.random.split(key)
    s = jax.random.randint(k1, (R, C), -6, 40).astype(f32) * 0.25       # many ties
    z = jax.random.bernoulli(k2, 0.1, (R, C))
    s = jnp.where(z, jnp.where(jax.random.bernoulli(k1, 0.5, (R, C)), 0.0, -0.0), s)
    return s.astype(jnp.bfloat16), jnp.asarray(nvis, jnp.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma list of candidates to run (default: all)")
    a = ap.parse_args(argv)
    print(f"devices {jax.devices()}", flush=True)
    cands = {"top_k": topk_model, "sort16": topk_sort16, "sort32": topk_sort32, "two_level": topk_two_level,
             "kernel": topk_kernel, "kernel: select": select_only, "kernel: final sort": sort_only}
    if not a.quick:
        cands.update({"kernel radix 4": kernel_variant(radix=4), "kernel g8192": kernel_variant(max_group=8192),
                      "kernel g4096": kernel_variant(max_group=4096), "kernel g2048": kernel_variant(max_group=2048)})
    if a.only:
        cands = {n: f for n, f in cands.items() if n in a.only.split(",")}
    bad = 0
    # correctness
    for R, C, k, nv in [(3, 2048, 512, [2048, 700, 100]), (2, 73728, 512, [73728, 65537]), (1, 4096, 1024, [1500]),
                        (1, 262144, 512, [200000]), (300, 2048, 512, list(range(0, 3000, 10)))][:1 if a.quick else 9]:
        s, nvis = scores_with_ties(jax.random.PRNGKey(C), R, C, nv)
        ref = np.asarray(jax.jit(topk_model, static_argnums=2)(s, nvis, k))
        for name, fn in cands.items():
            if name.startswith("kernel:") or name.startswith("kernel "):
                continue
            if name == "sort32" and C > 65536:
                continue
            got = np.asarray(jax.jit(fn, static_argnums=2)(s, nvis, k))
            ok = np.array_equal(got, ref)
            bad += not ok
            print(f"check {name} R={R} C={C} k={k}: {'ok' if ok else 'MISMATCH'}"
                  + ("" if ok else f" first diff at {np.argwhere(got != ref)[:3].tolist()}"), flush=True)
    shapes = [(1, 2048, 512), (32, 2048, 512), (64, 16384, 512), (1, 262144, 512), (1, 262144, 1024),
              (64, 32768, 1024), (8192, 2048, 512), (4096, 16384, 512)]
    if a.quick:
        shapes = shapes[:2]
    print("| rows | C | k | " + " | ".join(f"{n} us" for n in cands) + " | index scores us |", flush=True)
    print("|---|---|---|" + "---|" * (len(cands) + 1), flush=True)
    from pallas_kernels import indexer as ix
    for R, C, k in shapes:
        key = jax.random.PRNGKey(R + C)
        s = jax.random.normal(key, (R, C), f32).astype(jnp.bfloat16)
        nvis = jnp.full((R,), C, jnp.int32)
        row = []
        for name, fn in cands.items():
            if name == "sort32" and C > 65536:
                row.append("-")
                continue
            t, err = bench._try_time(jax.jit(bench.topk_chain(lambda x, nv, fn=fn, k=k: fn(x, nv, k))), [(s, nvis)])
            row.append(f"{t * 1e6 / 16:.1f}" if t else err)
        # the scores kernel at this shape: rows = B*S queries; decode (R <= 64) as B=R, S=1; prefill B=1, S=R
        B, S = (R, 1) if R <= 64 else (1, R)
        q = jax.random.normal(key, (B, S, 64, 128), f32).astype(jnp.bfloat16)
        w = jax.random.normal(key, (B, S, 64), f32).astype(jnp.bfloat16)
        keys = jax.random.normal(key, (B, C, 128), f32).astype(jnp.bfloat16)
        t, err = bench._try_time(jax.jit(lambda *x: ix.index_scores(*x)), [(q, w, keys)])
        row.append(f"{t * 1e6:.1f} (one call)" if t else err)
        print(f"| {R} | {C} | {k} | " + " | ".join(row) + " |", flush=True)
    print("checks failed:", bad, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
