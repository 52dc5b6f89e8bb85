"""Serviceable rate and share of adapters meeting the SLO, per baseline, in the real engine; and the simulator's
prediction of the same runs.

Baselines (bench/baselines.py), all on the same devices: coupled (one replica over --coupled_mesh, the engine's
own adapter cache of --coupled_slots), coupled+sjf, coupled-reduced (40% of that cache), disaggregated (the role
layout --disagg_layout: base instance(s) and a LoRA server whose shared cache has --disagg_slots). By default the
coupled replica spans as many devices as the disaggregated layout (1+1 <-> ep2, 2+2 <-> ep4, 4+4 <-> ep8), so
both use the same hardware; every row compiles the same --pool_slots pool and placeholder adapters pin the slots
it does not use, and the disaggregated row gets as many usable slots as coupled
(docs/architecture/08-slo-provisioning.md says why). With --coupled_replicas N the coupled rows run as N
independent replicas instead (S-LoRA-style data parallelism, engine/replicas.py): each replica on its own
devices with its own KV cache, scheduler and adapter cache of --coupled_slots usable slots, requests routed by
adapter residency then load; by default each replica spans 1/N of the disaggregated layout's devices (1+1 and
N=2: one single-device replica per device, issue 6's "coupled on 2 GPUs" baseline).
For each, the serviceable rate (highest Poisson rate whose run keeps P95 TTFT and mean TPOT within the SLO) is
found by bisection (bench/rate_search.py), each probe replaying the same seeded workload at that rate in
wall-clock time (bench/replay.py `measured`, which also counts the engine steps over every base instance). Then
every baseline runs once more at a common rate (the best serviceable rate), where the share of adapters meeting
the SLO is compared. The simulator (bench/simulator.py), driven by the step calibration --calibration (measured
separately by calibrate_step_time.py, on one device), replays the same workloads for the coupled rows, and its
serviceable rates and P95 TTFTs are set beside the measured ones. With a sweep and --calibration measured, every
row is simulated with the step model its own probes measured (replay.step_model: coefficients, the host gap
between steps, and for the disaggregated row whole disaggregated steps).

On CPU the tiny model's adapters load in microseconds; --emulated_load_ms makes each adapter load stall its step
as long as a real adapter's host-to-device copy would (default 50 ms: a ~2.5 GB adapter, e.g. Qwen3-30B-A3B at
rank 32, at an assumed 50 GB/s), so that the cache size matters as it does at real sizes. On CPU the host is
split into as many devices as the layouts need (--cpu_devices, default: that many).

    python benchmarks/slo_baselines.py --out out/slo_cpu
    # the 2-GPU machine, real shapes: coupled ep2 vs disaggregated 1+1 on the same two GPUs, real adapter loads
    # (docs/benchmarks.md: "On the GPU machine")
    python benchmarks/slo_baselines.py --model configs/models/qwen3-30b-a3b.json --num_layers 8 --dtype bfloat16 \\
        --rank 32 --num_adapters 64 --pool_slots 24 --coupled_slots 16 --emulated_load_ms 0 --max_num_seqs 64 \\
        --max_num_batched_tokens 512 --max_model_len 2048 --prompt_len burstgpt:16:512 \\
        --output_len burstgpt-response:1:256 --disagg_layout 1+1 --coupled_mesh ep2 --num_requests 120 \\
        --max_probes 4 --rel_tol 0.2 --calibration '' --out $OUT/slo_gpu
    # the same with the coupled rows as two single-device replicas (one per GPU): add --coupled_replicas 2
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared GPU host
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402

from infinilora_jax.bench import baselines, calibration, metrics, plots, rate_search, replay, simulator, workload  # noqa: E402,E501

F = flags.FLAGS
flags.DEFINE_string("model", None, "configs/models/*.json (random weights) or an HF dir; default: bundled tiny")
flags.DEFINE_integer("num_layers", None, "cut the model to this many layers")
flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "")
flags.DEFINE_integer("num_adapters", 32, "random adapters, Zipf-popular")
flags.DEFINE_integer("rank", 8, "")
flags.DEFINE_integer("pool_slots", 16, "device adapter slots compiled into the pool (>= coupled_slots)")
flags.DEFINE_integer("coupled_slots", 8, "usable adapter slots of the coupled baselines")
flags.DEFINE_float("emulated_load_ms", 50.0, "time per adapter load (0: none): a stall of the step that carries "
                   "it, or with --adapter_loading=background the earliest its requests run")
flags.DEFINE_enum("adapter_loading", "step", ["step", "background"], "LLM(adapter_loading=...) of every engine")
flags.DEFINE_bool("async_scheduling", True, "LLM(async_scheduling=...) of every engine, and the simulator's model of "
                  "them")
flags.DEFINE_integer("max_num_seqs", 16, "")
flags.DEFINE_integer("max_num_batched_tokens", 128, "")
flags.DEFINE_integer("max_model_len", 256, "")
flags.DEFINE_integer("num_requests", 200, "requests per probe")
flags.DEFINE_string("prompt_len", "burstgpt:8:160", "")
flags.DEFINE_string("output_len", "8:48", "")
flags.DEFINE_float("zipf", 1.2, "")
flags.DEFINE_float("burstiness", 1.0, "gamma shape of arrival gaps (1 = Poisson)")
flags.DEFINE_float("slo_ttft", 0.25, "P95 TTFT target, s")
flags.DEFINE_float("slo_tpot", 0.1, "mean TPOT target, s")
flags.DEFINE_float("start_rate", 8.0, "first probe, requests/s")
flags.DEFINE_float("rel_tol", 0.1, "bisection stops when the bracket is this narrow (relative)")
flags.DEFINE_integer("max_probes", 8, "runs per baseline at most")
flags.DEFINE_list("baselines", list(baselines.BASELINES), "")
flags.DEFINE_string("calibration", "configs/calibration/cpu-tiny.json", "step calibration for the simulator check; "
                    "'measured': with a sweep, each baseline's own probes' step model (replay.step_model)")
flags.DEFINE_string("calibration_model", "tiny-qwen3-moe", "")
flags.DEFINE_string("compilation_cache", "out/jax_cache", "persistent compilation cache directory ('' for none)")
flags.DEFINE_integer("seed", 0, "")
flags.DEFINE_string("disagg_layout", "1+1", "role layout of the disaggregated row (meshes/layouts.py "
                    "ROLE_LAYOUTS: base + LoRA-server devices)")
flags.DEFINE_string("coupled_mesh", None, "layout of the coupled replica (meshes/layouts.py LAYOUTS); default: "
                    "ep<N> over the N devices of --disagg_layout when the disaggregated row runs, else one device")
flags.DEFINE_integer("coupled_replicas", 1, "run the coupled rows as this many independent replicas (each with "
                     "--coupled_mesh on its own devices and its own adapter cache; default mesh: ep<N/replicas> "
                     "over the disaggregated layout's N devices)")
flags.DEFINE_integer("disagg_slots", None, "usable adapter slots of the LoRA server (default: --coupled_slots)")
flags.DEFINE_integer("disagg_num_pages", None, "KV pages of the disaggregated engine (its LoRA devices' adapter "
                     "arenas are their weight and KV blocks; default: the LLM's, doubled until the pool fits)")
flags.DEFINE_integer("cpu_devices", None, "split the CPU host into this many devices (default: the devices the "
                     "layouts use; only the CPU backend is affected)")
flags.DEFINE_integer("disagg_max_num_seqs", None, "running requests of the disaggregated base instance (default: "
                     "--max_num_seqs; its device holds no adapters, so its KV cache may seat more)")
flags.DEFINE_integer("compile_workers", 2, "programs compiled at once before traffic")
flags.DEFINE_integer("distinct_adapters", 0, "adapters with pages of their own (0: all); later ones reuse them")
flags.DEFINE_list("sweep_adapters", [], "adapter counts: instead of one table, each baseline's serviceable rate "
                  "at each count (Zipf over the first N adapters; --num_adapters is raised to the largest)")
flags.DEFINE_string("simulate_from", None, "an earlier run's JSON: skip the engine, redo the simulator check with "
                    "that run's settings (flags given here win)")
flags.DEFINE_float("sim_exchange_ms_per_layer", 0.22, "simulator, disaggregated rows: exchange cost per layer "
                   "(2 x H200, 8-layer decode, fifth session: (12.80 - 11.04) / 8 ms)")
flags.DEFINE_string("out", "out/slo_cpu", "output prefix (.json, *_<plot>.png)")


def main(argv):
    del argv
    measured = None
    if F.simulate_from:  # the measured part of an earlier run; redo the simulator check only, with its settings
        with open(F.simulate_from) as f:
            measured = json.load(f)
        for key, value in measured.get("config", {}).items():
            if key in F and not F[key].present:
                setattr(F, key, value)
        if "async_scheduling" not in measured.get("config", {}) and not F["async_scheduling"].present:
            F.async_scheduling = False  # recorded before async scheduling existed: one step at a time
    if F.sweep_adapters:
        F.num_adapters = max(F.num_adapters, *(int(n) for n in F.sweep_adapters))
    slo = metrics.SLO(F.slo_ttft, F.slo_tpot)
    spec = workload.WorkloadSpec(F.num_requests, 1.0, F.burstiness, F.num_adapters, F.zipf, 0.0,
                                 workload.LengthDist.parse(F.prompt_len), workload.LengthDist.parse(F.output_len),
                                 F.seed)
    wanted = [baselines.BASELINES[name] for name in F.baselines]
    report = measured if measured is not None else _measure(wanted, spec, slo)
    if report["baselines"] and os.path.exists(F.calibration):
        report["simulator"] = _simulator_check(report["baselines"], spec, slo)
    if report.get("sweep") and (F.calibration == "measured" or os.path.exists(F.calibration)):
        report["simulator"] = _simulator_sweep_check(report, spec, slo)
    _write(report)
    if report.get("sweep"):
        _print_sweep(report)
        _plot_sweep(report)
        return
    _print_table(report, wanted)
    _plots(report, slo)


def _write(report: dict) -> None:
    os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
    with open(F.out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=float)


def _layouts(wanted) -> tuple[str | None, str | None]:
    """(coupled mesh, disaggregated layout) of this run; the coupled replica spans the disaggregated layout's
    devices unless --coupled_mesh says otherwise."""
    from meshes.layouts import resolve_role_layout

    disagg = F.disagg_layout if any(b.mode == "disaggregated" for b in wanted) else None
    coupled = F.coupled_mesh
    if F.coupled_replicas < 1:
        raise app.UsageError(f"--coupled_replicas={F.coupled_replicas}: must be at least 1")
    if coupled is None and disagg is not None:
        n = resolve_role_layout(disagg).num_devices
        if n % F.coupled_replicas:
            raise app.UsageError(f"--coupled_replicas={F.coupled_replicas} does not divide the {n} devices of "
                                 f"--disagg_layout={disagg}: give --coupled_mesh")
        n //= F.coupled_replicas
        coupled = f"ep{n}" if n > 1 else None
    return coupled, disagg


def _coupled_label(coupled: str | None) -> str:
    mesh = coupled or "single"
    return f"{F.coupled_replicas}x{mesh}" if F.coupled_replicas > 1 else mesh


def _num_devices(llm) -> int:
    """Devices the LLM runs on (every replica's, for a replica group)."""
    return sum(len(r.mesh.devices.flat) for r in getattr(llm.runner, "runners", None) or [llm.runner])


def _devices(coupled: str | None, disagg: str | None) -> int:
    from meshes.layouts import resolve_layout, resolve_role_layout

    return max(F.coupled_replicas * resolve_layout(coupled).num_devices,
               resolve_role_layout(disagg).num_devices if disagg else 1)


def _disagg_seqs() -> int:
    return F.disagg_max_num_seqs or F.max_num_seqs


def _disagg_llm(pool_slots: int, share_from=None):
    """The disaggregated LLM. Its LoRA devices keep adapter pages in their weight and KV blocks: when the pool
    does not fit there, the KV page count (hence the blocks) is doubled, up to 4 times."""
    from infinilora_jax.errors import ConfigError

    num_pages = F.disagg_num_pages
    for attempt in range(5):
        try:
            return replay.benchmark_llm(F.model, F.num_adapters, F.rank, pool_slots, dtype=F.dtype,
                                        num_layers=F.num_layers, max_num_seqs=_disagg_seqs(),
                                        max_num_batched_tokens=max(F.max_num_batched_tokens, _disagg_seqs()),
                                        max_model_len=F.max_model_len, mode="disaggregated",
                                        mesh=F.disagg_layout, num_pages=num_pages, share_from=share_from,
                                        workers=F.compile_workers, distinct=F.distinct_adapters,
                                        adapter_loading=F.adapter_loading, async_scheduling=F.async_scheduling)
        except ConfigError as e:
            if "role buffers hold pages" not in str(e) or attempt == 4:
                raise
            page_size = 16
            base = num_pages or min(65536, _disagg_seqs() * -(-F.max_model_len // page_size) + 1)
            num_pages = 2 * base
            logging.warning("%s; retrying with num_pages=%d", e, num_pages)
            import gc

            gc.collect()


def _measure(wanted, spec, slo) -> dict:
    """Runs the real engine: bisection per baseline, then each at the common rate. Written to --out.json before
    anything else happens."""
    coupled_mesh, disagg_layout = _layouts(wanted)
    devices = F.cpu_devices if F.cpu_devices is not None else _devices(coupled_mesh, disagg_layout)
    if devices > 1:
        import jax

        jax.config.update("jax_num_cpu_devices", devices)  # the CPU backend only; before any backend starts
    replay.enable_compilation_cache(F.compilation_cache)
    coupled = [b for b in wanted if b.mode == "coupled"]
    slots = {b.name: baselines.reduced_slots(F.coupled_slots) if b.reduced_cache else F.coupled_slots
             for b in coupled}
    engines = {}  # baseline -> (llm, adapter names, configure): one engine for the coupled rows, one disaggregated
    layouts = {}
    if coupled:
        llm, names = replay.benchmark_llm(F.model, F.num_adapters, F.rank, F.pool_slots, dtype=F.dtype,
                                          num_layers=F.num_layers, max_num_seqs=F.max_num_seqs,
                                          max_num_batched_tokens=F.max_num_batched_tokens,
                                          max_model_len=F.max_model_len, mesh=coupled_mesh,
                                          replicas=F.coupled_replicas, workers=F.compile_workers,
                                          distinct=F.distinct_adapters, adapter_loading=F.adapter_loading,
                                          async_scheduling=F.async_scheduling)
        replay.emulate_cold_loads(llm.engine, F.emulated_load_ms / 1e3)
        limit = replay.AdapterSlotLimit(llm)
        for b in coupled:
            def configure(b=b, llm=llm, limit=limit):
                limit.set(slots[b.name])
                replay.set_policy(llm.engine, b.policy)
            engines[b.name] = (llm, names, configure)
            layouts[b.name] = _coupled_label(coupled_mesh)
    disagg_note = None
    if disagg_layout is not None:
        if not baselines.disaggregated_engine_available():
            disagg_note = "not available yet: LLM has no mode='disaggregated'"
        else:  # the LoRA server's shared cache: as many usable slots as coupled unless --disagg_slots
            d_llm, d_names = _disagg_llm(F.pool_slots, engines[coupled[0].name][0] if coupled else None)
            replay.emulate_cold_loads(d_llm.engine, F.emulated_load_ms / 1e3)
            slots["disaggregated"] = F.disagg_slots or F.coupled_slots
            d_limit = replay.AdapterSlotLimit(d_llm)

            def configure_disagg(llm=d_llm, limit=d_limit):
                limit.set(slots["disaggregated"])
                replay.set_policy(llm.engine, "fcfs")
            engines["disaggregated"] = (d_llm, d_names, configure_disagg)
            layouts["disaggregated"] = disagg_layout
    if F.sweep_adapters:
        return _sweep(engines, slots, layouts, spec, slo)
    results: dict[str, dict] = {}
    runs = {}

    def make_report(common: float) -> dict:
        return {"config": {k: getattr(F, k) for k in (
                    "model", "num_layers", "dtype", "num_adapters", "rank", "pool_slots", "coupled_slots",
                    "emulated_load_ms", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_requests",
                    "prompt_len", "output_len", "zipf", "burstiness", "slo_ttft", "slo_tpot", "rel_tol",
                    "max_probes", "seed", "disagg_layout", "coupled_mesh", "coupled_replicas", "disagg_slots",
                    "disagg_num_pages", "adapter_loading", "async_scheduling")},
                "layouts": {"coupled": _coupled_label(coupled_mesh), "disaggregated": disagg_layout},
                "common_rate": common, "baselines": results, "disaggregated": disagg_note, "simulator": {}}

    for name, (llm, names, configure) in engines.items():
        configure()
        runs[name] = run = _runner(llm, names, spec, llm.config.vocab_size, slo)
        run.warm(F.start_rate)  # fills the cache, settles the allocator
        search = rate_search.find_serviceable_rate(run, lambda s: metrics.meets_slo(s, slo), start=F.start_rate,
                                                   rel_tol=F.rel_tol, max_probes=F.max_probes, desc=name)
        results[name] = {"slots": slots[name], "policy": baselines.BASELINES[name].policy, "layout": layouts[name],
                         "devices": _num_devices(llm),
                         "serviceable_rate": search.rate, "probes": [dataclasses.asdict(p) for p in search.probes]}
        logging.info("%s: serviceable rate %.2f req/s", name, search.rate)
        _write(make_report(0.0))  # so far (a run cut short still leaves its searches)
    common = max((r["serviceable_rate"] for r in results.values()), default=0.0)
    for name, (_, _, configure) in engines.items():
        configure()
        results[name]["at_common_rate"] = runs[name](common) if common > 0 else None
    report = make_report(common)
    _write(report)
    return report


def _sweep(engines: dict, slots: dict, layouts: dict, spec, slo) -> dict:
    """Each baseline's serviceable rate as the number of adapters in the workload grows (Zipf over the first N
    registered adapters). Each count's search starts at the rate the baseline served at the previous count."""
    rows, start = [], {}
    report = {"config": {k: getattr(F, k) for k in (
        "model", "num_layers", "dtype", "rank", "pool_slots", "coupled_slots", "disagg_slots", "emulated_load_ms",
        "max_num_seqs", "disagg_max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_requests",
        "prompt_len", "output_len", "zipf", "burstiness", "slo_ttft", "slo_tpot", "rel_tol", "max_probes", "seed",
        "disagg_layout", "coupled_mesh", "coupled_replicas", "sweep_adapters", "adapter_loading",
        "async_scheduling")},
        "layouts": layouts, "baselines": {}, "sweep": rows, "simulator": {}}
    for count in (int(n) for n in F.sweep_adapters):
        row = {"num_adapters": count, "baselines": {}}
        rows.append(row)
        counted = dataclasses.replace(spec, num_adapters=count)
        for name, (llm, names, configure) in engines.items():
            configure()
            run = _runner(llm, names[:count], counted, llm.config.vocab_size, slo)
            first = start.get(name, F.start_rate)
            run.warm(first)  # this count's popular adapters into the cache
            partial = row["baselines"][name] = {"slots": slots[name], "layout": layouts[name], "unfinished": True,
                                                "probes": []}

            def run_and_keep(rate, run=run, partial=partial):  # a run cut short keeps its probes
                summary = run(rate)
                partial["probes"].append({"rate": rate, "ok": metrics.meets_slo(summary, slo), "summary": summary})
                _write(report)
                return summary
            search = rate_search.find_serviceable_rate(run_and_keep, lambda s: metrics.meets_slo(s, slo), start=first,
                                                       rel_tol=F.rel_tol, max_probes=F.max_probes,
                                                       desc=f"{name} N={count}")
            best = search.best_summary() or {}
            start[name] = max(search.rate, first / 4)
            row["baselines"][name] = {
                "slots": slots[name], "layout": layouts[name], "devices": _num_devices(llm),
                "serviceable_rate": search.rate, "adapters_meeting_slo": best.get("adapters_meeting_slo", 0.0),
                "hit_rate": best.get("hit_rate"), "ttft_p95_s": best.get("ttft_p95_s"),
                "tpot_mean_s": best.get("tpot_mean_s"), "probes": [dataclasses.asdict(p) for p in search.probes]}
            logging.info("N=%d %s: serviceable rate %.2f req/s", count, name, search.rate)
            _write(report)  # so far
    return report


def _print_sweep(report: dict) -> None:
    print(f"\n  serviceable rate (req/s) and share of adapters meeting the SLO at it, by adapter count "
          f"(P95 TTFT <= {F.slo_ttft} s, mean TPOT <= {F.slo_tpot} s)")
    names = list(report["sweep"][0]["baselines"]) if report["sweep"] else []
    print("  " + f"{'adapters':>8} " + " ".join(f"{n:>26}" for n in names))
    for row in report["sweep"]:
        cells = []
        for n in names:
            r = row["baselines"].get(n)
            if not r:
                cells.append(f"{'-':>26}")
            elif "serviceable_rate" not in r:  # cut off mid-search: its probes so far
                cells.append("cut off: " + ",".join(f"{p['rate']:g}{'+' if p['ok'] else '-'}" for p in r["probes"]))
            else:
                cells.append(f"{r['serviceable_rate']:8.2f} ({r['adapters_meeting_slo']:4.0%}, "
                             f"hit {r['hit_rate'] or 0:.2f})")
        print("  " + f"{row['num_adapters']:>8} " + " ".join(f"{c:>26}" for c in cells))


def _plot_sweep(report: dict) -> None:
    series: dict[str, list] = {}
    for row in report["sweep"]:
        for name, r in row["baselines"].items():
            if "serviceable_rate" not in r:  # cut off mid-search
                continue
            series.setdefault(f"{name} ({r['layout']}, {r['slots']} slots)", []).append(
                (row["num_adapters"], r["serviceable_rate"]))
    plots.versus_rate(series, "serviceable rate (requests/s)", F.out + "_sweep.png", xlabel="adapters (Zipf)",
                      logx=True, title=f"serviceable rate at the SLO vs adapter count ({F.disagg_layout} devices)")
    logging.info("wrote %s.json and %s_sweep.png", F.out, F.out)


def _runner(llm, names, spec, vocab, slo):
    """run(rate): the probe at that rate, measured. run.warm(rate): the caches settled (replay.settle_caches:
    every adapter staged, free slots filled with the most popular), then another draw of the same workload (the
    next seed), unmeasured: it leaves the cache holding the distribution's popular adapters, not the probe's own
    requests' adapters (which replaying the probe's own workload would preload)."""
    def run(rate: float) -> dict:
        reqs = workload.generate(dataclasses.replace(spec, rate=rate), vocab)
        return {**replay.measured(llm.engine, reqs, names, slo), "rate": rate}

    def warm(rate: float) -> None:
        seconds = replay.settle_caches(llm.engine, names[:spec.num_adapters])
        logging.info("staged %d adapters and filled free slots in %.1f s", spec.num_adapters, seconds)
        replay.replay(llm.engine, workload.generate(dataclasses.replace(spec, rate=rate, seed=spec.seed + 1), vocab),
                      names)

    run.warm = warm
    return run


def _sim_config(name: str, model, probes: list[dict] = ()) -> simulator.ClusterConfig:
    """The simulator's config for a baseline of this run: its settings, its --adapter_loading, requests routed
    as the engine routes them (the simulator's default: by adapter affinity over coupled replicas, to the base
    instance with the fewest requests when disaggregated), and async scheduling as the engine ran its measured
    `probes` (recordings before the fifteenth session's disaggregated engine stepped one at a time)."""
    recorded = [p["summary"]["async_scheduling"] for p in probes if "async_scheduling" in p.get("summary", {})]
    async_scheduling = recorded[0] if recorded else F.async_scheduling
    b = baselines.BASELINES[name]
    if b.mode == "disaggregated":
        from meshes.layouts import resolve_role_layout

        layout = resolve_role_layout(F.disagg_layout)
        return simulator.ClusterConfig("disaggregated", layout.dp, model, F.disagg_slots or F.coupled_slots,
                                       F.emulated_load_ms, 0.0, "fcfs", _disagg_seqs(),
                                       max(F.max_num_batched_tokens, _disagg_seqs()),
                                       # a model timed on the disaggregated engine holds the exchange already
                                       exchange_ms_per_layer=0.0 if model.engine_mode == "disaggregated" else
                                       F.sim_exchange_ms_per_layer,
                                       lora_devices=layout.num_devices // 2, replica_devices=layout.ep,
                                       adapter_loading=F.adapter_loading, async_scheduling=async_scheduling)
    slots = baselines.reduced_slots(F.coupled_slots) if b.reduced_cache else F.coupled_slots
    return simulator.ClusterConfig("coupled", F.coupled_replicas, model, slots, F.emulated_load_ms, 0.0, b.policy,
                                   F.max_num_seqs, F.max_num_batched_tokens, adapter_loading=F.adapter_loading,
                                   async_scheduling=async_scheduling)


def _calibrated_model():
    """The calibration's step model, at this run's depth when --num_layers cuts the model (the models are per
    layer)."""
    model = calibration.load(F.calibration)[F.calibration_model]
    return model.with_layers(F.num_layers) if F.num_layers else model


def _measured_step_model(name: str, probes: list[dict]):
    """A baseline's step model from its own probes (`step_model` of each summary): the coefficients weighted by
    steps fitted, the host gap between steps (`gap_ms`) by gaps measured (runs that predate its recording have
    none: 0), timed on the baseline's engine (`engine_mode`: a disaggregated baseline's steps are whole
    disaggregated steps); the probes' rates, steps and gaps in its provenance."""
    fits = [(p["rate"], p["summary"].get("step_model")) for p in probes]
    fits = [(rate, f) for rate, f in fits if f]
    if not fits:
        return None
    n = sum(f["n"] for _, f in fits)
    mean = {k: sum(f[k] * f["n"] for _, f in fits) / n for k in ("const", "tokens_coef", "adapters_coef")}
    gaps = sum(f.get("gaps", 0) for _, f in fits)
    gap_ms = sum(f["gap_ms"] * f["gaps"] for _, f in fits if f.get("gaps")) / gaps if gaps else 0.0
    mode = baselines.BASELINES[name].mode
    provenance = {"probes": [{"rate": rate, "steps": f["n"], "gaps": f.get("gaps")} for rate, f in fits],
                  "gap_ms": f"mean of {gaps} host gaps between steps (replay.host_gaps)" if gaps else
                  "not recorded by this run: 0"}
    return calibration.StepTimeModel(f"{name} (measured)", fits[0][1]["layers"], **mean, provenance=provenance,
                                     gap_ms=gap_ms, engine_mode=mode)


def _simulate_beside(cfg: simulator.ClusterConfig, spec, probes: list[dict], slo, start: float, name=None):
    """The simulator's serviceable rate for `cfg` on `spec`'s workload (bisection from `start`), and each measured
    probe's P95 TTFT, mean TPOT, adapters meeting the SLO and hit rate beside the simulated ones at its rate. With
    `name` (a self-calibrated check), also each probe's P95 TTFT simulated with that probe's own step model
    (`simulated_own_ttft_p95_s`): on a shared machine whose load drifts between probes, that separates the
    model's structure from the drift the pooled model averages over."""
    def sim_run(rate, cfg=cfg):
        res = simulator.simulate(workload.generate(dataclasses.replace(spec, rate=rate), None), cfg)
        return {**res.summary(slo), "rate": rate}

    search = rate_search.find_serviceable_rate(sim_run, lambda s: metrics.meets_slo(s, slo), start=start,
                                               rel_tol=F.rel_tol / 4, max_probes=20, progress=False)
    keys = ("ttft_p95_s", "tpot_mean_s", "adapters_meeting_slo", "hit_rate")
    beside = []
    for p in probes:
        sides = (("measured", p["summary"]), ("simulated", sim_run(p["rate"])))
        beside.append({"rate": p["rate"], **{f"{side}_{key}": source[key] for key in keys for side, source in sides}})
        own = _measured_step_model(name, [p]) if name is not None else None
        if own is not None:
            beside[-1]["simulated_own_ttft_p95_s"] = sim_run(p["rate"], dataclasses.replace(cfg, step=own))[
                "ttft_p95_s"]
    return search.rate, beside


def _simulator_sweep_check(report: dict, spec, slo) -> dict:
    """For every (adapter count, baseline) of a sweep: the simulator's serviceable rate and its P95 TTFT, TPOT and
    hit rate at each measured probe's rate, beside the measured ones. Printed as a table."""
    model = None if F.calibration == "measured" else _calibrated_model()
    out = {"calibration": F.calibration, "model": F.calibration_model, "layers": F.num_layers,
           "exchange_ms_per_layer": F.sim_exchange_ms_per_layer, "rows": []}
    source = "each baseline's own probes" if model is None else f"{F.calibration}: {F.calibration_model}"
    print(f"\n  simulator ({source}) against the measured sweep")
    own_note = " (with the probe's own model)" if model is None else ""
    print(f"  {'adapters':>8} {'baseline':>16} {'measured':>9} {'simulated':>9}   probes: rate -> P95 TTFT "
          f"measured / simulated{own_note}, hit rate measured / simulated")
    for row in report["sweep"]:
        counted = dataclasses.replace(spec, num_adapters=row["num_adapters"])
        for name, r in row["baselines"].items():
            own = _measured_step_model(name, r["probes"]) if model is None else model
            if own is None:
                print(f"  {row['num_adapters']:>8} {name:>16}: no probe recorded a step model")
                continue
            cfg = _sim_config(name, own, r["probes"])
            first = r["probes"][0]["rate"] if r["probes"] else F.start_rate
            simulated, probes = _simulate_beside(cfg, counted, r["probes"], slo, first,
                                                 name if model is None else None)
            measured = r.get("serviceable_rate")
            out["rows"].append({"num_adapters": row["num_adapters"], "baseline": name, "measured": measured,
                                "simulated": simulated, "probes": probes,
                                "step_model": {k: getattr(own, k) for k in (
                                    "layers", "const", "tokens_coef", "adapters_coef", "host_ms", "gap_ms",
                                    "engine_mode", "provenance")}})
            own_p95 = lambda p: (f" ({p['simulated_own_ttft_p95_s']:.2f})" if "simulated_own_ttft_p95_s" in p
                                 else "")
            cells = "; ".join(f"{p['rate']:g} -> {p['measured_ttft_p95_s']:.2f} / {p['simulated_ttft_p95_s']:.2f}"
                              f"{own_p95(p)} s, {p['measured_hit_rate']:.2f} / {p['simulated_hit_rate']:.2f}"
                              for p in probes)
            shown = "cut off" if measured is None else f"{measured:g}"
            print(f"  {row['num_adapters']:>8} {name:>16} {shown:>9} {simulated:>9.3g}   {cells}")
    return out


def _simulator_check(results: dict, spec, slo) -> dict:
    """Simulate the measured probes and search the simulated serviceable rate."""
    model = _calibrated_model()
    out = {"calibration": F.calibration, "model": F.calibration_model,
           "note": "the calibration's step times are of the engine it was measured on (configs/calibration: one "
                   "device); the coupled rows ran on " + str(report_layout(results))}
    for name, r in results.items():
        if baselines.BASELINES[name].mode != "coupled":
            out[name] = {"note": "no step calibration of the disaggregated engine yet"}
            continue
        cfg = _sim_config(name, model, r["probes"])
        simulated, probes = _simulate_beside(cfg, spec, r["probes"], slo, F.start_rate)
        measured = r["serviceable_rate"]
        out[name] = {"serviceable_rate": simulated,
                     "gap": simulated / measured - 1 if measured > 0 else None, "probes": probes}
    return out


def report_layout(results: dict) -> str:
    return ", ".join(sorted({r.get("layout", "single") for n, r in results.items()
                             if baselines.BASELINES[n].mode == "coupled"}))


def _print_table(report: dict, wanted) -> None:
    common = report["common_rate"]
    print(f"\n  serviceable rate and share of adapters meeting the SLO (P95 TTFT <= {F.slo_ttft} s, mean TPOT <= "
          f"{F.slo_tpot} s; an adapter meets it when > 90% of its requests do)")
    print(f"  {'baseline':<17} {'layout':>7} {'slots':>5} {'rate req/s':>10} {'adapters ok @own':>16} "
          f"{f'adapters ok @{common:.2f}':>18} {'hit rate':>8} {'sim rate':>8} {'sim gap':>8}")
    for b in wanted:
        r = report["baselines"].get(b.name)
        if r is None:
            print(f"  {b.name:<17} {report['disaggregated'] or 'not run'}")
            continue
        own = next((p["summary"] for p in r["probes"] if p["ok"] and p["rate"] == r["serviceable_rate"]), None)
        at = r.get("at_common_rate")
        sim = report["simulator"].get(b.name, {})
        gap = sim.get("gap")
        print(f"  {b.name:<17} {r.get('layout', ''):>7} {r['slots']:>5} {r['serviceable_rate']:>10.2f} "
              f"{own['adapters_meeting_slo'] if own else 0:>16.0%} "
              f"{at['adapters_meeting_slo'] if at else 0:>18.0%} {at['hit_rate'] if at else 0:>8.2f} "
              f"{sim.get('serviceable_rate', float('nan')):>8.2f} {gap if gap is not None else float('nan'):>+8.0%}")


def _plots(report: dict, slo) -> None:
    res, sim = report["baselines"], report["simulator"]
    if not res:
        return
    att = {n: [(p["rate"], p["summary"]["adapters_meeting_slo"]) for p in r["probes"]] for n, r in res.items()}
    sim_att = {n: [(p["rate"], p["simulated_adapters_meeting_slo"]) for p in s["probes"]]
               for n, s in sim.items() if isinstance(s, dict) and "probes" in s}
    plots.versus_rate(att, "share of adapters meeting the SLO", F.out + "_attainment.png", target=None,
                      dashed=sim_att, title="SLO attainment vs rate (measured; simulated dashed)")
    ttft = {n: [(p["rate"], p["summary"]["ttft_p95_s"]) for p in r["probes"]] for n, r in res.items()}
    sim_ttft = {n: [(p["rate"], p["simulated_ttft_p95_s"]) for p in s["probes"]]
                for n, s in sim.items() if isinstance(s, dict) and "probes" in s}
    plots.versus_rate(ttft, "P95 TTFT (s)", F.out + "_ttft.png", target=slo.ttft_s, dashed=sim_ttft, logy=True,
                      title="P95 TTFT vs rate (measured; simulated dashed)")
    cdf = {n: r["at_common_rate"]["per_adapter_attainment"] for n, r in res.items() if r.get("at_common_rate")}
    plots.attainment_cdf(cdf, slo.attainment, F.out + "_cdf.png",
                         title=f"per-adapter SLO attainment at {report['common_rate']:.2f} req/s")
    logging.info("wrote %s.json and %s_{attainment,ttft,cdf}.png", F.out, F.out)


if __name__ == "__main__":
    app.run(main)
