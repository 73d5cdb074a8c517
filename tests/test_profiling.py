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


HLO = '''HloModule jit_f

FileNames
1 "/x/v4jax/model.py"
2 "/x/v4jax/layers.py"

FunctionNames
1 "decode_step"
2 "rms_norm"

FileLocations
1 {file_name_id=1 function_name_id=1 line=290 end_line=290 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=118 end_line=118 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}

ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %loop_add_fusion = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(f)/add" stack_frame_id=2}
}
'''


def test_hlo_sources_reads_stack_frames():
    src = profiling.hlo_sources(HLO)
    # frame 2 is layers.py:118 called from frame 1 (parent ids are printed one above the parent's id)
    assert src["loop_add_fusion"] == ("layers.py:118 rms_norm < model.py:290 decode_step", "jit(f)/add")
    old = '  %fusion.3 = f32[8] fusion(%p), metadata={op_name="a/b" source_file="/y/attention.py" source_line=42}'
    assert profiling.hlo_sources(old)["fusion_3"] == ("attention.py:42", "a/b")


def test_by_source_groups_kernels_by_line(tmp_path):
    rows = profiling.by_source(_write(tmp_path), HLO, steps=1)
    text = "\n".join(rows)
    assert "| layers.py:118 rms_norm < model.py:290 decode_step | 0.001 | 1.0 | 13.3 | add |" in text
    assert "| [grouped_matmul_fp4] | 0.006 | 2.0 | 80.0 |" in text     # no instruction of that name


def test_report_is_both_tables_and_keeps_the_hlo(tmp_path):
    d = _write(tmp_path / "trace")
    rows = profiling.report(d, HLO, steps=2, wall_s=10e-6)
    assert rows == profiling.summarize(d, steps=2, top=25, wall_s=10e-6) + profiling.by_source(d, HLO, steps=2,
                                                                                                top=60)
    assert (tmp_path / "trace.hlo.txt").read_text() == HLO
