"""Check a provisioning plan against the real engine: the planned cache against measured admissibility and TTFT.

1. The plan (bench/plan.py) for the tiny model's setting: the workload, the SLO, the cold-load time (the
   emulated stall of benchmarks/slo_baselines.py, 50 ms by default) and the hit-path TTFT simulated from the CPU
   step calibration give the admissibility the P95 TTFT SLO needs and the cache capacity that reaches it.
2. The engine serves the same workload at the same rate with every cache size in --capacities (and the planned
   one): measured admissibility (adapter-cache hits at admission / acquisitions) and P95 TTFT per size.
3. Prints both, says whether the planned capacity met the admissibility it was planned for and the SLO, and
   plots cache size against admissibility (Che, an LRU simulation, the engine) into <out>_cache.png.

    python benchmarks/provisioning_check.py --out out/provisioning_cpu
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402

from infinilora_jax.bench import admissibility, metrics, model_shapes, plan, plots, replay, simulator, workload  # noqa: E402,E501
from infinilora_jax.llm import BUNDLED_MODEL  # noqa: E402

F = flags.FLAGS
flags.DEFINE_integer("num_adapters", 32, "")
flags.DEFINE_integer("rank", 8, "")
flags.DEFINE_integer("pool_slots", 16, "device adapter slots compiled into the pool (the largest capacity)")
flags.DEFINE_list("capacities", ["1", "2", "4", "8", "12", "16"], "cache sizes to measure")
flags.DEFINE_float("rate", 16.0, "requests/s")
flags.DEFINE_integer("num_requests", 300, "")
flags.DEFINE_string("prompt_len", "burstgpt:8:160", "")
flags.DEFINE_string("output_len", "8:48", "")
flags.DEFINE_float("zipf", 1.2, "")
flags.DEFINE_float("emulated_load_ms", 50.0, "stall per adapter load (the cold-load time the plan is given)")
flags.DEFINE_float("slo_ttft", 0.25, "")
flags.DEFINE_float("slo_margin", 1.0, "plan under load against this share of the TTFT target (bench/plan.py)")
flags.DEFINE_integer("max_num_seqs", 16, "")
flags.DEFINE_integer("max_num_batched_tokens", 128, "")
flags.DEFINE_integer("max_model_len", 256, "")
flags.DEFINE_string("calibration", "configs/calibration/cpu-tiny.json", "")
flags.DEFINE_string("compilation_cache", "out/jax_cache", "")
flags.DEFINE_integer("seed", 0, "")
flags.DEFINE_string("out", "out/provisioning_cpu", "output prefix")


def main(argv):
    del argv
    request = plan.PlanRequest(
        model=BUNDLED_MODEL, rank=F.rank, targets=("all",), dtype_bytes=4, num_adapters=F.num_adapters, zipf=F.zipf,
        rate=F.rate, slo_ttft=F.slo_ttft, slo_margin=F.slo_margin, cold_load_s=F.emulated_load_ms / 1e3,
        calibration=F.calibration, calibration_model="tiny-qwen3-moe", prompt_len=F.prompt_len, output_len=F.output_len,
        num_requests=F.num_requests, max_num_seqs=F.max_num_seqs, max_num_batched_tokens=F.max_num_batched_tokens,
        seed=F.seed)  # only the cache part of the plan is checked here (the LoRA-server layout needs GPUs)
    planned = plan.make_plan(request)
    print(plan.format_plan(planned))
    capacity = planned["cache"]["capacity"]
    sizes = sorted({int(c) for c in F.capacities} | ({capacity} if 1 <= capacity <= F.pool_slots else set()))

    replay.enable_compilation_cache(F.compilation_cache)
    llm, names = replay.benchmark_llm(None, F.num_adapters, F.rank, F.pool_slots, max_num_seqs=F.max_num_seqs,
                                      max_num_batched_tokens=F.max_num_batched_tokens, max_model_len=F.max_model_len)
    replay.emulate_cold_loads(llm.engine, F.emulated_load_ms / 1e3)
    limit = replay.AdapterSlotLimit(llm)
    spec = workload.WorkloadSpec(F.num_requests, F.rate, 1.0, F.num_adapters, F.zipf, 0.0,
                                 workload.LengthDist.parse(F.prompt_len), workload.LengthDist.parse(F.output_len),
                                 F.seed)
    reqs = workload.generate(spec, llm.config.vocab_size)
    warm = workload.generate(dataclasses.replace(spec, num_requests=F.num_requests // 3, seed=F.seed + 1),
                             llm.config.vocab_size)
    popularity = workload.zipf_weights(F.num_adapters, F.zipf)
    step = plan.step_model(request, model_shapes.load(BUNDLED_MODEL), planned["targets"])
    rows = []
    for c in sizes:
        limit.set(c)
        replay.replay(llm.engine, warm, names)  # fill this cache size's LRU with the workload's adapters
        s = replay.measured(llm.engine, reqs, names, metrics.SLO(F.slo_ttft))
        sim = simulator.simulate(workload.generate(spec, None), simulator.ClusterConfig(
            step=step, cache_slots=c, load_ms=F.emulated_load_ms, max_num_seqs=F.max_num_seqs,
            max_num_batched_tokens=F.max_num_batched_tokens)).summary(metrics.SLO(F.slo_ttft))
        rows.append({"capacity": c, "measured_hit_rate": s["hit_rate"],
                     "che_hit_rate": admissibility.che_hit_rate(popularity, c),
                     "lru_simulated_hit_rate": admissibility.simulated_hit_rate(popularity, c, 50_000, F.seed),
                     "simulator_hit_rate": sim["hit_rate"], "measured_ttft_p95_s": s["ttft_p95_s"],
                     "simulated_ttft_p95_s": sim["ttft_p95_s"], "meets_ttft_slo": s["ttft_p95_s"] <= F.slo_ttft,
                     "load_average": s["load_average"]})
        logging.info("capacity %d: %s", c, rows[-1])
    need = planned["required_admissibility"]
    print(f"\n  {'capacity':>8} {'Che':>6} {'LRU sim':>7} {'engine':>6} {'simulator':>9} {'P95 TTFT':>8} "
          f"{'(simulated)':>11}  SLO")
    for r in rows:
        mark = "  <- planned" if r["capacity"] == capacity else ""
        print(f"  {r['capacity']:>8} {r['che_hit_rate']:>6.3f} {r['lru_simulated_hit_rate']:>7.3f} "
              f"{r['measured_hit_rate']:>6.3f} {r['simulator_hit_rate']:>9.3f} {r['measured_ttft_p95_s']:>8.3f} "
              f"{r['simulated_ttft_p95_s']:>11.3f}  {'met' if r['meets_ttft_slo'] else 'missed'}{mark}")
    at = next((r for r in rows if r["capacity"] == capacity), None)
    verdict = None
    if at is not None:
        verdict = {"planned_capacity": capacity, "required_admissibility": need,
                   "measured_admissibility": at["measured_hit_rate"], "admissibility_met": at["measured_hit_rate"]
                   >= need, "ttft_slo_met": at["meets_ttft_slo"]}
        print(f"\n  planned {capacity} slots for admissibility >= {need:.3f}: measured {at['measured_hit_rate']:.3f} "
              f"({'met' if verdict['admissibility_met'] else 'NOT met'}); P95 TTFT {at['measured_ttft_p95_s']:.3f} s "
              f"({'meets' if at['meets_ttft_slo'] else 'misses'} the {F.slo_ttft} s SLO)")
    os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
    with open(F.out + ".json", "w") as f:
        json.dump({"plan": planned, "rows": rows, "verdict": verdict,
                   "config": {k: getattr(F, k) for k in ("num_adapters", "rank", "pool_slots", "rate", "num_requests",
                                                         "prompt_len", "output_len", "zipf", "emulated_load_ms",
                                                         "slo_ttft", "slo_margin", "max_num_seqs",
                                                         "max_num_batched_tokens")}},
                  f, indent=1, default=float)
    curve = list(range(1, F.num_adapters + 1))
    plots.cache_admissibility(curve, {"Che approximation": [admissibility.che_hit_rate(popularity, c) for c in curve]},
                              F.out + "_cache.png",
                              points={"LRU simulation": [(r["capacity"], r["lru_simulated_hit_rate"]) for r in rows],
                                      "engine (measured)": [(r["capacity"], r["measured_hit_rate"]) for r in rows],
                                      "simulator": [(r["capacity"], r["simulator_hit_rate"]) for r in rows]},
                              required=need if 0 < need <= 1 else None, chosen=capacity,
                              title=f"{F.num_adapters} adapters, Zipf {F.zipf}, {F.rate} req/s (tiny model, CPU)")


if __name__ == "__main__":
    app.run(main)
