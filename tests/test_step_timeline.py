"""tools/step_timeline.py: a profiler trace as one timeline of host spans and device program runs."""

import gzip
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import step_timeline  # noqa: E402


def _trace(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "/host:CPU"}}]
    host = [  # the engine thread (most Python frames) and a worker thread whose spans must not show
        {"ph": "X", "pid": 9, "tid": 5, "ts": 0, "dur": 1000, "name": "$engine.py:162 step"},
        {"ph": "X", "pid": 9, "tid": 5, "ts": 10, "dur": 600, "name": "$runner.py:97 _sample"},
        {"ph": "X", "pid": 9, "tid": 5, "ts": 20, "dur": 500, "name": "PjitFunction(_sample)"},
        {"ph": "X", "pid": 9, "tid": 5, "ts": 30, "dur": 5, "name": "$tiny.py:1 short"},
        {"ph": "X", "pid": 9, "tid": 7, "ts": 40, "dur": 300, "name": "$worker.py:1 other"}]
    program = {"hlo_module": "jit__sample"}
    gpu = [{"ph": "X", "pid": 1, "tid": 1, "ts": 100, "dur": 1, "name": "MemcpyH2D"},
           {"ph": "X", "pid": 1, "tid": 1, "ts": 200, "dur": 50, "name": "fusion_1", "args": program},
           {"ph": "X", "pid": 1, "tid": 1, "ts": 252, "dur": 40, "name": "fusion_2", "args": program},
           {"ph": "X", "pid": 1, "tid": 1, "ts": 600, "dur": 2, "name": "MemcpyD2H"}]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + host + gpu}, f)
    return str(tmp_path)


def test_timeline_nests_engine_spans_and_merges_program_runs(tmp_path):
    events = step_timeline.device_trace.load_events(_trace(tmp_path))
    host = [line for _, line in step_timeline.host_lines(events, min_us=30, max_depth=6)]
    assert host == ["host   $engine.py:162 step  1000 us", "host     $runner.py:97 _sample  600 us",
                    "host       PjitFunction(_sample)  500 us"]  # no 5 us span, no worker thread
    device = [line for _, line in step_timeline.device_lines(events, min_us=30)]
    assert device == ["GPU:0  MemcpyH2D: 1 op(s), busy 1 us, ends +1 us",
                      "GPU:0  -- idle 99 us",
                      "GPU:0  jit__sample: 2 op(s), busy 90 us, ends +92 us",
                      "GPU:0  -- idle 308 us",
                      "GPU:0  MemcpyD2H: 1 op(s), busy 2 us, ends +2 us"]
    assert step_timeline.host_lines(events, min_us=30, max_depth=1) == [(0, "host   $engine.py:162 step  1000 us")]


def test_launches_of_one_name_split_by_launch_shape():
    """Kernels sharing a name (Mosaic GPU's body_mosaic_gpu_kernel) told apart by their launch shape."""
    shrink = {"kernel_details": "grid:4,576,1 dynamic_shared:73776"}
    expand = {"kernel_details": "grid:6912,1,1 dynamic_shared:32776"}
    events = [{"ph": "X", "name": "body_mosaic_gpu_kernel", "dur": d, "args": a}
              for d, a in ((26, shrink), (36, expand), (27, shrink), (38, expand), (40, expand))]
    events.append({"ph": "X", "name": "fusion_1", "dur": 500})
    lines = step_timeline.launches(events, "body_mosaic_gpu_kernel", steps=2)
    assert lines == ["     57.0 us/step    1.5 launches/step      38.0 us each  grid:6912,1,1 dynamic_shared:32776",
                     "     26.5 us/step    1.0 launches/step      26.5 us each  grid:4,576,1 dynamic_shared:73776"]
