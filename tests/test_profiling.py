"""v4jax.profiling: the kernel table of a profiler trace, on a hand-written XSpace (no GPU needed)."""
import pytest
from jax.profiler import ProfileData

from v4jax import profiling

TRACE = '''
planes {
  name: "/device:GPU:0"
  lines { name: "Stream #14(Compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000 }
    events { metadata_id: 2 offset_ps: 4000000 duration_ps: 1000000 }
    events { metadata_id: 1 offset_ps: 6000000 duration_ps: 3000000 } }
  lines { name: "Stream #15(MemcpyH2D)" timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 0 duration_ps: 500000 } }
  event_metadata { key: 1 value { id: 1 name: "grouped_matmul_fp4" } }
  event_metadata { key: 2 value { id: 2 name: "loop_add_fusion" } }
  event_metadata { key: 3 value { id: 3 name: "MemcpyH2D" } }
}
planes { name: "/host:CPU" lines { name: "python" events { metadata_id: 1 offset_ps: 0 duration_ps: 9 } }
         event_metadata { key: 1 value { id: 1 name: "not a kernel" } } }
'''


def _write(tmp_path):
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    (d / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(TRACE))
    return str(tmp_path)


def test_kernel_table_sums_device_kernels(tmp_path):
    t = profiling.kernel_table(_write(tmp_path))
    assert list(t) == ["/device:GPU:0"]                       # host planes are not kernels
    info = t["/device:GPU:0"]
    assert info["kernels"]["grouped_matmul_fp4"] == 6000 and info["counts"]["grouped_matmul_fp4"] == 2
    assert info["kernels"]["loop_add_fusion"] == 1000 and info["kernels"]["MemcpyH2D"] == 500
    assert info["span_ns"] == 9000                            # first start .. last end over the stream lines


def test_summarize_per_step(tmp_path):
    rows = profiling.summarize(_write(tmp_path), steps=2, wall_s=10e-6)
    text = "\n".join(rows)
    assert "busy 0.004 ms/step in 2 kernels/step" in text     # (6000 + 1000 + 500) ns / 2 steps; 4 events / 2
    assert "wall 0.005 ms/step" in text
    first = [r for r in rows if r.startswith("  | grouped_matmul_fp4")][0]
    assert "| 0.003 | 1.0 | 80.0 |" in first                 # 3 us/step, one call/step, 6000/7500 of busy


def test_missing_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="xplane"):
        profiling.kernel_table(str(tmp_path))
