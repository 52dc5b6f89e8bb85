"""Decode steps with the step's numpy inputs packed into one transfer against one transfer per array, in one engine.

decode_step.py's engine and flags (B requests over A rank-r adapters, all decoding); blocks of --steps steps
alternate between the two ways of passing the host inputs (models/precompiled.py: `pack_host_inputs`), so both
see the same process, device and batch. Prints the median step time and its parts per way: until the program is
enqueued (schedule, build, transfers, launch) and the rest (the device's step, tokens back, completion).

    python benchmarks/host_inputs.py --model configs/models/qwen3-30b-a3b.json --num_layers 2 --requests 64 \\
        --adapters 32 --rank 32 --steps 16 --blocks 4 --out $OUT/host_inputs
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import decode_step  # noqa: E402  (its flags and engine set-up)
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

F = flags.FLAGS
flags.DEFINE_integer("blocks", 4, "blocks of --steps steps per way (alternating)")

WAYS = {"packed": True, "separate": False}


def main(argv):
    del argv
    llm, prefill_s = decode_step.decoding_engine(True, 2 * F.blocks * F.steps + 2 * len(WAYS))
    engine, steps = llm.engine, llm.runner.steps
    times = {w: [] for w in WAYS}
    enqueued = {w: [] for w in WAYS}
    for way, pack in WAYS.items():  # each way's decode program is built before the timed blocks
        steps.pack_host_inputs = pack
        t0 = time.perf_counter()
        engine.step()
        engine.step()
        print(f"  {way}: first steps (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(F.blocks):
        for way, pack in WAYS.items():
            steps.pack_host_inputs = pack
            for _ in range(F.steps):
                start = time.perf_counter()
                engine.step()
                times[way].append(time.perf_counter() - start)
                enqueued[way].append(llm.runner.last_enqueued_at - start)
    result = {"config": {k: getattr(F, k) for k in ("model", "num_layers", "dtype", "requests", "adapters", "rank",
                                                     "prompt_len", "steps", "blocks")},
              "prefill_and_compile_s": prefill_s}
    print(f"  {'way':9} {'step ms':>8} {'until enqueued ms':>18} {'rest ms':>8}")
    for way in WAYS:
        step, until = 1e3 * float(np.median(times[way])), 1e3 * float(np.median(enqueued[way]))
        rest = 1e3 * float(np.median(np.subtract(times[way], enqueued[way])))
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
