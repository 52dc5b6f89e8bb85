"""Workload generation and serving metrics used by the benchmarks."""
import os

import numpy as np

from infinilora_jax.bench import metrics, workload


def test_workload_is_seeded_and_follows_its_spec():
    spec = workload.WorkloadSpec(num_requests=4000, rate=10.0, num_adapters=16, zipf_s=1.2, base_fraction=0.25,
                                 prompt_len=workload.LengthDist.parse("8:64"),
                                 output_len=workload.LengthDist.parse("5"))
    a, b = workload.generate(spec, 512), workload.generate(spec, 512)
    assert [(r.arrival, r.adapter, r.prompt) for r in a] == [(r.arrival, r.adapter, r.prompt) for r in b]
    gaps = np.diff([r.arrival for r in a])
    assert abs(gaps.mean() - 0.1) < 0.01 and abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # exponential gaps
    assert all(8 <= len(r.prompt) <= 64 and r.max_tokens == 5 for r in a)
    base = np.mean([r.adapter is None for r in a])
    assert abs(base - 0.25) < 0.03
    counts = np.bincount([r.adapter for r in a if r.adapter is not None], minlength=16)
    want = workload.zipf_weights(16, 1.2) * counts.sum()
    assert np.abs(counts - want).max() < 0.2 * want[0] and counts[0] > 3 * counts[15]
    bursty = workload.generate(workload.WorkloadSpec(num_requests=4000, rate=10.0, burstiness=0.25), 512)
    bg = np.diff([r.arrival for r in bursty])
    assert abs(bg.mean() - 0.1) < 0.015 and bg.std() / bg.mean() > 1.6  # gamma(0.25): CV = 2


def test_lognormal_lengths_are_clipped():
    d = workload.LengthDist.parse("lognormal:100:1.0:10:400")
    x = d.sample(np.random.default_rng(0), 5000)
    assert x.min() >= 10 and x.max() <= 400 and 80 < np.median(x) < 120


def test_slo_attainment_per_adapter():
    slo = metrics.SLO(ttft_s=0.25, tpot_s=0.1)
    t = [metrics.RequestTiming("a", 0.0, 0.1, 1.0, 10, 11),  # ttft 0.1, tpot 0.09: meets
         metrics.RequestTiming("a", 0.0, 0.3, 1.0, 10, 11),  # ttft too slow
         metrics.RequestTiming("b", 1.0, 1.2, 1.47, 10, 4),  # meets (tpot 0.09)
         metrics.RequestTiming("b", 1.0, 1.1, 3.1, 10, 11)]  # tpot 0.2: too slow
    r = metrics.summarize(t, wall_seconds=4.0, slo=slo)
    assert r["per_adapter_attainment"] == {"a": 0.5, "b": 0.5}
    assert r["adapters_meeting_slo"] == 0.0 and r["requests_meeting_slo"] == 0.5
    assert r["output_tokens_per_s"] == 37 / 4.0
    r = metrics.summarize(t[:1] + t[2:3], 4.0, slo)
    assert r["adapters_meeting_slo"] == 1.0


def test_device_trace_summary_of_a_real_profile(tmp_path):
    """A real jax.profiler trace of a jitted matmul is summarised: busy time within the span, the ops counted per
    call, kernel names categorised."""
    import jax
    import jax.numpy as jnp

    from infinilora_jax.bench import device_trace

    f = jax.jit(lambda x: jnp.sin(x @ x).sum())
    x = jnp.ones((128, 128))
    f(x).block_until_ready()
    with device_trace.traced(str(tmp_path)) as where:
        for _ in range(3):
            f(x).block_until_ready()
    summary = device_trace.summarize(where(), calls=3)
    assert summary
    for s in summary.values():
        assert 0 < s["busy_us"] <= s["span_us"] + 1e-6
        assert 0 <= s["idle_share"] < 1
        # the top kernels are a subset of all ops, each op in exactly one category
        assert sum(v for _, v in s["top_us"]) <= sum(s["by_category_us"].values()) + 1e-6
        assert s["ops_per_call"] >= 1
        idle = s["span_us"] - s["busy_us"]  # per call; the idle time splits into inside and between calls
        assert s["in_call_idle_us"] >= -1e-6 and s["between_calls_us"] >= 0
        assert abs(s["in_call_idle_us"] + 2 * s["between_calls_us"] / 3 - idle) < 1e-3 * max(idle, 1)
    assert "us" in device_trace.format_summary(summary)
    assert device_trace.category("ncclDevKernel_SendRecv") == "collective"
    assert device_trace.category("nvjet_hsh_128x256_64x4") == "gemm"
    assert device_trace.category("loop_add_fusion") == "other"


