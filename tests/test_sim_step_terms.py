"""The simulator's measured step terms beyond the per-step model: the host gap between steps (StepTimeModel.gap_ms,
measured by bench/replay.py host_gaps) and models timed on the disaggregated engine (engine_mode), which the
simulator takes whole."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from infinilora_jax.bench import calibration, replay, simulator, workload

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODEL = calibration.StepTimeModel("toy", 4, 1.0, 0.02, 0.1, 1.0)


def _step(tokens, adapters=1):  # MODEL's step, ms
    return 1.0 + 4 * (1.0 + 0.02 * tokens + 0.1 * adapters)


@pytest.mark.parametrize("jump", [True, False])
def test_host_gap_follows_every_step(jump):
    """One request: three prefill chunks, then four decode steps; a gap after each step delays the next one, not
    the tokens of the step it follows."""
    gap = 2.5
    req = workload.WorkloadRequest(0.0, 0, None, 5, prompt_tokens=300)
    cfg = simulator.ClusterConfig(step=dataclasses.replace(MODEL, gap_ms=gap), cache_slots=1,
                                  max_num_batched_tokens=128)
    sim = simulator.Simulator(cfg)
    sim.jump = jump
    res = sim.run([req])
    (t,) = res.timings
    ttft = _step(128) + gap + _step(128) + gap + _step(44)
    assert t.ttft == pytest.approx(ttft / 1e3)
    assert t.finish == pytest.approx((ttft + 4 * (gap + _step(1))) / 1e3)
    assert res.steps == 7


@pytest.mark.parametrize("mode,engine_mode", [("coupled", "coupled"), ("disaggregated", "coupled"),
                                              ("disaggregated", "disaggregated")])
def test_host_gap_is_charged_in_every_mode(mode, engine_mode):
    """A burst that one replica serves in the same steps with or without the gap: the gap adds exactly
    (steps - 1) gaps to the last finish, and lengthens every request's TPOT."""
    spec = workload.WorkloadSpec(40, 1000.0, 1.0, 8, 1.2, 0.0, workload.LengthDist.parse("8:64"),
                                 workload.LengthDist.parse("4:24"), seed=3)
    reqs = [dataclasses.replace(r, arrival=0.0) for r in workload.generate(spec, None)]
    model = dataclasses.replace(MODEL, engine_mode=engine_mode)
    cfg = simulator.ClusterConfig(mode, 1, model, 8, 20.0, max_num_seqs=8, lora_devices=1)
    plain = simulator.simulate(reqs, cfg)
    gapped = simulator.simulate(reqs, dataclasses.replace(cfg, step=dataclasses.replace(model, gap_ms=3.0)))
    assert gapped.steps == plain.steps > 1
    assert gapped.makespan_s == pytest.approx(plain.makespan_s + (plain.steps - 1) * 3e-3)
    tpot = lambda res: [(t.finish - t.first_token) / (t.output_tokens - 1) for t in res.timings if t.output_tokens > 1]
    assert all(g > p + 2.9e-3 for g, p in zip(tpot(gapped), tpot(plain)))


def test_disaggregated_engine_model_is_taken_whole():
    """A model timed on the disaggregated engine already holds the LoRA server's work and the exchange: its step is
    base + adapter term (the derivation from a coupled model would overlap them, max of the two, and drop the
    adapter term here); it cannot describe a coupled replica, and no exchange is added on top."""
    whole = dataclasses.replace(MODEL, adapters_coef=0.5, engine_mode="disaggregated")
    req = workload.WorkloadRequest(0.0, 0, None, 1, prompt_tokens=10)
    cfg = simulator.ClusterConfig("disaggregated", 1, whole, 4, lora_devices=1)
    (t,) = simulator.simulate([req], cfg).timings
    assert t.ttft == pytest.approx((1.0 + 4 * (1.0 + 0.02 * 10 + 0.5)) / 1e3)
    derived = simulator.simulate([req], dataclasses.replace(cfg, step=dataclasses.replace(whole,
                                                                                          engine_mode="coupled")))
    assert derived.timings[0].ttft == pytest.approx((1.0 + 4 * (1.0 + 0.02 * 10)) / 1e3)  # max(base, LoRA)
    with pytest.raises(ValueError, match="coupled replica"):
        simulator.ClusterConfig("coupled", 1, whole)
    with pytest.raises(ValueError, match="exchange"):
        simulator.ClusterConfig("disaggregated", 1, whole, lora_devices=1, exchange_ms_per_layer=0.07)
    with pytest.raises(ValueError, match="engine_mode"):
        dataclasses.replace(MODEL, engine_mode="split")


