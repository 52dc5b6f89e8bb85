"""The paper's setting, simulated: 16 GPUs, four MoE models, 512-1024 adapters, Zipf 1.2; serviceable rate and
share of adapters meeting the SLO for every baseline.

Deployments (per model, H200s: 141 GB, reserve 10%):
  coupled, coupled+sjf  all --gpus as base replicas of g devices each (g: the fewest, a power of two, that leave a
                        fifth of memory spare after the bf16 weights); each replica's spare memory holds the KV
                        its batch needs (max_num_seqs x the workload's P95 request length) and the rest caches
                        adapters (S-LoRA style).
  coupled-reduced       the same, 40% of the spare memory to adapters and 60% to KV.
  disaggregated         --base_gpus as base replicas (all spare memory to KV) and --gpus - --base_gpus as one
                        LoRA server whose cache and layout come from the provisioning DP (bench/provisioning.py);
                        --exchange_us per layer for the base <-> LoRA-server exchange.
Step times come from configs/calibration/h200.json through bench/extrapolation.py: measured at 4-8 layers on one
H200 for Mixtral and Qwen3 widths at rank 16; full depth, other ranks, GPT-OSS and DBRX, several devices per
replica are EXTRAPOLATED (the JSON output records each model's derivation). Cold loads: adapter bytes over
--h2d_gbps (assumed), stalling the step that needs them (--adapter_loading step) or delaying only the requests
that need them (background). Requests are routed as the engine routes them (--routing engine: coupled replicas by
adapter affinity, base instances to the one with the fewest requests); the 16-GPU tables in docs/benchmarks.md
were first made when the simulator routed round robin at each arrival: --routing round_robin
--noarrivals_between_steps reproduces that version.

    python benchmarks/simulate_cluster.py --out out/cluster
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from infinilora_jax.bench import (  # noqa: E402
    admissibility,
    baselines,
    calibration,
    extrapolation,
    metrics,
    model_shapes,
    plots,
    provisioning,
    rate_search,
    simulator,
    workload,
)

F = flags.FLAGS
flags.DEFINE_list("models", ["mixtral-8x7b:64", "qwen3-30b-a3b:32", "gpt-oss-20b:64", "dbrx:64"],
                  "configs/models/<name>.json : adapter rank (the paper's ranks)")
flags.DEFINE_list("num_adapters", ["512", "1024"], "")
flags.DEFINE_float("zipf", 1.2, "")
flags.DEFINE_integer("gpus", 16, "GPUs in all (the disaggregated mode's base + LoRA-server GPUs)")
flags.DEFINE_integer("coupled_gpus", None, "GPUs of the coupled baselines (default: --gpus, the same hardware)")
flags.DEFINE_integer("base_gpus", 8, "disaggregated: GPUs for base replicas (the rest serve LoRA)")
flags.DEFINE_string("calibration", "configs/calibration/h200.json", "")
flags.DEFINE_float("exchange_us", 70.0, "per layer, base <-> LoRA server (60-75 us measured with XLA ppermute)")
flags.DEFINE_float("h2d_gbps", 50.0, "host-to-device bandwidth per GPU (assumed)")
flags.DEFINE_enum("adapter_loading", "step", list(simulator.ADAPTER_LOADINGS), "a cold load stalls its step, or "
                  "(background) delays only the requests that need it")
flags.DEFINE_enum("routing", "engine", ["engine", *simulator.ROUTINGS], "requests to replicas: as the engine does "
                  "in each mode, or as named (bench/simulator.py)")
flags.DEFINE_bool("arrivals_between_steps", True, "requests reach the replicas only between steps, as in the "
                  "engine (bench/simulator.py ClusterConfig.arrivals_between_steps)")
flags.DEFINE_bool("async_scheduling", True, "the engines queue each step before reading the previous one's tokens "
                  "(their default; bench/simulator.py ClusterConfig.async_scheduling)")
flags.DEFINE_float("memory_gb", 141.0, "")
flags.DEFINE_float("reserve", 0.1, "")
flags.DEFINE_string("prompt_len", "burstgpt:16:512", "BurstGPT-like, cut at 512 tokens: longer prompts (P95 ~800 at "
                    "1024) take more than the 0.25 s TTFT to prefill with the measured Mixtral step time")
flags.DEFINE_string("output_len", "burstgpt-response:1:512", "")
flags.DEFINE_integer("num_requests", 2000, "per simulated run at least")
flags.DEFINE_float("duration_s", 120.0, "each run has rate * duration_s requests (at least --num_requests): short "
                   "runs at high rates end before the queue shows that it grows")
flags.DEFINE_integer("max_num_seqs", 64, "")
flags.DEFINE_integer("max_num_batched_tokens", 512, "")
flags.DEFINE_float("slo_ttft", 0.25, "")
flags.DEFINE_float("slo_tpot", 0.1, "")
flags.DEFINE_float("rel_tol", 0.03, "")
flags.DEFINE_list("baselines", list(baselines.BASELINES), "")
flags.DEFINE_integer("seed", 0, "")
flags.DEFINE_string("out", "out/cluster", "output prefix (.json, .md table, _<model>_<N>_{attainment,ttft,cdf}.png, "
                    "_cache_<N>.png)")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def deployments(shape, rank: int, num_adapters: int, spec, measured) -> tuple[dict, calibration.StepTimeModel]:
    """Cluster configs and sizing per baseline for one model."""
    device = provisioning.Device(F.memory_gb * 1e9, 3.2e12, F.h2d_gbps * 1e9, F.reserve)
    targets = model_shapes.DEFAULT_TARGETS
    adapter = shape.adapter_bytes(rank, targets)
    sizes = [r.prompt_tokens + r.max_tokens for r in workload.generate(spec, None)]
    kv_need = F.max_num_seqs * float(np.percentile(sizes, 95)) * shape.kv_bytes_per_token()
    probe = provisioning.coupled_cache(shape, adapter, device, 0.5)
    g = probe.devices
    step = extrapolation.derive(shape, rank, targets, measured, devices=g)
    load_ms = 1e3 * adapter / device.h2d_bytes_per_s
    common = dict(step=step, max_num_seqs=F.max_num_seqs, max_num_batched_tokens=F.max_num_batched_tokens,
                  replica_devices=g, adapter_loading=F.adapter_loading,
                  arrivals_between_steps=F.arrivals_between_steps, async_scheduling=F.async_scheduling,
                  routing=None if F.routing == "engine" else F.routing)
    out = {}
    for b in (baselines.BASELINES[n] for n in F.baselines):
        if b.mode == "coupled":
            share = baselines.REDUCED_LORA_SHARE if b.reduced_cache else max(0.0, 1 - kv_need / probe.spare_bytes)
            cc = provisioning.coupled_cache(shape, adapter, device, share, devices=g)
            gpus = F.coupled_gpus or F.gpus
            cfg = simulator.ClusterConfig("coupled", gpus // g, cache_slots=max(1, cc.capacity), load_ms=load_ms,
                                          policy=b.policy, kv_tokens=cc.kv_tokens, **common)
            info = {"gpus": gpus, "replicas": gpus // g, "devices_per_replica": g, "lora_share": share,
                    "cache_per_replica": cc.capacity, "kv_tokens_per_replica": cc.kv_tokens}
        else:
            lora_gpus = F.gpus - F.base_gpus
            layouts = provisioning.plan_lora_server(shape, rank, device, num_adapters, targets=targets,
                                                    max_devices=lora_gpus)
            server = layouts[-1]  # the best layout on all the LoRA GPUs
            kv = provisioning.coupled_cache(shape, adapter, device, 0.0, devices=g).kv_tokens
            cfg = simulator.ClusterConfig("disaggregated", F.base_gpus // g, cache_slots=server.capacity,
                                          load_ms=server.load_ms, kv_tokens=kv,
                                          exchange_ms_per_layer=F.exchange_us / 1e3, lora_devices=lora_gpus,
                                          **common)
            info = {"gpus": F.gpus, "replicas": F.base_gpus // g, "devices_per_replica": g, "lora_gpus": lora_gpus,
                    "server_layout": f"EP{server.ep} x PP{server.pp}", "server_cache": server.capacity,
                    "kv_tokens_per_replica": kv}
        slots = cfg.cache_slots
        info.update(adapter_gb=adapter / 1e9, load_ms=cfg.load_ms,
                    che_hit_rate=admissibility.che_hit_rate(workload.zipf_weights(num_adapters, F.zipf), slots))
        out[b.name] = (cfg, info)
    return out, step


def search(cfg, spec, slo):
    def run(rate):
        n = max(F.num_requests, int(rate * F.duration_s))
        res = simulator.simulate(workload.generate(dataclasses.replace(spec, rate=rate, num_requests=n), None), cfg)
        return {**res.summary(slo), "rate": rate, "requests": n}

    ok = lambda s: s["unfinished"] == 0 and metrics.meets_slo(s, slo)
    return rate_search.find_serviceable_rate(run, ok, start=4.0, rel_tol=F.rel_tol, max_probes=24,
                                             progress=False), run


def main(argv):
    del argv
    slo = metrics.SLO(F.slo_ttft, F.slo_tpot)
    measured = calibration.load(os.path.join(ROOT, F.calibration) if not os.path.isabs(F.calibration)
                                else F.calibration)
    report = {"config": {k: getattr(F, k) for k in ("models", "num_adapters", "zipf", "gpus", "coupled_gpus",
                                                   "base_gpus",
                                                   "calibration", "exchange_us", "h2d_gbps", "memory_gb", "reserve",
                                                   "prompt_len", "output_len", "num_requests", "duration_s",
                                                   "max_num_seqs", "max_num_batched_tokens", "slo_ttft", "slo_tpot",
                                                   "seed", "adapter_loading", "routing",
                                                   "arrivals_between_steps")},
              "results": []}
    jobs = [(m, int(n)) for m in F.models for n in F.num_adapters]
    for item, n in tqdm(jobs, desc="models", unit="setting"):
        name, rank = item.split(":")
        shape = model_shapes.load(os.path.join(ROOT, "configs", "models", f"{name}.json"))
        spec = workload.WorkloadSpec(F.num_requests, 1.0, 1.0, n, F.zipf, 0.0,
                                     workload.LengthDist.parse(F.prompt_len),
                                     workload.LengthDist.parse(F.output_len), F.seed)
        deps, step = deployments(shape, int(rank), n, spec, measured)
        rows, runs = {}, {}
        for bname, (cfg, info) in deps.items():
            res, runs[bname] = search(cfg, spec, slo)
            rows[bname] = {**info, "serviceable_rate": res.rate,
                           "probes": [{"rate": p.rate, "ok": p.ok, **{k: p.summary.get(k) for k in (
                               "ttft_p95_s", "tpot_mean_s", "adapters_meeting_slo", "hit_rate")}}
                                      for p in res.probes]}
        common_rate = max(r["serviceable_rate"] for r in rows.values())
        per_adapter = {}
        for bname, r in rows.items():
            at = runs[bname](common_rate) if common_rate > 0 else None
            r["at_common_rate"] = {k: at[k] for k in ("ttft_p95_s", "tpot_mean_s", "adapters_meeting_slo",
                                                      "hit_rate")} if at else None
            if at and "per_adapter_attainment" in at:
                per_adapter[bname] = at["per_adapter_attainment"]
            own = next((p for p in r["probes"] if p["ok"] and p["rate"] == r["serviceable_rate"]), None)
            r["adapters_meeting_slo_at_own_rate"] = own["adapters_meeting_slo"] if own else 0.0
        report["results"].append({"model": name, "rank": int(rank), "num_adapters": n, "common_rate": common_rate,
                                  "step_model": step.to_dict(), "baselines": rows})
        _plot(name, n, rows, slo)
        if per_adapter:
            plots.attainment_cdf(per_adapter, slo.attainment, f"{F.out}_{name}_{n}_cdf.png",
                                 title=f"{name}, {n} adapters, at {common_rate:.1f} req/s (simulated)")
    os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
    with open(F.out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(table(report))
    with open(F.out + ".md", "w") as f:
        f.write(markdown(report) + "\n")
    _plot_caches(report)
    logging.info("wrote %s.json and plots", F.out)


def table(report: dict) -> str:
    lines = [f"  {'model':<15} {'N':>5} {'baseline':<16} {'GPUs':>9} {'cache':>6} {'hit':>5} {'rate req/s':>10} "
             f"{'x coupled':>9} {'adapters ok @common':>19}"]
    for res in report["results"]:
        base = res["baselines"].get("coupled", {}).get("serviceable_rate", 0.0)
        for name, r in res["baselines"].items():
            gpus = f"{r['replicas']}x{r['devices_per_replica']}" + (f"+{r['lora_gpus']}" if "lora_gpus" in r else "")
            cache = r.get("cache_per_replica", r.get("server_cache"))
            at = r["at_common_rate"]["adapters_meeting_slo"] if r["at_common_rate"] else float("nan")
            ratio = r["serviceable_rate"] / base if base > 0 else float("nan")
            lines.append(f"  {res['model']:<15} {res['num_adapters']:>5} {name:<16} {gpus:>9} {cache:>6} "
                         f"{r['che_hit_rate']:>5.2f} {r['serviceable_rate']:>10.2f} {ratio:>9.2f} {at:>19.0%}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The table as markdown (for docs/benchmarks.md)."""
    lines = ["| model (rank) | adapters | baseline | GPUs | adapter cache | Che hit rate | serviceable rate (req/s) | "
             "vs coupled | adapters meeting SLO at the common rate |", "|---|---|---|---|---|---|---|---|---|"]
    for res in report["results"]:
        base = res["baselines"].get("coupled", {}).get("serviceable_rate", 0.0)
        for name, r in res["baselines"].items():
            gpus = f"{r['replicas']} x {r['devices_per_replica']}" + (f" + {r['lora_gpus']} LoRA" if "lora_gpus" in r
                                                                      else "")
            cache = (f"{r['server_cache']} shared ({r['server_layout']})" if "server_cache" in r
                     else f"{r['cache_per_replica']} per replica")
            at = r["at_common_rate"]["adapters_meeting_slo"] if r["at_common_rate"] else float("nan")
            lines.append(f"| {res['model']} (r{res['rank']}) | {res['num_adapters']} | {name} | {gpus} | {cache} | "
                         f"{r['che_hit_rate']:.2f} | {r['serviceable_rate']:.1f} | "
                         f"{r['serviceable_rate'] / base if base else float('nan'):.2f}x | {at:.0%} "
                         f"(at {res['common_rate']:.1f}) |")
    return "\n".join(lines)