def test_device_trace_gaps_split_between_and_inside_calls():
    from infinilora_jax.bench import device_trace

    # two calls of [0, 10) + [12, 20), separated by a 50 us gap
    spans = [(0, 10), (12, 20), (70, 80), (82, 90), (5, 9)]
    assert device_trace._busy(spans) == 36
    assert device_trace._gaps(spans) == [50, 2, 2]


def test_device_trace_attributes_gaps_to_the_programs_around_them(tmp_path):
    """Idle time inside a call splits into gaps between two programs and gaps within one, each of the largest
    listed with the ops around it; the largest calls-1 gaps are the time between calls."""
    import gzip
    import json

    from infinilora_jax.bench import device_trace

    def op(name, ts, dur, module):
        return {"ph": "X", "pid": 1, "tid": 1, "name": name, "ts": ts, "dur": dur, "args": {"hlo_module": module}}

    # two calls (steps), each: program "fwd" with a 30 us stall inside it, a 100 us host gap, program "sample"
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
    for t0 in (0, 1000):
        events += [op("gemm_a", t0, 10, "fwd"), op("fusion_b", t0 + 40, 10, "fwd"), op("short", t0 + 42, 2, "fwd"),
                   op("argmax", t0 + 150, 5, "sample")]
    path = tmp_path / "plugins" / "profile" / "x"
    path.mkdir(parents=True)
    with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = device_trace.summarize(str(tmp_path), calls=2)["/device:GPU:0"]
    assert s["between_calls_us"] == 845  # 1000 - 155
    assert s["idle_between_programs_us"] == 100 and s["idle_within_programs_us"] == 30
    assert abs(s["in_call_idle_us"] - 130) < 1e-9
    assert s["program_runs_per_call"] == 2
    top = s["largest_gaps"][1]
    assert (top["us"], top["before"], top["after"], top["before_module"], top["after_module"]) == \
        (100, "fusion_b", "argmax", "fwd", "sample")  # the op that ended last, not the one that started last
    assert "100 us between programs" in device_trace.format_summary({"/device:GPU:0": s})