def test_step_terms_are_stored_and_loaded(tmp_path):
    model = dataclasses.replace(MODEL, gap_ms=0.3, engine_mode="disaggregated", provenance={"gap_ms": "measured"})
    calibration.save(str(tmp_path / "c.json"), {"toy": model})
    back = calibration.load(str(tmp_path / "c.json"))["toy"]
    assert (back.gap_ms, back.engine_mode, back.provenance) == (0.3, "disaggregated", {"gap_ms": "measured"})
    stored = calibration.load(os.path.join(ROOT, "configs/calibration/cpu-tiny.json"))
    assert all(m.gap_ms == 0.0 and m.engine_mode == "coupled" for m in stored.values())  # not measured there


def test_host_gaps_and_the_step_model_from_records():
    """host_gaps: per step unit, from the end of a step that left work pending to the start of the unit's next
    step; idle time after a step that left none is not a gap. step_model carries their mean and the engine."""
    def rec(unit, start_s, ms, pending, tokens=8, adapters=1):
        return replay.StepRecord(tokens, adapters, 2, 0, ms, ms, 1, 0, unit, start_s, pending)
    records = [rec(0, 0.000, 4.0, True), rec(1, 0.001, 5.0, True), rec(0, 0.0045, 4.0, True),
               rec(1, 0.0068, 5.0, False), rec(0, 0.0090, 4.0, False), rec(1, 0.100, 5.0, True),
               rec(1, 0.1052, 5.0, False)]
    assert sorted(replay.host_gaps(records)) == pytest.approx(sorted([0.5, 0.8, 0.5, 0.2]))
    assert len(replay.host_gaps(records[:1])) == 0
    steps = [rec(0, 0.01 * k, 2 * (0.5 + 0.01 * t + 0.2 * a), True, t, a)
             for k, (t, a) in enumerate((t, a) for t in (8, 32, 64, 128) for a in (0, 1, 3))]
    model = replay.step_model(steps, layers=2, mode="disaggregated")
    gaps = replay.host_gaps(steps)
    assert model["gaps"] == len(steps) - 1 and model["gap_ms"] == pytest.approx(float(np.mean(gaps)))
    assert model["engine_mode"] == "disaggregated" and model["const"] == pytest.approx(0.5)


def test_simulate_from_pools_the_measured_terms(tmp_path):
    """slo_baselines --simulate_from --calibration measured: each baseline's model pools its probes' host gaps
    (weighted by gaps) and is timed on its own engine; each probe is also simulated with its own model; a longer
    gap lowers the simulated rate."""
    def probe(rate, gap_ms, gaps):
        fit = {"layers": 2, "const": 1.0, "tokens_coef": 0.05, "adapters_coef": 0.2, "n": 100,
               "median_error": 0.05, "gap_ms": gap_ms, "gaps": gaps}
        return {"rate": rate, "ok": True, "summary": {"ttft_p95_s": 0.1, "tpot_mean_s": 0.01, "hit_rate": 1.0,
                                                      "adapters_meeting_slo": 1.0, "step_model": fit}}
    def run(gaps, out):
        row = {"slots": 8, "layout": "x", "serviceable_rate": 16.0, "adapters_meeting_slo": 1.0, "hit_rate": 1.0,
               "probes": [probe(8.0, gaps[0], 10), probe(16.0, gaps[1], 30)]}
        src = {"config": {"num_requests": 60, "sweep_adapters": ["8"], "baselines": ["coupled", "disaggregated"],
                          "coupled_slots": 8, "rel_tol": 0.4, "max_num_seqs": 8, "emulated_load_ms": 10.0},
               "sweep": [{"num_adapters": 8, "baselines": {"coupled": row, "disaggregated": row}}],
               "baselines": {}, "simulator": {}}
        (tmp_path / "src.json").write_text(json.dumps(src))
        cmd = [sys.executable, "benchmarks/slo_baselines.py", "--calibration", "measured", "--simulate_from",
               str(tmp_path / "src.json"), "--out", str(tmp_path / out)]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
        assert res.returncode == 0, res.stderr[-2000:]
        report = json.loads((tmp_path / f"{out}.json").read_text())
        return {r["baseline"]: r for r in report["simulator"]["rows"]}
    rows = run((0.2, 1.0), "a")
    for name, mode in (("coupled", "coupled"), ("disaggregated", "disaggregated")):
        model = rows[name]["step_model"]
        assert model["gap_ms"] == pytest.approx((0.2 * 10 + 1.0 * 30) / 40) and model["engine_mode"] == mode
        assert all(p["simulated_own_ttft_p95_s"] > 0 for p in rows[name]["probes"])  # each probe's own model too
    slow = run((20.0, 20.0), "b")
    assert all(slow[n]["simulated"] < rows[n]["simulated"] for n in rows)
