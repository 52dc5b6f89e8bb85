"""Workload generation and serving metrics used by the benchmarks."""

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
