#!/usr/bin/env python
"""List the matrix products of the training step that would run as fp32 GEMMs on an NVIDIA GPU (issue 6).

    python scripts/list_f32_dots.py --size 1b                    # the bench_train step, batch 2 x 4096
    python scripts/list_f32_dots.py --size 1b --all --top 60     # every dot, bf16 ones included
    python scripts/list_f32_dots.py --size tiny --seq-len 256    # a quick check

How: traces the exact step `python -m v4jax.bench train` runs (bench_train's StepSpec, state and batch, as
ShapeDtypeStructs; nothing is allocated, compiled or run) with `jax.make_jaxpr`, on a CPU-only machine, and walks
the jaxpr: every `dot_general` / `conv_general_dilated` (inside scans, conds, remat, custom-VJP and pjit bodies;
a scan's body counts `length` times, a while/cond body once) with its operand dtypes, precision, shapes, batch
dims, FLOPs per call, call count, and where it comes from. Autodiff keeps the forward eqn's source info on the
transposed eqns, so a gradient dot shows its forward line. Columns:
  where   the innermost line outside the product helpers (v4jax/layers.py, pallas_kernels/): the model line
  via     the helper line it went through (layers._matmul, split_matmul, act_einsum, a kernel's custom VJP ...)
  role    "fwd" if the forward alone (a second trace, no grad) has the same product (shapes, dtypes, dimension
          numbers; remat recomputations included), else "bwd dL" / "bwd dR" when the output has the shape of
          the forward's lhs / rhs at that line (that operand's gradient), "bwd" otherwise

GPU dispatch (default, `--dispatch gpu`): every kernel dispatch (`pallas_kernels.*.default_backend`,
`layers.split_backend`, the skinny check) is made to answer as on an NVIDIA GPU, so the listing shows the GPU
path: `layers.split_matmul`'s bf16 GEMMs instead of the fp32 einsums it replaces there, and the Pallas kernels
(sparse attention, indexer scores, grouped matmul, Sinkhorn) as opaque `pallas_call`s (not listed; they are not
XLA GEMMs). `--dispatch cpu` lists what CPU runs (the references' einsums, tagged "ref" if they live in
pallas_kernels/*/reference.py).

Classes ("gpu" column):
  f32     an f32 operand (either one): cuBLAS fp32 GEMM without tensor cores (precision HIGHEST), the
          `sm80_xmma_gemm_f32f32` / `cutlass_80_simt_sgemm` kernels; "f32-tf32" for precision DEFAULT (XLA may
          use TF32 there -- not spec numerics)
  bf16    both operands bf16 (or narrower): tensor cores
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src import source_info_util  # noqa: E402
from jax.extend import core as jcore  # noqa: E402


# ---- GPU dispatch on a CPU host ---------------------------------------------------------------------------
def force_gpu_dispatch(set_attr=setattr) -> None:
    """Make every `platform_backend` call answer for platform "cuda" (the kernels then trace their GPU path; in
    interpret mode, which does not matter for tracing) and `layers.split_backend` "gpu". set_attr: how to patch
    (a test passes pytest's monkeypatch.setattr, which undoes it)."""
    import pallas_kernels._backend as pb
    import v4jax.model  # noqa: F401 - import every module that binds platform_backend first
    import v4jax.train  # noqa: F401
    from v4jax import layers
    orig = pb.platform_backend

    def as_gpu(available, platform=None):
        return orig(available, "cuda")
    for name, mod in list(sys.modules.items()):
        if (name.startswith("pallas_kernels") or name.startswith("v4jax")) and \
                getattr(mod, "platform_backend", None) is orig:
            set_attr(mod, "platform_backend", as_gpu)
    set_attr(layers, "split_backend", lambda: "gpu")


def f32_dots(size: str = "1b", seq_len: int = 4096, batch: int = 2, grad_accum: int = 1, optimizer: str = "adamw",
             quant_sim: bool = True):
    """[(Row with its role, calls)] of the fp32 dots of the step (under whatever dispatch is active)."""
    cfg, jaxpr, fwd = trace_step(size, seq_len, batch, grad_accum, optimizer, quant_sim)
    _FWD.clear()
    for r, key, _ in walk(fwd.jaxpr):
        _FWD.setdefault(key, set()).add(r.where)
    return [(r._replace(role=_role(key, r)), m) for r, key, m in walk(jaxpr.jaxpr) if r.klass.startswith("f32")]


# ---- the step ------------------------------------------------------------------------------------------
def trace_step(size: str, seq_len: int, batch: int, grad_accum: int, optimizer: str, quant_sim: bool):
    from v4jax import bench_train as BT
    from v4jax import params as P
    from v4jax import train as T
    cfg = BT.model_for(size, **({} if quant_sim else {"quant_sim": False}))
    spec = BT._spec(cfg, optimizer, grad_accum)
    flat = P.abstract_flat(cfg, "bf16")
    master = {n: jax.ShapeDtypeStruct(flat[n].shape, jnp.float32) for n in spec.trainable}
    tx, sched = T.build_optimizer(spec, master)
    state = jax.eval_shape(lambda f: BT._state(spec, f, tx), flat)
    micro = batch // grad_accum
    b = {k: jax.ShapeDtypeStruct((grad_accum, micro, seq_len), jnp.int32)
         for k in ("tokens", "segment_ids", "loss_mask")}
    step = jax.make_jaxpr(T.make_train_step(spec, tx, sched))(state, b)
    # the forward alone (one micro-batch, no grad): its dots are the "fwd" ones; any other dot is a gradient
    t = jax.ShapeDtypeStruct((micro, seq_len), jnp.int32)
    fwd = jax.make_jaxpr(lambda st, t, s, m: T.model_losses(spec, T._assemble(spec, st["master"], st["frozen"]),
                                                            t, s, m))(state, t, t, t)
    return cfg, step, fwd


# ---- the walk ------------------------------------------------------------------------------------------
Row = collections.namedtuple("Row", "where via role lhs rhs out dtypes precision batch flops klass")
HELPERS = ("v4jax/layers.py", "pallas_kernels/")     # lines that only implement a product for their caller
_FWD: dict = {}        # (lhs, rhs, dtypes, dims) -> {where} of the dots of the forward-only trace


def _frames(eqn) -> list[str]:
    """The repository frames of eqn's traceback, innermost first (a custom VJP's eqns carry its call site)."""
    tb = eqn.source_info.traceback
    if tb is None:
        return []
    return [f"{os.path.relpath(f.file_name, ROOT)}:{f.start_line}" for f in source_info_util.user_frames(tb)
            if str(ROOT) in f.file_name and "/scripts/" not in f.file_name]


def _short_dt(a) -> str:
    return {"float32": "f32", "bfloat16": "bf16", "float64": "f64", "float16": "f16"}.get(str(a.dtype), str(a.dtype))


def _prec(eqn) -> str:
    pr = eqn.params.get("precision")
    if pr is None:
        return "default"
    if isinstance(pr, (tuple, list)):
        names = {str(getattr(x, "name", x)) for x in pr if x is not None}
        return ",".join(sorted(names)).lower() or "default"
    return str(pr).lower()


def _dims(eqn):
    dn = eqn.params.get("dimension_numbers")
    return str(dn)


def _dot_row(eqn, mult: int, ctx: list):
    """(Row, key for the forward match, multiplier)."""
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        batch = tuple(lhs.shape[i] for i in lb)
        flops = 2 * math.prod(out.shape) * math.prod(lhs.shape[i] for i in lc)
    else:   # convolution: 2 * out elements * (kernel elements / out features)
        flops = 2 * math.prod(out.shape) * math.prod(rhs.shape) // max(out.shape[1], 1)
        batch = ()
    dts = f"{_short_dt(lhs)}x{_short_dt(rhs)}->{_short_dt(out)}"
    prec = _prec(eqn)
    if {"f32", "f64"} & {_short_dt(lhs), _short_dt(rhs)}:
        klass = "f32" if ("highest" in prec or "float32" in prec) else "f32-tf32"
    else:
        klass = "bf16"
    fr = _frames(eqn)
    chain = [f for f in fr if not f.startswith(HELPERS)] or ctx
    key = (tuple(lhs.shape), tuple(rhs.shape), dts, _dims(eqn))
    # a custom VJP's forward, traced during autodiff, keeps only the frames of its fwd rule: name the line of
    # the forward-only trace's identical product then
    where = chain[0] if chain else "/".join(sorted(_FWD.get(key, ()))) or (fr[-1] if fr else "?")
    via = fr[0] if fr and fr[0] != where else ""
    if "pallas_kernels/" in via and "reference" in via:
        klass += " ref"
    return Row(where, via, "", tuple(lhs.shape), tuple(rhs.shape), tuple(out.shape), dts, prec, batch, flops,
               klass), key, mult


def _sub_jaxprs(eqn):
    """(jaxpr, multiplier) for each sub-jaxpr of eqn: a scan body counts `length` times; pallas_call kernels are
    not XLA dots and are skipped."""
    if eqn.primitive.name == "pallas_call":
        return []
    mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    out = []
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                out.append((x.jaxpr, mult))
            elif isinstance(x, jcore.Jaxpr):
                out.append((x, mult))
    return out


def walk(jaxpr, mult: int = 1, out=None, ctx=()):
    """[(Row, forward-match key, calls)] of every dot in jaxpr and its sub-jaxprs. ctx: the enclosing eqn's
    non-helper frames (a custom-VJP body's eqns may carry only their own function's frames)."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            out.append(_dot_row(eqn, mult, list(ctx)))
        subs = _sub_jaxprs(eqn)
        if subs:
            c = [f for f in _frames(eqn) if not f.startswith(HELPERS)] or list(ctx)
            for sub, m in subs:
                walk(sub, mult * m, out, c)
    return out


def _role(key, row: Row) -> str:
    """"fwd" if the forward-only trace has the same product (shapes, dtypes, dimension numbers: the forward or
    its remat recomputation); else a gradient: "bwd dL" / "bwd dR" when the output has the shape (up to axis
    order) of the lhs / rhs of a forward product at the same line, plain "bwd" otherwise."""
    if key in _FWD:
        return "fwd"
    o = sorted(row.out)
    for (l, r, _, _), wheres in _FWD.items():
        if row.where in wheres:
            if sorted(l) == o:
                return "bwd dL"
            if sorted(r) == o:
                return "bwd dR"
    return "bwd"


def table(rows, show_all: bool, top: int, gpu_flops: float) -> list[str]:
    agg: dict = {}
    for r, key, m in rows:
        if not show_all and not r.klass.startswith("f32"):
            continue
        r = r._replace(role=_role(key, r))
        agg[r] = agg.get(r, 0) + m
    items = sorted(agg.items(), key=lambda kv: -kv[0].flops * kv[1])
    total = sum(r.flops * n for r, n in items)
    lines = [f"{len(items)} distinct dots, {sum(n for _, n in items)} calls, {total / 1e12:.3f} TFLOP per step"
             + (f" (~{total / gpu_flops * 1e3:.1f} ms at {gpu_flops / 1e12:.0f} TFLOP/s)" if gpu_flops else ""),
             "| # | GFLOP total | calls | GFLOP/call | gpu | role | dtypes | precision | lhs | rhs | batch | "
             "where | via |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, (r, n) in enumerate(items[:top]):
        lines.append(f"| {i + 1} | {r.flops * n / 1e9:.2f} | {n} | {r.flops / 1e9:.3f} | {r.klass} | {r.role} | "
                     f"{r.dtypes} | {r.precision} | {list(r.lhs)} | {list(r.rhs)} | {list(r.batch) or ''} | "
                     f"{r.where} | {r.via} |")
    if len(items) > top:
        rest = sum(r.flops * n for r, n in items[top:])
        lines.append(f"(+{len(items) - top} more, {rest / 1e9:.2f} GFLOP)")
    by_site: collections.Counter = collections.Counter()
    for r, n in items:
        by_site[(r.where, r.via, r.role.split()[0])] += r.flops * n
    lines.append("\nby source line (GFLOP per step):")
    for (w, v, role), f in by_site.most_common(top):
        lines.append(f"  {f / 1e9:10.2f}  {role:3s}  {w}" + (f"  (via {v})" if v else ""))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1b", help="a bench_train size (1b, tiny)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--optimizer", default="adamw", help="adamw or muon (Muon adds Newton-Schulz matmuls)")
    ap.add_argument("--no-quant-sim", action="store_true")
    ap.add_argument("--dispatch", choices=("gpu", "cpu"), default="gpu",
                    help="which kernel dispatch to trace (default: what an NVIDIA GPU runs)")
    ap.add_argument("--all", action="store_true", help="list bf16 dots too")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--fp32-tflops", type=float, default=50.0,
                    help="for the time estimate (H100 SXM fp32 SIMT peak ~67; cuBLAS reaches ~50)")
    a = ap.parse_args(argv)
    if a.dispatch == "gpu":
        force_gpu_dispatch()
    cfg, jaxpr, fwd = trace_step(a.size, a.seq_len, a.batch, a.grad_accum, a.optimizer, not a.no_quant_sim)
    _FWD.clear()
    for r, key, _ in walk(fwd.jaxpr):
        _FWD.setdefault(key, set()).add(r.where)
    rows = walk(jaxpr.jaxpr)
    print(f"# step of bench_train --size {a.size}: batch {a.batch} x {a.seq_len} (grad_accum {a.grad_accum}), "
          f"{a.optimizer}, dispatch {a.dispatch}, quant_sim {cfg.quant_sim}")
    print("\n".join(table(rows, a.all, a.top, a.fp32_tflops * 1e12 if not a.all else 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
