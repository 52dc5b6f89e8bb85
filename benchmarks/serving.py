"""Serving benchmark: a synthetic multi-adapter workload through the engine, with latency and SLO metrics.

Arrivals Poisson (or gamma-bursty, or all at once), adapters Zipf(s) over N random adapters, prompt and output
lengths from --prompt_len / --output_len ("64", "16:128" uniform, or "lognormal:median:sigma:low:high").
Reports throughput, TTFT P50/P95, TPOT mean/P95 and per-adapter SLO attainment; writes JSON and a PNG.

    # CPU, the bundled tiny model
    python benchmarks/serving.py --num_requests 64 --rate 8 --out out/serving_cpu
    # GPU, a Qwen3-30B-A3B-shaped model with random weights
    python benchmarks/serving.py --model configs/models/qwen3-30b-a3b.json --dtype bfloat16 \\
        --num_adapters 32 --max_adapters 32 --rank 16 --num_requests 256 --rate 16 --out $OUT/serving
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402

from infinilora_jax import LLM  # noqa: E402
from infinilora_jax.bench import metrics, workload  # noqa: E402
from infinilora_jax.bench.compilations import CompileCounter  # noqa: E402
from infinilora_jax.bench.replay import replay  # noqa: E402
from infinilora_jax.lora.random_adapter import random_adapter  # noqa: E402
from infinilora_jax.lora.targets import ALL_TARGETS  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", None, "HF model dir, configs/models/*.json (random weights), or none: bundled tiny")
flags.DEFINE_integer("num_layers", None, "cut a random-weight model to this many layers")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "")
flags.DEFINE_string("mesh", None, "mesh layout (default: one device)")
flags.DEFINE_integer("cpu_devices", 0, "on CPU, split the host into this many devices")
flags.DEFINE_integer("num_adapters", 8, "random adapters registered")
flags.DEFINE_integer("max_adapters", 4, "device adapter slots")
flags.DEFINE_integer("rank", 16, "adapter rank")
flags.DEFINE_list("targets", list(ALL_TARGETS), "adapter targets (lora/targets.py)")
flags.DEFINE_integer("num_requests", 64, "")
flags.DEFINE_float("rate", 8.0, "requests/s (inf: all at once)")
flags.DEFINE_float("burstiness", 1.0, "gamma shape of arrival gaps (1 = Poisson)")
flags.DEFINE_float("zipf", 1.2, "adapter popularity exponent")
flags.DEFINE_float("base_fraction", 0.0, "share of requests without an adapter")
flags.DEFINE_string("prompt_len", "16:128", "")
flags.DEFINE_string("output_len", "16:64", "")
flags.DEFINE_integer("max_num_seqs", 32, "")
flags.DEFINE_integer("max_num_batched_tokens", 256, "")
flags.DEFINE_integer("page_size", 16, "")
flags.DEFINE_integer("num_pages", None, "")
flags.DEFINE_integer("max_model_len", 1024, "")
flags.DEFINE_float("slo_ttft", 0.25, "seconds")
flags.DEFINE_float("slo_tpot", 0.1, "seconds")
flags.DEFINE_integer("warmup_requests", None, "requests of the same workload (another seed) run first so that "
                     "compilation stays out of the measurement; default: num_requests / 2")
flags.DEFINE_boolean("precompile", True, "compile every step program before any traffic (LLMEngine.warmup)")
flags.DEFINE_integer("compile_workers", 8, "parallel compilations for --precompile")
flags.DEFINE_integer("seed", 0, "")
flags.DEFINE_string("out", "out/serving", "output path prefix (.json and .png are added)")


def main(argv):
    del argv
    if F.cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", F.cpu_devices)
    targets = tuple(F.targets)
    llm = LLM(F.model, dtype=F.dtype, mesh=F.mesh, max_lora_rank=max(F.rank, 1), max_adapters=F.max_adapters,
              lora_targets=targets, max_host_adapters=max(F.num_adapters, 1), max_model_len=F.max_model_len,
              page_size=F.page_size, num_pages=F.num_pages, max_num_seqs=F.max_num_seqs,
              max_num_batched_tokens=F.max_num_batched_tokens, num_layers=F.num_layers)
    names = [f"adapter-{k}" for k in range(F.num_adapters)]
    for k, name in enumerate(names):
        llm.runner.adapters.register_weights(random_adapter(llm.config, name, F.rank, targets, seed=k,
                                                            dtype=llm.runner.dtype))
    spec = workload.WorkloadSpec(F.num_requests, F.rate, F.burstiness, F.num_adapters, F.zipf, F.base_fraction,
                                 workload.LengthDist.parse(F.prompt_len), workload.LengthDist.parse(F.output_len),
                                 F.seed)
    vocab = llm.config.vocab_size
    compile_s, programs = 0.0, 0
    if F.precompile:
        t = time.monotonic()
        programs = llm.engine.warmup(workers=F.compile_workers)
        compile_s = time.monotonic() - t
        logging.info("precompiled %d step shapes in %.1f s", programs, compile_s)
    warmup = F.warmup_requests if F.warmup_requests is not None else F.num_requests // 2
    if warmup:
        warm = workload.generate(workload.WorkloadSpec(**{**spec.__dict__, "num_requests": warmup,
                                                         "seed": F.seed + 1}), vocab)
        replay(llm.engine, warm, names)
    stats0 = dict(llm.runner.adapters.stats.__dict__)
    compiles = CompileCounter()
    timings, wall = replay(llm.engine, workload.generate(spec, vocab), names)
    result = metrics.summarize(timings, wall, metrics.SLO(F.slo_ttft, F.slo_tpot))
    result["config"] = {k: getattr(F, k) for k in ("model", "num_layers", "dtype", "mesh", "num_adapters",
                                                   "max_adapters", "rank", "num_requests", "rate", "burstiness",
                                                   "zipf", "prompt_len", "output_len", "max_num_seqs",
                                                   "max_num_batched_tokens", "page_size", "max_model_len")}
    result["adapter_cache"] = {k: v - stats0[k] for k, v in llm.runner.adapters.stats.__dict__.items()}
    result["preemptions"] = llm.engine.scheduler.num_preemptions
    result["compilations_during_measurement"] = compiles.count
    result["precompile"] = {"shapes": programs, "seconds": compile_s}
    os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
    with open(F.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    _plot(timings, result, F.out + ".png")
    rows = [("requests", result["requests"]), ("wall s", f"{wall:.2f}"),
            ("output tok/s", f"{result['output_tokens_per_s']:.1f}"), ("req/s", f"{result['requests_per_s']:.2f}"),
            ("TTFT P50 / P95 s", f"{result['ttft_p50_s']:.3f} / {result['ttft_p95_s']:.3f}"),
            ("TPOT mean / P95 s", f"{result['tpot_mean_s']:.4f} / {result['tpot_p95_s']:.4f}"),
            ("requests meeting SLO", f"{result['requests_meeting_slo']:.1%}"),
            ("adapters meeting SLO", f"{result['adapters_meeting_slo']:.1%}"),
            ("adapter hits/misses/evictions", "{hits}/{misses}/{evictions}".format(**result["adapter_cache"])),
            ("preemptions", result["preemptions"]),
            ("precompiled shapes / s", f"{programs} / {compile_s:.1f}"),
            ("compilations while measuring", compiles.count)]
    print("\n".join(f"  {k:<32} {v}" for k, v in rows))
    logging.info("wrote %s.json and %s.png", F.out, F.out)


def _plot(timings, result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].hist([t.ttft for t in timings], bins=30)
    axes[0].axvline(result["slo"]["ttft_s"], color="r", ls="--", label="SLO")
    axes[0].set(title="TTFT (s)", xlabel="s", ylabel="requests")
    axes[0].legend()
    axes[1].hist([t.tpot for t in timings if t.output_tokens > 1], bins=30)
    axes[1].axvline(result["slo"]["tpot_s"], color="r", ls="--")
    axes[1].set(title="TPOT (s)", xlabel="s")
    att = np.sort(list(result["per_adapter_attainment"].values()))
    axes[2].plot(np.concatenate([[0], att]), np.concatenate([[0], np.arange(1, len(att) + 1) / len(att)]),
                 drawstyle="steps-post", marker="o")
    axes[2].axvline(result["slo"]["attainment"], color="r", ls="--")
    axes[2].set(title="per-adapter SLO attainment (CDF)", xlabel="share of requests meeting SLO", xlim=(-0.02, 1.02),
                ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
