"""python -m v4jax.sample: help, argument errors, and one real run (demo model or random tiny fallback)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v4jax import sample

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600, stdin=None):
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    return subprocess.run([sys.executable, "-m", "v4jax.sample", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, input=stdin)


def test_help_exits_0_with_examples():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    for word in ("--checkpoint", "--prompt-file", "--interactive", "--thinking", "--mesh", "examples:"):
        assert word in r.stdout


def test_generates_with_tiny_fallback():
    r = _run("--max-new-tokens", "5", "--prompt", "hi")
    assert r.returncode == 0, r.stderr
    if not (sample.DEMO_DIR / "tokenizer.json").is_file():
        assert "RANDOM tiny model" in r.stderr
    assert "tok/s" in r.stderr and "finish:" in r.stderr


def test_bad_mesh_fails_clearly():
    r = _run("--mesh", "expert=1024", "--prompt", "hi")
    assert r.returncode == 2
    assert "--mesh" in r.stderr and "1024" in r.stderr and "Traceback" not in r.stderr
    r = _run("--mesh", "experts=1", "--prompt", "hi")
    assert r.returncode == 2 and "experts" in r.stderr and "Traceback" not in r.stderr
