"""Decode steps with the step's numpy inputs packed into one transfer against one transfer per array, in one engine.

B requests over A rank-r adapters decode; blocks of K steps alternate between the two ways of passing the host
inputs (models/precompiled.py: `pack_host_inputs`), so both see the same process, device and batch. Prints the
median step time and its host parts per way: dispatch (from the step's start until the program is enqueued:
schedule, build, transfers, launch) and the rest (the device's step, tokens back, completion).

    python benchmarks/host_inputs.py --model configs/models/qwen3-30b-a3b.json --num_layers 2 --requests 64 \\
        --adapters 32 --rank 32 --out $OUT/host_inputs
"""

from __future__ import annotations

import dataclasses
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
flags.DEFINE_integer("rank", 32, "")
flags.DEFINE_integer("prompt_len", 128, "")
flags.DEFINE_integer("block", 16, "steps per block")
flags.DEFINE_integer("blocks", 4, "blocks per way (alternating)")
flags.DEFINE_string("out", None, "write <out>.json")

WAYS = {"packed": True, "separate": False}


def main(argv):
    del argv
    steps_needed = 2 * F.blocks * F.block + 2 * len(WAYS) + 8
    llm = LLM(F.model, dtype=F.dtype, num_layers=F.num_layers, max_lora_rank=F.rank, lora_targets=ALL_TARGETS,
              max_adapters=F.adapters, max_host_adapters=F.adapters, max_num_seqs=F.requests,
              max_num_batched_tokens=max(256, F.requests), max_model_len=F.prompt_len + steps_needed + 64,
              progress=False)
    first = random_adapter(llm.config, "a0", F.rank, ALL_TARGETS, seed=0, dtype=llm.runner.dtype)
    for k in range(F.adapters):  # contents do not change step times: one random adapter under every name
        llm.runner.adapters.register_weights(dataclasses.replace(first, name=f"a{k}"))
    engine, rng = llm.engine, np.random.default_rng(0)
    params = SamplingParams(max_tokens=steps_needed + 32, temperature=0.0, ignore_eos=True)
    for i in range(F.requests):
        engine.add_request(rng.integers(3, llm.config.vocab_size, F.prompt_len).tolist(), params, f"a{i % F.adapters}")
    t0 = time.perf_counter()
    while any(len(r.output_token_ids) == 0 for r in engine.requests.values()):
        engine.step()
    print(f"  prefill and compile {time.perf_counter() - t0:.1f} s", flush=True)
    steps = llm.runner.steps
    times = {w: [] for w in WAYS}
    dispatch = {w: [] for w in WAYS}
    for way, pack in WAYS.items():  # each way's decode program is built before the timed blocks
        steps.pack_host_inputs = pack
        t0 = time.perf_counter()
        engine.step()
        engine.step()
        print(f"  {way}: first steps (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(F.blocks):
        for way, pack in WAYS.items():
            steps.pack_host_inputs = pack
            for _ in range(F.block):
                start = time.perf_counter()
                engine.step()
                times[way].append(time.perf_counter() - start)
                dispatch[way].append(llm.runner.last_enqueued_at - start)
    result = {"config": {k: getattr(F, k) for k in ("model", "num_layers", "dtype", "requests", "adapters", "rank",
                                                     "prompt_len", "block", "blocks")}}
    print(f"  {'way':9} {'step ms':>8} {'until enqueued ms':>18} {'rest ms':>8}")
    for way in WAYS:
        step, until = 1e3 * float(np.median(times[way])), 1e3 * float(np.median(dispatch[way]))
        rest = 1e3 * float(np.median(np.subtract(times[way], dispatch[way])))
        result[way] = {"step_ms_median": step, "until_enqueued_ms_median": until, "rest_ms_median": rest,
                       "steps": len(times[way])}
        print(f"  {way:9} {step:8.3f} {until:18.3f} {rest:8.3f}")
    ratio = result["packed"]["step_ms_median"] / result["separate"]["step_ms_median"]
    result["packed_over_separate"] = ratio
    print(f"  packed / separate step time: {ratio:.3f}")
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out + ".json", "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
