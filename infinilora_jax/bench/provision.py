"""Print a provisioning plan: adapter cache size and LoRA-server layout for a workload and an SLO.

    python -m infinilora_jax.bench.provision --model configs/models/qwen3-30b-a3b.json --rank 32 \\
        --num_adapters 512 --zipf 1.2 --rate 4 --calibration configs/calibration/h200.json

Steps (bench/provisioning.py): the cold-load time (measured, --cold_load_s, or adapter bytes over --h2d_gbps);
the hit-path TTFT distribution (simulated at --rate with every adapter resident, from the step calibration, or
--hit_ttft_s); the admissibility rate the P95 TTFT SLO needs; the cache that reaches it (Che's approximation,
checked by an LRU simulation); the LoRA-server layouts per device count and the chosen one; and what a coupled
replica could cache instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from absl import app, flags

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

F = flags.FLAGS
flags.DEFINE_string("model", None, "the model's config.json (or its directory), e.g. configs/models/*.json",
                    required=True)
flags.DEFINE_integer("rank", 32, "adapter rank")
flags.DEFINE_list("targets", list(model_shapes.DEFAULT_TARGETS), f"adapter targets, or 'all' ({ALL_TARGETS})")
flags.DEFINE_integer("dtype_bytes", 2, "bytes per adapter weight")
flags.DEFINE_integer("gate_up_rank_factor", 1, "2 for per-expert PEFT adapters with separate gate/up A matrices")
flags.DEFINE_integer("num_adapters", 512, "")
flags.DEFINE_float("zipf", 1.2, "adapter popularity exponent")
flags.DEFINE_float("rate", 4.0, "requests/s per base replica, for the hit-path TTFT")
flags.DEFINE_float("slo_ttft", 0.25, "P95 TTFT target, s")
flags.DEFINE_float("quantile", 0.95, "TTFT quantile the SLO constrains")
flags.DEFINE_float("cold_load_s", None, "measured cold-load time of one adapter (default: bytes / h2d_gbps)")
flags.DEFINE_float("load_overlap", 0.0, "share of a cold load hidden behind compute")
flags.DEFINE_float("hit_ttft_s", None, "hit-path TTFT (default: simulated from the calibration)")
flags.DEFINE_string("calibration", None, "step calibration JSON (configs/calibration/*.json)")
flags.DEFINE_string("calibration_model", None, "model in it (default: the --model's name, else derived)")
flags.DEFINE_string("prompt_len", "burstgpt:16:1024", "workload prompt lengths (bench/workload.py)")
flags.DEFINE_string("output_len", "burstgpt-response:1:512", "")
flags.DEFINE_integer("num_requests", 2000, "simulated requests for the hit-path TTFT")
flags.DEFINE_integer("max_num_seqs", 64, "")
flags.DEFINE_integer("max_num_batched_tokens", 512, "")
flags.DEFINE_integer("replica_devices", 1, "devices per base replica (divides the step time, extrapolated)")
flags.DEFINE_float("device_memory_gb", 141.0, "")
flags.DEFINE_float("hbm_tbps", 3.2, "HBM bandwidth (measured copy rate on the H200: 3.2 TB/s)")
flags.DEFINE_float("h2d_gbps", 50.0, "host-to-device bandwidth per device (assumed)")
flags.DEFINE_float("reserve", 0.1, "share of device memory kept for activations and the runtime")
flags.DEFINE_integer("max_devices", 8, "LoRA-server devices considered")
flags.DEFINE_integer("step_adapters", 64, "adapters in one LoRA-server step (all base replicas' batches)")
flags.DEFINE_integer("step_tokens", 256, "tokens in one LoRA-server step")
flags.DEFINE_float("coupled_lora_share", 0.8, "coupled replica: share of spare memory for adapters")
flags.DEFINE_integer("seed", 0, "")
flags.DEFINE_string("out", None, "also write the plan as JSON here")


def step_model(shape: model_shapes.ModelShape, targets) -> calibration.StepTimeModel | None:
    if not F.calibration:
        return None
    models = calibration.load(F.calibration)
    name = F.calibration_model or shape.name
    m = models.get(name)
    if m is not None and m.rank == F.rank and tuple(m.targets) == tuple(targets) and F.replica_devices == 1:
        return m.with_layers(shape.num_layers)
    return extrapolation.derive(dataclasses.replace(shape, name=name), F.rank, targets, models, F.replica_devices,
                                F.dtype_bytes)


def hit_path_ttft(model: calibration.StepTimeModel) -> np.ndarray:
    """TTFTs at --rate with every adapter resident (no cold loads)."""
    spec = workload.WorkloadSpec(F.num_requests, F.rate, 1.0, F.num_adapters, F.zipf, 0.0,
                                 workload.LengthDist.parse(F.prompt_len), workload.LengthDist.parse(F.output_len),
                                 F.seed)
    cfg = simulator.ClusterConfig("coupled", 1, model, F.num_adapters, 0.0, max_num_seqs=F.max_num_seqs,
                                  max_num_batched_tokens=F.max_num_batched_tokens)
    result = simulator.simulate(workload.generate(spec, None), cfg)
    return np.array([t.ttft for t in result.timings])


def make_plan() -> dict:
    shape = model_shapes.load(F.model)
    targets = tuple(ALL_TARGETS) if F.targets == ["all"] else tuple(F.targets)
    device = provisioning.Device(F.device_memory_gb * 1e9, F.hbm_tbps * 1e12, F.h2d_gbps * 1e9, F.reserve)
    adapter_bytes = shape.adapter_bytes(F.rank, targets, F.dtype_bytes, F.gate_up_rank_factor)
    cold = F.cold_load_s if F.cold_load_s is not None else adapter_bytes / device.h2d_bytes_per_s
    penalty = cold * (1 - F.load_overlap)
    model = step_model(shape, targets)
    if F.hit_ttft_s is not None:
        hit_ttft, hit_source = np.array([F.hit_ttft_s]), "given"
    elif model is not None:
        hit_ttft = hit_path_ttft(model)
        hit_source = f"simulated at {F.rate} req/s with every adapter resident ({model.name}" + \
            (", extrapolated)" if model.extrapolated else ")")
    else:
        raise app.UsageError("give --hit_ttft_s or --calibration")
    popularity = workload.zipf_weights(F.num_adapters, F.zipf)
    need = provisioning.required_admissibility(F.slo_ttft, hit_ttft, penalty, F.quantile)
    cache = provisioning.plan_cache(popularity, need, adapter_bytes)
    lru = admissibility.simulated_hit_rate(popularity, cache.capacity, 100_000, F.seed) if cache.capacity else 0.0
    budget = math.inf
    if model is not None:
        base, _ = model.split(F.step_tokens, 0)
        budget = float(base - model.host_ms) / model.layers
    layouts = provisioning.plan_lora_server(shape, F.rank, device, cache.capacity, targets=targets,
                                            dtype_bytes=F.dtype_bytes, max_devices=F.max_devices,
                                            step_adapters=F.step_adapters, step_tokens=F.step_tokens,
                                            layer_budget_ms=budget, gate_up_rank_factor=F.gate_up_rank_factor)
    chosen = provisioning.choose(layouts)
    coupled = None
    try:
        coupled = provisioning.coupled_cache(shape, adapter_bytes, device, F.coupled_lora_share,
                                             dtype_bytes=F.dtype_bytes)
    except ValueError:
        pass
    return {"model": shape.name, "layers": shape.num_layers, "experts": shape.num_experts, "rank": F.rank,
            "targets": list(targets), "adapter_bytes": adapter_bytes, "num_adapters": F.num_adapters, "zipf": F.zipf,
            "rate": F.rate, "slo_ttft_s": F.slo_ttft, "quantile": F.quantile, "cold_load_s": cold,
            "cold_load_source": "given" if F.cold_load_s is not None else f"bytes / {F.h2d_gbps} GB/s (assumed)",
            "miss_penalty_s": penalty, "hit_ttft_p50_s": float(np.percentile(hit_ttft, 50)),
            "hit_ttft_p95_s": float(np.percentile(hit_ttft, 95)), "hit_ttft_source": hit_source,
            "required_admissibility": need, "cache": dataclasses.asdict(cache), "cache_lru_simulated": lru,
            "layer_budget_ms": budget, "layouts": [dataclasses.asdict(r) for r in layouts],
            "chosen": dataclasses.asdict(chosen) if chosen else None,
            "coupled": dataclasses.asdict(coupled) if coupled else None,
            "coupled_admissibility": admissibility.che_hit_rate(popularity, coupled.capacity) if coupled else None,
            "slo": dataclasses.asdict(metrics.SLO(F.slo_ttft))}


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
        lines.append(f"SLO P{p['quantile'] * 100:.0f} TTFT <= {p['slo_ttft_s']} s needs immediate admissibility >= "
                     f"{need:.3f}")
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


def main(argv):
    del argv
    plan = make_plan()
    print(format_plan(plan))
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out, "w") as f:
            json.dump(plan, f, indent=1, default=float)


if __name__ == "__main__":
    app.run(main)
