"""Measure engine steps and fit the simulator's step-time model (bench/calibration.py), stored with provenance.

Runs a multi-adapter workload through the engine at several arrival rates (so that steps of many sizes occur:
lone decodes, full decode batches, prefill chunks), records every step's tokens, distinct adapters and time,
fits step_ms = host_ms + layers * (const + tokens_coef * tokens + adapters_coef * adapters), and writes the
model, the raw points and where they came from (date, machine, command, git commit) into a calibration JSON.
host_ms is the median time a step spends outside the runner's jitted call (scheduling, packing, bookkeeping);
gap_ms the mean host time between two steps while requests are pending (replay.host_gaps: the caller's loop
adding arrivals), which no step's time holds and the simulator charges after every step.

    # CPU, the bundled tiny model (what configs/calibration/cpu-tiny.json holds)
    python benchmarks/calibrate_step_time.py --out configs/calibration/cpu-tiny.json
    # GPU, a real shape cut to 8 layers
    python benchmarks/calibrate_step_time.py --model configs/models/mixtral-8x7b.json --num_layers 8 \\
        --dtype bfloat16 --rank 16 --num_adapters 32 --slots 32 --max_num_seqs 64 --max_num_batched_tokens 512 \\
        --max_model_len 1024 --rates 4,16,64 --name mixtral-8x7b --out $OUT/h200-mixtral.json
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from infinilora_jax.bench import calibration, replay, workload  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", None, "configs/models/*.json (random weights) or an HF dir; default: bundled tiny")
flags.DEFINE_string("name", "tiny-qwen3-moe", "name of the fitted model in the calibration file")
flags.DEFINE_integer("num_layers", None, "cut the model to this many layers")
flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "")
flags.DEFINE_integer("num_adapters", 32, "")
flags.DEFINE_integer("slots", 16, "device adapter slots")
flags.DEFINE_integer("rank", 8, "")
flags.DEFINE_integer("max_num_seqs", 16, "")
flags.DEFINE_integer("max_num_batched_tokens", 128, "")
flags.DEFINE_integer("max_model_len", 256, "")
flags.DEFINE_list("rates", ["4", "16", "48"], "arrival rates (requests/s) to run")
flags.DEFINE_integer("num_requests", 128, "requests per rate")
flags.DEFINE_string("prompt_len", "burstgpt:8:160", "")
flags.DEFINE_string("output_len", "8:48", "")
flags.DEFINE_float("zipf", 1.2, "")
flags.DEFINE_string("compilation_cache", "out/jax_cache", "persistent compilation cache directory ('' for none)")
flags.DEFINE_string("machine", None, "machine description for the provenance (default: from the platform)")
flags.DEFINE_string("out", "configs/calibration/cpu-tiny.json", "calibration JSON to write (merged by name)")


def _shape_config() -> str:
    """The model's config.json, relative to the repository when inside it."""
    from infinilora_jax.llm import BUNDLED_MODEL

    path = os.path.abspath(F.model or os.path.join(BUNDLED_MODEL, "config.json"))
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def main(argv):
    del argv
    replay.enable_compilation_cache(F.compilation_cache)
    llm, names = replay.benchmark_llm(F.model, F.num_adapters, F.rank, F.slots, dtype=F.dtype,
                                      num_layers=F.num_layers, max_num_seqs=F.max_num_seqs,
                                      max_num_batched_tokens=F.max_num_batched_tokens, max_model_len=F.max_model_len)
    layers = llm.config.num_layers
    log = replay.StepLog()
    spec = workload.WorkloadSpec(F.num_requests, 1.0, 1.0, F.num_adapters, F.zipf, 0.0,
                                 workload.LengthDist.parse(F.prompt_len), workload.LengthDist.parse(F.output_len))
    replay.replay(llm.engine, workload.generate(dataclasses.replace(spec, rate=float(F.rates[0]), seed=99),
                                                llm.config.vocab_size), names)  # warm the caches
    load_before = os.getloadavg()[0]
    for k, rate in enumerate(float(r) for r in F.rates):
        reqs = workload.generate(dataclasses.replace(spec, rate=rate, seed=k), llm.config.vocab_size)
        replay.replay(llm.engine, reqs, names, step_log=log)
        logging.info("rate %.1f: %d steps so far", rate, len(log.records))
    recs = log.records
    host_ms = float(np.median([r.ms - r.device_ms for r in recs]))
    gaps = replay.host_gaps(recs)
    gap_ms = float(gaps.mean()) if len(gaps) else 0.0
    points = [calibration.StepPoint(r.tokens, r.adapters, r.ms, layers, r.rows) for r in recs]
    provenance = calibration.provenance(" ".join(["python"] + sys.argv), F.machine, {
        "workload": {"rates": F.rates, "num_requests": F.num_requests, "prompt_len": F.prompt_len,
                     "output_len": F.output_len, "num_adapters": F.num_adapters, "zipf": F.zipf, "rank": F.rank,
                     "slots": F.slots},
        "engine": {"max_num_seqs": F.max_num_seqs, "max_num_batched_tokens": F.max_num_batched_tokens,
                   "max_model_len": F.max_model_len, "dtype": F.dtype, "model": F.model or "bundled tiny",
                   "num_layers": layers},
        "host_gaps": {"n": len(gaps), "median_ms": float(np.median(gaps)) if len(gaps) else None},
        "load_average_1min": [load_before, os.getloadavg()[0]]})  # other processes may share the machine
    model = calibration.fit(points, F.name, host_ms=host_ms, provenance=provenance, rank=F.rank, gap_ms=gap_ms,
                            targets=tuple(llm.runner.pool.pool_cfg.targets), shape_config=_shape_config())
    err = calibration.residuals(model, points)
    provenance["fit"] = {"median_abs_rel_error": float(np.median(np.abs(err))),
                         "p90_abs_rel_error": float(np.percentile(np.abs(err), 90)), "steps": len(points)}
    models = calibration.load(F.out) if os.path.exists(F.out) else {}
    models[F.name] = model
    os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
    calibration.save(F.out, models)
    print(f"  {len(points)} steps; host {host_ms:.2f} ms/step, {gap_ms:.2f} ms between steps; "
          f"per layer: const {model.const:.4f} ms, {model.tokens_coef * 1e3:.3f} us/token, "
          f"{model.adapters_coef * 1e3:.3f} us/adapter ({layers} layers)")
    print(f"  fit |relative error|: median {provenance['fit']['median_abs_rel_error']:.1%}, "
          f"P90 {provenance['fit']['p90_abs_rel_error']:.1%}")
    logging.info("wrote %s", F.out)


if __name__ == "__main__":
    app.run(main)