def test_busy_time_is_the_union_of_intervals():
    from infinilora_jax.bench.device_trace import _busy

    assert _busy([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert _busy([]) == 0


def test_child_items_protocol_and_failures(tmp_path):
    """run_child reads a child's TAG rows and STAGE lines, and names how a child failed (crash, timeout, no row)
    with the stage it was in and its CUDA error."""
    import sys

    from infinilora_jax.bench import child_items

    def child(body: str) -> list[str]:
        script = tmp_path / "child.py"
        script.write_text(f"import sys, time\nsys.path.insert(0, {os.getcwd()!r})\n"
                          f"from infinilora_jax.bench.child_items import emit, stage\n{body}\n")
        return [sys.executable, str(script)]

    ok = child_items.run_child(child("stage('setup'); emit({'x': 1.5}); emit({'y': 2})"), dict(os.environ), 60)
    assert ok.failure is None and ok.rows == [{"x": 1.5}, {"y": 2}] and ok.stages == ["setup"]
    crash = child_items.run_child(child("stage('run'); sys.stderr.write('CUDA_ERROR_MISALIGNED_ADDRESS here\\n');"
                                        " sys.exit(3)"), dict(os.environ), 60)
    fields = crash.failure_fields()
    assert crash.failure == "CRASH rc=3" and fields["ok"] is False
    assert fields["detail"] == "CRASH rc=3 in stage 'run': CUDA_ERROR_MISALIGNED_ADDRESS here"
    assert fields["tail"] == ["CUDA_ERROR_MISALIGNED_ADDRESS here"]
    slow = child_items.run_child(child("stage('time'); time.sleep(30)"), dict(os.environ), 3)
    assert slow.failure == "TIMEOUT" and slow.failure_fields()["detail"] == "TIMEOUT in stage 'time'"
    assert child_items.run_child(child("pass"), dict(os.environ), 60).failure == "NO ROW"


def test_feedback_loop_runs_every_call_and_copy_seconds():
    import jax.numpy as jnp

    from infinilora_jax.bench import child_items

    calls = []
    run = child_items.feedback_loop(lambda x, w: (calls.append(1), x @ w)[1])
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    out = run(5, x, w)
    assert out.shape == x.shape and bool(jnp.all(out == x))  # the fed-back zero leaves the input unchanged
    assert len(calls) == 1
    assert run(5, x, w).shape == x.shape and len(calls) == 1  # the same n reuses the compiled loop
    assert run(2, x, w).shape == x.shape and len(calls) == 2  # the trip count is static: XLA knows it
    hlo = run.lower(3, x, w).compile().as_text()
    assert "known_trip_count" in hlo
    assert child_items.copy_seconds(jnp.ones((1024,)), 3, 2) > 0


def test_timing_loop_keeps_every_call_of_integer_and_float_outputs():
    """kernel_timing's unrolled loop must run the call once per iteration: an integer output fed back as
    `v * 0` was folded to 0 and the calls dropped as dead code (group_rows timed ~0 us on the H200)."""
    import jax.numpy as jnp

    from infinilora_jax.bench import kernel_timing

    keys = jnp.arange(100, dtype=jnp.int32)[::-1]
    sorts = kernel_timing.timing_loop(jnp.argsort, 3).lower(keys).compile().as_text().count(" sort(")
    assert sorts == 3
    x = jnp.ones((64, 64))
    assert kernel_timing.timing_loop(lambda v: v @ v, 3).lower(x).compile().as_text().count(" dot(") == 3
    assert bool(jnp.all(kernel_timing.timing_loop(jnp.argsort, 3)(keys) == keys))  # the fed-back zero


def test_timing_harness_does_not_copy_its_input():
    """The loop's own cost (kernel_timing.identity) must not include copying x: returning x itself kept it
    alive through the barrier and XLA copied it before the feedback write (on the H200 every iteration: 18 us
    at 4,096 x 4,096 bf16, subtracted from every figure). On CPU that shows as one extra full-size copy."""
    import re

    import jax.numpy as jnp

    from infinilora_jax.bench import kernel_timing

    x = jnp.ones((512, 256), jnp.bfloat16)

    def full_copies(fn):
        hlo = kernel_timing.timing_loop(fn, 4).lower(x).compile().as_text()
        return len(re.findall(r"bf16\[512,256\]\S* copy\(", hlo))

    assert full_copies(lambda v: v) == 2  # the input's copy, and one more for returning x through the barrier
    assert full_copies(kernel_timing.identity) == 1  # the input's copy only


def test_lora_kernels_benchmark_redraws_its_plot(tmp_path):
    """benchmarks/lora_kernels.py --plot_from: the script imports and draws dense and per-expert rows (a failed
    variant, which has no time, is left out of the bars)."""
    import json
    import subprocess
    import sys

    rows = [dict(op="delta", tokens=64, adapters=32, rank=16, variant=v, us=us, floor_us=3.4)
            for v, us in (("reference", 9.5), ("gpu-kernel-rm", 18.8))]
    expert = dict(op="expert delta", case="qwen3-gate_up", tokens=64, rows=512, adapters=32, rank=32)
    rows += [dict(expert, variant="reference", us=95.7, floor_us=38.9),
             dict(expert, variant="gpu-kernel-rm", error="RuntimeError: x")]
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"rows": rows}))
    subprocess.run([sys.executable, "benchmarks/lora_kernels.py", "--plot_from", str(run)], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    png = (tmp_path / "run.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_lora_kernels_benchmark_smoke_run(tmp_path):
    """benchmarks/lora_kernels.py --smoke on CPU: every case kind is built, every CPU variant checked against
    the reference (the run fails if one disagrees) and the JSON written."""
    import json
    import subprocess
    import sys

    out = tmp_path / "smoke"
    subprocess.run([sys.executable, "benchmarks/lora_kernels.py", "--smoke", "--out", str(out)], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600, capture_output=True)
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"shrink", "delta", "expert delta", "qkv delta"}
    assert {r["segments"] for r in rows if r["op"] == "delta"} == {False, True}  # tokens in segments too
    assert all(r["rel_err"] < 1e-2 for r in rows)  # one-hot and ragged_dot round s to bf16: 1.6e-3
    assert max(r["rel_err"] for r in rows if r["variant"] in ("reference-rm", "dispatch")) < 1e-5


def test_decode_variants_compares_two_lora_engines_in_one_process(tmp_path):
    """benchmarks/decode_variants.py --compare lora_backend on CPU (bundled tiny model): two engines, one per LoRA
    backend setting, built and stepped in alternating blocks under their own INFINILORA_LORA_BACKEND; both
    timed for every block, the process environment left as it was. (The numbers mean something on a GPU only;
    CPU's `auto` is the reference, so the second engine is given `reference` explicitly here.)"""
    import json
    import subprocess
    import sys

    out = tmp_path / "lb"
    env = {k: v for k, v in os.environ.items() if k != "INFINILORA_LORA_BACKEND"}
    subprocess.run([sys.executable, "benchmarks/decode_variants.py", "--compare", "lora_backend",
                    "--kernels_backend", "reference", "--requests", "4", "--adapters", "2", "--rank", "16",
                    "--steps", "3", "--blocks", "2", "--prompt_len", "8", "--out", str(out)], check=True,
                   env={**env, "JAX_PLATFORMS": "cpu"}, timeout=600, capture_output=True)
    result = json.loads((tmp_path / "lb.json").read_text())
    assert result["settings"] == {"reference": {"INFINILORA_LORA_BACKEND": "reference"},
                                  "kernels": {"INFINILORA_LORA_BACKEND": "reference"}}
    assert "INFINILORA_LORA_BACKEND" not in result["environment"]
    assert set(result["prefill_and_compile_s"]) == {"reference", "kernels"}
    for way in ("reference", "kernels"):
        assert result[way]["steps"] == 6 and result[way]["step_ms_median"] > 0
    assert result["reference_over_kernels"] > 0


def test_disagg_benchmark_decode_part_plots_its_steps(tmp_path):
    """benchmarks/disagg.py --parts decode on CPU (bundled tiny model, coupled1): the decode rows with and without
    LoRA in the JSON, and a PNG of those steps (with no sweep it once drew empty axes, the same image whatever
    was measured)."""
    import json
    import subprocess
    import sys

    def run(name, requests):
        out = tmp_path / name
        subprocess.run([sys.executable, "benchmarks/disagg.py", "--parts", "decode", "--modes", "coupled1",
                        "--requests", str(requests), "--adapters", "2", "--steps", "2", "--rank", "8",
                        "--prompt_len", "8", "--out", str(out)], check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600, capture_output=True)
        return json.loads((tmp_path / f"{name}.json").read_text()), (tmp_path / f"{name}.png").read_bytes()

    result, png = run("a", 4)
    assert {(r["mode"], r["lora"]) for r in result["decode"]} == {("coupled1", True), ("coupled1", False)}
    assert all(r["step_ms"] > 0 for r in result["decode"])
    assert png.startswith(b"\x89PNG")
    _, other = run("b", 2)
    assert other != png  # the bars follow the measured steps
