"""Training-step benchmark: tokens/s and MFU of v4jax.train's compiled step, Muon vs AdamW, and the share of the
Muon step spent in Newton-Schulz.

    python -m v4jax.bench_train --size 1b --seq-len 4096 --batch 4 --json out.json
    (or from code: bench_train(argparse.Namespace(...)); `add_parser(subparsers)` hooks it into a CLI)

What is measured: the exact step `python -m v4jax.train` runs (StepSpec / make_train_step: next-token + MTP loss,
balance loss, grad accumulation scan, clipping, optimizer, router-bias rule) on random tokens packed as one
document per row, fp32 master weights, remat per block. Per optimizer: compile time, then the median of timed
steps (each ended with block_until_ready). MFU = 6 * active_params * tokens / time / peak, active_params as in
train.flops_params (routed experts x k/E, head per prediction head, no embedding; attention's S^2 work and the
remat recompute are not counted, so MFU is the usual "model flops" figure). Newton-Schulz share: the Muon
orthogonalisation of every Muon leaf's gradient-shaped matrix, jitted alone, timed the same way, divided by the
Muon step time; the optimizer update alone (Muon and AdamW) is timed too.

Sizes (`--size`): "1b" is a V4-shaped model of ~1.2 B parameters (~0.3 B active): all layer types (SWA, CSA with
indexer, HCA), 2 hash layers, mHC with 4 streams, MTP, 32 experts top-4, head_dim 512 (448 + 64 RoPE), vocab 32K;
"tiny" is the tiny preset (a CPU smoke check of this script).

Status (2026-11-23, session 10): H100 at --size 1b: AdamW 143.7 ms/step (57.0K tokens/s, MFU 13.5%), Muon
282.6 ms (bf16 Newton-Schulz 145 ms); --batch 16 --grad-accum 8: AdamW MFU 14.5%, Muon +13% over AdamW (session 5:
+5% at --batch 32 --grad-accum 16). Scaling on 2 x H200 (`--meshes "1;expert=2;seq=2"`, AdamW, session 5): 159.5 /
170.1 / 138.8 ms (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import params as P
from . import sharding as sh
from . import train as T
from .config import ModelConfig
from .optim import MUON, newton_schulz, param_groups

SIZES = {
    "1b": dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, head_dim=512,
               q_lora_rank=512, o_groups=4, o_lora_rank=512, index_n_heads=16, index_head_dim=128, index_topk=256,
               n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=1024, num_hash_layers=2,
               compress_ratios=(0, 4, 128, 4, 0), max_position_embeddings=65536, quantized=False),
    "tiny": dict(quantized=False),
}


def model_for(size: str, **overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **{**SIZES[size], **overrides})


def _spec(cfg: ModelConfig, optimizer: str, grad_accum: int, lr: float = 3e-4) -> T.StepSpec:
    abstract = P.abstract_flat(cfg, "bf16")
    c = T.defaults()
    c["mtp_weight"] = 0.3
    names = T.trainable_names(c, cfg, abstract)
    blocks = T.score_blocks(cfg, True)
    return T.StepSpec(cfg=cfg, trainable=tuple(names), model_dtypes=tuple((n, str(abstract[n].dtype)) for n in names),
                      master_dtype="float32", remat=True, with_mtp=True, mtp_weight=0.3, balance_weight=1e-4,
                      bias_speed=1e-3, bias_rows=tuple(blocks), balance_rows=tuple(r for r, _ in blocks),
                      grad_accum=grad_accum,
                      opt=(optimizer, lr, 0, "constant", None, None, 0.1, 1.0, (), (), False, 1000))


def _state(spec: T.StepSpec, flat: dict, tx) -> dict:
    master = {n: flat[n].astype(jnp.float32) for n in spec.trainable}
    frozen = {n: v for n, v in flat.items() if n not in master}
    return {"master": master, "frozen": frozen, "opt": tx.init(master), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(0))}


def _batch(cfg: ModelConfig, grad_accum: int, micro: int, S: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    toks = rng.integers(2, cfg.vocab_size, (grad_accum, micro, S), dtype=np.int32)
    seg = np.ones_like(toks)
    mask = np.ones_like(toks)
    return {"tokens": jnp.asarray(toks), "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(mask)}


def _time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_train(args) -> dict:
    """Run the benchmark described in the module docstring; prints a table, returns (and optionally writes) JSON.
    With --meshes: the same step on each mesh in turn (the scaling table of issue 5)."""
    if args.grad_accum < 1 or args.batch < args.grad_accum or args.batch % args.grad_accum:
        raise SystemExit(f"bench train: --batch {args.batch} must be a multiple of --grad-accum {args.grad_accum} "
                         f"(rows per step = micro-batch x grad_accum)")
    if getattr(args, "cpu_devices", None):
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if getattr(args, "meshes", None):
        return bench_scaling(args)
    return _bench_train(args)


def bench_scaling(args) -> dict:
    """Step time of one optimizer on each mesh of --meshes ("1" = one device, no mesh), and the speed-up over the
    first entry. Tokens per step stay the same on every mesh (batch and sequence are split, not grown)."""
    name = args.optimizers.split(",")[0]
    rows = []
    for m in args.meshes.split(";"):
        a = argparse.Namespace(**{**vars(args), "meshes": None, "optimizers": name, "mesh": None if m in ("1", "none")
                                  else m, "json": None})
        try:
            r = _bench_train(a)["results"].get(name, {})
        except Exception as e:  # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append((m, r))
    base = rows[0][1].get("step_ms")
    print(f"\n| mesh | devices | step ms | tokens/s | MFU (per device) | speed-up vs {rows[0][0]} |")
    print("|---|---|---|---|---|---|")
    out = {"optimizer": name, "rows": []}
    for m, r in rows:
        n = 1 if m in ("1", "none") else int(np.prod(list(sh.parse_mesh_spec(m, len(jax.devices())).values())))
        if "step_ms" in r:
            print(f"| {m} | {n} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['mfu'] / n:.1%} | "
                  f"{base / r['step_ms']:.2f}x |" if base else "")
        else:
            print(f"| {m} | {n} | {r.get('error', '-')} | | | |")
        out["rows"].append({"mesh": m, "devices": n, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _bench_train(args) -> dict:
    cfg = model_for(args.size, **({"quant_sim": False} if getattr(args, "no_quant_sim", False) else {}))
    S, B, N = args.seq_len, args.batch, args.grad_accum
    micro = B // N
    peak = (args.peak_tflops or T.default_peak_tflops()) * 1e12
    n_total, n_active = P.count_params(cfg), T.flops_params(cfg, True)
    dev = jax.devices()[0]
    out = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__, "size": args.size,
           "params": n_total, "active_params": n_active, "seq_len": S, "batch": B, "grad_accum": N,
           "tokens_per_step": B * S, "peak_tflops": peak / 1e12, "quant_sim": cfg.quant_sim, "results": {}}
    print(f"# {dev.device_kind}: {n_total / 1e9:.3f} B params ({n_active / 1e9:.3f} B active for 6ND), "
          f"batch {B} x {S} (grad_accum {N}), peak {peak / 1e12:.0f} TFLOP/s", flush=True)

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    mesh = sh.make_mesh(args.mesh) if getattr(args, "mesh", None) else None
    out["mesh"] = getattr(args, "mesh", None)
    t0 = time.perf_counter()
    if mesh is None:
        flat = P.flatten(jax.jit(lambda k: P.init_params(cfg, k, dtype="bf16"))(jax.random.key(0)))
    else:
        flat = P.flatten(P.init_params_sharded(cfg, jax.random.key(0), sh.param_shardings(cfg, mesh, "bf16"),
                                               "bf16"))
    jax.block_until_ready(flat)
    out["init_s"] = time.perf_counter() - t0
    print(f"init {out['init_s']:.1f}s", flush=True)
    batch = _batch(cfg, N, micro, S)
    if mesh is not None:    # rows over data, the sequence over seq (the model constrains its activations)
        spec = jax.sharding.PartitionSpec(None, "data" if micro % dict(mesh.shape)["data"] == 0 else None,
                                          "seq" if S % dict(mesh.shape)["seq"] == 0 else None)
        batch = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, spec)) for k, v in batch.items()}
    for name in args.optimizers.split(","):
        try:
            if mesh is None:
                _one(cfg, flat, batch, name, args, out, peak)
            else:
                with jax.set_mesh(mesh):
                    _one(cfg, flat, batch, name, args, out, peak)
        except Exception as e:  # noqa: BLE001 - keep the other measurements (OOM, compile failure)
            out["results"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        dump()
        if name == MUON:
            try:
                _newton_schulz(cfg, flat, N, args, out)
            except Exception as e:  # noqa: BLE001
                out["newton_schulz_error"] = f"{type(e).__name__}: {str(e)[:500]}"
            dump()
    return out


def _one(cfg, flat, batch, name, args, out, peak):
    S, B, N = args.seq_len, args.batch, args.grad_accum
    n_active = out["active_params"]
    spec = _spec(cfg, name, N)
    tx, sched = T.build_optimizer(spec, {n: flat[n].astype(jnp.float32) for n in spec.trainable})
    state = jax.jit(lambda f: _state(spec, f, tx))(flat)
    # the state keeps its shardings from step to step (else XLA may pick other output layouts on a mesh)
    step = jax.jit(T.make_train_step(spec, tx, sched), donate_argnums=0,
                   out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
    print(f"{name}: compiling the step ...", flush=True)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    comp = time.perf_counter() - t0
    box = {"s": state}

    def run():
        box["s"], m = compiled(box["s"], batch)
        return m["loss"]
    loss0 = float(run())
    dt = _time(run, args.steps)
    if getattr(args, "profile", None):
        from . import profiling
        d = f"{args.profile}/train_{name}"
        try:
            with jax.profiler.trace(d):
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                wall = time.perf_counter() - t0
            print("\n".join(profiling.report(d, compiled.as_text(), steps=1, wall_s=wall, top=30)), flush=True)
        except Exception as e:  # noqa: BLE001 - a diagnostic; the measurement stands without it
            print(f"profile: {type(e).__name__}: {str(e)[:200]}", flush=True)
    # the optimizer update alone, on gradient-shaped inputs
    master = box["s"]["master"]
    upd = jax.jit(lambda g, o, p: tx.update(g, o, p))
    g = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, jnp.float32), master)
    upd_c = upd.lower(g, box["s"]["opt"], master).compile()
    dt_opt = _time(lambda: upd_c(g, box["s"]["opt"], master)[0], args.steps)
    tps = B * S / dt
    r = {"compile_s": comp, "step_ms": dt * 1e3, "tokens_per_s": tps, "mfu": 6 * n_active * tps / peak,
         "optimizer_update_ms": dt_opt * 1e3, "first_loss": loss0}
    out["results"][name] = r
    print(f"{name:6s} compile {comp:6.1f}s | step {dt * 1e3:8.1f} ms | {tps:10,.0f} tok/s | MFU {r['mfu']:6.1%} | "
          f"optimizer update alone {dt_opt * 1e3:7.1f} ms", flush=True)
    del box, state, compiled


def _newton_schulz(cfg, flat, N, args, out):
    """Newton-Schulz alone over every Muon leaf, with fp32 and with bf16 matmuls (the trainer's default,
    train.NS_DTYPE); the share of the Muon step is that of the trainer's dtype."""
    labels = param_groups({n: flat[n] for n in _spec(cfg, MUON, N).trainable})
    mats = {n: jnp.ones(flat[n].shape, jnp.float32) * 1e-2 + jax.random.normal(jax.random.key(1), flat[n].shape) * 1e-3
            for n, l in labels.items() if l == MUON}
    for dt in ("float32", "bfloat16"):
        ns = jax.jit(lambda ms, dt=dt: {n: newton_schulz(m, dtype=jnp.dtype(dt)) for n, m in ms.items()}) \
            .lower(mats).compile()
        dt_ns = _time(lambda: ns(mats), args.steps)
        out[f"newton_schulz_{dt}_ms"] = dt_ns * 1e3
        line = f"Newton-Schulz (all Muon matrices, {dt} matmuls) {dt_ns * 1e3:.1f} ms"
        if dt == T.NS_DTYPE:
            out["newton_schulz_ms"] = dt_ns * 1e3
            if MUON in out["results"]:
                out["newton_schulz_share_of_muon_step"] = dt_ns / (out["results"][MUON]["step_ms"] / 1e3)
                line += f" = {out['newton_schulz_share_of_muon_step']:.1%} of the Muon step (the trainer's dtype)"
        print(line, flush=True)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="training step: tokens/s, MFU, Muon vs AdamW, Newton-Schulz share") if sub \
        else argparse.ArgumentParser(prog="python -m v4jax.bench_train", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2, help="rows per optimizer step (all micro-batches together)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per optimizer")
    p.add_argument("--optimizers", default="muon,adamw")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--no-quant-sim", action="store_true", help="switch the reference's quantisation simulations off")
    p.add_argument("--json", default=None)
    p.add_argument("--mesh", default=None, help="run the step on this mesh (e.g. expert=2 or seq=2)")
    p.add_argument("--meshes", default=None,
                   help='scaling table: ";"-separated meshes, "1" = one device, e.g. "1;expert=2;seq=2"')
    p.add_argument("--cpu-devices", type=int, default=None, help="(CPU check of the script) host device count")
    p.add_argument("--profile", default=None, help="directory: trace one more step per optimizer and print the "
                                                   "kernels that take the time (v4jax.profiling)")
    p.set_defaults(func=bench_train)
    return p


def main(argv=None) -> int:
    args = add_parser(None).parse_args(argv)
    bench_train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