def _plot(name: str, n: int, rows: dict, slo) -> None:
    prefix = f"{F.out}_{name}_{n}"
    plots.versus_rate({b: [(p["rate"], p["adapters_meeting_slo"] or 0.0) for p in r["probes"]]
                       for b, r in rows.items()}, "share of adapters meeting the SLO", prefix + "_attainment.png",
                      title=f"{name}, {n} adapters (simulated)")
    plots.versus_rate({b: [(p["rate"], min(p["ttft_p95_s"], 1e3)) for p in r["probes"]] for b, r in rows.items()},
                      "P95 TTFT (s)", prefix + "_ttft.png", target=slo.ttft_s, logy=True,
                      title=f"{name}, {n} adapters (simulated)")


def _plot_caches(report: dict) -> None:
    """Che admissibility against cache size for each adapter count, with every deployment's cache marked."""
    for n in sorted({res["num_adapters"] for res in report["results"]}):
        pop = workload.zipf_weights(n, F.zipf)
        sizes = sorted(set(np.unique(np.geomspace(1, n, 60).astype(int)).tolist()))
        points = {}
        for res in (r for r in report["results"] if r["num_adapters"] == n):
            for b, r in res["baselines"].items():
                cache = min(r.get("cache_per_replica", r.get("server_cache")), n)
                points.setdefault(b, []).append((cache, r["che_hit_rate"]))
        plots.cache_admissibility(sizes, {f"Che, Zipf {F.zipf} over {n}": [admissibility.che_hit_rate(pop, c)
                                                                          for c in sizes]},
                                  f"{F.out}_cache_{n}.png", points=points,
                                  title=f"cache size vs admissibility, {n} adapters (each model's deployments)",
                                  logx=True)


if __name__ == "__main__":
    app.run(main)
