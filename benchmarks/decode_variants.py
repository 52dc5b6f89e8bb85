"""Decode steps of one engine under two settings, in alternating blocks: async scheduling on and off, or the
step's numpy inputs packed into one transfer against one transfer per array.

decode_step.py's engine and flags (B requests over A rank-r adapters, all decoding); blocks of --steps steps
alternate between the two settings, so both see the same process, device and batch:
- `--compare async_scheduling` (engine/engine.py): queue step N+1 before reading step N's tokens, or not.
  Prints the median time between consecutive steps' returns (what a stream of steps runs at) per setting.
- `--compare host_inputs` (models/precompiled.py `pack_host_inputs`). Also prints the parts: until the program is
  enqueued (schedule, build, transfers, launch) and the rest (the device's step, tokens back, completion).

    python benchmarks/decode_variants.py --compare async_scheduling --model configs/models/qwen3-30b-a3b.json \\
        --num_layers 2 --requests 64 --adapters 32 --rank 32 --steps 16 --blocks 4 --out $OUT/async_scheduling
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
flags.DEFINE_enum("compare", "async_scheduling", ["async_scheduling", "host_inputs"], "the setting compared")
flags.DEFINE_integer("blocks", 4, "blocks of --steps steps per setting (alternating)")

SETTINGS = {
    "async_scheduling": {"async": ("engine", "async_scheduling", True), "sync": ("engine", "async_scheduling", False)},
    "host_inputs": {"packed": ("steps", "pack_host_inputs", True), "separate": ("steps", "pack_host_inputs", False)},
}


def main(argv):
    del argv
    ways = SETTINGS[F.compare]
    llm, prefill_s = decode_step.decoding_engine(True, 2 * F.blocks * F.steps + 4 * len(ways))
    owners = {"engine": llm.engine, "steps": llm.runner.steps}

    def use(way):
        owner, attribute, value = ways[way]
        setattr(owners[owner], attribute, value)

    engine = llm.engine
    times = {w: [] for w in ways}
    enqueued = {w: [] for w in ways}
    for way in ways:  # each setting's programs are built and its pipeline filled before the timed blocks
        use(way)
        t0 = time.perf_counter()
        for _ in range(3):
            engine.step()
        print(f"  {way}: first steps (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(F.blocks):
        for way in ways:
            use(way)
            engine.step()  # the switch's step (it may complete the other setting's queued step): not timed
            last = time.perf_counter()
            for _ in range(F.steps):
                engine.step()
                now = time.perf_counter()
                times[way].append(now - last)
                enqueued[way].append(llm.runner.last_enqueued_at - last)
                last = now
    result = {"compare": F.compare,
              "config": {k: getattr(F, k) for k in ("model", "num_layers", "dtype", "requests", "adapters", "rank",
                                                     "prompt_len", "steps", "blocks")},
              "prefill_and_compile_s": prefill_s}
    print(f"  {'setting':9} {'step ms':>8} {'until enqueued ms':>18} {'rest ms':>8} {'tokens/s':>9}")
    for way in ways:
        step, until = 1e3 * float(np.median(times[way])), 1e3 * float(np.median(enqueued[way]))
        rest = 1e3 * float(np.median(np.subtract(times[way], enqueued[way])))
        result[way] = {"step_ms_median": step, "until_enqueued_ms_median": until, "rest_ms_median": rest,
                       "tokens_per_s": F.requests / (step / 1e3), "steps": len(times[way])}
        print(f"  {way:9} {step:8.3f} {until:18.3f} {rest:8.3f} {F.requests / (step / 1e3):9.1f}")
    first, second = ways
    ratio = result[first]["step_ms_median"] / result[second]["step_ms_median"]
    result[f"{first}_over_{second}"] = ratio
    print(f"  {first} / {second} step time: {ratio:.3f}")
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out + ".json", "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
