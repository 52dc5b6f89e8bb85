"""Decode-step cost of multi-LoRA serving: the same engine with and without adapters.

B running requests spread over A distinct rank-r adapters (on attention, router and experts); once every request
is decoding, time K engine steps (host scheduling + one jitted forward + sampling; each step returns sampled
tokens to the host), one at a time (no async scheduling). Then the same with no adapter pool at all. Prints
step time, the ratio and tokens/s, and each step's parts: the host's scheduling, batch building and completion,
the dispatch (until the step is enqueued) and the wait (device, tokens back): what async scheduling can hide
(benchmarks/decode_variants.py measures it).

    python benchmarks/decode_step.py --model configs/models/mixtral-8x7b.json --requests 64 --adapters 32 \\
        --rank 16 --dtype bfloat16 --out $OUT/decode_step
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from infinilora_jax import LLM, SamplingParams  # noqa: E402
from infinilora_jax.lora.random_adapter import random_adapter  # noqa: E402
from infinilora_jax.lora.targets import ALL_TARGETS  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", None, "configs/models/*.json (random weights) or an HF dir; default: bundled tiny")
flags.DEFINE_integer("num_layers", None, "cut the model to this many layers")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "")
flags.DEFINE_integer("requests", 64, "running requests")
flags.DEFINE_integer("adapters", 32, "distinct adapters among them")
flags.DEFINE_integer("rank", 16, "")
flags.DEFINE_list("targets", list(ALL_TARGETS), "")
flags.DEFINE_integer("prompt_len", 128, "")
flags.DEFINE_integer("steps", 16, "timed decode steps")
flags.DEFINE_integer("distinct_adapters", 4, "adapters with pages of their own; the others reuse theirs in turn "
                     "(each still its own adapter and slot: contents do not change step times, and generating "
                     "random pages takes seconds per adapter at real widths)")
flags.DEFINE_string("out", None, "write <out>.json")


PHASES = ("schedule", "build", "dispatch", "wait", "complete")


def decoding_engine(with_adapters: bool, timed_steps: int):
    """(LLM whose F.requests requests all decode, room for `timed_steps` more steps each; the seconds their
    prefill and its compilations took). The decode program is compiled too (one step run)."""
    targets = tuple(F.targets) if with_adapters else ()
    budget = max(256, F.requests)
    # the first requests decode while later prompts prefill: they must not reach max_tokens before the timed steps
    prefill_steps = -(-F.requests * F.prompt_len // budget) + 1
    max_tokens = prefill_steps + timed_steps + 32
    llm = LLM(F.model, dtype=F.dtype, num_layers=F.num_layers, max_lora_rank=F.rank, lora_targets=targets,
              max_adapters=max(F.adapters, 1), max_host_adapters=max(F.adapters, 1), max_num_seqs=F.requests,
              max_num_batched_tokens=budget, max_model_len=F.prompt_len + max_tokens + 1,
              progress=False)
    names = [None] * F.requests
    if with_adapters:
        made = []
        for k in range(F.adapters):
            if k < max(1, F.distinct_adapters):
                made.append(random_adapter(llm.config, f"a{k}", F.rank, targets, seed=k, dtype=llm.runner.dtype))
            else:
                made.append(dataclasses.replace(made[k % len(made)], name=f"a{k}"))
            llm.runner.adapters.register_weights(made[-1])
        names = [f"a{i % F.adapters}" for i in range(F.requests)]
    rng = np.random.default_rng(0)
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for name in names:
        engine.add_request(rng.integers(3, llm.config.vocab_size, F.prompt_len).tolist(), params, name)
    print(f"  [{'with' if with_adapters else 'without'} adapters] model and adapters ready", flush=True)
    t0 = time.perf_counter()
    while any(len(r.output_token_ids) == 0 for r in engine.requests.values()):
        engine.step()  # prefill (and compile)
    prefill_s = time.perf_counter() - t0
    print(f"  prefill (and its compilations) {prefill_s:.1f} s", flush=True)
    engine.step()  # compile the decode shape
    return llm, prefill_s


def measure(with_adapters: bool) -> dict:
    llm, prefill_s = decoding_engine(with_adapters, F.steps)
    engine = llm.engine
    engine.async_scheduling = False
    engine.step()  # completes a queued step: the parts below run one step at a time
    times, phases = [], {k: [] for k in PHASES}
    for _ in range(F.steps):
        # LLMEngine.step's parts, timed apart: the host's work (schedule, build, complete) and the run: dispatch
        # (until the step is enqueued) and wait (the device's step, tokens back), which on a GPU holds the device time
        t = [time.perf_counter()]
        plan = engine.schedule_step()
        t.append(time.perf_counter())
        batch, sampling = engine.build_step(plan)
        t.append(time.perf_counter())
        queued, engine.kv = engine.runner.sample(batch, engine.kv, sampling, engine.rows_out)
        engine.mark_dispatched(plan)
        t.append(time.perf_counter())
        tokens, top = engine.runner.fetch(queued)
        t.append(time.perf_counter())
        outs = engine.complete_step(plan, tokens, top)
        t.append(time.perf_counter())
        times.append(t[-1] - t[0])
        for name, a, b in zip(PHASES, t, t[1:]):
            phases[name].append(b - a)
        assert len(outs) == F.requests, "every request decodes one token per step"
    for rid in list(engine.requests):
        engine.abort(rid)
    engine.pop_finished()
    result = {"with_adapters": with_adapters, "step_ms_median": 1e3 * float(np.median(times)),
              "step_ms_mean": 1e3 * float(np.mean(times)), "tokens_per_s": F.requests / float(np.median(times)),
              "phase_ms_median": {k: 1e3 * float(np.median(v)) for k, v in phases.items()},
              "prefill_and_compile_s": prefill_s, "adapter_pool_bytes": sum(
                  x.nbytes for x in __import__("jax").tree.leaves(llm.runner.adapters.pool_state))}
    del llm, engine
    gc.collect()
    print(f"  [{'with' if with_adapters else 'without'} adapters] step {result['step_ms_median']:.2f} ms (median), "
          f"{result['tokens_per_s']:.1f} tokens/s", flush=True)
    return result


def main(argv):
    del argv
    lora = measure(True)
    base = measure(False)
    ratio = lora["step_ms_median"] / base["step_ms_median"]
    print(f"  model {F.model or 'bundled tiny'} layers={F.num_layers or 'all'} dtype={F.dtype} "
          f"requests={F.requests} adapters={F.adapters} rank={F.rank}")
    print(f"  {'':18} {'step ms (median)':>17} {'tokens/s':>10}   " + "".join(f"{p + ' ms':>12}" for p in PHASES))
    for name, r in (("with adapters", lora), ("no adapters", base)):
        print(f"  {name:18} {r['step_ms_median']:17.2f} {r['tokens_per_s']:10.1f}   "
              + "".join(f"{r['phase_ms_median'][p]:12.3f}" for p in PHASES))
    print(f"  ratio with/without adapters: {ratio:.3f}")
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out + ".json", "w") as f:
            json.dump({"with": lora, "without": base, "ratio": ratio,
                       "config": {k: getattr(F, k) for k in ("model", "num_layers", "dtype", "requests", "adapters",
                                                             "rank", "prompt_len", "steps")}}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
