"""Coupled vs disaggregated serving on the same devices (two for 1+1, the 2-GPU machine; four for 2+2): decode
step and adapter-count sweep.

Modes compared (same model, same adapters, same workload):
  coupled      one replica over the devices of --coupled_mesh (default ep2; ep4 beside 2+2), every device holds
               its share of the base weights and of the adapter pool (the S-LoRA-style baseline);
  coupled1     one replica on device 0 alone: one of the instances coupled_dp runs (two on the 2-GPU machine)
               (each with its own adapter cache), so "disagg vs coupled1" compares equal batches per base instance;
  coupled_dp   the coupled deployment on the disaggregated layout's devices (issue 6's baseline, S-LoRA style): one
               single-device replica per device of --disagg_mesh (2 for 1+1, 4 for 2+2), each with its own
               weights, KV cache, scheduler and adapter cache (as many slots as the decode rows' adapters), stepped
               concurrently; requests routed by adapter residency, then load (engine/replicas.py). Its decode rows
               split the B requests over the replicas (a step is every replica's step at once; tokens/s is the
               deployment's);
  disagg       --disagg_mesh, "1+1" by default: device 0 is the base instance (all base weights, KV cache),
               device 1 the LoRA server (all adapter pages, in its role buffers); per layer the base pushes
               activations, routing and slots to it with ppermute and gets float32 deltas back
               (docs/architecture/07-disaggregated.md). "2+2": base ep2 on devices 0-1, LoRA server ep2 on 2-3.
The CPU backend is split into as many devices as the two layouts use (the larger of --disagg_mesh and
--coupled_mesh); other backends are not affected.
Parts (--parts):
  decode   median engine-step time with B running requests over A rank-r adapters, and without adapters
           (disagg without LoRA targets makes no exchange: its difference to "all targets" is the exchange cost);
  sweep    decode step time and adapter capacity (slots the device memory holds) as A grows (--sweep);
The serviceable rate at the SLO, per adapter count, is benchmarks/slo_baselines.py --sweep_adapters (rate
bisection, slot limits, coupled replicas vs disaggregated; tools/gpu_runbook.sh slo_sweep has the GPU command).
Prints a table per part, writes <out>.json and <out>.png, and logs live bytes per device by role.

    # the 2-GPU machine (NCCL_NVLS_ENABLE=0 is set here; never NVLink multicast)
    python benchmarks/disagg.py --model configs/models/qwen3-30b-a3b.json --num_layers 8 --dtype bfloat16 \\
        --rank 16 --parts decode,sweep --out $OUT/disagg
    # the 4-GPU machine: 2+2 against coupled on the same four GPUs (tools/gpu_runbook.sh x4_decode)
    python benchmarks/disagg.py --model configs/models/qwen3-30b-a3b.json --num_layers 8 --dtype bfloat16 \\
        --rank 32 --parts decode --modes coupled,coupled_dp,disagg --disagg_mesh 2+2 --coupled_mesh ep4 --out $OUT/x4
    # CPU smoke run of the script itself (tiny model, 2 fake devices; 4 with --disagg_mesh 2+2 --coupled_mesh ep4)
    python benchmarks/disagg.py --smoke --out out/disagg_smoke
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared GPU host
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", None, "configs/models/*.json (random weights) or an HF dir; default: bundled tiny")
flags.DEFINE_integer("num_layers", None, "cut a random-weight model to this many layers")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "")
flags.DEFINE_string("coupled_mesh", "ep2", "coupled layout (ep2, tp2, pp2, ...; ep4 beside 2+2)")
flags.DEFINE_string("disagg_mesh", "1+1", "disaggregated role layout")
flags.DEFINE_list("parts", ["decode", "sweep"], "decode, sweep")
flags.DEFINE_list("modes", ["coupled", "disagg"], "coupled (--coupled_mesh), coupled1 (one device), coupled_dp "
                  "(one single-device replica per device of --disagg_mesh), disagg")
flags.DEFINE_integer("rank", 16, "adapter rank (and the pools' max rank)")
flags.DEFINE_list("targets", None, "adapter targets (default: all, lora/targets.py)")
flags.DEFINE_integer("requests", 64, "decode: running requests")
flags.DEFINE_integer("adapters", 32, "decode: distinct adapters among them (and pool slots)")
flags.DEFINE_integer("prompt_len", 128, "decode: prompt tokens")
flags.DEFINE_integer("steps", 16, "decode: timed steps")
flags.DEFINE_list("sweep", ["1", "8", "32", "64", "128"], "sweep: adapter counts (pool slots = count)")
flags.DEFINE_integer("max_num_batched_tokens", 512, "")
flags.DEFINE_integer("num_pages", None, "KV pages (default: the LLM's)")
flags.DEFINE_boolean("async_scheduling", True, "every mode queues each step before reading the previous one's "
                     "tokens (the engine's default); --noasync_scheduling: one step at a time")
flags.DEFINE_boolean("smoke", False, "tiny CPU run of --parts (float32, 4 requests, rank 8)")
flags.DEFINE_string("out", "out/disagg", "output path prefix")
flags.DEFINE_integer("profile_steps", 0, "decode: after timing, trace this many steps and summarise device time "
                     "(busy, idle, collectives, GEMMs) per device (bench/device_trace.py)")
flags.DEFINE_boolean("without_lora", True, "decode: also time each mode without adapters (the no-LoRA baseline row)")
flags.DEFINE_string("trace_dir", None, "decode: keep the profiled steps' raw traces under "
                    "<trace_dir>/<mode>_<adapters> (default: a temporary directory)")

DISTINCT = 4  # adapters with their own random pages


def make_llm(mode: str, max_adapters: int, targets, max_num_seqs: int, max_model_len: int):
    from infinilora_jax import LLM
    from meshes.layouts import resolve_role_layout

    mesh = {"disagg": F.disagg_mesh, "coupled": F.coupled_mesh, "coupled1": "single", "coupled_dp": "single"}[mode]
    replicas = resolve_role_layout(F.disagg_mesh).num_devices if mode == "coupled_dp" else 1
    return LLM(F.model, dtype=F.dtype, mesh=mesh, mode="disaggregated" if mode == "disagg" else "coupled",
               replicas=replicas,
               num_layers=F.num_layers, max_lora_rank=F.rank, lora_targets=targets, max_adapters=max_adapters,
               max_host_adapters=max(max_adapters, 1), max_num_seqs=max_num_seqs,
               max_num_batched_tokens=max(F.max_num_batched_tokens, max_num_seqs), max_model_len=max_model_len,
               num_pages=F.num_pages, progress=False, async_scheduling=F.async_scheduling)


def register(llm, count: int, targets) -> list[str]:
    from infinilora_jax.lora.random_adapter import random_adapter

    # Host RNG at real widths takes seconds per adapter; contents do not change step times, so adapters past the
    # first DISTINCT share pages (each is still its own adapter: own name, own host entry, own device slot).
    names, distinct = [f"a{k}" for k in range(count)], []
    for k, name in enumerate(names):
        if k < DISTINCT:
            distinct.append(random_adapter(llm.config, name, F.rank, targets, seed=k, dtype=llm.runner.dtype))
            weights = distinct[-1]
        else:
            weights = dataclasses.replace(distinct[k % DISTINCT], name=name)
        llm.runner.adapters.register_weights(weights)
    return names


def memory(llm) -> list[dict]:
    runner = llm.runner
    if hasattr(runner, "bytes_by_role"):
        return runner.bytes_by_role()
    return [{"device": d, "role": "coupled", "live_bytes": n} for d, n in runner.live_bytes_per_device().items()]


def decode_step(mode: str, adapters: int, with_lora: bool = True) -> dict:
    """Median step time once B requests decode, over `adapters` distinct adapters (0: none)."""
    from infinilora_jax import SamplingParams
    from infinilora_jax.errors import ConfigError
    from infinilora_jax.lora.targets import ALL_TARGETS

    targets = tuple(F.targets or ALL_TARGETS) if with_lora else ()
    try:
        llm = make_llm(mode, max(adapters, 1), targets, F.requests, F.prompt_len + F.steps + 64)
    except ConfigError as e:  # the pool does not fit in device memory
        return {"mode": mode, "adapters": adapters, "error": str(e)}
    names = register(llm, adapters, targets) if with_lora and adapters else []
    engine, rng = llm.engine, np.random.default_rng(0)
    params = SamplingParams(max_tokens=F.steps + 32, temperature=0.0, ignore_eos=True)
    for i in range(F.requests):
        engine.add_request(rng.integers(3, llm.config.vocab_size, F.prompt_len).tolist(), params,
                           names[i % len(names)] if names else None)
    t0 = time.perf_counter()
    while any(len(r.output_token_ids) == 0 for r in engine.requests.values()):
        engine.step()
    prefill_s = time.perf_counter() - t0
    engine.step()  # compile the decode shape
    times = []
    for _ in range(F.steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    result = {"mode": mode, "adapters": adapters, "lora": with_lora, "step_ms": 1e3 * float(np.median(times)),
              "tokens_per_s": F.requests / float(np.median(times)), "prefill_and_compile_s": prefill_s,
              "memory": memory(llm)}
    if F.profile_steps:
        from infinilora_jax.bench import device_trace

        trace_dir = F.trace_dir and os.path.join(F.trace_dir, f"{mode}_{adapters}")
        with device_trace.traced(trace_dir) as where:
            for _ in range(F.profile_steps):
                engine.step()
        result["device_time"] = device_trace.summarize(where(), calls=F.profile_steps)
        print(device_trace.format_summary(result["device_time"]), flush=True)
    print(f"  {mode:8} adapters {adapters:4d} lora {with_lora!s:5}: step {result['step_ms']:.2f} ms "
          f"(prefill and compile {prefill_s:.0f} s)", flush=True)
    for rid in list(engine.requests):
        engine.abort(rid)
    del llm, engine
    gc.collect()
    return result


def main(argv):
    del argv
    import jax

    from meshes.layouts import resolve_layout, resolve_role_layout

    # the CPU backend only, before any backend starts: as many devices as the layouts use
    jax.config.update("jax_num_cpu_devices", max(resolve_role_layout(F.disagg_mesh).num_devices,
                                                 resolve_layout(F.coupled_mesh).num_devices))
    if F.smoke:
        F.dtype, F.requests, F.adapters, F.prompt_len, F.steps = "float32", 4, 2, 8, 2
        F.sweep, F.rank, F.max_num_batched_tokens = ["1", "4"], 8, 16
    results = {"config": {k: getattr(F, k) for k in ("model", "num_layers", "dtype", "coupled_mesh", "disagg_mesh",
                                                      "rank", "requests", "adapters", "prompt_len",
                                                      "async_scheduling")}}
    os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)

    def save():  # after every row: a run cut off by a device-call limit keeps what it finished
        with open(F.out + ".json", "w") as f:
            json.dump(results, f, indent=1, default=str)

    if "decode" in F.parts:
        rows = results["decode"] = []
        for mode in F.modes:
            for adapters, lora in ((F.adapters, True), (0, False))[: 2 if F.without_lora else 1]:
                rows.append(decode_step(mode, adapters, with_lora=lora))
                save()
        print(f"  {'mode':8} {'adapters':>8} {'lora':>5} {'step ms':>9} {'tokens/s':>9}")
        for r in rows:
            print(f"  {r['mode']:8} {r['adapters']:8d} {str(r.get('lora')):>5} {r.get('step_ms', float('nan')):9.2f} "
                  f"{r.get('tokens_per_s', float('nan')):9.1f} {r.get('error', '')}")
        for r in rows:
            logging.info("%s lora=%s memory by device: %s", r["mode"], r.get("lora"), r.get("memory"))
    if "sweep" in F.parts:
        rows = results["sweep"] = []
        for a in F.sweep:
            for mode in F.modes:
                rows.append(decode_step(mode, int(a)))
                save()
        print(f"  {'mode':8} {'adapters':>8} {'step ms':>9}")
        for r in rows:
            print(f"  {r['mode']:8} {r['adapters']:8d} {r.get('step_ms', float('nan')):9.2f} {r.get('error', '')}")
    save()
    _plot(results, F.out + ".png")
    logging.info("wrote %s.json and %s.png", F.out, F.out)


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    if any("step_ms" in r for r in results.get("sweep", [])):
        for mode in F.modes:
            sweep = [r for r in results["sweep"] if r["mode"] == mode and "step_ms" in r]
            ax.plot([r["adapters"] for r in sweep], [r["step_ms"] for r in sweep], marker="o", label=mode)
        ax.set(title="decode step vs adapters", xlabel="distinct adapters", ylabel="ms", xscale="log")
        ax.legend()
    else:  # no sweep: the decode part's step per mode, with and without adapters
        rows = [r for r in results.get("decode", []) if "step_ms" in r]
        labels = [f"{r['mode']}\n{'LoRA' if r['lora'] else 'no LoRA'}" for r in rows]
        ax.bar(range(len(rows)), [r["step_ms"] for r in rows], tick_label=labels or None)
        ax.set(title=f"decode step ({results.get('config', {}).get('num_layers')} layers)", ylabel="ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
