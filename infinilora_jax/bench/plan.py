"""A provisioning plan from a workload, an SLO and adapter sizes (bench/provisioning.py does the arithmetic).

`make_plan(PlanRequest(...))` returns the plan as a dict, `format_plan` prints it; `python -m
infinilora_jax.bench.provision` is the CLI. Steps: the cold-load time (measured, `cold_load_s`, or adapter bytes
over `h2d_gbps`); the hit-path TTFT distribution (simulated at `rate` with every adapter resident, from the step
calibration, or `hit_ttft_s`); the admissibility rate the TTFT SLO needs, per request (a miss's own delay,
provisioning.required_admissibility) and under load (misses stall the replica for everyone: the smallest cache
whose simulated TTFT quantile at `rate` meets the SLO, `capacity_under_load`), the larger of the two; the cache
that reaches it (Che's approximation, checked by an LRU simulation); the LoRA-server layouts per device count
and the chosen one; and what a coupled replica could cache instead.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from infinilora_jax.bench import (
    admissibility,
    calibration,
    extrapolation,
    metrics,
    model_shapes,
    provisioning,
    simulator,
    workload,
)
from infinilora_jax.lora.targets import ALL_TARGETS


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on (the CLI's flags; see their help)."""

    model: str
    rank: int = 32
    targets: tuple = model_shapes.DEFAULT_TARGETS  # or ("all",)
    dtype_bytes: int = 2
    gate_up_rank_factor: int = 1
    num_adapters: int = 512
    zipf: float = 1.2
    rate: float = 4.0
    slo_ttft: float = 0.25
    quantile: float = 0.95
    slo_margin: float = 1.0  # under load, the simulated TTFT quantile must stay under slo_ttft * slo_margin
    cold_load_s: float | None = None
    load_overlap: float = 0.0
    hit_ttft_s: float | None = None
    calibration: str | None = None
    calibration_model: str | None = None
    prompt_len: str = "burstgpt:16:1024"
    output_len: str = "burstgpt-response:1:512"
    num_requests: int = 2000
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    replica_devices: int = 1
    device_memory_gb: float = 141.0
    hbm_tbps: float = 3.2
    h2d_gbps: float = 50.0
    reserve: float = 0.1
    max_devices: int = 8
    step_adapters: int = 64
    step_tokens: int = 256
    coupled_lora_share: float = 0.8
    async_scheduling: bool = True  # the engine's default: the host's work overlaps the device (bench/simulator.py)
    seed: int = 0


def step_model(r: PlanRequest, shape: model_shapes.ModelShape, targets) -> calibration.StepTimeModel | None:
    if not r.calibration:
        return None
    models = calibration.load(r.calibration)
    name = r.calibration_model or shape.name
    m = models.get(name)
    if m is not None and m.rank == r.rank and tuple(m.targets) == tuple(targets) and r.replica_devices == 1:
        return m.with_layers(shape.num_layers)
    return extrapolation.derive(dataclasses.replace(shape, name=name), r.rank, targets, models, r.replica_devices,
                                r.dtype_bytes)


def simulated_ttft(r: PlanRequest, model: calibration.StepTimeModel, slots: int, load_s: float) -> np.ndarray:
    """TTFTs of one replica at r.rate with a cache of `slots` whose misses stall the step by load_s (inf for
    requests that never finish)."""
    spec = workload.WorkloadSpec(r.num_requests, r.rate, 1.0, r.num_adapters, r.zipf, 0.0,
                                 workload.LengthDist.parse(r.prompt_len), workload.LengthDist.parse(r.output_len),
                                 r.seed)
    cfg = simulator.ClusterConfig("coupled", 1, model, slots, 1e3 * load_s, max_num_seqs=r.max_num_seqs,
                                  max_num_batched_tokens=r.max_num_batched_tokens, async_scheduling=r.async_scheduling)
    result = simulator.simulate(workload.generate(spec, None), cfg)
    return np.array([t.ttft for t in result.timings] + [math.inf] * result.unfinished)


