"""Where device time goes: a JAX profiler trace summarised as a table of kernels (no TensorBoard needed).

    with jax.profiler.trace(d): run(...)
    print("\n".join(profiling.summarize(d, steps=n)))

Reads the newest `*.xplane.pb` under the directory with `jax.profiler.ProfileData`; for each device plane it sums
the events of the kernel lines (the "XLA Ops" line when the trace has one, else every stream line) by name and
reports total time, count, time per step and the share of busy time, plus the busy time per step against the
wall time of the traced region (the gap is launch / host overhead).
"""
from __future__ import annotations

import collections
import glob
import os
import re


def _profile_data(trace_dir: str):
    from jax.profiler import ProfileData
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    return ProfileData.from_file(files[-1])


def _stat(event, key):
    for k, v in event.stats:
        if k == key:
            return v
    return None


def kernel_table(trace_dir: str) -> dict:
    """{plane name: {"lines": {line: (events, total ns)}, "kernels": Counter name -> ns, "counts": Counter,
    "ops": Counter of the events' 'tf_op' / 'hlo_op' stat -> ns, "span_ns": first start .. last end}}."""
    pd = _profile_data(trace_dir)
    out = {}
    for plane in pd.planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = {ln.name: ln for ln in plane.lines}
        info = {"lines": {}, "kernels": collections.Counter(), "counts": collections.Counter(),
                "ops": collections.Counter(), "span_ns": 0.0}
        for name, ln in lines.items():
            evs = list(ln.events)
            info["lines"][name] = (len(evs), sum(e.duration_ns for e in evs))
        use = [n for n in lines if "XLA Ops" in n] or [n for n in lines if n.lower().startswith("stream")]
        t0, t1 = None, None
        for n in use:
            for e in lines[n].events:
                info["kernels"][e.name] += e.duration_ns
                info["counts"][e.name] += 1
                op = _stat(e, "tf_op") or _stat(e, "hlo_op")
                if op is not None:
                    info["ops"][str(op)] += e.duration_ns
                s = e.start_ns
                t0 = s if t0 is None else min(t0, s)
                t1 = s + e.duration_ns if t1 is None else max(t1, s + e.duration_ns)
        info["span_ns"] = (t1 - t0) if t0 is not None else 0.0
        info["used_lines"] = use
        out[plane.name] = info
    return out


def summarize(trace_dir: str, steps: int = 1, top: int = 30, wall_s: float | None = None) -> list[str]:
    """Lines of text: per device plane, the `top` kernels by total time (per step), and busy vs wall time."""
    rows = []
    for plane, info in kernel_table(trace_dir).items():
        busy = sum(info["kernels"].values())
        n = sum(info["counts"].values())
        rows.append(f"{plane}: lines " + ", ".join(f"{k} ({c} ev, {t / 1e6:.2f} ms)"
                                                   for k, (c, t) in info["lines"].items()))
        head = (f"  busy {busy / 1e6 / steps:.3f} ms/step in {n / steps:.0f} kernels/step (lines "
                f"{info['used_lines']}); span {info['span_ns'] / 1e6 / steps:.3f} ms/step")
        if wall_s:
            head += f"; wall {wall_s * 1e3 / steps:.3f} ms/step"
        rows.append(head)
        rows.append("  | kernel | ms/step | calls/step | % busy |")
        rows.append("  |---|---|---|---|")
        for name, t in info["kernels"].most_common(top):
            rows.append(f"  | {name[:90]} | {t / 1e6 / steps:.3f} | {info['counts'][name] / steps:.1f} | "
                        f"{100 * t / max(busy, 1):.1f} |")
        if info["ops"]:
            rows.append("  | op (tf_op / hlo_op stat) | ms/step | % busy |")
            rows.append("  |---|---|---|")
            for name, t in info["ops"].most_common(top):
                rows.append(f"  | {name[-110:]} | {t / 1e6 / steps:.3f} | {100 * t / max(busy, 1):.1f} |")
    return rows


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_META = re.compile(r'(op_name|source_file|source_line|stack_frame_id)=(?:"([^"]*)"|(\d+))')
_TABLE = re.compile(r"^(\d+)\s+(?:\"(.*)\"|\{(.*)\})\s*$")


