"""scripts/list_f32_dots.py on the tiny bench_train step: with the GPU dispatch forced, no fp32 GEMM is left in
the training step outside the Pallas kernels' own code (issue 6: the backward of every bf16 linear, the grouped
wo_a, the mHC mixes and hc_post were fp32 SIMT GEMMs on H100)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "list_f32_dots.py"


@pytest.fixture
def lister():
    spec = importlib.util.spec_from_file_location("list_f32_dots", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    jax.clear_caches()          # jitted helpers traced under the other dispatch must not be reused either way
    yield mod
    jax.clear_caches()


def test_no_f32_gemms_in_the_training_step_on_gpu(lister, monkeypatch):
    lister.force_gpu_dispatch(monkeypatch.setattr)
    rows = lister.f32_dots("tiny", seq_len=256, batch=2)
    # only the sparse attention's pool backward (pallas_kernels, used when the pool is <= 8x the index list, i.e.
    # at these tiny sizes and not at 1b) may remain
    assert all(r.via.startswith("pallas_kernels/") for r, _ in rows), [r for r, _ in rows]


def test_cpu_dispatch_lists_the_fp32_paths(lister):
    rows = lister.f32_dots("tiny", seq_len=256, batch=2)
    wheres = {r.where for r, _ in rows}
    # off GPU the fp32 linears (head, compressor, router) and the mixes stay fp32 einsums, and are listed
    assert any(w.startswith("v4jax/losses.py") for w in wheres) and any(w.startswith("v4jax/hyper.py")
                                                                         for w in wheres)
    assert all(r.role in ("fwd", "bwd", "bwd dL", "bwd dR") and r.flops > 0 for r, _ in rows)
