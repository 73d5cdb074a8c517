"""`python -m v4jax.bench full`: a complete V4 model (Flash or Pro) at its real size, native FP8/FP4 weights generated
on the devices (random, the official layout, scales that keep activations O(1)), experts split over `expert`;
prefill and decode throughput, memory, KV-cache bytes per token and the decode bandwidth floor.

    python -m v4jax.bench full --model flash --mesh expert=2            # 2 x H200 (issue 9)
    python -m v4jax.bench full --model pro --mesh expert=8              # 8 x H200 (issue 10)
    python -m v4jax.bench full --model tiny --mesh expert=2 --cpu-devices 2   # a CPU dry run of the code path

What is measured
* weights: bytes held per device after generation, against the checkpoint's own size (abstract inventory).
* prefill B x S: `model.prefill` on the prompt (micro-batches of at most --prefill-tokens tokens per call);
  prefill tokens/s.
* decode B x ctx: --steps greedy tokens from a cache at position ctx, in one on-device loop of `decode_step`;
  time per output token, output tokens/s. The cache is the production layout (kv_cache_format "fp8": FP8 entries
  + bf16 RoPE dims + UE8M0 scales, FP4 indexer keys), filled with random entries of that format (encoded by the
  model's own `store_kv` / `store_keys`) up to ctx -- not by a prefill of ctx tokens; this is said in the output.
* floor: the bytes one decode step must read -- every non-expert weight, the routed experts the batch touches
  (expected number of distinct experts under uniform routing, E (1 - (1 - k/E)^B) per layer), and the cache rows the
  step reads (window, top-k CSA entries, all indexer keys, all HCA entries) -- divided by the measured copy
  bandwidth of one device times the number of devices; also the floor with the non-expert weights replicated on
  every device (what this sharding can reach).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial


def _parse_cases(s: str) -> list[tuple[int, int]]:
    """"1x8K,32x64K" -> [(1, 8192), (32, 65536)]; "" -> []. A malformed case raises one ValueError naming it."""
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)x(\d+)([km]?)", part.lower())
        if not m:
            raise ValueError(f"bench full: case {part!r} is not BATCHxTOKENS (e.g. 1x8K, 32x64K, 1x1M)")
        out.append((int(m[1]), int(m[2]) * {"k": 1024, "m": 1 << 20, "": 1}[m[3]]))
    return out


def _fmt_tok(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    if p is None:
        p = argparse.ArgumentParser(prog="python -m v4jax.bench full", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flash", help="preset: flash | pro | tiny | tiny-pro")
    p.add_argument("--mesh", default=None, help="mesh spec (default: expert=<all devices>)")
    p.add_argument("--prefill", default="1x8K,8x8K,1x64K", help="prefill cases BxS, comma-separated")
    p.add_argument("--decode", default="1x8K,8x8K,32x8K,1x64K,1x1M", help="decode cases Bxctx")
    p.add_argument("--steps", type=int, default=128, help="decode steps per case")
    p.add_argument("--prefill-tokens", type=int, default=65536, help="at most this many tokens per prefill call")
    p.add_argument("--chunk-tokens", type=int, default=8192,
                   help="tokens per chunk of each block's per-token work inside a prefill call (0: unchunked)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (a quicker, partial run)")
    p.add_argument("--rules", default=None,
                   help="override sharding.RULES, e.g. q_heads=expert,o_groups=expert,heads=expert (attention "
                        "heads split over the expert devices: Pro on 8 GPUs holds 110 GiB/GPU instead of 124)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds; cases that would start later are skipped")
    p.add_argument("--threads", type=int, default=8, help="parallel compilations")
    p.add_argument("--cpu-devices", type=int, default=None, help="CPU dry run with this many host devices")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp4-layout", choices=("kernel", "kernel-unfused", "checkpoint"), default="kernel",
                   help="routed experts as params.to_kernel_layout leaves them (FP4 halves layout, w1/w3 joined: "
                        "the default), the same without joining w1/w3 (fuse_gate_up=False), or as in the checkpoint")
    p.add_argument("--profile", default=None,
                   help="directory: trace one more prefill call and 4 more decode steps of every case with the JAX "
                        "profiler and print the kernels that take the time (v4jax.profiling)")
    return p


PROFILE_STEPS = 4


def _profile(root, name, exe, args, steps, log):
    """Trace one call exe(*args) (`steps` decode steps, or one prefill call) with the JAX profiler and log the
    kernel table and the per-source-line table (the HLO text is kept beside the trace)."""
    import jax
    from . import profiling
    d = os.path.join(root, name)
    try:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            out = exe(*args)
            jax.block_until_ready(out)
            wall = time.perf_counter() - t0
        del out
        for line in profiling.report(d, exe.as_text(), steps=steps, wall_s=wall):
            log(line)
    except Exception as e:  # noqa: BLE001 - profiling is a diagnostic; the measurement stands without it
        log(f"profile {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def make_config(name: str, layers: int | None):
    from .config import ModelConfig
    cfg = ModelConfig.preset(name, kv_cache_format="fp8")
    if layers is not None and layers < cfg.n_layers:
        ratios = tuple(cfg.compress_ratios[:layers]) + tuple(cfg.compress_ratios[cfg.n_layers:])
        cfg = cfg.replace(num_hidden_layers=layers, compress_ratios=ratios,
                          num_hash_layers=min(cfg.num_hash_layers, layers))
    return cfg


# ---- bytes -------------------------------------------------------------------------------------------
def weight_bytes(cfg) -> dict:
    """Checkpoint bytes of the native params: total, routed experts (per layer, per expert), the rest."""
    from . import params as P
    flat = P.abstract_flat(cfg, "native")
    total = sum(v.size * v.dtype.itemsize for v in flat.values())
    experts = {k: v.size * v.dtype.itemsize for k, v in flat.items() if ".ffn.experts." in k}
    exp_total = sum(experts.values())
    n_moe = cfg.n_layers + cfg.n_mtp
    per_expert = exp_total / (n_moe * cfg.n_routed_experts)
    mtp = sum(v.size * v.dtype.itemsize for k, v in flat.items() if k.startswith("mtp.") and ".ffn.experts." not in k)
    return {"total": total, "experts": exp_total, "per_expert": per_expert, "dense": total - exp_total,
            "dense_no_mtp": total - exp_total - mtp}


def decode_step_bytes(cfg, B: int, ctx: int) -> dict:
    """Bytes one decode step of B sequences at position ctx must read (see the module doc)."""
    from . import attention, indexer
    wb = weight_bytes(cfg)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = E * (1.0 - (1.0 - k / E) ** B)
    experts = cfg.n_layers * touched * wb["per_expert"]
    kvb, keyb = attention.kv_bytes(cfg), indexer.key_bytes(cfg)
    cache = 0.0
    for layer in range(cfg.n_layers):
        m = cfg.ratio(layer)
        rows = min(ctx, cfg.sliding_window)
        if m == 4:
            rows += min(ctx // 4, cfg.index_topk)
            cache += (ctx // 4) * keyb
        elif m == 128:
            rows += ctx // 128
        cache += rows * kvb
    return {"dense": wb["dense_no_mtp"], "experts": experts, "cache": B * cache,
            "total": wb["dense_no_mtp"] + experts + B * cache}


# ---- state -------------------------------------------------------------------------------------------
def random_cache(cfg, B: int, ctx: int, max_len: int, key):
    """A decode cache at position ctx whose entries are random values stored in cfg.kv_cache_format."""
    import jax
    import jax.numpy as jnp
    from . import attention, indexer, model
    cache = model.init_cache(cfg, B, max_len)
    layers = []
    for i, c in enumerate(cache["layers"]):
        c = dict(c)
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        c["window"] = attention.store_kv(cfg, jax.random.normal(k1, (B, cfg.sliding_window, cfg.head_dim),
                                                                jnp.bfloat16))
        if "comp" in c:
            c["comp"] = attention.store_kv(cfg, jax.random.normal(k2, (B, c["comp"].shape[1], cfg.head_dim),
                                                                  jnp.bfloat16))
        if "index_keys" in c:
            c["index_keys"] = indexer.store_keys(cfg, jax.random.normal(
                k3, (B, c["index_keys"].shape[1], cfg.index_head_dim), jnp.bfloat16))
        layers.append(c)
    return {"pos": jnp.full((B,), ctx, jnp.int32), "layers": layers}


def _decode_loop(cfg, params, cache, tok, n):
    import jax
    import jax.numpy as jnp
    from . import model

    def body(_, ct):
        c, t = ct
        logits, c = model.decode_step(cfg, params, c, t)
        return c, jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, n, body, (cache, tok))


def _memory_stats() -> list[dict | None]:
    """The allocator's statistics per local device (None where there are none: CPU devices)."""
    import jax
    out = []
    for d in jax.local_devices():
        try:
            out.append(d.memory_stats() or None)
        except Exception:  # noqa: BLE001 - CPU devices have no stats
            out.append(None)
    return out


