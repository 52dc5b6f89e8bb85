"""SLO evaluation harness: workloads, trace loading, rate search, admissibility model, SJF, simulator, calibration,
provisioning."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from infinilora_jax.bench import (
    admissibility,
    calibration,
    extrapolation,
    metrics,
    model_shapes,
    provisioning,
    rate_search,
    simulator,
    trace,
    workload,
)
from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.request import Request
from infinilora_jax.engine.scheduler import Scheduler, SchedulerConfig
from infinilora_jax.errors import ConfigError
from infinilora_jax.sampling import SamplingParams

ROOT = os.path.join(os.path.dirname(__file__), "..")


# ---- workloads ----

def test_gamma_arrivals_have_the_asked_cv():
    for cv in (1.0, 2.0, 3.0):
        spec = workload.WorkloadSpec(num_requests=20000, rate=5.0, burstiness=workload.gamma_shape_for_cv(cv))
        gaps = np.diff([r.arrival for r in workload.generate(spec, None)])
        assert abs(gaps.mean() - 0.2) < 0.02 * (1 + cv)
        assert abs(gaps.std() / gaps.mean() - cv) < 0.08 * cv
    with pytest.raises(ValueError):
        workload.gamma_shape_for_cv(0)


def test_burstgpt_length_fits():
    rng = np.random.default_rng(0)
    prompts = workload.LengthDist.parse("burstgpt").sample(rng, 40000)
    assert prompts.min() >= 16 and prompts.max() <= 4096
    assert 150 < np.median(prompts) < 200 and 550 < prompts.mean() < 660  # documented: ~175, ~600
    assert 2500 < np.percentile(prompts, 95) < 3200  # documented: ~2,860
    resp = workload.LengthDist.parse("burstgpt-response:1:20000")
    for p, mean in ((250, 150), (2000, 450)):  # the conversation-log summary the fit follows
        x = resp.sample(rng, 40000, np.full(40000, p))
        assert abs(x.mean() / mean - 1) < 0.06
    x = resp.sample(rng, 40000, np.full(40000, 382))  # mid-band: 5-95% roughly 20..700
    assert 15 < np.percentile(x, 5) < 30 and 550 < np.percentile(x, 95) < 850
    with pytest.raises(ValueError, match="given the prompt"):
        resp.sample(rng, 3)
    with pytest.raises(ValueError, match="bad length"):
        workload.LengthDist.parse("zipf:x:1:2")


def test_workload_without_vocabulary_has_the_same_requests():
    spec = workload.WorkloadSpec(num_requests=50, rate=3.0, num_adapters=8,
                                 prompt_len=workload.LengthDist.parse("burstgpt:8:64"),
                                 output_len=workload.LengthDist.parse("burstgpt-response:1:64"))
    a, b = workload.generate(spec, 512), workload.generate(spec, None)
    assert [(r.arrival, r.adapter, r.prompt_tokens, r.max_tokens) for r in a] == \
        [(r.arrival, r.adapter, r.prompt_tokens, r.max_tokens) for r in b]
    assert all(r.prompt is None for r in b) and all(len(r.prompt) == r.prompt_tokens for r in a)


# ---- traces ----

def test_trace_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("timestamp,adapter,prompt_tokens,output_tokens,extra\n"
                        "10.0,b,5,3,x\n8.0,a,7,2,y\n12.5,,4,1,z\n14.0,b,9,9,w\n")
    recs = trace.read_trace(str(csv_path))
    assert [r.timestamp for r in recs] == [8.0, 10.0, 12.5, 14.0]  # sorted
    assert [r.adapter for r in recs] == ["a", "b", None, "b"] and recs[0].line == 3
    reqs, names = trace.to_requests(recs, vocab_size=100)
    assert names == ["b", "a"]  # most requested first
    assert [r.adapter for r in reqs] == [1, 0, None, 0]
    assert [r.arrival for r in reqs] == [0.0, 2.0, 4.5, 6.0] and [len(r.prompt) for r in reqs] == [7, 5, 4, 9]
    fast, _ = trace.to_requests(recs, rate=1.0)  # 3 gaps over 6 s = 0.5 req/s; at 1 req/s the span halves
    assert fast[-1].arrival == pytest.approx(3.0)
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"timestamp": 1, "adapter": "x", "prompt_tokens": 3, "output_tokens": 4}\n\n'
                  '{"Timestamp": 2, "Model": null, "Request tokens": 5, "Response tokens": 6}\n')
    recs = trace.read_trace(str(jl))
    assert [(r.adapter, r.prompt_tokens, r.output_tokens, r.line) for r in recs] == [("x", 3, 4, 1),
                                                                                     (None, 5, 6, 3)]


@pytest.mark.parametrize("name,text,where,what", [
    ("a.csv", "timestamp,adapter,prompt_tokens\n1,a,3\n", ":1:", "output_tokens"),
    ("b.csv", "timestamp,adapter,prompt_tokens,output_tokens\n1,a,3,4\n2,a,three,4\n", ":3:", "prompt_tokens"),
    ("c.csv", "timestamp,adapter,prompt_tokens,output_tokens\n1,a,3,4\n\n2,a,3,0\n", ":4:", "at least 1"),
    ("d.csv", "timestamp,adapter,prompt_tokens,output_tokens\n1,a,3,4,5\n", ":2:", "cells"),
    ("e.csv", "timestamp,adapter,prompt_tokens,output_tokens\nnan,a,3,4\n", ":2:", "not finite"),
    ("f.jsonl", '{"timestamp": 1, "prompt_tokens": 2, "output_tokens": 3}\n{"timestamp": 2,\n', ":2:", "JSON"),
    ("g.jsonl", '{"timestamp": 1, "prompt_tokens": 2}\n', ":1:", "output_tokens"),
    ("h.jsonl", '[1, 2]\n', ":1:", "object"),
    ("i.jsonl", '{"timestamp": 1, "adapter": 7, "prompt_tokens": 2, "output_tokens": 3}\n', ":1:", "adapter"),
    ("j.jsonl", '{"timestamp": 1, "prompt_tokens": 2.5, "output_tokens": 3}\n', ":1:", "integer"),
    ("k.jsonl", "\n", "", "no records"),
])
def test_trace_errors_name_the_line(tmp_path, name, text, where, what):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(trace.TraceError, match=what) as e:
        trace.read_trace(str(path))
    assert str(e.value).startswith(str(path) + where)


def test_trace_missing_file():
    with pytest.raises(trace.TraceError, match="no such file"):
        trace.read_trace("/nonexistent/trace.csv")


# ---- rate search ----

def test_bisection_finds_the_threshold_of_a_monotone_function():
    calls = []

    def run(rate):
        calls.append(rate)
        return {"ttft_p95_s": 0.01 * rate, "tpot_mean_s": 0.0}  # meets a 0.137 s SLO up to rate 13.7

    meets = lambda s: metrics.meets_slo(s, metrics.SLO(ttft_s=0.137))
    res = rate_search.find_serviceable_rate(run, meets, start=1.0, rel_tol=0.01, max_probes=30, progress=False)
    assert res.rate <= 13.7 < res.failing_rate and (res.failing_rate - res.rate) <= 0.01 * res.rate
    assert calls[:5] == [1, 2, 4, 8, 16] and len(res.probes) == len(calls) < 30
    assert res.best_summary()["ttft_p95_s"] == pytest.approx(0.01 * res.rate)
    down = rate_search.find_serviceable_rate(run, meets, start=100.0, rel_tol=0.05, progress=False)
    assert down.rate <= 13.7 < down.failing_rate and down.probes[1].rate == 50.0
    never = rate_search.find_serviceable_rate(lambda r: {"ttft_p95_s": 9, "tpot_mean_s": 0}, start=1.0,
                                              min_rate=0.1, progress=False)
    assert never.rate == 0.0 and never.failing_rate == pytest.approx(0.1)  # halved down to min_rate
    always = rate_search.find_serviceable_rate(lambda r: {"ttft_p95_s": 0, "tpot_mean_s": 0}, start=1.0,
                                               max_rate=64.0, progress=False)
    assert always.rate == 64.0 and always.failing_rate is None
    capped = rate_search.find_serviceable_rate(run, meets, start=1.0, max_probes=3, progress=False)
    assert len(capped.probes) == 3 and capped.rate == 4.0


# ---- admissibility ----

@pytest.mark.parametrize("n,s,c", [(32, 1.2, 4), (512, 1.2, 32), (512, 1.2, 128), (1024, 1.2, 64), (64, 0.8, 16)])
def test_che_approximation_matches_lru_simulation(n, s, c):
    p = workload.zipf_weights(n, s)
    assert abs(admissibility.che_hit_rate(p, c) - admissibility.simulated_hit_rate(p, c, 40_000, seed=1)) < 0.015


def test_cache_capacity_for_a_hit_rate():
    p = workload.zipf_weights(512, 1.2)
    c = admissibility.capacity_for_hit_rate(p, 0.8)
    assert admissibility.che_hit_rate(p, c) >= 0.8 > admissibility.che_hit_rate(p, c - 1)
    assert admissibility.capacity_for_hit_rate(p, 0.0) == 0 and admissibility.capacity_for_hit_rate(p, 1.0) == 512
    assert admissibility.che_hit_rate(p, 512) == pytest.approx(1.0) and admissibility.che_hit_rate(p, 0) == 0.0
    hits = admissibility.lru_hits([1, 2, 1, 3, 2, 1, 1], 2)
    assert hits.tolist() == [False, False, True, False, False, False, True]


def test_engine_adapter_cache_is_the_lru_che_predicts():
    """The engine's measured hits, request by request, equal an exact LRU's on the same adapter sequence, and
    their rate is within sampling error of Che's approximation."""
    from infinilora_jax import LLM
    from infinilora_jax.lora.random_adapter import random_adapter

    n, slots = 16, 4
    llm = LLM(None, dtype="float32", max_lora_rank=4, max_adapters=slots, lora_targets=("q", "v"),
              max_host_adapters=n, max_model_len=64, max_num_seqs=1, max_num_batched_tokens=16, progress=False)
    cache = llm.runner.adapters
    for k in range(n):
        cache.register_weights(random_adapter(llm.config, f"a{k}", 4, ("q", "v"), seed=k, dtype=llm.runner.dtype))
    p = workload.zipf_weights(n, 1.2)
    seq = np.random.default_rng(3).choice(n, 400, p=p).tolist()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    hits = []
    for k in seq:  # one at a time: the queue is empty when the scheduler prefetches, so nothing is prefetched
        before = cache.stats.hits
        llm.engine.add_request([5, 6, 7, 8], params, f"a{k}")
        while llm.engine.has_unfinished():
            llm.engine.step()
        hits.append(cache.stats.hits > before)
    llm.engine.pop_finished()
    assert hits == admissibility.lru_hits(seq, slots).tolist()
    measured = np.mean(hits[40:])
    assert abs(measured - admissibility.che_hit_rate(p, slots)) < 0.07, measured


