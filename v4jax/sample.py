"""Sample from a DeepSeek-V4 model: `python -m v4jax.sample --help`.

Loads a checkpoint (HF safetensors or v4jax Orbax, via `v4jax.load`), or the shipped demo model, or -- when
neither is there -- a clearly labelled random tiny model, and streams generated text to the terminal.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"

EXAMPLES = """\
examples:
  # raw completion with the shipped demo model (a random tiny model if the demo is not installed)
  python -m v4jax.sample --prompt "Once upon a time" --max-new-tokens 64

  # chat with a real checkpoint, thinking mode, the reference's sampling temperature
  python -m v4jax.sample --checkpoint /ckpt/DeepSeek-V4-Flash --chat --thinking high \\
      --temperature 0.6 --prompt "Why is the sky blue?"

  # a batch: one prompt per line of a file, greedy
  python -m v4jax.sample --checkpoint /ckpt/v4-orbax --prompt-file prompts.txt --greedy

  # multi-turn chat on the terminal (/reset clears the conversation, /exit or Ctrl-D ends)
  python -m v4jax.sample --checkpoint /ckpt/DeepSeek-V4-Flash --interactive --system "Be brief."

  # experts spread over 8 GPUs
  python -m v4jax.sample --checkpoint /ckpt/DeepSeek-V4-Flash --mesh expert=8 --chat --prompt "hi"

Without --checkpoint the demo model in v4jax/assets/demo/ is used; if it is missing, a random tiny model
(ModelConfig.preset("tiny") + the byte-level tokenizer) is used instead, and a notice says so: its output is
noise, but the whole pipeline runs. Tokens/s (prefill and decode separately) are printed at the end, on stderr.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m v4jax.sample",
        description="Generate text with a DeepSeek-V4 model (raw completion, chat, or interactive chat).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", metavar="DIR",
                   help="HF safetensors directory or v4jax Orbax directory (default: the demo model)")
    m.add_argument("--tokenizer", metavar="DIR",
                   help="directory with tokenizer.json (default: the checkpoint directory)")
    m.add_argument("--dtype", choices=("native", "bf16"), default="native",
                   help="weights as stored (FP8/FP4 + scales, dequantized in the matmul) or bf16 (default: native)")
    m.add_argument("--mesh", metavar="SPEC",
                   help='device mesh, e.g. "expert=8" or "data=2,expert=4" (axes: data, expert, seq, tensor)')
    m.add_argument("--max-len", type=int, metavar="N",
                   help="cache length = longest prompt + reply (default: sized per call)")
    m.add_argument("--prefill-chunk", type=int, default=64, metavar="N",
                   help="prefill a prompt up to a multiple of N and feed the rest (< N tokens) through the decode "
                        "loop: prefill then compiles once per multiple of N instead of once per prompt length "
                        "(default: 64; 0 = prefill every prompt whole)")

    i = p.add_argument_group("input")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="the prompt (default: a short sample prompt)")
    src.add_argument("--prompt-file", metavar="FILE", help="one prompt per line; all lines run as one batch")
    src.add_argument("--interactive", action="store_true",
                     help="multi-turn chat reading user turns from stdin (implies --chat)")
    i.add_argument("--chat", action="store_true",
                   help="treat prompts as user messages in the V4 chat format and print the parsed reply")
    i.add_argument("--system", metavar="TEXT", help="system message (chat modes)")
    i.add_argument("--thinking", choices=("none", "high", "max"), default="none",
                   help="chat mode: none = direct answer, high = reasoning first, max = Think Max (default: none)")

    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="reply length budget (default: 256)")
    s.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature (default: 1.0, the official generation_config; the reference uses 0.6)")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1.0 = off)")
    s.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (default: 0 = off)")
    s.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    s.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable); the output is cut before it")
    return p


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def make_mesh(spec: str):
    """The mesh of --mesh (v4jax.sharding.make_mesh), set around loading and generation."""
    try:
        from . import sharding
    except ImportError as e:
        fail(f"--mesh {spec!r} needs sharding support (v4jax.sharding), which this installation does not have "
             f"({e}); run without --mesh")
    try:
        return sharding.make_mesh(spec)
    except ValueError as e:
        fail(f"--mesh {spec!r}: {e}")


def place_on_mesh(cfg, params, mesh):
    """Put the parameters on their shardings (a no-op for a checkpoint `v4jax.load` already placed)."""
    from . import sharding
    return sharding.place(cfg, params, mesh)


def _load_checkpoint(path: Path, dtype: str, tokenizer_dir: str | None):
    try:
        from . import load
    except ImportError as e:
        raise RuntimeError(f"loading a checkpoint needs v4jax.load (v4jax/checkpoint.py), which is not "
                           f"importable in this installation: {e}") from e
    from .tokenizer import Tokenizer
    tdir = Path(tokenizer_dir) if tokenizer_dir else path
    if not (tdir / "tokenizer.json").is_file():
        fail(f"{tdir}/ has no tokenizer.json: pass --tokenizer DIR (the HF checkpoint directory ships one)")
    cfg, params = load(str(path), dtype=dtype)
    return cfg, params, Tokenizer.from_dir(tdir)


def random_tiny_model(seed: int = 0):
    """ModelConfig.preset("tiny") with random weights and the byte-level tokenizer (vocab covering it)."""
    import jax
    from .config import ModelConfig
    from .params import init_params
    from .tokenizer import build_byte_tokenizer
    tok = build_byte_tokenizer()
    cfg = ModelConfig.preset("tiny")
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size))
    return cfg, init_params(cfg, jax.random.PRNGKey(seed), dtype="bf16"), tok


