"""Coupled replicas as threads on one CPU machine: are a replica's steps slower while the other replica steps?

A diagnostic for issue 7's CPU regime check (docs/benchmarks.md, "The simulator against issue 6's CPU regime"):
the simulator treats replicas as independent devices, while on CPU two replicas share the cores. Replays the
coupled+SJF baseline of that check (bundled tiny model, two single-device replicas, 16 adapters, 4 slots, 100 ms
emulated cold loads) at the given rates, fits the step model to each run's steps without loads, and compares
measured / modelled step time for steps that ran alone (the other replica inside a step < 10% of the time) and
steps that ran beside the other replica (> 90%).

    PYTHONPATH=. python tools/replica_overlap.py 8 16
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402

from infinilora_jax.bench import calibration, metrics, replay, workload  # noqa: E402


def overlap_shares(records) -> np.ndarray:
    """Per record: the share of its interval during which another replica (unit) was inside a step."""
    by_unit: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        by_unit.setdefault(r.unit, []).append((r.start_s, r.start_s + r.ms / 1e3))
    shares = []
    for r in records:
        a, b = r.start_s, r.start_s + r.ms / 1e3
        busy = sum(max(0.0, min(b, e) - max(a, s)) for u, spans in by_unit.items() if u != r.unit
                   for s, e in spans if e > a and s < b)
        shares.append(busy / max(b - a, 1e-9))
    return np.array(shares)


def main(rates: list[float]) -> None:
    llm, names = replay.benchmark_llm(None, 16, 8, 20, max_num_seqs=16, replicas=2)
    replay.emulate_cold_loads(llm.engine, 0.1)
    replay.AdapterSlotLimit(llm).set(4)
    replay.set_policy(llm.engine, "sjf")
    spec = workload.WorkloadSpec(150, 1.0, 1.0, 16, 1.2, 0.0, workload.LengthDist.parse("burstgpt:8:160"),
                                 workload.LengthDist.parse("8:48"))
    warm = workload.generate(dataclasses.replace(spec, rate=8.0, seed=99), llm.config.vocab_size)
    replay.replay(llm.engine, warm, names)
    layers = llm.config.num_layers
    for rate in rates:
        log = replay.StepLog()
        reqs = workload.generate(dataclasses.replace(spec, rate=rate, seed=1), llm.config.vocab_size)
        timings, wall = replay.replay(llm.engine, reqs, names, step_log=log)
        ttft_p95 = metrics.summarize(timings, wall, metrics.SLO(0.25, 0.1))["ttft_p95_s"]
        steps = [r for r in log.records if not r.loads]
        model = calibration.fit([calibration.StepPoint(r.tokens, r.adapters, r.ms, layers, r.rows) for r in steps],
                                "run")
        ratio = np.array([r.ms / model.step_ms(r.tokens, r.adapters, layers) for r in steps])
        shares = overlap_shares(log.records)[[i for i, r in enumerate(log.records) if not r.loads]]
        alone, beside = ratio[shares < 0.1], ratio[shares > 0.9]
        print(f"rate {rate:5.1f} req/s: P95 TTFT {ttft_p95:.3f} s, {len(steps)} steps; measured / model: "
              f"alone n={len(alone)} mean {alone.mean():.2f} P95 {np.percentile(alone, 95):.2f}; beside the other "
              f"replica n={len(beside)} mean {beside.mean():.2f} P95 {np.percentile(beside, 95):.2f}", flush=True)


if __name__ == "__main__":
    main([float(r) for r in sys.argv[1:]] or [8.0, 16.0])
