"""Checkpoint load benchmark: python -m v4jax.bench load [--layers N] [--dtype native,fp8] [--dir DIR]

Writes (once; reused when present) a random checkpoint in the official HF layout with the first N full-width
layers of a config (default: Flash, 4 layers, about 20 GB with embed/head and the MTP block), then measures:
  * raw disk read GB/s of the same files (plain sequential reads, 1 thread and 8 threads), cold (page cache
    dropped, if permitted: /proc/sys/vm/drop_caches, else posix_fadvise DONTNEED per file) and warm;
  * `v4jax.load(dir, dtype)` throughput from disk to device (checkpoint bytes / wall seconds, params ready on
    the device) and the peak host RSS above the process baseline (VmHWM after resetting it through
    /proc/self/clear_refs), each in a fresh process, cold and warm.
Prints a markdown table; `--out FILE` appends it (with a header line) to FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- measurements --------------------------------------------------------------------------------------
def _files(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def drop_caches(files: list[str]) -> str:
    """Empty the page cache of `files`: 'drop_caches', 'fadvise', or '' when neither worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return "drop_caches"
    except OSError:
        pass
    try:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"
    except (OSError, AttributeError):
        return ""


def read_files(files: list[str], threads: int = 1, chunk: int = 64 << 20) -> tuple[int, float]:
    """(bytes, seconds) of reading every file with plain reads into reused buffers."""
    jobs = [(p, off, min(chunk, os.path.getsize(p) - off)) for p in files
            for off in range(0, os.path.getsize(p), chunk)]
    lock = threading.Lock()
    total = [0]

    def work(my):
        buf = bytearray(chunk)
        fds = {}
        n = 0
        try:
            for p, off, size in my:
                fd = fds.get(p) or fds.setdefault(p, os.open(p, os.O_RDONLY))
                n += os.preadv(fd, [memoryview(buf)[:size]], off)
        finally:
            for fd in fds.values():
                os.close(fd)
        with lock:
            total[0] += n

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(jobs[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return total[0], time.perf_counter() - t0


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _verify(path: str, params) -> int:
    """Compare every loaded (native) leaf with the bytes in the files; the number of tensors compared."""
    import numpy as np

    from . import checkpoint as C
    from . import params as P
    from .safetensors_io import CheckpointDir
    n = 0
    with CheckpointDir(path) as ck:
        for leaf, arr in P.flatten(params).items():
            for name, h in C.official_view({leaf: arr}).items():
                want = ck.read(name)
                if not np.array_equal(np.asarray(h).view(np.uint8), np.asarray(want).view(np.uint8)):
                    raise AssertionError(f"loaded {name} differs from {ck.tensors[name].file}")
                n += 1
            ck.close()
    return n


def _child(path: str, dtype: str, verify: str = "") -> None:
    """Runs in a fresh process: time v4jax.load onto the default device, report JSON on the last line."""
    import jax
    import jax.numpy as jnp

    from . import checkpoint as C
    from .safetensors_io import CheckpointDir
    jax.block_until_ready(jnp.zeros(8) + 1)                  # backend up before the clock starts
    with CheckpointDir(path) as ck:
        nbytes = sum(t.nbytes for t in ck.tensors.values())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
    except OSError:
        base = _status("VmHWM")
    t0 = time.perf_counter()
    cfg, params = C.load(path, dtype=dtype, progress=False)
    jax.block_until_ready(params)
    dt = time.perf_counter() - t0
    dev = sum(x.nbytes for x in jax.tree.leaves(params))
    rss = _status("VmHWM") - base
    checked = _verify(path, params) if verify else 0
    print(json.dumps(dict(seconds=dt, bytes=nbytes, device_bytes=dev, rss=rss, checked=checked,
                          device=str(jax.devices()[0].device_kind), platform=jax.devices()[0].platform)))


def _run_child(path: str, dtype: str, timeout: float, verify: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", "import sys; from v4jax.bench_load import _child; "
                        "_child(*sys.argv[1:])", path, dtype, "verify" if verify else ""], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return dict(error=" | ".join(tail)[-300:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the benchmark -------------------------------------------------------------------------------------
def _log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def _ensure_checkpoint(args) -> tuple[object, float | None]:
    from . import checkpoint as C
    from .convert import random_config
    cfg = random_config(args.config, args.layers)
    if os.path.exists(args.dir):
        try:
            got, ck, _ = C.open_hf(args.dir)
            ck.close()
            why = "" if got == cfg else "another config"
        except ValueError as e:
            why = str(e).splitlines()[0]
        if why:
            raise SystemExit(f"{args.dir} exists and is not this benchmark's checkpoint ({why}): remove it or "
                             f"pass another --dir")
        _log(f"reusing {args.dir}")
        return cfg, None
    # in a child process: a JAX backend started here would keep (preallocate) the device memory that the
    # load measurements in their own processes need
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "v4jax.convert", "--random", args.config, "--to", args.dir, "--seed", "0",
           "--layers", str(args.layers)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return cfg, time.perf_counter() - t0


def bench_load(args) -> int:
    t_start = time.perf_counter()
    cfg, t_write = _ensure_checkpoint(args)
    files = _files(args.dir)
    total = sum(os.path.getsize(p) for p in files)
    from . import checkpoint as C
    from . import params as P
    inv = C.official_inventory(cfg)
    blocks: dict[str, int] = {}
    decl = P.declare(cfg)
    for block, names in C._groups(cfg):
        blocks[block] = sum(_nbytes(inv[n]) for name in names
                            for n in C._official_names(name, decl[name], cfg.n_routed_experts))
    largest = max(blocks.values())
    _log(f"checkpoint: {len(files)} files, {total / 1e9:.2f} GB, largest block {largest / 1e9:.2f} GB"
         + (f", written in {t_write:.0f} s ({total / 1e9 / t_write:.2f} GB/s)" if t_write else ""))
    rows = []

    def row(case, cache, nbytes, secs, rss=None, dev=None, note=""):
        rows.append((case, cache, nbytes / 1e9, secs, nbytes / 1e9 / secs if secs else float("nan"),
                     None if rss is None else rss / 1e9, None if dev is None else dev / 1e9, note))
        _log(f"  {case:<28} {cache:<5} {nbytes / 1e9:7.2f} GB {secs:7.2f} s {rows[-1][4]:6.2f} GB/s"
             + (f"  rss +{rss / 1e9:.2f} GB" if rss is not None else "") + (f"  {note}" if note else ""))

    how = drop_caches(files) if args.cold else ""
    for threads in (1, 8):
        if threads == 8 and args.cold:
            how = drop_caches(files)
        if how:
            n, s = read_files(files, threads)
            row(f"disk read, {threads} thread{'s' * (threads > 1)}", "cold", n, s, note=how)
        n, s = read_files(files, threads)
        row(f"disk read, {threads} thread{'s' * (threads > 1)}", "warm", n, s)
    device = ""
    for dtype in args.dtype.split(","):
        for cache in ("cold", "warm"):
            if time.perf_counter() - t_start > args.time_budget:
                _log(f"  time budget spent: skipping {dtype} {cache}")
                continue
            if cache == "cold":
                if not args.cold or not drop_caches(files):
                    continue
            else:
                read_files(files, 8)                           # make sure every page is cached
            verify = dtype == "native" and cache == "warm" and not args.no_verify
            r = _run_child(args.dir, dtype, timeout=max(60.0, args.time_budget), verify=verify)
            if "error" in r:
                _log(f"  load {dtype} {cache}: {r['error']}")
                rows.append((f"v4jax.load dtype={dtype}", cache, total / 1e9, None, None, None, None, r["error"]))
                continue
            device = device or f"{r['platform']}: {r['device']}"
            row(f"v4jax.load dtype={dtype}", cache, r["bytes"], r["seconds"], r["rss"], r["device_bytes"],
                "" if not r.get("checked") else f"all {r['checked']} tensors checked against the files")
    table = _table(cfg, args, total, largest, t_write, device, rows)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(total=total, largest_block=largest, write_seconds=t_write, device=device,
                           rows=rows), f, indent=1)
    return 0


def _nbytes(s) -> int:
    import numpy as np
    return int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize


def _table(cfg, args, total, largest, t_write, device, rows) -> str:
    lines = [f"### Checkpoint load ({args.config} width, {cfg.num_hidden_layers} layers + MTP: "
             f"{total / 1e9:.2f} GB in {len(_files(args.dir))} files, largest block {largest / 1e9:.2f} GB; "
             f"{device or 'no device run'})", "",
             "| what | page cache | GB | s | GB/s | peak host RSS above baseline (GB) | on device (GB) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for case, cache, gb, s, rate, rss, dev, note in rows:
        f = (lambda x, d=2: "" if x is None else f"{x:.{d}f}")
        lines.append(f"| {case} | {cache} | {gb:.2f} | {f(s)} | {f(rate)} | {f(rss)} | {f(dev)} | {note} |")
    if t_write:
        lines.append(f"\nRandom checkpoint written in {t_write:.0f} s ({total / 1e9 / t_write:.2f} GB/s, "
                     f"generated on the device).")
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Register the `load` subcommand on an argparse subparsers object (for python -m v4jax.bench)."""
    p = sub.add_parser("load", help="checkpoint load throughput (disk -> device) and peak host memory")
    _arguments(p)
    p.set_defaults(func=bench_load)


def _arguments(p) -> None:
    p.add_argument("--config", default="flash", help="preset or config.json whose width is used (default flash)")
    p.add_argument("--layers", type=int, default=4, help="layers of the random checkpoint (plus MTP)")
    p.add_argument("--dtype", default="native,fp8", help="comma list of load dtypes: native, bf16, fp8")
    p.add_argument("--dir", default="/tmp/v4jax-bench-load", help="where the random checkpoint is (re)used")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; later load cases are skipped")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure with the page cache dropped (drops the whole machine's cache if root)")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the warm native load with the files")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m v4jax.bench_load", description=__doc__.splitlines()[0])
    _arguments(ap)
    return bench_load(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