def load_model(args):
    """-> (cfg, params, tokenizer, description)."""
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.exists():
            fail(f"--checkpoint {path}: no such directory")
        try:
            cfg, params, tok = _load_checkpoint(path, args.dtype, args.tokenizer)
        except (RuntimeError, ValueError, OSError) as e:     # CheckpointError is a ValueError
            fail(f"cannot load --checkpoint {path}: {e}")
        return cfg, params, tok, str(path)
    if all((DEMO_DIR / f).is_file() for f in ("tokenizer.json", "config.json")):
        try:
            cfg, params, tok = _load_checkpoint(DEMO_DIR, args.dtype, args.tokenizer)
            return cfg, params, tok, f"demo model ({DEMO_DIR})"
        except RuntimeError as e:
            reason = str(e)
    else:
        reason = f"no demo model in {DEMO_DIR}/"
    print(f"notice: {reason} and no --checkpoint: using a RANDOM tiny model (untrained; its output is noise)",
          file=sys.stderr, flush=True)
    cfg, params, tok = random_tiny_model(args.seed)
    return cfg, params, tok, "random tiny model"


def _print_stats(results) -> None:
    st = results[0].stats
    pre = (f"prefill: {st.prefill_tokens} of {st.prompt_tokens} prompt tokens, {st.prefill_tokens_per_s:.1f} tok/s"
           if st.prefill_tokens else f"prefill: none ({st.prompt_tokens} prompt tokens fed through decode)")
    print(f"[{pre} | decode: {st.decode_tokens} tokens, {st.decode_tokens_per_s:.1f} tok/s (batch {st.batch}) | "
          f"generated {st.generated_tokens} | compile {st.compile_s:.1f}s | "
          f"finish: {', '.join(r.finish_reason for r in results)}]", file=sys.stderr, flush=True)


def _stream_printer():
    def emit(_index: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
    return emit


def run(args) -> int:
    import jax

    mesh = make_mesh(args.mesh) if args.mesh else None
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 0:
        fail(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    if args.max_len is not None and args.max_len < 2:
        fail(f"--max-len must be >= 2, got {args.max_len}")
    ctx = jax.set_mesh(mesh) if mesh is not None else _nullcontext()
    with ctx:
        t = time.perf_counter()
        cfg, params, tok, what = load_model(args)
        if mesh is not None:
            params = place_on_mesh(cfg, params, mesh)
            what += f" on mesh {dict(mesh.shape)}"
        print(f"[{what}: {cfg.n_layers} layers, hidden {cfg.dim}, vocab {cfg.vocab_size}; "
              f"loaded in {time.perf_counter() - t:.1f}s]", file=sys.stderr, flush=True)
        from .generate import Generator
        try:
            gen = Generator(cfg, params, tok, max_len=args.max_len, prefill_chunk=args.prefill_chunk or None)
        except ValueError as e:
            fail(str(e))
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, greedy=args.greedy, seed=args.seed, stop=tuple(args.stop))
        try:
            if args.interactive:
                return _interactive(gen, args, sampling)
            if args.prompt_file:
                lines = [ln.rstrip("\r\n") for ln in Path(args.prompt_file).read_text(encoding="utf-8").splitlines()]
                prompts = [ln for ln in lines if ln.strip()]
                if not prompts:
                    fail(f"--prompt-file {args.prompt_file}: no non-empty lines")
            else:
                prompts = [args.prompt if args.prompt is not None else "The quick brown fox"]
            return _batch(gen, args, prompts, sampling)
        except ValueError as e:
            fail(str(e))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _conversation(args, user_text: str) -> list[dict]:
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": user_text}]


def _batch(gen, args, prompts: list[str], sampling: dict) -> int:
    single = len(prompts) == 1
    stream = _stream_printer() if single else None
    if args.chat:
        results = gen.chat([_conversation(args, p) for p in prompts], thinking=args.thinking, stream=stream,
                           **sampling)
    else:
        results = gen.generate(prompts, stream=stream, **sampling)
    if single:
        sys.stdout.write("\n")
    else:
        for k, (p, r) in enumerate(zip(prompts, results)):
            print(f"=== [{k}] {p}")
            print(r.text)
    if args.chat and single and args.thinking != "none":
        m = results[0].message
        print(f"[reasoning: {len(m['reasoning_content'])} chars, answer: {len(m['content'])} chars]",
              file=sys.stderr)
    sys.stdout.flush()
    _print_stats(results)
    return 0


def _interactive(gen, args, sampling: dict) -> int:
    from .chat import completion_to_message
    history = [{"role": "system", "content": args.system}] if args.system else []
    base = list(history)
    tty = sys.stdin.isatty()
    print("[interactive chat: type a message; /reset clears the conversation, /exit or Ctrl-D ends]",
          file=sys.stderr, flush=True)
    turn = 0
    while True:
        if tty:
            sys.stderr.write("\n> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(base)
            print("[conversation cleared]", file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": text})
        r = gen.chat(history, thinking=args.thinking, stream=_stream_printer(),
                     **{**sampling, "seed": sampling["seed"] + turn})
        sys.stdout.write("\n")
        sys.stdout.flush()
        _print_stats([r])
        history.append(completion_to_message(r.message))
        turn += 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from .xla_flags import apply_defaults
    apply_defaults()
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