# ---- SJF ----

class _NoAdapters:
    def acquire(self, name):
        return 0

    def release(self, name):
        pass

    def prefetch(self, names):
        pass

    def poll_loads(self):
        return 0

    def is_ready(self, slot):
        return True


def _admission_order(policy: str) -> list[str]:
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=128, policy=policy),
                      CacheConfig(16, 64), _NoAdapters())
    sizes = {"a": (30, 20), "b": (5, 5), "c": (20, 5), "d": (5, 5), "e": (2, 40)}  # prompt, max_tokens
    for rid, (prompt, out) in sizes.items():
        sched.add(Request(rid, [3] * prompt, SamplingParams(max_tokens=out), None, 0))
    order = []
    while sched.waiting:
        work = sched.schedule()
        (req, _), = [(r, n) for r, n in work.rows if r.request_id not in order]
        order.append(req.request_id)
        sched.finish(req, "length")
    return order


def test_sjf_admits_the_shortest_job_first():
    assert _admission_order("fcfs") == ["a", "b", "c", "d", "e"]
    assert _admission_order("sjf") == ["b", "d", "c", "e", "a"]  # sizes 10, 10, 25, 42, 50; ties keep order
    assert SchedulerConfig().policy == "fcfs"
    with pytest.raises(ConfigError, match="policy"):
        SchedulerConfig(policy="lifo")