def device_memory() -> list[float]:
    return [m["bytes_in_use"] / 2**30 if m else float("nan") for m in _memory_stats()]


def memory_report() -> str:
    """Per device: in use / largest free block / limit (GiB), the allocator's own numbers; '' off the GPU. The
    largest free block is what one big buffer (a prefill's temp) can get: fragmentation shows as a gap between it
    and limit - in use."""
    stats = _memory_stats()
    if not all(stats):
        return ""
    g = lambda m, k: m.get(k, float("nan")) / 2**30
    return "memory in use / largest free block / limit GiB: " + ", ".join(
        f"{g(m, 'bytes_in_use'):.1f}/{g(m, 'largest_free_block_bytes'):.1f}/{g(m, 'bytes_limit'):.1f}" for m in stats)


# ---- main --------------------------------------------------------------------------------------------
def run(args) -> int:
    if args.cpu_devices:
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")
    import jax
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    from . import attention, model, params as P, sharding as SH
    from .bench import measure_copy_bw

    t_start = time.perf_counter()

    def log(s=""):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {s}" if s else "", flush=True)

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    cfg = make_config(args.model, args.layers)
    n_dev = len(jax.devices())
    mesh = SH.make_mesh(args.mesh or {"expert": n_dev})
    sizes = dict(mesh.shape)
    log(f"{args.model}: {cfg.n_layers} layers + {cfg.n_mtp} MTP, {cfg.n_routed_experts} experts (top-"
        f"{cfg.num_experts_per_tok}), hidden {cfg.dim}; devices {n_dev} x {jax.devices()[0].device_kind}; mesh "
        f"{ {k: v for k, v in sizes.items() if v > 1} }; jax {jax.__version__}")
    res: dict = {"model": args.model, "layers": cfg.n_layers, "devices": n_dev, "rules": args.rules,
                 "device_kind": jax.devices()[0].device_kind, "mesh": sizes, "prefill": [], "decode": []}
    bw = measure_copy_bw(1 << 30) if jax.default_backend() != "cpu" else float("nan")
    res["copy_GBps_per_device"] = bw / 1e9
    log(f"measured copy bandwidth per device: {bw / 1e9:.0f} GB/s")

    wb = weight_bytes(cfg)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        rules = SH.rules_with(args.rules)
        params = P.init_params_sharded(cfg, jax.random.key(args.seed), SH.param_shardings(cfg, mesh, "native",
                                                                                          rules))
        jax.block_until_ready(params)
        if args.fp4_layout != "checkpoint":     # what a GPU server runs (params.to_kernel_layout): same bytes
            params = P.to_kernel_layout(params, donate=True, fuse_gate_up=args.fp4_layout == "kernel")
        held = sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
        mem = device_memory()
        res.update(weights_checkpoint_GB=wb["total"] / 1e9, weights_held_GB=held / 1e9,
                   weights_init_s=time.perf_counter() - t0, memory_after_init_GiB=mem)
        log(f"weights: generated on device in {time.perf_counter() - t0:.1f} s; checkpoint size {wb['total'] / 1e9:.1f}"
            f" GB (experts {wb['experts'] / 1e9:.1f} GB, rest {wb['dense'] / 1e9:.1f} GB); held on devices "
            f"{held / 1e9:.1f} GB (non-expert weights replicated on each device; FP4 experts in the "
            f"{args.fp4_layout} layout); in use per device (GiB): "
            + ", ".join(f"{m:.1f}" for m in mem))
        if report := memory_report():
            log(report)
        kv_tok = attention.cache_bytes_per_token(cfg)
        kv_tok_bf16 = attention.cache_bytes_per_token(cfg, "bf16")
        res.update(kv_bytes_per_token=kv_tok, kv_bytes_per_token_bf16=kv_tok_bf16)
        log(f"KV cache (growing part) bytes/token: {kv_tok:.0f} in the production layout (spec 3.2 derives 3514 for "
            f"Flash, 5031 for Pro), {kv_tok_bf16:.0f} in bf16")

        # ---- compile everything up front, in parallel
        pre_cases = _parse_cases(args.prefill)
        dec_cases = _parse_cases(args.decode)
        jobs = {}
        key = jax.random.key(args.seed + 1)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())       # replicated inputs
        for B, S in pre_cases:
            mb = max(1, min(B, args.prefill_tokens // S))
            toks = jax.ShapeDtypeStruct((mb, S), jnp.int32, sharding=rep)
            jobs[("prefill", mb, S)] = lambda toks=toks, S=S: model._prefill.lower(cfg, params, toks, S + 1, True, args.chunk_tokens)
        loop = jax.jit(_decode_loop, static_argnums=0, donate_argnums=2)
        for B, ctx in dec_cases:
            max_len = ctx + args.steps + 8
            cache_abs = jax.eval_shape(lambda: model.init_cache(cfg, B, max_len))
            tok = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rep)
            jobs[("decode", B, ctx)] = lambda c=cache_abs, t=tok: loop.lower(cfg, params, c, t, 1)
            jobs[("fill", B, ctx)] = (lambda B=B, ctx=ctx, m=max_len:
                                      jax.jit(partial(random_cache, cfg, B, ctx, m)).lower(key))
        t0 = time.perf_counter()
        lowered = {}
        for k, f in jobs.items():
            try:
                lowered[k] = f()
            except Exception as e:  # noqa: BLE001 - report and go on
                lowered[k] = e
                log(f"lowering {k} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        log(f"lowered {len(jobs)} programs in {time.perf_counter() - t0:.1f} s; compiling with {args.threads} threads")

        def comp(item):
            k, low = item
            if isinstance(low, Exception):
                return k, low
            t = time.perf_counter()
            try:
                return k, (low.compile(), time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                return k, e
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, args.threads)) as ex:
            compiled = dict(ex.map(comp, lowered.items()))
        for k, v in compiled.items():
            if isinstance(v, Exception):
                log(f"compile {k} failed: {type(v).__name__}: {str(v).splitlines()[0][:200]}")
        res["compile_s"] = {f"{k[0]} {k[1]}x{_fmt_tok(k[2])}": round(v[1], 1) for k, v in compiled.items()
                            if not isinstance(v, Exception)}
        log(f"compiled in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{k} {v}s" for k, v in
                                                                     res["compile_s"].items()))

        # ---- prefill
        for B, S in pre_cases:
            mb = max(1, min(B, args.prefill_tokens // S))
            c = compiled.get(("prefill", mb, S))
            if isinstance(c, Exception) or c is None:
                continue
            if left() < 20:
                log(f"prefill {B}x{_fmt_tok(S)}: skipped (budget)")
                continue
            exe = c[0]
            calls = -(-B // mb)
            rng = np.random.default_rng(S + B)
            toks = [jax.device_put(rng.integers(0, cfg.vocab_size, (mb, S)).astype(np.int32), rep)
                    for _ in range(min(calls, 2))]
            try:
                jax.block_until_ready(exe(params, toks[0]))                  # warm-up (first execution)
                t0 = time.perf_counter()
                out = None
                for i in range(calls):
                    out = exe(params, toks[i % len(toks)])
                jax.block_until_ready(out)
                del out
                dt = time.perf_counter() - t0
                err = None
            except Exception as e:  # noqa: BLE001
                dt, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if report := memory_report():
                    log(report)
            row = {"batch": B, "seq": S, "micro_batch": mb, "calls": calls, "seconds": dt, "error": err,
                   "tokens_per_s": (B * S / dt) if dt else None, "memory_GiB": device_memory()}
            res["prefill"].append(row)
            log(f"prefill {B}x{_fmt_tok(S)} ({calls} call(s) of {mb}): " +
                (f"{dt:.2f} s, {B * S / dt:,.0f} tokens/s" if dt else err))
            if args.profile and dt:
                _profile(args.profile, f"prefill_{mb}x{_fmt_tok(S)}", exe, (params, toks[0]), 1, log)

        # ---- decode
        for B, ctx in dec_cases:
            c, f = compiled.get(("decode", B, ctx)), compiled.get(("fill", B, ctx))
            if isinstance(c, Exception) or isinstance(f, Exception) or c is None or f is None:
                continue
            if left() < 15:
                log(f"decode {B}x{_fmt_tok(ctx)}: skipped (budget)")
                continue
            steps = args.steps
            try:
                cache = f[0](key)
                tok = jax.device_put(np.zeros((B,), np.int32), rep)
                t0 = time.perf_counter()
                cache, tok = c[0](params, cache, tok, 2)                     # warm-up: 2 steps
                jax.block_until_ready(tok)
                est = (time.perf_counter() - t0) / 2
                steps = args.steps if est * args.steps < max(left() / 2, 5.0) else max(8, int(left() / 2 / est))
                mem = device_memory()
                t0 = time.perf_counter()
                cache, tok = c[0](params, cache, tok, steps)
                jax.block_until_ready(tok)
                dt = (time.perf_counter() - t0) / steps
                if args.profile:
                    _profile(args.profile, f"decode_{B}x{_fmt_tok(ctx)}", c[0], (params, cache, tok, PROFILE_STEPS),
                             PROFILE_STEPS, log)
                del cache
                err = None
            except Exception as e:  # noqa: BLE001
                dt, err, mem = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", device_memory()
            need = decode_step_bytes(cfg, B, ctx)
            floor = need["total"] / (bw * n_dev) if bw == bw else float("nan")
            floor_rep = (need["dense"] + (need["experts"] + need["cache"]) / n_dev) / bw if bw == bw else float("nan")
            cache_dev = attention.cache_bytes(cfg, ctx + args.steps + 8, batch=B)
            row = {"batch": B, "ctx": ctx, "ms_per_token": dt * 1e3 if dt else None, "error": err,
                   "steps": steps if dt else None,
                   "tokens_per_s": B / dt if dt else None, "step_bytes_GB": need["total"] / 1e9,
                   "floor_ms": floor * 1e3, "floor_replicated_ms": floor_rep * 1e3,
                   "x_floor": (dt / floor) if dt else None, "cache_GB": cache_dev / 1e9, "memory_GiB": mem,
                   "cache": "random entries in the production format (not a prefill)"}
            res["decode"].append(row)
            log(f"decode {B}x{_fmt_tok(ctx)}: " + (f"{dt * 1e3:.2f} ms/token, {B / dt:,.0f} tokens/s; floor "
                                                   f"{floor * 1e3:.2f} ms (x{dt / floor:.1f}), replicated-weights "
                                                   f"floor {floor_rep * 1e3:.2f} ms" if dt else err))

    # ---- tables
    print()
    print(f"## {args.model} ({cfg.n_layers} layers), {n_dev} x {res['device_kind']}, mesh "
          f"{ {k: v for k, v in sizes.items() if v > 1} }")
    print(f"weights: checkpoint {res['weights_checkpoint_GB']:.1f} GB, held {res['weights_held_GB']:.1f} GB; "
          f"KV bytes/token {kv_tok:.0f} (bf16 {kv_tok_bf16:.0f}); copy BW {bw / 1e9:.0f} GB/s per device")
    print("| prefill B x S | tokens/s | s | memory GiB/device |")
    print("|---|---|---|---|")
    for r in res["prefill"]:
        print(f"| {r['batch']} x {_fmt_tok(r['seq'])} | " + (f"{r['tokens_per_s']:,.0f} | {r['seconds']:.2f}"
              if r["seconds"] else f"{r['error']} | -") + " | " + ", ".join(f"{m:.0f}" for m in r["memory_GiB"])
              + " |")
    print("| decode B x ctx | ms/token | tokens/s | bytes/step GB | floor ms | x floor | replicated floor ms |"
          " cache GB | memory GiB/device |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["decode"]:
        ok = r["ms_per_token"] is not None
        print(f"| {r['batch']} x {_fmt_tok(r['ctx'])} | " + (f"{r['ms_per_token']:.2f} | {r['tokens_per_s']:,.0f}"
              if ok else f"{r['error']} | -") + f" | {r['step_bytes_GB']:.2f} | {r['floor_ms']:.2f} | "
              + (f"{r['x_floor']:.1f}" if ok else "-") + f" | {r['floor_replicated_ms']:.2f} | {r['cache_GB']:.2f} | "
              + ", ".join(f"{m:.0f}" for m in r["memory_GiB"]) + " |")
    print("decode caches: random entries in the production format up to ctx (not filled by a prefill)")
    res["total_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    ok = all(r["error"] is None for r in res["prefill"] + res["decode"])
    return 0 if ok else 1


def add_parser(sub):
    """Register the `full` subcommand (for v4jax/bench.py's _parsers)."""
    k = sub.add_parser("full", help="a complete Flash/Pro model at real size: prefill/decode speed vs the floor",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser(k)
    k.set_defaults(func=run)


def main(argv=None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
