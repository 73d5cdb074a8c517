"""`python -m v4jax.bench full` end to end on 2 CPU devices (a tiny model): weights generated onto an expert mesh,
AOT compiles, prefill, a random production-format cache, the decode loop, the tables and the JSON."""
import json
import os
import subprocess
import sys

import pytest


def test_bench_full_runs_on_cpu(tmp_path):
    out = tmp_path / "full.json"
    cmd = [sys.executable, "-m", "v4jax.bench", "full", "--model", "tiny", "--layers", "3", "--cpu-devices", "2",
           "--mesh", "expert=2", "--rules", "q_heads=expert,o_groups=expert", "--prefill", "2x256", "--decode", "1x256", "--steps", "3", "--threads", "2",
           "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 2 and res["mesh"]["expert"] == 2 and res["layers"] == 3
    assert res["weights_held_GB"] > res["weights_checkpoint_GB"] * 0.5       # experts split, the rest replicated
    (pre,), (dec,) = res["prefill"], res["decode"]
    assert pre["error"] is None and pre["tokens_per_s"] > 0 and pre["micro_batch"] == 2
    assert dec["error"] is None and dec["ms_per_token"] > 0 and dec["steps"] == 3
    assert dec["step_bytes_GB"] > 0 and "production format" in dec["cache"]
    assert res["kv_bytes_per_token"] < res["kv_bytes_per_token_bf16"]
    assert "| decode B x ctx |" in r.stdout


def test_case_lists_parse_or_name_the_bad_case():
    from v4jax.bench_full import _parse_cases
    assert _parse_cases("1x8K, 32x64k,1x1M,2x100") == [(1, 8192), (32, 65536), (1, 1 << 20), (2, 100)]
    assert _parse_cases("") == []
    with pytest.raises(ValueError, match="'8K'"):
        _parse_cases("1x8K,8K")