# ---- simulator ----

MODEL = calibration.StepTimeModel("toy", 4, 1.0, 0.02, 0.1, 1.0)


def _spec(rate, n=600):
    return workload.WorkloadSpec(n, rate, 1.0, 32, 1.2, 0.1, workload.LengthDist.parse("burstgpt:8:256"),
                                 workload.LengthDist.parse("8:64"), seed=4)


def _sim(rate, **kw):
    cfg = simulator.ClusterConfig(**{"step": MODEL, "cache_slots": 8, "load_ms": 30.0, **kw})
    res = simulator.simulate(workload.generate(_spec(rate), None), cfg)
    return res, metrics.summarize(res.timings, res.makespan_s)


def test_simulator_one_request_by_hand():
    req = workload.WorkloadRequest(0.0, 0, None, 5, prompt_tokens=300)
    cfg = simulator.ClusterConfig(step=MODEL, cache_slots=1, load_ms=40.0, max_num_batched_tokens=128,
                                  prewarm=False)
    res = simulator.simulate([req], cfg)
    step = lambda tokens: 1.0 + 4 * (1.0 + 0.02 * tokens + 0.1)  # ms
    prefill = step(128) + 40.0 + step(128) + step(44)  # three chunks, the first waits for the cold load
    (t,) = res.timings
    assert t.ttft == pytest.approx(prefill / 1e3) and t.finish == pytest.approx((prefill + 4 * step(1)) / 1e3)
    assert (res.hits, res.misses, res.steps) == (0, 1, 7)
    # async scheduling: a step's 1 ms of host work runs while the device computes the step before (each step
    # lasts the longer of the two, here the device's); the first token comes back with the next step (a decode
    # step); the last one at once, as no step follows it
    res = simulator.simulate([req], dataclasses.replace(cfg, async_scheduling=True))
    (t,) = res.timings
    overlapped = lambda tokens: step(tokens) - 1.0
    prefill = overlapped(128) + 40.0 + overlapped(128) + overlapped(44)
    assert t.ttft == pytest.approx((prefill + overlapped(1)) / 1e3)
    assert t.finish == pytest.approx((prefill + 4 * overlapped(1)) / 1e3) and res.steps == 7
    # a host-bound step (5 ms of host work, 1 ms of device work): 6 ms one at a time, 5 ms queued ahead
    host_bound = calibration.StepTimeModel("host-bound", 1, 1.0, 0.0, 0.0, host_ms=5.0)
    short = workload.WorkloadRequest(0.0, 0, None, 3, prompt_tokens=4)
    for queued, period in ((False, 6.0), (True, 5.0)):
        cfg = simulator.ClusterConfig(step=host_bound, cache_slots=1, prewarm=False, async_scheduling=queued)
        (t,) = simulator.simulate([short], cfg).timings
        assert t.finish == pytest.approx(3 * period / 1e3), queued
        assert t.ttft == pytest.approx((2 if queued else 1) * period / 1e3), queued


def test_simulator_async_scheduling_holds_a_finished_requests_pages_one_step():
    """Async scheduling: a request's last token reaches the caller with the replica's next step, and its KV stays
    taken until then, so a request waiting for that KV is admitted one step later than one step at a time."""
    flat = calibration.StepTimeModel("flat", 1, 10.0, 1.0, 0.0)  # 10 ms + 1 ms per token
    reqs = [workload.WorkloadRequest(0.0, 0, None, 2, prompt_tokens=4),
            workload.WorkloadRequest(0.0, 0, None, 2, prompt_tokens=4),
            workload.WorkloadRequest(0.0, 0, None, 1, prompt_tokens=4)]
    cfg = simulator.ClusterConfig(step=flat, cache_slots=1, kv_tokens=12, max_num_seqs=4, prewarm=False)
    sync = simulator.simulate(reqs, cfg).timings
    async_ = simulator.simulate(reqs, dataclasses.replace(cfg, async_scheduling=True)).timings
    # one step at a time: step 1 prefills both (18 ms), step 2 decodes both (12 ms), they finish and free 12 KV
    # tokens, step 3 prefills the third (14 ms)
    assert [t.finish for t in sync] == pytest.approx([0.030, 0.030, 0.044])
    assert [t.first_token for t in sync] == pytest.approx([0.018, 0.018, 0.044])
    # async: the first tokens come back with step 2; the finishes with step 3, which cannot use their KV yet
    # (nothing to run: it only reads the tokens back, at 30 ms); step 4 prefills the third (14 ms); its token
    # comes back when no step follows
    assert [t.first_token for t in async_] == pytest.approx([0.030, 0.030, 0.044])
    assert [t.finish for t in async_] == pytest.approx([0.030, 0.030, 0.044])


@pytest.mark.parametrize("between", [True, False])
def test_simulator_jumps_change_nothing(between):
    """Runs of identical decode steps are advanced in one jump: the result equals stepping one at a time (also
    where routing reads the replicas' state at each arrival, where background loads land mid-run, and, arrivals
    routed between steps, where an arrival waits for a step boundary inside another replica's run)."""
    reqs = workload.generate(_spec(12.0, 300), None)
    firsts = []
    for mode, policy, loading, routing, replicas, queued in (
            ("coupled", "fcfs", "step", None, 3, False), ("coupled", "sjf", "step", None, 3, False),
            ("disaggregated", "fcfs", "step", None, 3, False), ("coupled", "fcfs", "background", None, 3, False),
            ("disaggregated", "sjf", "background", None, 3, False),
            ("coupled", "fcfs", "step", "round_robin", 3, False), ("coupled", "fcfs", "background", None, 1, False),
            ("coupled", "fcfs", "step", None, 3, True), ("coupled", "sjf", "background", None, 1, True)):
        kw = dict(mode=mode, policy=policy, num_replicas=replicas, lora_devices=2, exchange_ms_per_layer=0.05,
                  kv_tokens=4000, adapter_loading=loading, max_num_seqs=6,  # full batches: jumps past arrivals
                  routing=routing, arrivals_between_steps=between, async_scheduling=queued)
        cfg = simulator.ClusterConfig(step=MODEL, cache_slots=8, load_ms=30.0, **kw)
        jumping, events = simulator.Simulator(cfg), []
        step = jumping._step
        jumping._step = lambda *args: events.append(1) or step(*args)
        a = jumping.run(reqs)
        sim = simulator.Simulator(cfg)
        sim.jump = False
        b = sim.run(reqs)
        assert a.steps == b.steps and (a.hits, a.misses) == (b.hits, b.misses)
        assert len(events) < 0.9 * a.steps  # some steps were jumped over
        assert [x for t in a.timings for x in (t.first_token, t.finish)] == pytest.approx(
            [x for t in b.timings for x in (t.first_token, t.finish)])
        firsts.append(sum(t.first_token for t in a.timings))
    # the mode matters: the other one gives other times for the first configuration
    other = sum(t.first_token for t in simulator.simulate(reqs, simulator.ClusterConfig(
        step=MODEL, cache_slots=8, load_ms=30.0, num_replicas=3, max_num_seqs=6, kv_tokens=4000,
        arrivals_between_steps=not between)).timings)
    assert other != pytest.approx(firsts[0])