def capacity_under_load(r: PlanRequest, model: calibration.StepTimeModel, load_s: float) -> int | None:
    """The smallest cache whose simulated TTFT quantile meets the SLO at r.rate when every miss stalls the
    replica's step (cold loads take engine time from every running request, so at a high miss rate queues grow
    even when one miss alone would be within the target); None when even every adapter resident does not."""
    def ok(slots: int) -> bool:
        return float(np.quantile(simulated_ttft(r, model, slots, load_s), r.quantile)) <= r.slo_ttft * r.slo_margin

    lo, hi = 1, r.num_adapters
    if not ok(hi):
        return None
    while lo < hi:  # the TTFT quantile falls as the cache grows
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def make_plan(r: PlanRequest) -> dict:
    """The plan as a dict (printed by format_plan)."""
    shape = model_shapes.load(r.model)
    targets = tuple(ALL_TARGETS) if tuple(r.targets) == ("all",) else tuple(r.targets)
    device = provisioning.Device(r.device_memory_gb * 1e9, r.hbm_tbps * 1e12, r.h2d_gbps * 1e9, r.reserve)
    adapter_bytes = shape.adapter_bytes(r.rank, targets, r.dtype_bytes, r.gate_up_rank_factor)
    cold = r.cold_load_s if r.cold_load_s is not None else adapter_bytes / device.h2d_bytes_per_s
    penalty = cold * (1 - r.load_overlap)
    model = step_model(r, shape, targets)
    if r.hit_ttft_s is not None:
        hit_ttft, hit_source = np.array([r.hit_ttft_s]), "given"
    elif model is not None:
        hit_ttft = simulated_ttft(r, model, r.num_adapters, 0.0)
        hit_source = f"simulated at {r.rate} req/s with every adapter resident ({model.name}" + \
            (", extrapolated)" if model.extrapolated else ")")
    else:
        raise ValueError("give hit_ttft_s or a calibration")
    popularity = workload.zipf_weights(r.num_adapters, r.zipf)
    need_request = provisioning.required_admissibility(r.slo_ttft, hit_ttft, penalty, r.quantile)
    cache = provisioning.plan_cache(popularity, need_request, adapter_bytes)
    load_capacity, need_load = None, 0.0
    if model is not None and cache.reachable:
        load_capacity = capacity_under_load(r, model, penalty)
        if load_capacity is None:
            cache = dataclasses.replace(cache, capacity=r.num_adapters, reachable=False)
        elif load_capacity > cache.capacity:
            need_load = admissibility.che_hit_rate(popularity, load_capacity)
            cache = provisioning.CachePlan(need_load, load_capacity, load_capacity * adapter_bytes, need_load, True)
    need = max(need_request, need_load)
    lru = admissibility.simulated_hit_rate(popularity, cache.capacity, 100_000, r.seed) if cache.capacity else 0.0
    budget = math.inf
    if model is not None:
        base, _ = model.split(r.step_tokens, 0)
        budget = float(base - model.host_ms) / model.layers
    layouts = provisioning.plan_lora_server(shape, r.rank, device, cache.capacity, targets=targets,
                                            dtype_bytes=r.dtype_bytes, max_devices=r.max_devices,
                                            step_adapters=r.step_adapters, step_tokens=r.step_tokens,
                                            layer_budget_ms=budget, gate_up_rank_factor=r.gate_up_rank_factor)
    chosen = provisioning.choose(layouts)
    coupled = None
    try:
        coupled = provisioning.coupled_cache(shape, adapter_bytes, device, r.coupled_lora_share,
                                             dtype_bytes=r.dtype_bytes)
    except ValueError:
        pass
    return {"model": shape.name, "layers": shape.num_layers, "experts": shape.num_experts, "rank": r.rank,
            "targets": list(targets), "adapter_bytes": adapter_bytes, "num_adapters": r.num_adapters, "zipf": r.zipf,
            "rate": r.rate, "slo_ttft_s": r.slo_ttft, "quantile": r.quantile, "cold_load_s": cold,
            "cold_load_source": "given" if r.cold_load_s is not None else f"bytes / {r.h2d_gbps} GB/s (assumed)",
            "miss_penalty_s": penalty, "hit_ttft_p50_s": float(np.percentile(hit_ttft, 50)),
            "hit_ttft_p95_s": float(np.percentile(hit_ttft, 95)), "hit_ttft_source": hit_source,
            "required_admissibility": need, "required_admissibility_per_request": need_request,
            "capacity_under_load": load_capacity, "cache": dataclasses.asdict(cache), "cache_lru_simulated": lru,
            "layer_budget_ms": budget, "layouts": [dataclasses.asdict(row) for row in layouts],
            "chosen": dataclasses.asdict(chosen) if chosen else None,
            "coupled": dataclasses.asdict(coupled) if coupled else None,
            "coupled_admissibility": admissibility.che_hit_rate(popularity, coupled.capacity) if coupled else None,
            "slo": dataclasses.asdict(metrics.SLO(r.slo_ttft))}