def _norm(name: str) -> str:
    return re.sub(r"[.\-]", "_", name)


def _frames(hlo_text: str) -> dict:
    """{stack frame id: [(file basename, line, function), ... innermost first]} from the FileNames /
    FunctionNames / FileLocations / StackFrames tables newer XLA prints at the top of a module's text."""
    tables, cur = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            cur = tables.setdefault(line, {})
            continue
        m = _TABLE.match(line) if cur is not None else None
        if m is None:
            cur = None if not line.strip() or line.startswith(("%", "HloModule", "ENTRY")) else cur
            continue
        cur[int(m.group(1))] = m.group(2) if m.group(2) is not None else dict(
            kv.split("=") for kv in m.group(3).split())
    files, funcs = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locs = {k: (os.path.basename(files.get(int(v["file_name_id"]), "?")), v.get("line", "?"),
                funcs.get(int(v.get("function_name_id", 0)), "?"))
            for k, v in tables.get("FileLocations", {}).items()}
    frames = tables.get("StackFrames", {})
    out = {}
    for fid in frames:
        chain, f, seen = [], fid, set()
        while f in frames and f not in seen:
            seen.add(f)
            chain.append(locs.get(int(frames[f]["file_location_id"]), ("?", "?", "?")))
            f = int(frames[f].get("parent_frame_id", 0)) - 1      # printed one above the parent's id; 0: none
        out[fid] = chain
    return out


def hlo_sources(hlo_text: str) -> dict:
    """{instruction name with '.'/'-' as '_' (how XLA names a fusion's kernel): (source, op_name)} from the
    `metadata={...}` of each instruction of an optimised HLO module's text (`Compiled.as_text()`). source is
    "file:line function < caller file:line function" (the two innermost frames) when the module has stack
    frame tables, else "file:line"."""
    frames = _frames(hlo_text)
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        meta = {k: (s if s else n) for k, s, n in _META.findall(m.group(2))}
        if "stack_frame_id" in meta and int(meta["stack_frame_id"]) in frames:
            src = " < ".join(f"{f}:{ln} {fn}" for f, ln, fn in frames[int(meta["stack_frame_id"])][:2])
        else:
            src = os.path.basename(meta.get("source_file", "?")) + ":" + meta.get("source_line", "?")
        out[_norm(m.group(1))] = (src, meta.get("op_name", ""))
    return out


def by_source(trace_dir: str, hlo_text: str, steps: int = 1, top: int = 40) -> list[str]:
    """Lines of text: per device plane, kernel time and count per step grouped by the Python source line
    (`hlo_sources`) of the HLO instruction that launched them; kernels with no instruction of that name
    (cuBLAS, Pallas, copies) are grouped by their own name."""
    src = hlo_sources(hlo_text)
    rows = []
    for plane, info in kernel_table(trace_dir).items():
        t, c, ops = collections.Counter(), collections.Counter(), {}
        for name, ns in info["kernels"].items():
            key, op = src.get(_norm(name), (f"[{name[:60]}]", ""))
            t[key] += ns
            c[key] += info["counts"][name]
            ops.setdefault(key, op.split("/")[-1])
        busy = max(sum(t.values()), 1)
        rows.append(f"{plane}: by source line ({len(t)} lines)")
        rows.append("  | source | ms/step | kernels/step | % busy | an op there |")
        rows.append("  |---|---|---|---|---|")
        for key, ns in t.most_common(top):
            rows.append(f"  | {key} | {ns / 1e6 / steps:.3f} | {c[key] / steps:.1f} | {100 * ns / busy:.1f} | "
                        f"{ops[key][:40]} |")
    return rows


def report(trace_dir: str, hlo_text: str, steps: int = 1, wall_s: float | None = None, top: int = 25,
           top_sources: int = 60) -> list[str]:
    """`summarize` then `by_source` for one traced program, with its HLO text written beside the trace
    (`<trace_dir>.hlo.txt`: the fusions' bodies, for reading later)."""
    with open(trace_dir.rstrip("/") + ".hlo.txt", "w") as f:
        f.write(hlo_text)
    return (summarize(trace_dir, steps=steps, top=top, wall_s=wall_s)
            + by_source(trace_dir, hlo_text, steps=steps, top=top_sources))