def test_simulator_sanity():
    ttft = [_sim(rate)[1]["ttft_p95_s"] for rate in (2, 8, 16, 32)]
    assert ttft == sorted(ttft) and ttft[-1] > 5 * ttft[0]  # latency grows with load
    hit = [_sim(8, cache_slots=c)[0].hit_rate for c in (2, 8, 24)]
    assert hit == sorted(hit) and hit[-1] > hit[0] + 0.3  # more cache, more hits
    assert _sim(16, cache_slots=24)[1]["ttft_p95_s"] < _sim(16, cache_slots=2)[1]["ttft_p95_s"]
    res, _ = _sim(4, cache_slots=8, num_replicas=1)
    p = workload.zipf_weights(32, 1.2)
    assert abs(res.hit_rate - admissibility.che_hit_rate(p, 8)) < 0.06  # light load: near plain LRU
    short = [t for t in _sim(20, policy="sjf")[0].timings if t.prompt_tokens + t.output_tokens < 60]
    fcfs = [t for t in _sim(20)[0].timings if t.prompt_tokens + t.output_tokens < 60]
    assert np.median([t.ttft for t in short]) < np.median([t.ttft for t in fcfs])  # SJF favours short jobs
    many = simulator.simulate(workload.generate(_spec(16), None),
                              simulator.ClusterConfig("disaggregated", 4, MODEL, 32, 30.0, lora_devices=4))
    few = simulator.simulate(workload.generate(_spec(16), None),
                             simulator.ClusterConfig("coupled", 4, MODEL, 8, 30.0))
    assert many.hit_rate > few.hit_rate  # one shared cache of 32 beats four of 8
    with pytest.raises(ValueError, match="lora_devices"):
        simulator.ClusterConfig("disaggregated", 2, MODEL)
    big = workload.WorkloadRequest(0.0, None, None, 50, prompt_tokens=100)
    out = simulator.simulate([big], simulator.ClusterConfig(step=MODEL, kv_tokens=120))
    assert out.unfinished == 1 and not out.timings


def test_simulator_step_loading_with_round_robin_is_unchanged():
    """Step loading, one replica or routed round robin, arrivals routed when they arrive (one replica: either way):
    the numbers the simulator gave before it learned to route by affinity, to load in the background and to route
    arrivals between steps (steps, hits, misses, summed first-token and finish times)."""
    reqs = workload.generate(_spec(12.0, 300), None)
    at_arrival = dict(arrivals_between_steps=False)
    recorded = [(dict(num_replicas=1, kv_tokens=3000), (3269, 161, 112, 4088.983552, 4174.362792)),
                (dict(num_replicas=1, kv_tokens=3000, **at_arrival), (3269, 161, 112, 4088.983552, 4174.362792)),
                (dict(num_replicas=3, policy="sjf", routing="round_robin", **at_arrival),
                 (8680, 160, 113, 4086.087379, 4147.364619)),
                (dict(mode="disaggregated", num_replicas=2, lora_devices=2, exchange_ms_per_layer=0.05,
                      routing="round_robin", **at_arrival), (6957, 162, 111, 4086.248, 4147.1628))]
    for kw, (steps, hits, misses, first, finish) in recorded:
        res = simulator.simulate(reqs, simulator.ClusterConfig(step=MODEL, cache_slots=6, load_ms=30.0, **kw))
        assert (res.steps, res.hits, res.misses, res.unfinished) == (steps, hits, misses, 0)
        assert sum(t.first_token for t in res.timings) == pytest.approx(first, abs=1e-5)
        assert sum(t.finish for t in res.timings) == pytest.approx(finish, abs=1e-5)


def _requests(*specs):
    """WorkloadRequests from (arrival s, adapter, prompt tokens, max_tokens)."""
    return [workload.WorkloadRequest(t, a, None, m, prompt_tokens=p) for t, a, p, m in specs]


