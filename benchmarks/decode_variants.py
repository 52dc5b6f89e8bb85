"""Decode steps under two settings, in alternating blocks in one process: async scheduling on and off, the step's
numpy inputs packed into one transfer against one transfer per array (one engine each time), or the LoRA math on
the reference against the dispatcher's choice (two engines).

decode_step.py's engine and flags (B requests over A rank-r adapters, all decoding); blocks of --steps steps
alternate between the two settings, so both see the same process, device and batch:
- `--compare async_scheduling` (engine/engine.py): queue step N+1 before reading step N's tokens, or not.
  Prints the median time between consecutive steps' returns (what a stream of steps runs at) per setting.
- `--compare host_inputs` (models/precompiled.py `pack_host_inputs`). Also prints the parts: until the program is
  enqueued (schedule, build, transfers, launch) and the rest (the device's step, tokens back, completion).
- `--compare lora_backend`: two engines with the same model, adapters and requests, one built and stepped with
  INFINILORA_LORA_BACKEND=reference, the other with --kernels_backend (default `auto`: the platform's choice,
  with the process's INFINILORA_GPU_KERNEL_MIN_ROWS / INFINILORA_GPU_RUN_ROWS; the backend is chosen when a
  program is traced, so each engine's blocks run under its own setting). Steps move +-0.3 ms between processes
  on the H200, more than the kernels' share of a host-bound step: this is the like-for-like comparison.

    python benchmarks/decode_variants.py --compare async_scheduling --model configs/models/qwen3-30b-a3b.json \\
        --num_layers 2 --requests 64 --adapters 32 --rank 32 --steps 16 --blocks 4 --out $OUT/async_scheduling
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import decode_step  # noqa: E402  (its flags and engine set-up)
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

F = flags.FLAGS
flags.DEFINE_enum("compare", "async_scheduling", ["async_scheduling", "host_inputs", "lora_backend"],
                  "the setting compared")
flags.DEFINE_integer("blocks", 4, "blocks of --steps steps per setting (alternating)")
flags.DEFINE_string("kernels_backend", "auto", "--compare lora_backend: the second engine's LoRA backend "
                    "(INFINILORA_LORA_BACKEND: auto, gpu, ...)")

# one engine, an attribute switched between blocks: (owner, attribute, value) per setting
SETTINGS = {
    "async_scheduling": {"async": ("engine", "async_scheduling", True), "sync": ("engine", "async_scheduling", False)},
    "host_inputs": {"packed": ("steps", "pack_host_inputs", True), "separate": ("steps", "pack_host_inputs", False)},
}
LORA_BACKEND_VAR = "INFINILORA_LORA_BACKEND"  # pallas_kernels.dispatch.ENV_VAR (not imported: jax set-up order)


def engine_settings() -> dict[str, dict[str, str]]:
    """One engine per setting, built and stepped under these environment variables."""
    return {"reference": {LORA_BACKEND_VAR: "reference"}, "kernels": {LORA_BACKEND_VAR: F.kernels_backend}}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """The process environment with `values` set, restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv):
    del argv
    room = 2 * F.blocks * F.steps + 8
    if F.compare in SETTINGS:
        ways = SETTINGS[F.compare]
        llm, prefill_s = decode_step.decoding_engine(True, room)
        llms = dict.fromkeys(ways, llm)
        owners = {"engine": llm.engine, "steps": llm.runner.steps}

        @contextlib.contextmanager
        def use(way):
            owner, attribute, value = ways[way]
            setattr(owners[owner], attribute, value)
            yield
    else:  # one engine per setting, each under its own environment
        ways = engine_settings()
        llms, prefill_s = {}, {}
        for way, env in ways.items():
            with environment(env):
                llms[way], prefill_s[way] = decode_step.decoding_engine(True, room)

        def use(way):
            return environment(ways[way])

    times = {w: [] for w in ways}
    enqueued = {w: [] for w in ways}
    for way in ways:  # each setting's programs are built and its pipeline filled before the timed blocks
        with use(way):
            t0 = time.perf_counter()
            for _ in range(3):
                llms[way].engine.step()
        print(f"  {way}: first steps (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(F.blocks):
        for way in ways:
            llm = llms[way]
            with use(way):
                llm.engine.step()  # the switch's step (it may complete the other setting's queued step): not timed
                last = time.perf_counter()
                for _ in range(F.steps):
                    llm.engine.step()
                    now = time.perf_counter()
                    times[way].append(now - last)
                    enqueued[way].append(llm.runner.last_enqueued_at - last)
                    last = now
    result = {"compare": F.compare,
              "config": {k: getattr(F, k) for k in ("model", "num_layers", "dtype", "requests", "adapters", "rank",
                                                     "prompt_len", "steps", "blocks", "kernels_backend")},
              "prefill_and_compile_s": prefill_s,
              "environment": {k: v for k, v in os.environ.items() if k.startswith("INFINILORA_")},
              "settings": {w: ways[w] if F.compare not in SETTINGS else list(ways[w]) for w in ways}}
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