def format_plan(p: dict) -> str:
    gb = 1e9
    lines = [f"model {p['model']}: {p['layers']} layers, {p['experts']} experts; adapters rank {p['rank']} on "
             f"{','.join(p['targets'])}: {p['adapter_bytes'] / gb:.3f} GB each",
             f"workload: {p['num_adapters']} adapters, Zipf {p['zipf']}, {p['rate']} req/s per replica",
             f"cold load {p['cold_load_s'] * 1e3:.1f} ms ({p['cold_load_source']}); miss penalty "
             f"{p['miss_penalty_s'] * 1e3:.1f} ms",
             f"hit-path TTFT P50 {p['hit_ttft_p50_s']:.3f} s, P95 {p['hit_ttft_p95_s']:.3f} s ({p['hit_ttft_source']})"]
    need, cache = p["required_admissibility"], p["cache"]
    if not math.isfinite(need):
        lines.append(f"SLO P{p['quantile'] * 100:.0f} TTFT <= {p['slo_ttft_s']} s cannot be met: the hit path alone "
                     "misses it (add base capacity, not cache)")
    else:
        per_request, load = p["required_admissibility_per_request"], p["capacity_under_load"]
        lines.append(f"SLO P{p['quantile'] * 100:.0f} TTFT <= {p['slo_ttft_s']} s needs immediate admissibility >= "
                     f"{need:.3f}: per request (a miss's own delay) {per_request:.3f}; under load (misses stall "
                     f"the replica) " + ("not reachable" if load is None else f"a cache of {load} (simulated)"))
        lines.append(f"adapter cache: {cache['capacity']} adapters ({cache['capacity_bytes'] / gb:.1f} GB): "
                     f"Che hit rate {cache['predicted_hit_rate']:.3f}, LRU simulation {p['cache_lru_simulated']:.3f}"
                     + ("" if cache["reachable"] else "  (not reachable even with every adapter cached)"))
    lines.append(f"LoRA-server layouts (per-layer budget {p['layer_budget_ms']:.3f} ms):")
    lines.append(f"  {'devices':>7} {'EP':>3} {'PP':>3} {'capacity':>8} {'GB/device':>9} {'layer ms':>8} "
                 f"{'load ms':>7}  feasible")
    for r in p["layouts"]:
        lines.append(f"  {r['devices']:>7} {r['ep']:>3} {r['pp']:>3} {r['capacity']:>8} "
                     f"{r['cache_bytes_per_device'] / gb:>9.1f} {r['layer_ms']:>8.3f} {r['load_ms']:>7.1f}  "
                     f"{'yes' if r['feasible'] else 'no: ' + r['why_not']}")
    c = p["chosen"]
    if c:
        stages = ", ".join(f"layers {a}-{b - 1}" for a, b in c["stages"])
        lines.append(f"plan: {c['devices']} LoRA-server device(s), EP {c['ep']} x PP {c['pp']} ({stages}); each "
                     f"device caches its share of {c['capacity']} adapters "
                     f"({c['cache_bytes_per_device'] / gb:.1f} GB)")
    else:
        lines.append(f"plan: no layout of up to {len(p['layouts'])} devices meets the capacity and the layer budget")
    if p["coupled"]:
        k = p["coupled"]
        lines.append(f"coupled instead: a replica on {k['devices']} device(s) caches {k['capacity']} adapters "
                     f"({k['lora_share']:.0%} of {k['spare_bytes'] / gb:.1f} GB spare): admissibility "
                     f"{p['coupled_admissibility']:.3f}")
    return "\n".join(lines)