def test_simulator_routes_by_adapter_affinity():
    # two replicas of one slot each, both prewarmed with adapter 0; adapters in pairs (0, 0, 1, 1, ...), each
    # request done before the next arrives: round robin sends each replica both adapters in turn, a reload for
    # nearly every request; affinity loads adapter 1 once (into replica 0, the lowest index of two idle replicas)
    # and then keeps each adapter where it is resident
    reqs = _requests(*((0.1 * i, (i // 2) % 2, 8, 8) for i in range(40)))
    cfg = simulator.ClusterConfig(step=MODEL, num_replicas=2, cache_slots=1, load_ms=20.0)
    assert cfg.router == "affinity"
    affinity = simulator.simulate(reqs, cfg)
    rr = simulator.simulate(reqs, dataclasses.replace(cfg, routing="round_robin"))
    assert (affinity.hits, affinity.misses) == (39, 1)
    assert rr.hit_rate < 0.1
    assert np.mean([t.ttft for t in affinity.timings]) < np.mean([t.ttft for t in rr.timings])
    # affinity also counts queued requests: the second of two simultaneous arrivals follows the first (whose
    # adapter is not loaded yet) instead of taking the idle replica and loading the adapter a second time
    pair = simulator.simulate(_requests((0.0, 1, 8, 8), (0.0, 1, 8, 8)), dataclasses.replace(cfg, prewarm=False))
    assert (pair.hits, pair.misses) == (1, 1)


def test_simulator_affinity_gives_way_to_the_least_loaded_replica():
    # the first request leaves 8 + 400 outstanding tokens on replica 0, which holds adapter 0; the second (same
    # adapter) goes there only while that is within the slack of the idle replica 1
    reqs = _requests((0.0, 0, 8, 400), (0.01, 0, 8, 4))
    cfg = simulator.ClusterConfig(step=MODEL, num_replicas=2, cache_slots=1, load_ms=20.0, prewarm=False,
                                  max_num_batched_tokens=128)
    beyond = simulator.simulate(reqs, cfg)  # slack: one step budget (128) < ~400
    within = simulator.simulate(reqs, dataclasses.replace(cfg, affinity_slack=1000))
    assert (beyond.hits, beyond.misses) == (0, 2)  # replica 1 loads adapter 0 too
    assert (within.hits, within.misses) == (1, 1)
    # requests without an adapter go to the least loaded replica: both short ones to replica 1, neither waits
    # for room in replica 0's one-sequence batch behind the long one (round robin sends the third there)
    base = _requests((0.0, None, 8, 400), (0.01, None, 8, 4), (0.011, None, 8, 4))
    one_seq = dataclasses.replace(cfg, max_num_seqs=1)
    assert max(t.ttft for t in simulator.simulate(base, one_seq).timings[1:]) < 0.1
    assert simulator.simulate(base, dataclasses.replace(one_seq, routing="round_robin")).timings[2].ttft > 1.0


FLAT = calibration.StepTimeModel("flat", 1, 10.0, 1.0, 0.0)  # a step: 10 ms + 1 ms per token


def _first_tokens(reqs, **kw):
    cfg = simulator.ClusterConfig(step=FLAT, cache_slots=4, load_ms=200.0, prewarm=False, **kw)
    res = simulator.simulate(_requests(*reqs), cfg)
    assert res.unfinished == 0
    return [t.first_token for t in res.timings]


@pytest.mark.parametrize("loading", ["step", "background"])
def test_simulator_routes_arrivals_between_steps(loading):
    """The engine's callers add requests only between steps, and ReplicaGroup.step returns when the first step in
    flight completes: a request arriving while every busy replica is stalled by a cold load waits for the first
    of them to complete, even with a replica idle, and is then routed (to the idle replica, the least loaded)
    before any replica starts its next step."""
    a, b = (0.0, 0, 4, 50), (0.0, 1, 100, 50)  # cold adapters: replica 0 busy until 0.214 s, replica 1 until 0.310
    d = (0.05, None, 4, 2)
    first = 0.014  # D's first token: one step of its 4-token prefill
    stalled = dict(num_replicas=3, adapter_loading=loading)
    assert _first_tokens([a, b, d], **stalled) == pytest.approx([0.214, 0.31, 0.214 + first])
    assert _first_tokens([a, b, d], **stalled, arrivals_between_steps=False) == pytest.approx(
        [0.214, 0.31, 0.05 + first])  # routed at its arrival, it starts on the idle replica 2 at once
    # two replicas completing their stalled steps at the same instant: D (least loaded: replica 0, a tie) is
    # routed before either starts its next step, and joins replica 0's next step (A's decode, D's prefill)
    both = dict(num_replicas=2, adapter_loading=loading)
    assert _first_tokens([a, (0.0, 1, 4, 50), d], **both) == pytest.approx([0.214, 0.214, 0.214 + 0.015])
    # routed when it arrives, D waits for replica 0's step too; but with background loading it is admitted when
    # the load lands, beside A's prefill (18 ms), where the engine's replica waits for the load and runs the step
    # that follows in one call, before its caller adds D
    old = [0.214, 0.214, 0.229] if loading == "step" else [0.218, 0.214, 0.218]
    assert _first_tokens([a, (0.0, 1, 4, 50), d], **both, arrivals_between_steps=False) == pytest.approx(old)
    # no step in flight: routed at once
    assert _first_tokens([(0.0, 0, 4, 1), (0.3, None, 4, 2)], **stalled)[1] == pytest.approx(0.3 + first)


def test_simulator_one_replica_takes_arrivals_after_its_step():
    """One replica (coupled or one base instance): a request arriving during a step stalled by a cold load joins
    the next step, whether routed when it arrives or when the step completes (the engine's callers add it then).
    Waiting for a background load, an LLMEngine's step runs the step that follows the wait in the same call, so
    the request waits for that step too; an InstanceGroup's step returns after the wait, so it joins that step."""
    a, d = (0.0, 0, 4, 50), (0.05, None, 4, 2)
    disagg = dict(mode="disaggregated", lora_devices=1)
    for between in (True, False):
        for kw in ({}, disagg):
            assert _first_tokens([a, d], **kw, arrivals_between_steps=between) == pytest.approx([0.214, 0.229])
        assert _first_tokens([a, d], **disagg, adapter_loading="background", arrivals_between_steps=between) == \
            pytest.approx([0.218, 0.218])  # A's prefill at the landing (0.2 s) with D's, 18 ms
    assert _first_tokens([a, d], adapter_loading="background") == pytest.approx([0.214, 0.229])
    assert _first_tokens([a, d], adapter_loading="background", arrivals_between_steps=False) == pytest.approx(
        [0.218, 0.218])


def test_simulator_fewest_requests_routing():
    # disaggregated base instances: the one with the fewest unfinished requests (ties to the lowest index),
    # whatever their sizes: one long request and three short ones go to instances 0, 1, 0, 1, the third behind
    # the long one (one request per batch)
    reqs = _requests((0.0, 0, 8, 400), (0.001, 1, 8, 4), (0.002, 2, 8, 4), (0.003, 3, 8, 4))
    cfg = simulator.ClusterConfig("disaggregated", 2, MODEL, 8, 0.0, lora_devices=1, max_num_seqs=1)
    assert cfg.router == "fewest_requests"
    ttft = [t.ttft for t in simulator.simulate(reqs, cfg).timings]
    assert ttft[2] > 1.0  # queued behind the long request on instance 0
    assert max(ttft[1], ttft[3]) < 0.1  # instance 1 runs the others one after the other


def test_simulator_background_load_by_hand():
    """One request, background loading: the replica has nothing else to run, so it waits for the load and the
    request's prefill starts when it lands: the same times as a step stalled by the load, one step fewer."""
    req = workload.WorkloadRequest(0.0, 0, None, 5, prompt_tokens=300)
    cfg = simulator.ClusterConfig(step=MODEL, cache_slots=1, load_ms=40.0, max_num_batched_tokens=128,
                                  prewarm=False, adapter_loading="background")
    res = simulator.simulate([req], cfg)
    step = lambda tokens: 1.0 + 4 * (1.0 + 0.02 * tokens + 0.1)  # ms
    prefill = 40.0 + step(128) + step(128) + step(44)
    (t,) = res.timings
    assert t.ttft == pytest.approx(prefill / 1e3) and t.finish == pytest.approx((prefill + 4 * step(1)) / 1e3)
    assert (res.hits, res.misses, res.steps) == (0, 1, 7)


def test_simulator_background_load_stalls_only_its_request():
    # A decodes 100 tokens; B (a cold adapter) arrives while A runs; C (B's adapter) arrives while B's load is
    # in flight
    load_ms = 50.0
    a = (0.0, 0, 8, 100)
    b, c = (0.2, 1, 8, 4), (0.22, 1, 8, 4)
    cfg = simulator.ClusterConfig(step=MODEL, cache_slots=2, load_ms=load_ms, prewarm=False)
    bg = dataclasses.replace(cfg, adapter_loading="background")
    step_run, bg_run = simulator.simulate(_requests(a, b, c), cfg), simulator.simulate(_requests(a, b, c), bg)
    alone = simulator.simulate(_requests(a), bg).timings[0]
    a_step, (a_bg, b_bg, c_bg) = step_run.timings[0], bg_run.timings
    # stepped: B's load stalls A's decode; in the background A runs on, delayed only by B's and C's own tokens
    assert a_step.finish - alone.finish > 0.9 * load_ms / 1e3
    assert a_bg.finish - alone.finish < 0.01
    assert a_bg.tpot < a_step.tpot
    # B waits for its load; C finds the adapter loading: a hit that waits for the same load, not a second one
    assert b_bg.ttft >= load_ms / 1e3
    assert c_bg.first_token == pytest.approx(b_bg.first_token) and c_bg.ttft < load_ms / 1e3
    assert (bg_run.hits, bg_run.misses) == (step_run.hits, step_run.misses) == (1, 2)


# ---- calibration and extrapolation ----

def test_calibration_fit_recovers_known_parameters(tmp_path):
    rng = np.random.default_rng(0)
    true = calibration.StepTimeModel("x", 8, 0.5, 0.01, 0.05, 2.0)
    pts = [calibration.StepPoint(int(t), int(a), float(true.step_ms(t, a) * rng.normal(1, 0.02)), 8)
           for t, a in zip(rng.integers(1, 512, 400), rng.integers(0, 33, 400))]
    got = calibration.fit(pts, "x", host_ms=2.0, provenance={"date": "today"}, rank=16, targets=("q",))
    for field in ("const", "tokens_coef", "adapters_coef"):
        assert getattr(got, field) == pytest.approx(getattr(true, field), rel=0.05), field
    assert np.median(np.abs(calibration.residuals(got, pts))) < 0.03
    path = str(tmp_path / "c.json")
    calibration.save(path, {"x": got})
    back = calibration.load(path)["x"]
    assert back == got and back.points[0]["tokens"] == pts[0].tokens and back.provenance == {"date": "today"}
    with pytest.raises(ValueError, match="several depths"):
        calibration.fit(pts[:3] + [dataclasses.replace(pts[3], layers=4)], "x")


def test_stored_calibrations_have_provenance():
    for name in ("cpu-tiny.json", "h200.json"):
        models = calibration.load(os.path.join(ROOT, "configs", "calibration", name))
        for m in models.values():
            assert {"date", "machine", "command"} <= set(m.provenance), (name, m.name)
            assert m.points and m.rank and m.targets and m.shape_config and not m.extrapolated
            assert all(v > 0 for v in (m.const, m.tokens_coef, m.adapters_coef))


def test_extrapolation_keeps_measured_terms_and_marks_derived_ones():
    h200 = calibration.load(os.path.join(ROOT, "configs", "calibration", "h200.json"))
    mixtral = model_shapes.load(os.path.join(ROOT, "configs", "models", "mixtral-8x7b.json"))
    m = extrapolation.derive(mixtral, 16, h200["mixtral-8x7b"].targets, h200)
    ref = h200["mixtral-8x7b"]
    assert m.extrapolated and m.layers == 32 and m.const == ref.const and m.tokens_coef == ref.tokens_coef
    assert m.adapters_coef == pytest.approx(ref.adapters_coef, rel=0.1)  # same rank: close to its own
    r64 = extrapolation.derive(mixtral, 64, h200["mixtral-8x7b"].targets, h200, devices=2)
    assert r64.adapters_coef == pytest.approx(2 * m.adapters_coef, rel=0.01)  # 4x the bytes on 2 devices
    dbrx = extrapolation.derive(model_shapes.load(os.path.join(ROOT, "configs", "models", "dbrx.json")), 64,
                                model_shapes.DEFAULT_TARGETS, h200)
    assert "derived from" in dbrx.provenance["method"] and dbrx.step_ms(64, 8) > 0


# ---- model shapes and provisioning ----

def test_model_shapes_match_published_sizes():
    published = {"mixtral-8x7b": 46.7e9, "qwen3-30b-a3b": 30.5e9, "gpt-oss-20b": 20.9e9, "dbrx": 131.6e9}
    for name, params in published.items():
        shape = model_shapes.load(os.path.join(ROOT, "configs", "models", f"{name}.json"))
        assert abs(shape.total_params() / params - 1) < 0.01, name


def test_adapter_bytes_match_the_engine_pages():
    from infinilora_jax.llm import BUNDLED_MODEL
    from infinilora_jax.lora.random_adapter import random_adapter
    from infinilora_jax.lora.targets import ALL_TARGETS
    from infinilora_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dir(BUNDLED_MODEL)
    shape = model_shapes.load(BUNDLED_MODEL)
    for targets in (ALL_TARGETS, ("q", "o", "expert_down"), ("gate", "router")):
        weights = random_adapter(cfg, "x", 8, targets, seed=0)
        assert shape.adapter_bytes(8, targets, dtype_bytes=4) == weights.nbytes


def test_required_admissibility():
    assert provisioning.required_admissibility(0.25, 0.1, 0.1) == 0.0  # a miss still meets the target
    assert provisioning.required_admissibility(0.25, 0.1, 0.2) == pytest.approx(0.95)  # every miss violates
    assert provisioning.required_admissibility(0.25, 0.3, 0.0) == float("inf")  # the hit path alone fails
    t = np.linspace(0.0, 0.2, 101)  # hits never violate; misses (+0.1 s) violate for t > 0.15: ~25%
    assert provisioning.required_admissibility(0.25, t, 0.1) == pytest.approx((0.25 - 0.05) / 0.25, abs=0.02)


def test_layer_partition_is_optimal():
    rng = np.random.default_rng(1)
    for _ in range(20):
        costs = rng.integers(1, 20, rng.integers(2, 9)).astype(float).tolist()
        stages = int(rng.integers(1, len(costs) + 1))
        best, bounds = provisioning.partition_layers(costs, stages)
        assert len(bounds) == stages and bounds[0][0] == 0 and bounds[-1][1] == len(costs)
        assert max(sum(costs[a:b]) for a, b in bounds) == best
        brute = min(max(sum(costs[a:b]) for a, b in zip((0,) + cuts, cuts + (len(costs),)))
                    for cuts in itertools.combinations(range(1, len(costs)), stages - 1))
        assert best == brute


def test_lora_server_plan():
    shape = model_shapes.load(os.path.join(ROOT, "configs", "models", "qwen3-30b-a3b.json"))
    dev = provisioning.Device()
    rows = provisioning.plan_lora_server(shape, 32, dev, 300, max_devices=8, step_adapters=64, layer_budget_ms=0.8)
    caps = [r.capacity for r in rows]
    assert [r.devices for r in rows] == list(range(1, 9)) and caps == sorted(caps) and caps[-1] > 6 * caps[0]
    for r in rows:
        assert r.ep * r.pp == r.devices and shape.num_experts % r.ep == 0
        assert r.capacity * r.adapter_bytes_per_device <= dev.usable_bytes
    chosen = provisioning.choose(rows)
    assert chosen.feasible and chosen.capacity >= 300 and all(not r.feasible for r in rows[: chosen.devices - 1])
    cc = provisioning.coupled_cache(shape, shape.adapter_bytes(32), dev, 0.8)
    assert cc.devices == 1 and 0 < cc.capacity < chosen.capacity


def test_provision_cli_prints_a_plan(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "infinilora_jax.bench.provision", "--model", "configs/models/qwen3-30b-a3b.json",
           "--rank", "32", "--num_adapters", "512", "--rate", "2", "--calibration", "configs/calibration/h200.json",
           "--num_requests", "300", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "needs immediate admissibility" in res.stdout or "cannot be met" in res.stdout
    assert "LoRA-server layouts" in res.stdout and "coupled instead" in res.stdout
    plan = json.loads(out.read_text())
    assert plan["model"] == "qwen3-30b-a3b" and len(plan["layouts"]) == 8


def test_simulate_from_a_gpu_sweep_cut_off_mid_search(tmp_path):
    """slo_baselines --simulate_from on the eighth session's Mixtral sweep (its disaggregated row was cut off by
    the call's limit after one probe): both rows are simulated with their own probes' step models, the cut-off
    row prints its probes, and the JSON keeps the measured rows as they were."""
    src = os.path.join(ROOT, "docs/results/2026-12-01-h200x2-session8/mixtral_sweep.json")
    out = tmp_path / "sim"
    cmd = [sys.executable, "benchmarks/slo_baselines.py", "--calibration", "measured", "--simulate_from", src,
           "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cut off: 8-" in res.stdout and "each baseline's own probes" in res.stdout
    report = json.loads((tmp_path / "sim.json").read_text())
    rows = {r["baseline"]: r for r in report["simulator"]["rows"]}
    assert rows["coupled+sjf"]["measured"] == 2.0 and rows["disaggregated"]["measured"] is None
    assert all(r["simulated"] > 0 and r["probes"] for r in rows.values())
    # timed on their own engines; that run predates the host-gap recording (no gaps: 0)
    assert [rows[n]["step_model"]["engine_mode"] for n in ("coupled+sjf", "disaggregated")] == [
        "coupled", "disaggregated"]
    assert all(r["step_model"]["gap_ms"] == 0.0 for r in rows.values())
    with open(src) as f:
        assert report["sweep"] == json.load(f)["sweep"]


def test_metrics_p99_and_meets_slo():
    t = [metrics.RequestTiming("a", 0.0, 0.01 * i, 0.01 * i + 1.0, 5, 11) for i in range(100)]
    s = metrics.summarize(t, 10.0)
    assert s["ttft_p99_s"] == pytest.approx(np.percentile([0.01 * i for i in range(100)], 99))
    assert not metrics.meets_slo(s, metrics.SLO(ttft_s=0.9)) and metrics.meets_slo(s, metrics.SLO(ttft_s=0.95))
    assert s["per_adapter_attainment"] == {"a": pytest.approx(0.26)}  # TTFT <= 0.25 s for i <= 25


# ---- the measurement hooks on the disaggregated engine ----

def test_disaggregated_replay_sees_every_instance():
    """bench.replay on a disaggregated InstanceGroup (two base instances sharing one LoRA server, 2+2_dp2): every
    request comes back with all its tokens, StepLog sees both instances' schedulers and the runner's
    sample_instances (new tokens over all steps = prompt + output - 1 per request), the shared cache's hits and
    misses count each adapter request once, emulated cold loads stall the step, and the knobs the baselines turn
    (slot limit, policy) reach every instance."""
    from infinilora_jax.bench import replay

    llm, names = replay.benchmark_llm(None, 6, 4, 4, targets=("q", "v"), max_num_seqs=4, max_num_batched_tokens=32,
                                      max_model_len=64, precompile=False, mode="disaggregated", mesh="2+2_dp2")
    engine = llm.engine
    assert len(replay.base_instances(engine)) == 2 and not hasattr(engine, "sample")
    limit = replay.AdapterSlotLimit(llm)
    limit.set(2)
    replay.set_policy(engine, "sjf")
    assert [i.scheduler.config.policy for i in engine.instances] == ["sjf", "sjf"]
    replay.set_policy(engine, "fcfs")
    assert [i.scheduler.config.policy for i in engine.instances] == ["fcfs", "fcfs"]
    replay.emulate_cold_loads(engine, 0.02)
    spec = workload.WorkloadSpec(10, 1000.0, 1.0, len(names), 1.2, 0.2, workload.LengthDist.parse("8"),
                                 workload.LengthDist.parse("3"), seed=1)
    reqs = workload.generate(spec, llm.config.vocab_size)
    log = replay.StepLog()
    timings, _ = replay.replay(engine, reqs, names, step_log=log)
    assert len(timings) == len(reqs) and all(t.output_tokens == 3 for t in timings)
    assert sorted(str(t.adapter) for t in timings) == sorted(
        str(None if r.adapter is None else names[r.adapter]) for r in reqs)
    assert sum(r.tokens for r in log.records) == sum(r.prompt_tokens + r.max_tokens - 1 for r in reqs)
    assert max(r.instances for r in log.records) == 2  # instance 1's scheduler is seen too
    assert all(r.device_ms > 0 and r.ms >= r.device_ms for r in log.records)

    reqs = workload.generate(dataclasses.replace(spec, seed=2), llm.config.vocab_size)
    stats = dataclasses.replace(llm.runner.adapters.stats)
    s = replay.measured(engine, reqs, names, metrics.SLO())
    assert s["requests"] == len(reqs) and s["output_tokens"] == 3 * len(reqs)
    assert s["steps"] > 0 and s["step_tokens"] == sum(r.prompt_tokens + r.max_tokens - 1 for r in reqs)
    assert s["hits"] + s["misses"] == sum(r.adapter is not None for r in reqs)
    assert s["loads"] == llm.runner.adapters.stats.loads - stats.loads > 0
    assert s["wall_s"] >= 0.02 * s["loads"]  # each load stalled its step
    assert "step_model" in s and s["async_scheduling"] is True  # the group queues a step ahead for all instances
    assert sum(r.loads for r in log.records) > 0, "StepLog counts the loads each step started"
    # one step unit (the group), steps one after another; the last step that ran work left only its own tokens to
    # read (queued ahead: one more `step` call reads them, running nothing); host gaps between steps
    starts = [r.start_s for r in log.records]
    assert {r.unit for r in log.records} == {0} and starts == sorted(starts) and log.records[-1].pending
    assert not engine.has_unfinished()
    assert all(b.start_s >= a.start_s + a.ms / 1e3 - 1e-9 for a, b in zip(log.records, log.records[1:]))
    assert s["gaps"] > 0 and 0 <= s["gap_ms_median"] <= s["wall_s"] * 1e3
    if s["step_model"] is not None:
        assert s["step_model"]["engine_mode"] == "disaggregated" and s["step_model"]["gaps"] == s["gaps"]

    # placeholders pinned by a slot limit set after the stall are not traffic: the next step does not sleep
    slept = []
    real_sleep = replay.time.sleep
    replay.time.sleep = slept.append
    try:
        before = llm.runner.adapters.stats.loads
        limit.set(1)
        assert llm.runner.adapters.stats.loads > before  # the placeholders were loaded
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=1), names[0])
        while engine.has_unfinished():
            engine.step()
    finally:
        replay.time.sleep = real_sleep
    assert sum(slept) <= 0.02 + 1e-9  # at most names[0]'s own load, never the placeholders'
    engine.pop_finished()
    assert not engine.has_unfinished() and engine.pop_finished() == []

    # settle_caches: every adapter staged, the free slots filled most popular first (nothing evicted), and the
    # steps after it sleep for none of those loads
    limit.set(3)
    cache = llm.runner.adapters
    resident = [n for n in cache.slot_of if n in names]
    assert len(resident) < 3, "a slot is free to fill"
    replay.time.sleep = slept.append
    slept.clear()
    try:
        assert replay.settle_caches(engine, names) >= 0
        assert all(name in cache.staged for name in names)
        want = resident + [n for n in names if n not in resident][:3 - len(resident)]
        assert sorted(n for n in cache.slot_of if n in names) == sorted(want)
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), want[-1])
        while engine.has_unfinished():
            engine.step()
    finally:
        replay.time.sleep = real_sleep
    assert slept == [] and len(engine.pop_finished()[0].output_token_ids) == 2


def test_step_model_is_fitted_to_the_steps_that_loaded_nothing():
    """replay.step_model: per-layer coefficients of const + tokens + adapters, recovered from exact steps; steps
    that started a load (their time holds its copy or stall) are left out; too few steps give None."""
    from infinilora_jax.bench import replay

    def record(tokens, adapters, loads=0):
        ms = 2 * (0.5 + 0.01 * tokens + 0.2 * adapters) + (200.0 if loads else 0.0)  # 2 layers
        return replay.StepRecord(tokens, adapters, 4, 0, ms, ms, 1, loads)
    records = [record(t, a) for t in (8, 32, 64, 128) for a in (0, 1, 3)] + [record(16, 2, loads=1)] * 5
    model = replay.step_model(records, layers=2)
    assert model["n"] == 12 and model["layers"] == 2 and model["median_error"] < 1e-6
    assert model["const"] == pytest.approx(0.5) and model["tokens_coef"] == pytest.approx(0.01)
    assert model["adapters_coef"] == pytest.approx(0.2)
    assert replay.step_model(records[:7], layers=2) is None
